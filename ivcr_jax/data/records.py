"""IVCR-200K annotation records: read, validate, and turn into training samples.

The official pipeline (reference §2.1, §4) trusts its JSON: a malformed record surfaces as a
crash deep inside training (`None - 1`, `split('.')[1]`), or silently as a wrong label
(`<VID> None </VID>`, B20) or an over-long context (B12). Here every record is checked up
front; a bad one is reported with its index and `text_id`, counted by reason and skipped, and
`ReadReport.summary()` says what was dropped.

Turn kinds: `retrieval` (`gt_se == [-1, -1]`, ten candidates, the answer names the ground
truth's rank as "video N"), `moment` (`gt_se = [start_s, end_s]`, the answer states the span
"Xs-Ys") and `chat`, a natural-dialogue turn (`gt_se` and `video_id` null, no video): an
extension of the official schema, which has no such turns (see `ivcr_jax.data.toy_corpus`).

Sample modes (`make_samples`):
- `dialogue`: one sequence per dialogue, every assistant answer supervised (ours, SPEC §4.2);
- `prefix`: the official one sample per turn prefix [1..k], only answer k supervised. The
  official conversion keeps prefixes of <= 10 turns and its dataset then keeps those of <= 7
  turns; together that is "the first 7 turns of every dialogue", which is what the reader's
  `max_turns=7` with `long_dialogues="truncate"` leaves, so both modes supervise the same turns.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ivcr_jax.data.answers import parse_span, parse_video_index
from ivcr_jax.jsonfile import read_json

log = logging.getLogger(__name__)

# Turn kinds. The evaluation metrics call retrieval turns "video" (video-retrieval accuracy).
RETRIEVAL, MOMENT, CHAT = "retrieval", "moment", "chat"
# Answers and timestamps are rounded to 0.1 s, so a span may end up to 0.05 s past the video.
_ROUNDING_SLACK_S = 0.051


@dataclasses.dataclass(frozen=True)
class Turn:
  """One user question and its assistant answer."""

  kind: str  # RETRIEVAL | MOMENT | CHAT
  question: str  # stripped, as the official conversion does
  answer: str  # stripped
  text_id: int | str
  video_id: str | None  # the ground-truth video (None for chat)
  candidates: tuple[str, ...]  # retriever order; () when absent
  gt_span: tuple[float, float] | None  # moment turns: gt_se
  # Retrieval: the 1-based rank of the ground truth among the candidates (the answer says it).
  # Moment: the k of "Current video : <VID> k </VID>" (None renders "None", as official B20).
  video_index: int | None

  @property
  def videos(self) -> tuple[str, ...]:
    """The videos this turn's prompt shows, in placeholder order."""
    if self.kind == RETRIEVAL:
      return self.candidates
    if self.kind == MOMENT:
      return (self.video_id,)
    return ()


@dataclasses.dataclass(frozen=True)
class Dialogue:
  index: int  # position of the record in the annotation file
  split: str
  type: int
  turns: tuple[Turn, ...]

  @property
  def name(self) -> str:
    return f"record {self.index} (text_id {self.turns[0].text_id!r})"


@dataclasses.dataclass(frozen=True)
class RecordOptions:
  """How strictly records are read; `from_config` takes them from the `data` config section."""

  num_candidates: int = 10
  max_turns: int = 7  # official: prefixes of <= 7 turns are used
  long_dialogues: str = "truncate"  # "truncate" (official: turns > max_turns never used) | "skip"
  # k of "Current video : <VID> k </VID>" when a moment answer has no "video N":
  # "candidates" (rank of video_id among the turn's candidates) or "none" (official B20).
  moment_index_fallback: str = "candidates"
  span_tolerance_s: float = 1.0  # max |answer span - gt_se| per end
  allow_chat: bool = True
  splits: tuple[str, ...] | None = None  # keep only these splits (None: all)

  def __post_init__(self):
    if self.long_dialogues not in ("truncate", "skip"):
      raise ValueError(f"long_dialogues must be 'truncate' or 'skip', got {self.long_dialogues!r}")
    if self.moment_index_fallback not in ("candidates", "none"):
      raise ValueError("moment_index_fallback must be 'candidates' or 'none', "
                       f"got {self.moment_index_fallback!r}")
    if self.max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")

  @classmethod
  def from_config(cls, data_cfg: Any, splits: Sequence[str] | None = None) -> RecordOptions:
    return cls(num_candidates=data_cfg.num_candidates, max_turns=data_cfg.max_turns,
               long_dialogues=data_cfg.long_dialogues,
               moment_index_fallback=data_cfg.moment_index_fallback,
               span_tolerance_s=data_cfg.span_tolerance_s, allow_chat=data_cfg.chat_turns,
               splits=None if splits is None else tuple(splits))


