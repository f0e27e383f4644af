"""Prompts as the official model sees them, tokenised with labels and answer-digit positions.

One renderer serves training, evaluation (prompt ending at " [/INST]") and chat:
- user contents are the official strings (reference §2.1-2.2): "Candidate videos : <VID> 1 </VID>
  <VIDEO> <VIDEOTOKEN> </VIDEO>,...,<VID> 10 </VID> ... </VIDEO>." + question for retrieval
  turns; "Current video : <VID> k </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains T
  frames sampled at t1, ..., tT seconds." + question for moment turns; the question alone for
  chat turns (an extension);
- the Llama-2 chat template (§2.3), `render_llama2`, equal to `tokenizer.apply_chat_template`
  with the Hugging Face Llama-2-chat template;
- labels on the supervised answers and their EOS (" {answer} </s>", like the official
  `get_label`), IGNORE_INDEX elsewhere;
- for every supervised retrieval answer the token positions of the digits of N in "video N",
  and for every moment answer those of the span's start and end with their place values
  (1e1, 1e0, 1e-1, ...), so that a differentiable loss can read the digit distributions there.

Positions index the token sequence before the `<VIDEOTOKEN>` placeholders are expanded into
video embeddings; the logits that predict the token at position p sit at p - 1.

The Q-Former's per-frame timestamp text (§1.2) is built here too, with quirk B1 (LLaMA ids used
as BERT ids) chosen by which tokenizer is passed, and B2 (the last frame's "seconds second.") by
a flag.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ivcr_jax.data.answers import NumberText, find_span, find_video_index, format_seconds
from ivcr_jax.data.records import MOMENT, RETRIEVAL, RecordError, Sample, Turn
from ivcr_jax.data.tokenizer import VIDEO_PLACEHOLDER, placeholder_id

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are an excellent video retrieval AI assistant."
IGNORE_INDEX = -100
VIDEO_ENTRY = "<VID> {} </VID> <VIDEO> " + VIDEO_PLACEHOLDER + " </VIDEO>"


def candidates_content(question: str, num_candidates: int = 10) -> str:
  """User content of a retrieval turn (official conversion notebook)."""
  entries = ",".join(VIDEO_ENTRY.format(i + 1) for i in range(num_candidates))
  return ("Candidate videos : " + entries + "." + question.strip()).strip()


def frame_times_message(frame_times: Sequence[float]) -> str:
  """`load_video`'s message: no final period (the `.` after it comes from the question part)."""
  secs = ", ".join(format_seconds(t) for t in frame_times)
  return f"The video contains {len(frame_times)} frames sampled at {secs} seconds"


def moment_content(question: str, video_index: int | None,
                   frame_times: Sequence[float]) -> str:
  """User content of a moment turn, with the frame-time sentence inserted as `__getitem__` does.

  `video_index` None renders "None" (official B20). The official code splits at every
  "</VIDEO>" and fails on a question containing one; this splits at the first.
  """
  content = (f"Current video : <VID> {video_index} </VID> <VIDEO> {VIDEO_PLACEHOLDER} "
             f"</VIDEO>." + question.strip()).strip()
  part1, part2 = content.split("</VIDEO>", 1)
  return part1 + "</VIDEO>. " + frame_times_message(frame_times).strip() + part2


def user_content(turn: Turn, frame_times: Sequence[float] | None,
                 num_candidates: int = 10) -> str:
  if turn.kind == RETRIEVAL:
    return candidates_content(turn.question, num_candidates)
  if turn.kind == MOMENT:
    if frame_times is None:
      raise ValueError(f"moment turn text_id {turn.text_id!r} needs its video's frame times")
    return moment_content(turn.question, turn.video_index, frame_times)
  return turn.question


def chat_messages(turns: Sequence[Turn], frame_times: Sequence[Sequence[float] | None], *,
                  generation: bool = False, system: str = SYSTEM_PROMPT,
                  num_candidates: int = 10) -> list[dict[str, str]]:
  """OpenAI-style messages of `turns`; with `generation` the last answer is left out.

  Args:
    frame_times: per turn, the sampled frame times (s) of a moment turn's video; None elsewhere.
  """
  messages = [{"role": "system", "content": system}]
  for i, turn in enumerate(turns):
    messages.append({"role": "user",
                     "content": user_content(turn, frame_times[i], num_candidates)})
    if not (generation and i == len(turns) - 1):
      messages.append({"role": "assistant", "content": turn.answer})
  return messages


END_USER = " [/INST]"  # closes every user turn; a generation prompt ends with it


def render_with_spans(messages: Sequence[dict[str, str]], bos: str, eos: str
                      ) -> tuple[str, list[tuple[int, int]]]:
  """The template's string and, per assistant message, its `[start, end)` (" answer </s>")."""
  system = None
  loop = list(messages)
  if loop and loop[0]["role"] == "system":
    system, loop = loop[0]["content"], loop[1:]
  parts: list[str] = []
  spans = []
  length = 0
  for i, m in enumerate(loop):
    if (m["role"] == "user") != (i % 2 == 0):
      raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
    content = m["content"]
    if i == 0 and system is not None:
      content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
    if m["role"] == "user":
      piece = bos + "[INST] " + content.strip() + END_USER
    else:
      piece = " " + content.strip() + " " + eos
      spans.append((length, length + len(piece)))
    parts.append(piece)
    length += len(piece)
  return "".join(parts), spans


