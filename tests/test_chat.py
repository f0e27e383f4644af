"""`python -m ivcr_jax.chat`: the session logic with scripted answers, and the real command
driven through a pseudo-terminal on a trained tiny run (model + retriever); the web demo on the
same run in headless Chromium."""

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from configs.interllava import get_config as llm_config
from configs.retriever import get_config as retriever_config
from ivcr_jax import experiment, train
from ivcr_jax.data.records import CHAT, MOMENT, RETRIEVAL
from ivcr_jax.evaluation.session import ChatSession
from ivcr_jax.retriever import training as retriever_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDEOS = [f"toy/v{i:04d}.mp4" for i in range(12)]


class ScriptedEvaluator:
  """Answers with the next scripted text and records the samples it was asked."""

  def __init__(self, texts):
    self.texts, self.samples = list(texts), []

  def answer(self, samples, desc="", progress=True):
    self.samples.extend(samples)
    return [(self.texts.pop(0), "prompt") for _ in samples]


class FixedRanker:
  def __init__(self):
    self.queries = []

  def top_k(self, queries, corpus, k):
    self.queries.extend(queries)
    return [VIDEOS[2:2 + k]], None


class Corpus:
  videos = VIDEOS


def test_session_turns_parse_answers_and_keep_the_history():
  ev = ScriptedEvaluator([
      "You want a video. The video 3 matches: a red circle moves up.",
      "In video 3, the red circle moves up during 2.5s-6.0s.",
      "背景是黑色。",
      "Another one. The video 12 is not a candidate.",
  ])
  ranker = FixedRanker()
  s = ChatSession(ev, ranker, Corpus(), video_root="/data/videos", max_turns=3)
  assert "No video is chosen" in s.handle("When does the red circle appear?").text
  assert ev.samples == []
  reply = s.handle("Find the video where a red circle moves up.")
  assert "[chosen: video 3 = toy/v0004.mp4 (/data/videos/toy/v0004.mp4)]" in reply.text
  assert ranker.queries == ["Find the video where a red circle moves up."]
  reply = s.handle("红色圆形什么时候出现？")
  assert "[moment: 2.5s-6.0s in video 3 (toy/v0004.mp4)]" in reply.text
  moment = ev.samples[-1].turns[-1]
  assert (moment.kind, moment.video_id, moment.video_index) == (MOMENT, "toy/v0004.mp4", 3)
  assert ev.samples[-1].turns[0].answer.startswith("You want a video. The video 3")
  s.handle("背景是什么颜色？")
  assert ev.samples[-1].turns[-1].kind == CHAT
  # A fourth turn: the oldest whole turn leaves the history (max_turns 3).
  reply = s.handle("Find another video where a blue square moves left.")
  assert [t.kind for t in ev.samples[-1].turns] == [MOMENT, CHAT, RETRIEVAL]
  assert "names no candidate" in reply.text and "[chosen: video 1 = toy/v0002.mp4" in reply.text
  assert "* video 1: toy/v0002.mp4" in s.handle("/candidates").text
  assert "video 4 = toy/v0005.mp4" in s.handle("/pick 4").text
  assert "Usage: /pick N" in s.handle("/pick 11").text
  assert "New topic" in s.handle("/new").text
  assert "No candidates yet" in s.handle("/candidates").text
  assert "Unknown command '/frobnicate'" in s.handle("/frobnicate").text
  assert "Please type a question" in s.handle("   ").text
  assert s.handle("/quit").quit


class Terminal:
  """A command on a pseudo-terminal: `expect` output patterns, `send` lines."""

  def __init__(self, cmd, **kwargs):
    master, slave = pty.openpty()
    self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                                 start_new_session=True, **kwargs)
    os.close(slave)
    self.fd, self.out, self.pos = master, "", 0

  def expect(self, pattern, timeout=120.0):
    deadline = time.monotonic() + timeout
    while (m := re.compile(pattern).search(self.out, self.pos)) is None:
      ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
      if not ready:
        raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n{self.out[-3000:]}")
      try:
        data = os.read(self.fd, 65536)
      except OSError:
        data = b""
      if not data:
        raise AssertionError(f"the command ended before {pattern!r}:\n{self.out[-3000:]}")
      self.out += data.decode("utf-8", "replace")
    self.pos = m.end()
    return m

  def send(self, line):
    os.write(self.fd, (line + "\n").encode())

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    os.close(self.fd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_toy_stores):
  """A 16-video toy corpus, a retriever and an InterLLaVA model trained a few steps on it."""
  root = tmp_path_factory.mktemp("chat")
  rcfg = retriever_config("tiny").copy_and_resolve_references()
  lcfg = llm_config("tiny").copy_and_resolve_references()
  with rcfg.unlocked():
    rcfg.data.toy_num_videos = 16
  stores = shared_toy_stores(rcfg)
  overrides = {"data.toy_num_videos": 16, "data.stores": stores}
  for cfg in (rcfg, lcfg):
    with cfg.unlocked():
      cfg.data.toy_num_videos, cfg.data.stores = 16, stores
  with rcfg.unlocked():
    rcfg.train.update(num_steps=10, log_every=5, eval_every=10, checkpoint_every=10)
  with lcfg.unlocked():
    lcfg.train.update(num_steps=2, batch_size=2, log_every=1, eval_every=0, checkpoint_every=2)
  store_dir, tok_dir = experiment.store_dirs(rcfg.data, rcfg.frame_size, str(root / "r"))
  retriever_training.train(rcfg, str(root / "r"), store_dir, tok_dir)
  train.train(lcfg, str(root / "m"))
  flags = [f"--{name}.{key}={value}" for name in ("config", "retriever_config")
           for key, value in overrides.items()]
  return root, flags