class RecordError(ValueError):
  """A record that cannot be used; `reason` is the counter key, the message names the record."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class ReadReport:
  """What reading an annotation file kept, skipped (by reason) and adjusted."""

  total: int = 0
  kept: int = 0
  other_split: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    parts = [f"{self.total} records: {self.kept} kept, {sum(self.skipped.values())} skipped"]
    if self.other_split:
      parts.append(f"{self.other_split} in other splits")
    text = ", ".join(parts)
    if self.skipped:
      text += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
    if self.notes:
      text += "; notes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items()))
    return text


class PathChecker:
  """Refuses video paths that are absolute, climb out of the video root, or (optionally) are
  missing; symlinks are resolved, so a link pointing outside the root is refused too."""

  def __init__(self, video_root: str | None, check_files: bool = False):
    self.root = None if video_root is None else os.path.realpath(video_root)
    self.check_files = check_files and video_root is not None

  def __call__(self, path: str, where: str) -> None:
    if "\0" in path or not path.strip():
      raise RecordError("unsafe_path", f"{where}: invalid video path {path!r}")
    norm = os.path.normpath(path)
    if os.path.isabs(path) or norm == ".." or norm.startswith(".." + os.sep):
      raise RecordError("unsafe_path", f"{where}: video path {path!r} escapes the video root")
    if self.root is None:
      return
    full = os.path.realpath(os.path.join(self.root, path))
    if os.path.commonpath([full, self.root]) != self.root:
      raise RecordError("unsafe_path", f"{where}: video path {path!r} resolves outside the "
                        f"video root {self.root}")
    if self.check_files and not os.path.isfile(full):
      raise RecordError("missing_video", f"{where}: video {path!r} not found under {self.root}")


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _field(d: Mapping, key: str, types: type | tuple[type, ...], where: str) -> Any:
  if key not in d:
    raise RecordError("missing_field", f"{where}: missing field {key!r}")
  value = d[key]
  if not isinstance(value, types) or isinstance(value, bool):
    raise RecordError("wrong_type", f"{where}: field {key!r} has type {type(value).__name__}")
  return value


def parse_record(raw: Any, index: int, opts: RecordOptions,
                 check_path: PathChecker | None = None,
                 durations: Mapping[str, float] | None = None) -> Dialogue:
  """Validates one annotation record; raises `RecordError` naming it when it cannot be used.

  Args:
    durations: seconds per relative video path; with it, spans must lie inside the video.
  """
  check_path = check_path or PathChecker(None)
  where = f"record {index}"
  if not isinstance(raw, Mapping):
    raise RecordError("wrong_type", f"{where}: a record must be an object, got "
                      f"{type(raw).__name__}")
  convs = raw.get("conversations")
  if isinstance(convs, list) and convs and isinstance(convs[0], Mapping):
    where = f"record {index} (text_id {convs[0].get('text_id')!r})"
  split = _field(raw, "split", str, where)
  rtype = _field(raw, "type", list, where)
  if len(rtype) != 1 or not isinstance(rtype[0], int) or isinstance(rtype[0], bool):
    raise RecordError("wrong_type", f"{where}: 'type' must be a one-element int list, got {rtype}")
  if rtype[0] == 0:
    raise RecordError("type0", f"{where}: type [0] is excluded (as in the official conversion)")
  convs = _field(raw, "conversations", list, where)
  if not convs or len(convs) % 2:
    raise RecordError("bad_conversation", f"{where}: {len(convs)} conversation entries; need "
                      "human/gpt pairs")
  turns = []
  for k in range(0, len(convs), 2):
    turns.append(_parse_turn(convs[k], convs[k + 1], f"{where} turn {k // 2 + 1}", opts,
                             check_path, durations))
  return Dialogue(index=index, split=split, type=rtype[0], turns=tuple(turns))


def _parse_turn(human: Any, gpt: Any, where: str, opts: RecordOptions, check_path: PathChecker,
                durations: Mapping[str, float] | None) -> Turn:
  """One question/answer pair; `gt_se` says the kind: null a chat turn, [-1, -1] a retrieval
  turn, a span a moment turn."""
  for entry, role in ((human, "human"), (gpt, "gpt")):
    if not isinstance(entry, Mapping) or entry.get("from") != role:
      got = entry.get("from") if isinstance(entry, Mapping) else type(entry).__name__
      raise RecordError("bad_conversation", f"{where}: expected a {role!r} entry, got {got!r}")
  text_id = _field(human, "text_id", (int, str), where)
  where = f"{where} (text_id {text_id!r})"
  question = _field(human, "value", str, where).strip()
  answer = _field(gpt, "value", str, where).strip()
  if not question or not answer:
    raise RecordError("missing_field", f"{where}: empty question or answer")
  if "gt_se" not in gpt:
    raise RecordError("missing_field", f"{where}: missing field 'gt_se'")
  gt_se = gpt["gt_se"]

  if gt_se is None:
    if not opts.allow_chat:
      raise RecordError("chat_turn", f"{where}: natural-dialogue turn (gt_se null) not allowed")
    if gpt.get("video_id") is not None:
      raise RecordError("wrong_type", f"{where}: a chat turn (gt_se null) must not name a video")
    return Turn(CHAT, question, answer, text_id, None, (), None, None)

  if not (isinstance(gt_se, list) and len(gt_se) == 2 and all(_is_number(x) for x in gt_se)):
    raise RecordError("wrong_type", f"{where}: 'gt_se' must be two numbers, got {gt_se!r}")
  video_id = _field(gpt, "video_id", str, where)
  check_path(video_id, where)
  candidates: tuple[str, ...] = ()
  if "candidate_videos" in gpt or list(gt_se) == [-1, -1]:
    raw_c = _field(gpt, "candidate_videos", list, where)
    if not all(isinstance(c, str) for c in raw_c):
      raise RecordError("wrong_type", f"{where}: 'candidate_videos' must hold path strings")
    candidates = tuple(raw_c)

  if list(gt_se) == [-1, -1]:
    return _retrieval_turn(question, answer, text_id, video_id, candidates, where, opts,
                           check_path, durations)
  return _moment_turn(question, answer, text_id, video_id, candidates, gt_se, where, opts,
                      durations)


def _retrieval_turn(question: str, answer: str, text_id: int | str, video_id: str,
                    candidates: tuple[str, ...], where: str, opts: RecordOptions,
                    check_path: PathChecker, durations: Mapping[str, float] | None) -> Turn:
  """A retrieval turn, once its answer is checked against the ground truth's rank among the
  candidates."""
  if len(candidates) != opts.num_candidates or len(set(candidates)) != len(candidates):
    raise RecordError("bad_candidates", f"{where}: need {opts.num_candidates} distinct "
                      f"candidate videos, got {len(candidates)} "
                      f"({len(set(candidates))} distinct)")
  for c in candidates:
    check_path(c, where)
    if durations is not None and c not in durations:
      raise RecordError("missing_video", f"{where}: candidate video {c!r} is not available "
                        "(no duration known: missing or undecodable)")
  if video_id not in candidates:
    raise RecordError("gt_not_in_candidates", f"{where}: ground-truth video {video_id!r} is "
                      "not among the candidates (retriever miss)")
  rank = candidates.index(video_id) + 1
  said = parse_video_index(answer)
  if said is None:
    raise RecordError("no_video_index", f"{where}: retrieval answer has no parsable "
                      f"'video N': {answer[:80]!r}")
  if said != rank:
    raise RecordError("index_mismatch", f"{where}: answer says video {said} but the ground "
                      f"truth is candidate {rank}")
  return Turn(RETRIEVAL, question, answer, text_id, video_id, candidates, None, rank)


def _moment_turn(question: str, answer: str, text_id: int | str, video_id: str,
                 candidates: tuple[str, ...], gt_se: list, where: str, opts: RecordOptions,
                 durations: Mapping[str, float] | None) -> Turn:
  """A moment turn, once its answer's span is checked against `gt_se` and the video's length."""
  start, end = float(gt_se[0]), float(gt_se[1])
  if not 0 <= start < end:
    raise RecordError("bad_span", f"{where}: gt_se {gt_se} is not a span 0 <= start < end")
  said_span = parse_span(answer)
  if said_span is None:
    raise RecordError("no_span", f"{where}: moment answer has no parsable 'Xs-Ys' span: "
                      f"{answer[:80]!r}")
  if said_span[0] >= said_span[1]:
    raise RecordError("bad_span", f"{where}: answer span {said_span} is empty or reversed")
  if max(abs(said_span[0] - start), abs(said_span[1] - end)) > opts.span_tolerance_s:
    raise RecordError("span_mismatch", f"{where}: answer span {said_span[0]}s-{said_span[1]}s "
                      f"differs from gt_se {gt_se}")
  if durations is not None:
    if video_id not in durations:
      raise RecordError("missing_video", f"{where}: video {video_id!r} is not available (no "
                        "duration known: missing or undecodable)")
    limit = durations[video_id] + _ROUNDING_SLACK_S
    if max(end, said_span[1]) > limit:
      raise RecordError("span_outside_video", f"{where}: span ends at "
                        f"{max(end, said_span[1])}s, after the end of {video_id!r} "
                        f"({durations[video_id]:.2f}s)")
  index = parse_video_index(answer)
  if index is None and opts.moment_index_fallback == "candidates" and video_id in candidates:
    index = candidates.index(video_id) + 1
  return Turn(MOMENT, question, answer, text_id, video_id, candidates, (start, end), index)


def read_annotations(source: str | Iterable[Any], opts: RecordOptions = RecordOptions(), *,
                     video_root: str | None = None, check_files: bool = False,
                     durations: Mapping[str, float] | None = None,
                     ) -> tuple[list[Dialogue], ReadReport]:
  """Reads an IVCR-200K annotation file (or its parsed list), keeping the valid dialogues.

  Args:
    source: path of the JSON file, or the list of records.
    video_root: directory the video paths are relative to; paths resolving outside it are bad.
    check_files: also require every referenced video file to exist.
    durations: seconds per relative video path; with it, spans must lie inside their video and
      every referenced video must be listed (the decodable ones).
  Returns:
    The kept dialogues (over-long ones truncated or skipped per `opts`) and the report; every
    problem is also logged as a warning, and the summary at INFO level.
  """
  if isinstance(source, str):
    source = read_json(source)
  if not isinstance(source, list):
    raise ValueError(f"an IVCR annotation file holds a list of records, got "
                     f"{type(source).__name__}")
  checker = PathChecker(video_root, check_files)
  report = ReadReport()
  dialogues = []
  for index, raw in enumerate(source):
    report.total += 1
    if opts.splits is not None and isinstance(raw, Mapping) and raw.get("split") not in opts.splits:
      report.other_split += 1
      continue
    try:
      d = parse_record(raw, index, opts, checker, durations)
      if len(d.turns) > opts.max_turns:
        if opts.long_dialogues == "skip":
          raise RecordError("too_long", f"{d.name}: {len(d.turns)} turns, more than max_turns "
                            f"{opts.max_turns}")
        _note(report, "truncated", f"{d.name}: {len(d.turns)} turns truncated to "
              f"{opts.max_turns}")
        d = dataclasses.replace(d, turns=d.turns[:opts.max_turns])
    except RecordError as e:
      report.skipped[e.reason] += 1
      report.messages.append(f"skipped {e}")
      log.warning("skipped %s", e)
      continue
    for t in d.turns:
      if t.kind == MOMENT and t.video_index is None:
        _note(report, "moment_without_index", f"{d.name}: moment turn text_id {t.text_id!r} has "
              "no video index; the prompt says '<VID> None </VID>' (official B20)")
    report.kept += 1
    dialogues.append(d)
  log.info("%s", report.summary())
  return dialogues, report


def _note(report: ReadReport, key: str, message: str) -> None:
  report.notes[key] += 1
  report.messages.append(message)
  log.info("%s", message)


@dataclasses.dataclass(frozen=True)
class Sample:
  """A training/evaluation unit: the first `num_turns` turns of a dialogue, some supervised."""

  dialogue: Dialogue
  num_turns: int
  supervised: tuple[int, ...]  # turn indices whose answers carry labels

  @property
  def turns(self) -> tuple[Turn, ...]:
    return self.dialogue.turns[:self.num_turns]


def make_samples(dialogues: Iterable[Dialogue], mode: str = "dialogue") -> list[Sample]:
  """`dialogue`: one sample per dialogue, all answers supervised; `prefix`: official, one
  sample per turn prefix with only its last answer supervised."""
  samples = []
  for d in dialogues:
    n = len(d.turns)
    if mode == "dialogue":
      samples.append(Sample(d, n, tuple(range(n))))
    elif mode == "prefix":
      samples.extend(Sample(d, k, (k - 1,)) for k in range(1, n + 1))
    else:
      raise ValueError(f"sample mode must be 'dialogue' or 'prefix', got {mode!r}")
  return samples
