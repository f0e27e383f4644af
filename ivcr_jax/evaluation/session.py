"""An interactive retrieval session: the state and turn logic behind `python -m ivcr_jax.chat`.

Each user message becomes a turn of the training schema and goes through the same prompt
renderer, video splicing and KV-cache generator as evaluation (`Evaluator`, batch 1; its
programs are compiled once per shape bucket, so warm turns do not recompile):
- a new query (or any message while no video is chosen) is a retrieval turn: the retriever
  ranks the whole corpus, its top-10 become the turn's candidates, and the model answers with
  "video N" and its explanation;
- a question about time ("when", "moment", "什么时候", ...) is a moment turn on the chosen video;
- anything else is a natural-dialogue turn.
The history holds the model's own answers (as the interactive evaluation does) in the official
format, truncated by whole turns to the `max_turns` the model was trained with (the encoder drops
more of the oldest turns if the context is still too long). Answers are read by the one parser
(`ivcr_jax.data.answers`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping

from ivcr_jax.data import answers
from ivcr_jax.data.records import CHAT, MOMENT, RETRIEVAL, Dialogue, Sample, Turn
from ivcr_jax.evaluation.evaluator import Evaluator
from ivcr_jax.retriever.ranking import CorpusIndex, Ranker

COMMANDS = {
    "/new": "start a new topic (forget the dialogue, the candidates and the chosen video)",
    "/candidates": "show the ten candidates of the last retrieval",
    "/pick N": "talk about candidate N from now on",
    "/help": "this list",
    "/quit": "leave (also /exit or Ctrl-D)",
}
_MOMENT = re.compile(r"(?i)\b(when|what time|moment|timestamp|how long|which part|at what)\b"
                     r"|什么时候|何时|片段|时刻|几秒|哪一段")
_RETRIEVAL = re.compile(r"(?i)\b(find|search|looking for|show me|another video|a video|"
                        r"the video where|the clip where)\b|找|视频")


def help_text() -> str:
  return "Commands:\n" + "\n".join(f"  {c:<12} {what}" for c, what in COMMANDS.items())


@dataclasses.dataclass
class Reply:
  text: str
  quit: bool = False
  seconds: float = 0.0  # model time of the turn (0: no model call)
  span: tuple[float, float] | None = None  # the moment a moment turn's answer states


class ChatSession:
  """One user's dialogue with the model (module docstring)."""

  def __init__(self, evaluator: Evaluator, ranker: Ranker, corpus: CorpusIndex, *,
               video_root: str = "", num_candidates: int = 10, max_turns: int = 7,
               durations: Mapping[str, float] | None = None):
    """`durations`: seconds per video (shown by the web demo's timeline)."""
    self.evaluator, self.ranker, self.corpus = evaluator, ranker, corpus
    self.durations = dict(durations or {})
    self.video_root, self.k, self.max_turns = video_root, num_candidates, max_turns
    self.new_topic()
    self._text_id = 0

  def new_topic(self) -> None:
    self.history: list[Turn] = []
    self.candidates: tuple[str, ...] = ()
    self.chosen: int | None = None  # 1-based index into `candidates`

  def handle(self, line: str) -> Reply:
    """The reply to one line of user input."""
    line = line.strip()
    if not line:
      return Reply("Please type a question, or a command (/help lists them).")
    if line.startswith("/"):
      return self._command(line)
    if _MOMENT.search(line) and not _new_video_request(line):
      if self.chosen is None:
        return Reply("No video is chosen yet, so there is no moment to look for: first ask for "
                     "a video (e.g. \"Find the video where a red circle moves up\").")
      return self._turn(MOMENT, line)
    if self.chosen is None or _RETRIEVAL.search(line):
      return self._turn(RETRIEVAL, line)
    return self._turn(CHAT, line)

  def _command(self, line: str) -> Reply:
    name, _, arg = line.partition(" ")
    name = name.lower()
    if name in ("/quit", "/exit"):
      return Reply("Bye.", quit=True)
    if name == "/help":
      return Reply(help_text())
    if name == "/new":
      self.new_topic()
      return Reply("New topic: the dialogue, the candidates and the chosen video are cleared.")
    if name == "/candidates":
      if not self.candidates:
        return Reply("No candidates yet: ask for a video first.")
      return Reply("\n".join(
          f"{'*' if i == self.chosen else ' '} video {i}: {v}"
          for i, v in enumerate(self.candidates, 1)))
    if name == "/pick":
      if not self.candidates:
        return Reply("No candidates yet: ask for a video first.")
      if not arg.strip().isdigit() or not 1 <= int(arg) <= len(self.candidates):
        return Reply(f"Usage: /pick N with N from 1 to {len(self.candidates)}.")
      self.chosen = int(arg)
      return Reply(self._video_line())
    return Reply(f"Unknown command {name!r}. " + help_text())

  def _video_line(self) -> str:
    video = self.candidates[self.chosen - 1]
    return (f"[chosen: video {self.chosen} = {video} "
            f"({os.path.join(self.video_root, video)})]")

  def _turn(self, kind: str, question: str) -> Reply:
    start = time.perf_counter()
    notes, span = [], None
    if kind == RETRIEVAL:
      found, _ = self.ranker.top_k([question], self.corpus, self.k)
      self.candidates, self.chosen = tuple(found[0]), None
      notes.append(f"[retrieved {self.k} candidates from {len(self.corpus.videos)} videos; "
                   "/candidates lists them]")
    self._text_id += 1
    video = self.candidates[self.chosen - 1] if kind == MOMENT else None
    turn = Turn(kind, question, "", self._text_id, video,
                self.candidates if kind != CHAT else (), None,
                self.chosen if kind == MOMENT else None)
    turns = (*self.history[-(self.max_turns - 1):], turn) if self.max_turns > 1 else (turn,)
    sample = Sample(Dialogue(0, "chat", 1, turns), len(turns), ())
    (text, _), = self.evaluator.answer([sample], progress=False)
    self.history = [*turns[:-1], dataclasses.replace(turn, answer=text)]
    if kind == RETRIEVAL:
      k = answers.predicted_index(text)
      if k is not None and 1 <= k <= len(self.candidates):
        self.chosen = k
      else:
        self.chosen = 1
        notes.append("[the answer names no candidate: the retriever's top-1 is taken]")
      notes.append(self._video_line())
    elif kind == MOMENT:
      span = answers.predicted_span(text)
      notes.append(f"[moment: {span[0]}s-{span[1]}s in video {self.chosen} ({video})]"
                   if span else "[the answer states no time span]")
    seconds = time.perf_counter() - start
    return Reply("\n".join([text or "(empty answer)", *notes]), seconds=seconds, span=span)


def _new_video_request(line: str) -> bool:
  """A request for a new video that mentions time words in its description ("find another video
  where ...")."""
  return bool(re.search(r"(?i)\b(another video|a new video|other video)\b|另一个视频", line))


def run_repl(session: ChatSession, read=input, write=print) -> None:
  """Reads lines until /quit or end of input, printing each reply and its model time."""
  write("Ask for a video, then about moments in it. " + help_text())
  while True:
    try:
      line = read("you> ")
    except EOFError:
      write("Bye.")
      return
    reply = session.handle(line)
    write(reply.text)
    if reply.seconds:
      write(f"({reply.seconds:.2f} s)")
    if reply.quit:
      return