def render_llama2(messages: Sequence[dict[str, str]], bos: str = "<s>", eos: str = "</s>") -> str:
  """The Llama-2 chat rendering of `messages` (generation prompts end with " [/INST]")."""
  return render_with_spans(messages, bos, eos)[0]


@dataclasses.dataclass(frozen=True)
class NumberTarget:
  """A number an answer writes, located on its digit tokens."""

  turn: int
  role: str  # "index" (video N) | "start" | "end" (of a span)
  value: float
  positions: tuple[int, ...]  # token position of each digit
  digits: tuple[int, ...]
  places: tuple[float, ...]  # place value of each digit: value = sum(digits * places)
  next_position: int  # the token after the last digit (where the number ends)


@dataclasses.dataclass(frozen=True)
class EncodedSample:
  text: str  # the rendered prompt
  input_ids: np.ndarray  # [N] int32
  labels: np.ndarray  # [N] int32, IGNORE_INDEX where unsupervised
  placeholder_positions: np.ndarray  # [P] int32, in order
  videos: tuple[str, ...]  # [P] the video of each placeholder
  video_turns: tuple[int, ...]  # [P] the turn each placeholder belongs to
  turn_kinds: tuple[str, ...]
  numbers: tuple[NumberTarget, ...]
  # Supervised retrieval/moment answers whose numbers could not be parsed or did not fall on
  # single-digit tokens (then no NumberTarget is exported for them).
  number_failures: int

  def spliced_length(self, tokens_per_video: Sequence[int]) -> int:
    """Sequence length once each placeholder becomes its video's embeddings."""
    if len(tokens_per_video) != len(self.videos):
      raise ValueError(f"{len(tokens_per_video)} token counts for {len(self.videos)} videos")
    return len(self.input_ids) - len(self.videos) + int(sum(tokens_per_video))


def locate_number(turn: int, role: str, number: NumberText, offset: int,
                  starts: list[int], offsets: Sequence[tuple[int, int]],
                  text: str) -> NumberTarget | None:
  """Locates each digit of `number` (at `offset` in `text`) on a token of its own, or None."""
  positions, digits, places = [], [], []
  for char, digit, place in number.digits():
    c = offset + char
    i = bisect.bisect_right(starts, c) - 1
    if i < 0:
      return None
    s, e = offsets[i]
    if not s <= c < e or text[s:e].strip() != str(digit):
      return None
    if i + 1 < len(offsets) and offsets[i + 1][0] <= c:  # byte-level pieces share characters
      return None
    positions.append(i)
    digits.append(digit)
    places.append(place)
  if len(set(positions)) != len(positions):
    return None
  return NumberTarget(turn, role, number.value, tuple(positions), tuple(digits), tuple(places),
                      positions[-1] + 1)


def encode(sample: Sample, tokenizer: PreTrainedTokenizerBase,
           frame_times: Sequence[Sequence[float] | None], *, generation: bool = False,
           num_candidates: int = 10, tokens_per_video: Sequence[int] | None = None,
           max_len: int | None = None) -> EncodedSample:
  """Renders and tokenises a sample.

  Args:
    frame_times: per turn of `sample.turns`, the frame times of a moment turn's video (None for
      other turns).
    generation: evaluation/chat prompt: the last answer is left out (ends at " [/INST]"), no
      labels.
    tokens_per_video, max_len: when both are given, a sample longer than `max_len` once its
      videos are spliced in raises `RecordError` ("context_too_long") naming the record, instead
      of silently overrunning the context (official B12).
  """
  turns = sample.turns
  if len(frame_times) != len(turns):
    raise ValueError(f"{len(frame_times)} frame-time entries for {len(turns)} turns")
  messages = chat_messages(turns, frame_times, generation=generation,
                           num_candidates=num_candidates)
  text, answer_spans = render_with_spans(messages, tokenizer.bos_token, tokenizer.eos_token)
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  offsets = [tuple(o) for o in enc["offset_mapping"]]

  labels, numbers, failures = _supervision(
      sample, tokenizer, () if generation else sample.supervised, ids, offsets, text,
      answer_spans)
  videos, video_turns, positions = _placeholders(sample, tokenizer, ids)
  out = EncodedSample(text=text, input_ids=ids, labels=labels, placeholder_positions=positions,
                      videos=tuple(videos), video_turns=tuple(video_turns),
                      turn_kinds=tuple(t.kind for t in turns), numbers=tuple(numbers),
                      number_failures=failures)
  if tokens_per_video is not None and max_len is not None:
    length = out.spliced_length(tokens_per_video)
    if length > max_len:
      raise RecordError("context_too_long", f"{sample.dialogue.name}: {length} tokens with "
                        f"{len(videos)} videos spliced in, more than max_len {max_len}")
  return out