def test_chat_command_in_a_terminal(runs):
  root, flags = runs
  help_out = subprocess.run([sys.executable, "-m", "ivcr_jax.chat", "--help"], cwd=REPO,
                            capture_output=True, text=True).stdout  # absl exits 1 after help
  assert "/candidates" in help_out and "--retriever" in help_out
  term = Terminal([sys.executable, "-m", "ivcr_jax.chat", "--config=configs/interllava.py:tiny",
                   "--retriever_config=configs/retriever.py:tiny", *flags,
                   f"--workdir={root / 'm'}", f"--retriever={root / 'r'}"],
                  cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"})
  try:
    term.expect(r"you> ", timeout=300)
    term.send("")
    term.expect(r"Please type a question.*\n.*you> ")
    term.send("/frobnicate")
    term.expect(r"Unknown command '/frobnicate'(.|\n)*you> ")
    term.send("When does the red circle appear?")
    term.expect(r"No video is chosen yet(.|\n)*you> ")
    term.send("Find the video where a red circle moves up.")
    m = term.expect(r"\[chosen: video (\d+) = (toy/v\d{4}\.mp4) \((.+?)\)\]", timeout=300)
    assert 1 <= int(m.group(1)) <= 10 and os.path.isfile(m.group(3).strip())
    term.expect(r"\(\d+\.\d\d s\)\r?\n")
    warm = term.pos  # the first turn compiled the model's programs; later turns reuse them
    term.send("红色圆形什么时候出现？")
    term.expect(r"\[(moment: [\d.]+s-[\d.]+s in video \d+ \(toy/v\d{4}\.mp4\)"
                r"|the answer states no time span)\]", timeout=300)
    term.send("Find another video where a blue square moves left.")
    term.expect(r"\[chosen: video \d+ = toy/v\d{4}\.mp4")
    term.expect(r"\(\d+\.\d\d s\)\r?\n")
    assert "Compiling" not in term.out[warm:], term.out[warm:]
    term.send("/candidates")
    term.expect(r"\* video \d+: toy/v\d{4}\.mp4")
    term.send("/new")
    term.expect(r"New topic")
    term.send("When does it start?")
    term.expect(r"No video is chosen yet")
    term.send("/quit")
    term.expect(r"Bye\.")
    assert term.proc.wait(timeout=60) == 0
  finally:
    term.close()


def _chromium():
  return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
               if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (.ci/run installs it)")
def test_web_demo_in_a_headless_browser(runs, tmp_path):
  root, flags = runs
  log_path = tmp_path / "server.log"
  with open(log_path, "w") as log:  # a file, not a pipe: nobody has to drain the server's logs
    server = subprocess.Popen(
        [sys.executable, "-m", "ivcr_jax.web_demo", "--config=configs/interllava.py:tiny",
         "--retriever_config=configs/retriever.py:tiny", *flags, "--port=0",
         f"--workdir={root / 'm'}", f"--retriever={root / 'r'}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=log,
        stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not (m := re.search(r"serving on (http://127\.0\.0\.1:\d+/)", log_path.read_text())):
      assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
      time.sleep(1)
    url = m.group(1)

    def post(text):
      req = urllib.request.Request(url + "api/message", json.dumps({"text": text}).encode())
      with urllib.request.urlopen(req, timeout=300) as res:
        return json.loads(res.read())

    warm = post("Find the video where a red circle moves up.")  # compiles before the browser
    assert warm["video"] == warm["candidates"][warm["chosen"] - 1] and len(warm["candidates"]) == 10
    assert post("")["reply"].startswith("Please type a question")
    assert "New topic" in post("/new")["reply"] and post("/candidates")["candidates"] == []
    with pytest.raises(urllib.error.HTTPError, match="404"):
      urllib.request.urlopen(url + "video/..%2F..%2Fprep_report.json", timeout=30)
    page = url + "?q=" + urllib.parse.quote("Find the video where a blue square moves left.")
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--window-size=1280,800", "--virtual-time-budget=20000"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True,
                         timeout=180).stdout
    chosen = re.search(r'<li class="chosen">(toy/v\d{4}\.mp4)</li>', dom)
    assert chosen, dom[-2000:]
    assert f'src="/video/{chosen.group(1)}"' in dom and '<div class="bot">' in dom
    shot = os.path.join(os.environ.get("IVCR_TEST_ARTIFACTS", str(tmp_path)), "web_demo.png")
    subprocess.run([*browser, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    with open(shot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  finally:
    server.kill()
    server.wait()
