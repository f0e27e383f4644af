"""The toy world in words: conversations in the official layouts, each video written as text.

The official recipe starts from a pretrained LLaMA, which already knows how to find, in its
context, the passage a question is about and to copy what stands next to it. The demo's LLaMA
has to learn that somewhere; this module writes the text it learns it from
(`ivcr_jax.pretrain_llm`). Everything comes from the toy corpus's own generator
(`toy_corpus.DialogueMaker`: its videos, simulated retriever and question/answer templates) on a
world seed of its own, so no video or dialogue of a demo corpus is seen, and is rendered by the
one prompt renderer with every `<VIDEOTOKEN>` replaced by the words the video block stands for:

- a retrieval list's block: the background and each event as "colour shape motion", e.g.
  "navy, red circle up, blue square still" (`video_words`);
- a moment turn's block: the same with each event's span in the answers' format ("red circle
  up 2.0s-5.3s"), beside the official frame-times sentence.

An example is one candidate list followed by several retrieval questions (the first about the
retriever's ground truth, the others about other candidates that their description singles out:
no other candidate shows all of its events), then moment questions about one of the candidates.
Dense supervision is what lets a small model find the in-context lookup at all: associative
recall is learned in thousands of steps when every sequence asks many questions of one context,
and not in the budget when it asks one.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from ivcr_jax.data import prompt, toy_corpus
from ivcr_jax.data.answers import find_span, find_video_index, format_seconds
from ivcr_jax.data.frames import sample_indices
from ivcr_jax.data.tokenizer import VIDEO_PLACEHOLDER

FOLLOW_UPS = ("official", "words")
QUESTION_TOKENS = ("all", "events")
INDEX_GROUPS = ("first1", "first2", "first3", "follow1", "follow2", "follow3")


def video_words(spec: toy_corpus.VideoSpec, *, spans: bool = False) -> str:
  """What a video block says in the text world (with each event's span for moment turns)."""
  events = []
  for e in spec.events:
    words = f"{e.colour} {e.shape} {e.motion}"  # the motion's key is its word: "up", "left"
    if spans:
      start, end = e.span(spec.fps)
      words += f" {format_seconds(start)}s-{format_seconds(end)}s"
    events.append(words)
  return ", ".join([spec.background, *events])


@dataclasses.dataclass(frozen=True)
class TextWorldConfig:
  """What the text world draws. Everything derives from `seed`."""

  seed: int = 987654  # the world's videos; never a demo corpus's toy_seed (those are small ints)
  num_videos: int = 4000
  num_candidates: int = 10
  retrieval_questions: int = 8  # per candidate list
  # The first question is the corpus's, with its full answer; the follow-ups get the short
  # answer "The video N.", so that a row asks many questions of one list (the answers' language
  # is learnt from the first and the moment answers). "official": follow-ups are the corpus's
  # questions; "words": they name the events in the blocks' own words ("Find: red circle up,
  # blue square still."), a third of the tokens, so more questions fit a row.
  follow_ups: str = "official"
  moment_questions: int = 2  # about one candidate, after the retrieval questions
  frames: int = 8  # frame times written in moment turns (the demo samples 8 frames)
  # A curriculum on the list length: training lists grow linearly from `min_candidates` at step
  # 0 to `num_candidates` at `curriculum_steps` (0: full lists from the start). Held-out
  # streams always have full lists.
  min_candidates: int = 0
  curriculum_steps: int = 0
  # A curriculum on where the follow-ups' index is read (`encode_batch(answer_gap=...)`): with
  # `answer_gap_every` > 0, a training row's follow-up answers its index straight after the
  # question's last event word until step `answer_gap_from`; then what stands in between (after
  # a words follow-up, the template ". [/INST] The video ", 9 tokens) comes back one token every
  # `answer_gap_every` steps, the one next to the index first. `scripts/probe_lookup.py
  # --gap_every` measured why: one template token there stops the lookup from being learnt at
  # all, a gap grown token by token carries it over. Held-out rows always have it whole.
  answer_gap_from: int = 0
  answer_gap_every: int = 0
  # A curriculum on the videos' events (1-3 each): with `events_every` > 0, training step s draws
  # its lists (the asked video and its distractors) from the videos of at most 1 + s //
  # `events_every` events. `scripts/probe_lookup.py --events_every` measured why: a question
  # naming several events of a block is learnt later than one naming one event, and much
  # earlier after the one-event lookup. Held-out lists draw from every video.
  events_every: int = 0

  def __post_init__(self):
    if self.min_candidates and not 2 <= self.min_candidates <= self.num_candidates:
      raise ValueError(f"world.min_candidates {self.min_candidates} must lie in "
                       f"[2, num_candidates={self.num_candidates}]")
    if self.follow_ups not in FOLLOW_UPS:
      raise ValueError(f"world.follow_ups must be one of {FOLLOW_UPS}, got {self.follow_ups!r}")
    if self.events_every < 0:
      raise ValueError(f"world.events_every must be >= 0, got {self.events_every}")
    if self.answer_gap_from < 0 or self.answer_gap_every < 0:
      raise ValueError(f"world.answer_gap_from ({self.answer_gap_from}) and answer_gap_every "
                       f"({self.answer_gap_every}) must be >= 0")

  def candidates_at(self, step: int) -> int:
    """The list length of training step `step`."""
    if not self.min_candidates or step >= self.curriculum_steps:
      return self.num_candidates
    grow = (self.num_candidates - self.min_candidates) * step / self.curriculum_steps
    return self.min_candidates + int(grow)

  def events_at(self, step: int) -> int | None:
    """The most events a video of training step `step`'s lists has (None: no limit)."""
    return 1 + step // self.events_every if self.events_every else None

  def answer_gap_at(self, step: int) -> int | None:
    """How many template tokens training step `step` keeps before a follow-up's index (None:
    all of them, the curriculum is off)."""
    if not self.answer_gap_every:
      return None
    if step < self.answer_gap_from:
      return 0
    return 1 + (step - self.answer_gap_from) // self.answer_gap_every


@dataclasses.dataclass(frozen=True)
class TextExample:
  text: str
  answer_spans: tuple[tuple[int, int], ...]  # character ranges of " answer </s>"
  # The first digit of N in each retrieval answer's "video N" (moment answers name the video
  # of their prompt's "Current video : <VID> k </VID>", a copy that needs no search).
  index_chars: tuple[int, ...]
  # Per retrieval answer, its `INDEX_GROUPS` entry: the list's first question (whose answer is
  # the retriever's ground truth, with the rank prior to lean on) or a follow-up, and how many
  # events the named video has (2-3 events: the question is a conjunction the list's
  # look-alikes share parts of).
  index_groups: tuple[str, ...]
  span_chars: tuple[int, ...]  # characters of the span digits of moment answers
  # Per event of a candidate block and per event a retrieval question names: the last character
  # of its phrase ("cyan square right" / "... moves from left to right") and the 0-based
  # candidates, among those written before it, that show that event (a block's own index
  # included): what a lookup at that token can know.
  lookups: tuple[tuple[int, tuple[int, ...]], ...] = ()
  block_lookups: int = 0  # how many of `lookups` (the first ones) are in the blocks
  # Character ranges of the user's questions (each turn's question, without the candidate list
  # or moment block before it). Predicting a question's words is a lookup of its own: after
  # "Find: cyan square" the next word is the motion of the listed cyan square.
  question_spans: tuple[tuple[int, int], ...] = ()
  # Character ranges of the event phrases the retrieval questions name ("cyan square right",
  # "cyan square moves from left to right"): the words of a question that the list determines
  # once the question has started, without the template around them.
  question_event_spans: tuple[tuple[int, int], ...] = ()
  # Per follow-up, the character ending its question's last event phrase and its index's first
  # digit: the template between them is what `encode_batch(answer_gap=...)` shortens.
  answer_gaps: tuple[tuple[int, int], ...] = ()


class TextWorld:
  """Draws `TextExample`s. The examples of `(stream, step)` come from their own generator
  (`[seed, 3, stream, step]`): a batch is a pure function of its step (exact resumption, the
  same text on every machine), and streams (training, held out) never share a draw."""

  def __init__(self, cfg: TextWorldConfig, stream: int = 0):
    self.cfg = cfg
    self.stream = stream
    corpus = toy_corpus.ToyCorpusConfig(num_videos=cfg.num_videos, seed=cfg.seed,
                                        num_candidates=cfg.num_candidates, chinese_fraction=0.0)
    self.specs = toy_corpus.make_video_specs(corpus)
    self.maker = toy_corpus.DialogueMaker(self.specs, corpus)
    self.by_path = {s.path: i for i, s in enumerate(self.specs)}
    self.event_counts = np.asarray([len(s.events) for s in self.specs])

  def examples(self, step: int, count: int) -> list[TextExample]:
    self.maker.rng = np.random.default_rng([self.cfg.seed, 3, self.stream, step])
    held_out = self.stream != 0
    k = self.cfg.num_candidates if held_out else self.cfg.candidates_at(step)
    most = None if held_out else self.cfg.events_at(step)
    pool = None if most is None else self.event_counts <= most
    return [self._example(k, pool) for _ in range(count)]

  def answer_gap(self, step: int) -> int | None:
    """The template tokens kept before the follow-ups' indices at `step` (`encode_batch`'s
    `answer_gap`): the curriculum's for training, the whole template held out."""
    return self.cfg.answer_gap_at(step) if self.stream == 0 else None

  def _frame_times(self, spec: toy_corpus.VideoSpec) -> list[float]:
    """The times of the frames an evaluation samples (`uniform`)."""
    return [int(i) / spec.fps for i in sample_indices(spec.num_frames, self.cfg.frames,
                                                       "uniform")]

  def _example(self, num_candidates: int, pool: np.ndarray | None = None) -> TextExample:
    """One list of `num_candidates` (of the videos `pool` marks, default all) and its
    questions."""
    maker, rng, cfg = self.maker, self.maker.rng, self.cfg
    if pool is None:
      gt = int(rng.integers(len(self.specs)))
    else:
      allowed = np.flatnonzero(pool)
      gt = int(allowed[rng.integers(len(allowed))])
    paths, rank = maker.retrieve(gt, num_candidates=num_candidates, among=pool)
    videos = [self.by_path[p] for p in paths]
    content = prompt.candidates_content("", num_candidates)
    for v in videos:
      content = content.replace(VIDEO_PLACEHOLDER, video_words(self.specs[v]), 1)
    events = maker.event_sets
    named = [i for i, v in enumerate(videos)
             if not any(events[v] <= events[w] for j, w in enumerate(videos) if j != i)]
    asked = [rank - 1] + [named[int(j)] for j in rng.integers(len(named),
                                                               size=cfg.retrieval_questions - 1)]
    messages = [{"role": "system", "content": prompt.SYSTEM_PROMPT}]
    questions = []
    for q, i in enumerate(asked):
      question, answer = maker.retrieval_qa(videos[i], i + 1, zh=False)
      if q:
        answer = f"The video {i + 1}."
        if cfg.follow_ups == "words":
          question = "Find: " + video_words(self.specs[videos[i]]).split(", ", 1)[1] + "."
      questions.append(question)
      messages += [{"role": "user", "content": (content if q == 0 else "") + question},
                   {"role": "assistant", "content": answer}]
    if cfg.moment_questions:
      i = int(rng.integers(len(videos)))
      spec = self.specs[videos[i]]
      block = prompt.moment_content("", i + 1, self._frame_times(spec)).replace(
          VIDEO_PLACEHOLDER, video_words(spec, spans=True), 1)
      for q, e in enumerate(rng.choice(len(spec.events), cfg.moment_questions)):
        question, answer = maker.moment_qa(videos[i], i + 1, spec.events[int(e)], zh=False)
        questions.append(question)
        messages += [{"role": "user", "content": (block if q == 0 else "") + question},
                     {"role": "assistant", "content": answer}]
    text, spans = prompt.render_with_spans(messages, "<s>", "</s>")
    question_spans = []
    for question, (start, _) in zip(questions, spans, strict=True):  # "... question [/INST]"
      end = start - len(prompt.END_USER)
      question_spans.append((end - len(question.strip()), end))
    index_chars, span_chars = [], []
    for turn, (start, end) in enumerate(spans):
      answer = text[start + 1:end]
      if turn < len(asked):  # a retrieval answer; a moment answer's index copies its prompt's
        index_chars.append(start + 1 + find_video_index(answer).start)
      else:
        span_chars += [start + 1 + c for n in find_span(answer) for c, _, _ in n.digits()]
    lookups, phrase_spans = [], []

    def look_up(video: int, start: int, seen: int, motion_words: dict[str, str] | None) -> None:
      """Appends each event of `video` as written from `start` on (the motion as its key, or
      as `motion_words` says it), with the first `seen` candidates that show it."""
      for e in self.specs[video].events:
        phrase = f"{e.colour} {e.shape} {motion_words[e.motion] if motion_words else e.motion}"
        found = text.index(phrase, start)
        start = found + len(phrase)
        phrase_spans.append((found, start))
        key = (e.colour, e.shape, e.motion)
        lookups.append((start - 1, tuple(j for j in range(seen) if key in events[videos[j]])))

    for j, v in enumerate(videos):  # the blocks, in order: candidates up to this one
      look_up(v, lookups[-1][0] if lookups else 0, j + 1, None)
    in_blocks = len(lookups)
    answer_gaps = []
    for q, i in enumerate(asked):  # each question follows the previous answer
      in_words = q and cfg.follow_ups == "words"
      look_up(videos[i], spans[q - 1][1] if q else 0, len(videos),
              None if in_words else toy_corpus.MOTIONS)
      if q:
        answer_gaps.append((phrase_spans[-1][1], index_chars[q]))
    groups = [f"{'follow' if q else 'first'}{len(self.specs[videos[i]].events)}"
              for q, i in enumerate(asked)]
    return TextExample(text, tuple(spans), tuple(index_chars), tuple(groups), tuple(span_chars),
                       tuple(lookups), in_blocks, tuple(question_spans),
                       tuple(phrase_spans[in_blocks:]), tuple(answer_gaps))


def encode_batch(examples: Sequence[TextExample], tokenizer, *, seq_len: int, positions: int,
                 lookups: int = 0, num_candidates: int = 10, questions: str = "",
                 answer_gap: int | None = None) -> dict[str, np.ndarray]:
  """Fixed-shape rows: `ids [B, seq_len]` and, per row, `positions` supervised slots
  (`position`: the token whose logits predict `label`; `weight` 1 on the answers' tokens, 0
  elsewhere; `index_group` is 1 + the `INDEX_GROUPS` entry of the slot of an index's first
  digit, 0 elsewhere; `is_span` marks the digits of moment spans; with `questions` "all", the
  slots after the answers' hold the questions' tokens, marked by `is_question`; with "events",
  only the tokens of the event phrases the retrieval questions name), and `lookups` slots
  of the events in the blocks and in the questions (`TextExample.lookups`; `lookup_position`:
  the token ending the event's phrase; `lookup_target [B, lookups, num_candidates]`: 1 for each
  candidate written before it that shows the event; `lookup_weight`; `lookup_in_question`: 1 for
  a question's). With `answer_gap` set, each follow-up keeps only that many of the template
  tokens between its question's last event and its index (the ones next to the index;
  `TextWorldConfig.answer_gap_from`): the others are left out of the row.

  Rows longer than `seq_len + 1` tokens are cut (their later answers are not supervised) and
  rows with more supervised tokens than `positions` (or events than `lookups`, when it is not
  0) keep the first ones: all are counted in `cut_rows` so that a caller can size them.
  """
  if questions and questions not in QUESTION_TOKENS:
    raise ValueError(f"questions must be one of {QUESTION_TOKENS}, got {questions!r}")
  enc = tokenizer([e.text for e in examples], add_special_tokens=False,
                  return_offsets_mapping=True)
  b = len(examples)
  out = dict(ids=np.full((b, seq_len), tokenizer.eos_token_id, np.int32),
             position=np.zeros((b, positions), np.int32),
             label=np.zeros((b, positions), np.int32),
             weight=np.zeros((b, positions), np.float32),
             is_span=np.zeros((b, positions), np.float32),
             index_group=np.zeros((b, positions), np.int32),
             is_question=np.zeros((b, positions), np.float32))
  out.update(lookup_position=np.zeros((b, lookups), np.int32),
             lookup_target=np.zeros((b, lookups, num_candidates), np.float32),
             lookup_weight=np.zeros((b, lookups), np.float32),
             lookup_in_question=np.zeros((b, lookups), np.float32))
  cut = 0
  for row, example in enumerate(examples):
    tokens, offsets = enc["input_ids"][row], enc["offset_mapping"][row]
    if answer_gap is not None:
      tokens, offsets = _shorten_answer_gaps(tokens, offsets, example.answer_gaps, answer_gap)
    starts = [s for s, _ in offsets]
    kept = tokens[:seq_len + 1]
    out["ids"][row, :len(kept) - 1] = kept[:-1]
    index = {bisect.bisect_right(starts, c) - 1: 1 + INDEX_GROUPS.index(g)
             for c, g in zip(example.index_chars, example.index_groups, strict=True)}
    span = {bisect.bisect_right(starts, c) - 1 for c in example.span_chars}
    answered = [t for lo, hi in example.answer_spans
                for t in range(bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi))
                if 0 < t < len(kept)]
    supervised = list(answered)
    if questions:  # every token overlapping a range ("▁I" starts at the space before "I")
      ends = [e for _, e in offsets]
      ranges = (example.question_spans if questions == "all"
                else example.question_event_spans)
      supervised += [t for lo, hi in ranges
                     for t in range(bisect.bisect_right(ends, lo), bisect.bisect_left(starts, hi))
                     if 0 < t < len(kept)]
    found = [(t, holders) for c, holders in example.lookups
             if (t := bisect.bisect_right(starts, c) - 1) < len(kept) - 1]
    cut += (len(tokens) > seq_len + 1 or len(supervised) > positions
            or 0 < lookups < len(found))
    supervised = supervised[:positions]
    n = len(supervised)
    out["position"][row, :n] = [t - 1 for t in supervised]
    out["label"][row, :n] = [tokens[t] for t in supervised]
    out["weight"][row, :min(n, len(answered))] = 1.0
    out["is_question"][row, len(answered):n] = 1.0
    out["is_span"][row, :n] = [t in span for t in supervised]
    out["index_group"][row, :n] = [index.get(t, 0) for t in supervised]
    for slot, (t, holders) in enumerate(found[:lookups]):
      out["lookup_position"][row, slot] = t
      out["lookup_target"][row, slot, list(holders)] = 1.0
      out["lookup_weight"][row, slot] = 1.0
      out["lookup_in_question"][row, slot] = slot >= example.block_lookups
  out["cut_rows"] = np.asarray(cut, np.int32)
  return out


def _shorten_answer_gaps(tokens: list[int], offsets: list[tuple[int, int]],
                         gaps: Sequence[tuple[int, int]], keep: int
                         ) -> tuple[list[int], list[tuple[int, int]]]:
  """`tokens` and their character `offsets` without the template tokens of each gap (a token
  starting at or after the gap's first character and before its index's) but the last `keep`."""
  starts = [s for s, _ in offsets]
  dropped = set()
  for first, index in gaps:
    lo, hi = bisect.bisect_left(starts, first), bisect.bisect_left(starts, index)
    dropped.update(range(lo, max(lo, hi - keep)))
  kept = [t for t in range(len(tokens)) if t not in dropped]
  return [tokens[t] for t in kept], [offsets[t] for t in kept]