def _supervision(sample: Sample, tokenizer: PreTrainedTokenizerBase, supervised: Sequence[int],
                 ids: np.ndarray, offsets: list[tuple[int, int]], text: str,
                 answer_spans: Sequence[tuple[int, int]]
                 ) -> tuple[np.ndarray, list[NumberTarget], int]:
  """Labels (the supervised answers' tokens, each ending in EOS), the digit targets of their
  index and span answers, and how many answers had numbers that could not be located."""
  turns = sample.turns
  starts = [s for s, _ in offsets]
  labels = np.full(len(ids), IGNORE_INDEX, np.int32)
  numbers: list[NumberTarget] = []
  failures = 0
  for t in supervised:
    span_start, span_end = answer_spans[t]
    first = bisect.bisect_left(starts, span_start)
    last = bisect.bisect_left(starts, span_end)
    if first >= last or ids[last - 1] != tokenizer.eos_token_id:
      raise ValueError(f"{sample.dialogue.name}: answer {t + 1} does not tokenise to its own "
                       "tokens ending in EOS")
    labels[first:last] = ids[first:last]
    turn = turns[t]
    answer_start = span_start + 1  # after the template's leading space
    if turn.kind == RETRIEVAL:
      found = find_video_index(turn.answer)
      targets = [] if found is None else [("index", found)]
    elif turn.kind == MOMENT:
      found = find_span(turn.answer)
      targets = [] if found is None else [("start", found[0]), ("end", found[1])]
    else:
      continue
    located = [locate_number(t, role, n, answer_start, starts, offsets, text)
               for role, n in targets]
    if not located or any(x is None for x in located):
      failures += 1
    else:
      numbers.extend(located)
  return labels, numbers, failures


def _placeholders(sample: Sample, tokenizer: PreTrainedTokenizerBase, ids: np.ndarray
                  ) -> tuple[list[str], list[int], np.ndarray]:
  """The sample's videos in prompt order, the turn of each, and the position of each one's
  `<VIDEOTOKEN>` (one per video, or the prompt is malformed)."""
  positions = np.flatnonzero(ids == placeholder_id(tokenizer)).astype(np.int32)
  videos, video_turns = [], []
  for i, turn in enumerate(sample.turns):
    videos.extend(turn.videos)
    video_turns.extend([i] * len(turn.videos))
  if len(positions) != len(videos):
    raise ValueError(f"{sample.dialogue.name}: {len(positions)} placeholders in the prompt for "
                     f"{len(videos)} videos (does a question contain {VIDEO_PLACEHOLDER}?)")
  return videos, video_turns, positions


# ------------------------------------------------------------------------------------------
# Q-Former timestamp text


def qformer_frame_texts(frame_times: Sequence[float], *, last_frame_quirk: bool = True
                        ) -> list[str]:
  """One "This frame is sampled at {t} second." per frame.

  With `last_frame_quirk` (official B2) the last frame reads "... {t} seconds second.": the
  dataset's `.replace('seconds.', '')` misses `load_video`'s period-less message.
  """
  secs = [format_seconds(t) for t in frame_times]
  if last_frame_quirk and secs:
    secs[-1] += " seconds"
  return [f"This frame is sampled at {s} second." for s in secs]


def qformer_text_ids(frame_times: Sequence[float], tokenizer: PreTrainedTokenizerBase, *,
                     max_len: int = 32, pad_to: int | None = None, last_frame_quirk: bool = True,
                     vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Q-Former text ids and mask `[T, L]` (int32) for one video's frames.

  Args:
    tokenizer: the LLM tokenizer (official B1: its ids index the BERT embedding table; BOS
      first, pad = eos = 2) or a BERT-style tokenizer ([CLS] ... [SEP], its own pad).
    max_len: truncation length (official 32).
    pad_to: static L; None pads to the longest text of this video, as the official code does.
    vocab_size: the Q-Former's vocabulary; ids beyond it raise instead of indexing out of range.
  """
  texts = qformer_frame_texts(frame_times, last_frame_quirk=last_frame_quirk)
  enc = tokenizer(texts, padding="longest", max_length=max_len, truncation=True)
  longest = max(len(x) for x in enc["input_ids"])
  width = longest if pad_to is None else pad_to
  if width < longest:
    raise ValueError(f"pad_to {pad_to} is shorter than the longest timestamp text ({longest})")
  ids = np.full((len(texts), width), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(texts), width), np.int32)
  for i, (row, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True)):
    ids[i, :len(row)] = row
    mask[i, :len(m)] = m
  if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
    raise ValueError(f"Q-Former text id {int(ids.max())} >= Q-Former vocab {vocab_size}: the "
                     "LLM tokenizer's ids index the BERT table (B1); use a smaller LLM vocab or "
                     "a BERT-style Q-Former tokenizer")
  return ids, mask
