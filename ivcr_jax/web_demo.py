"""A web page to talk to a trained run: the chat, the ten candidates, and the chosen video playing
from the grounded moment, with the moment drawn on a timeline.

  python -m ivcr_jax.web_demo --config=configs/interllava.py:demo --workdir=DIR --retriever=RDIR \\
      [--retriever_config=configs/retriever.py:demo] [--host=127.0.0.1] [--port=7860]

then open http://127.0.0.1:7860 (add `?q=your question` to ask at once). The session is the
terminal chat's (`python -m ivcr_jax.chat --help` explains the commands, which work here too);
the server is Python's standard library (no extra package), one session per server, one model
call at a time. It listens on 127.0.0.1 unless --host says otherwise, and serves only video files
under the stores' video root.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.parse

from absl import app, flags, logging

from ivcr_jax import chat
from ivcr_jax.data.records import PathChecker, RecordError
from ivcr_jax.evaluation.session import ChatSession, help_text

# --config, --retriever_config, --workdir, --retriever and --step are the chat's (`chat.py`).
flags.adopt_module_key_flags(chat)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ivcr_jax demo</title>
<style>
body { font-family: sans-serif; margin: 16px; display: grid; gap: 16px;
       grid-template-columns: 1fr 1fr; }
#log { height: 420px; overflow-y: auto; border: 1px solid #ccc; padding: 8px;
       white-space: pre-wrap; }
.you { color: #1a4d8f; } .bot { color: #222; margin-bottom: 8px; }
#cands li.chosen { font-weight: bold; }
#timeline { position: relative; height: 14px; background: #ddd; margin-top: 6px; }
#span { position: absolute; top: 0; height: 14px; background: #e0502a; }
video { width: 100%; background: #000; }
</style></head><body>
<div><h3>Chat</h3><div id="log"></div>
<form id="form"><input id="q" size="60" placeholder="Find the video where a red circle moves up">
<button>Send</button> <button type="button" id="new">New topic</button></form></div>
<div><h3>Video <span id="vname"></span></h3><video id="video" controls muted></video>
<div id="timeline"><div id="span"></div></div><div id="spantext"></div>
<h3>Candidates</h3><ol id="cands"></ol></div>
<script>
const log = document.getElementById("log");
function add(cls, text) {
  const d = document.createElement("div"); d.className = cls; d.textContent = text;
  log.appendChild(d); log.scrollTop = log.scrollHeight;
}
function show(r) {
  const c = document.getElementById("cands"); c.innerHTML = "";
  r.candidates.forEach((v, i) => {
    const li = document.createElement("li"); li.textContent = v;
    if (i + 1 === r.chosen) li.className = "chosen";
    c.appendChild(li);
  });
  const video = document.getElementById("video"), bar = document.getElementById("span");
  if (r.video) {
    document.getElementById("vname").textContent = r.video;
    const src = "/video/" + encodeURI(r.video);
    if (!video.src.endsWith(src)) video.src = src;
  }
  if (r.span && r.duration) {
    bar.style.left = (100 * r.span[0] / r.duration) + "%";
    bar.style.width = (100 * (r.span[1] - r.span[0]) / r.duration) + "%";
    document.getElementById("spantext").textContent =
        "moment " + r.span[0] + "s-" + r.span[1] + "s of " + r.duration.toFixed(1) + "s";
    video.currentTime = r.span[0];
  } else { bar.style.width = "0"; document.getElementById("spantext").textContent = ""; }
}
async function send(text) {
  add("you", "you: " + text);
  const res = await fetch("/api/message", {method: "POST", body: JSON.stringify({text})});
  const r = await res.json();
  add("bot", r.reply);
  show(r);
}
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault(); const q = document.getElementById("q");
  if (q.value) { send(q.value); q.value = ""; }
};
document.getElementById("new").onclick = () => send("/new");
const q = new URLSearchParams(location.search).get("q");
if (q) send(q);
</script></body></html>
"""


def make_handler(session: ChatSession):
  """A request handler class bound to `session` (model calls serialised by a lock)."""
  lock = threading.Lock()
  check = PathChecker(session.video_root, check_files=True)

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
      logging.info("web: " + fmt, *args)

    def _send(self, code: int, body: bytes, kind: str, extra: dict | None = None) -> None:
      self.send_response(code)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      for k, v in (extra or {}).items():
        self.send_header(k, v)
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):
      path = urllib.parse.urlparse(self.path).path
      if path == "/":
        return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
      if path.startswith("/video/"):
        return self._video(urllib.parse.unquote(path[len("/video/"):]))
      return self._send(404, b"not found", "text/plain")

    def _video(self, video: str) -> None:
      try:
        check(video, "web request")
      except RecordError as e:
        return self._send(404, str(e).encode(), "text/plain")
      with open(os.path.join(session.video_root, video), "rb") as f:
        data = f.read()
      start, end = 0, len(data) - 1
      rng = self.headers.get("Range", "")
      if rng.startswith("bytes="):  # browsers seek in mp4 with range requests
        a, _, b = rng[6:].partition("-")
        start, end = int(a or 0), min(int(b) if b else end, end)
        return self._send(206, data[start:end + 1], "video/mp4", {
            "Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"})
      return self._send(200, data, "video/mp4", {"Accept-Ranges": "bytes"})

    def do_POST(self):
      if self.path != "/api/message":
        return self._send(404, b"not found", "text/plain")
      try:
        text = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))["text"]
      except (ValueError, KeyError, TypeError):
        return self._send(400, b'expected {"text": ...}', "text/plain")
      with lock:
        reply = session.handle(str(text))
        if reply.quit:  # the page stays up: a quit just starts over
          session.new_topic()
        video = session.candidates[session.chosen - 1] if session.chosen else None
        body = {"reply": reply.text, "seconds": reply.seconds, "span": reply.span,
                "candidates": list(session.candidates), "chosen": session.chosen,
                "video": video, "duration": session.durations.get(video)}
      self._send(200, json.dumps(body, ensure_ascii=False).encode(),
                 "application/json; charset=utf-8")

  return Handler


def main(argv: list[str]) -> None:
  session = chat.open_session(argv)
  server = http.server.ThreadingHTTPServer((_HOST.value, _PORT.value), make_handler(session))
  print(f"serving on http://{_HOST.value}:{server.server_port}/ (Ctrl-C stops)\n{help_text()}",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
