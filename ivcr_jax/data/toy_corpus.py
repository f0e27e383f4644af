"""A small synthetic IVCR-style corpus: real mp4 videos of moving shapes + official-schema JSON.

It exists so that the demo, the tests and the benchmarks exercise the real data path (decoding
mp4 with decord, the IVCR-200K annotation schema of reference §4.1, retriever top-10 lists) on a
CPU, with a task a tiny model can learn: the queries name colours, shapes, motions and times
that the frames show.

Videos (`videos/toy/vNNNN.mp4`, H.264, square frames of `size` px, `fps` frames/s, 8-30 s):
a background colour and 1-3 events; an event is a coloured shape that appears at a frame, moves
(or stays still) and disappears. Within a video the (colour, shape) pairs are distinct, so a
moment query names its event unambiguously.

Annotations (`annotations.json`), one record per dialogue in the official schema:
`{"split", "type": [k], "conversations": [human, gpt, ...]}`, human turns
`{"from": "human", "value", "text_id"}`, gpt turns `{"from": "gpt", "value", "video_id",
"candidate_videos", "gt_se"}`. Answer templates follow the official ones: retrieval answers say
"video N" in their second sentence, moment answers "in video N ... Xs-Ys" (the ground-truth
format of reference §5.2), N being the 1-based rank of the video in `candidate_videos`.

Choices a real corpus does not dictate:
- `type` codes are this corpus's own (the official meanings are not in the code; `[0]` is never
  used): 1 retrieval; 2 retrieval -> moment; 3 moment (ground truth = retriever top-1, as the
  official test filter requires of a first moment turn); 4 retrieval -> moment -> moment;
  5 retrieval -> chat -> retrieval; 6 retrieval -> moment -> chat -> retrieval -> moment, 15% of
  them extended by two more retrieval -> moment rounds to 9 turns (8 without chat), longer than
  the official 7-turn limit, to exercise the over-long handling.
- Natural-dialogue (chat) turns have no official representation: they are gpt turns with
  `"gt_se": null` and `"video_id": null` and no candidates (an extension, also understood by
  `ivcr_jax.data.records`). `chat_turns=False` gives a strictly official file.
- The retriever is simulated: candidates are the 9 videos most similar to the query (shared
  colour/shape/background plus noise) and the ground truth at rank r with probability
  proportional to `rank_decay**(r-1)` (~45% rank 1). The ground truth is always among the
  candidates: IVCR-200K's test set does hold retriever misses (its "no-zero" filter removes
  them), but a training record without its answer in the list cannot be supervised, and the
  toy corpus is for training. Videos whose events include all the events of the query are
  never distractors, so every query has one right answer.
- Splits partition the videos (the first video of a dialogue comes from its split's share);
  candidates come from the whole corpus, as a retriever searches all of it.
- About `chinese_fraction` of the dialogues ask in Chinese (IVCR-200K is bilingual).

`videos.json` records each video's frame count, fps, duration and events (ground truth for
checks), and the config that built the corpus (a rebuild with the same config is skipped).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from ivcr_jax.data.answers import format_seconds
from ivcr_jax.jsonfile import read_json, write_json

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 220, 40),
    "cyan": (40, 210, 220), "magenta": (210, 50, 200), "white": (240, 240, 240),
    "orange": (245, 140, 30)}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "cyan": "青色",
              "magenta": "品红色", "white": "白色", "orange": "橙色"}
BACKGROUNDS = {"black": (10, 10, 10), "dark grey": (70, 70, 70), "navy": (20, 20, 80),
               "dark green": (15, 60, 25)}
SHAPES = ("circle", "square", "triangle")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
MOTIONS = {"right": "moves from left to right", "left": "moves from right to left",
           "down": "moves down", "up": "moves up", "still": "stays still"}
MOTIONS_ZH = {"right": "从左向右移动", "left": "从右向左移动", "down": "向下移动",
              "up": "向上移动", "still": "静止不动"}
VIDEO_DIR = "toy"  # videos live under `<root>/videos/toy/`, paths in the JSON are `toy/vNNNN.mp4`

_TYPE_WEIGHTS = {1: 0.25, 2: 0.25, 3: 0.15, 4: 0.15, 5: 0.1, 6: 0.1}
_NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three"}


@dataclasses.dataclass(frozen=True)
class ToyCorpusConfig:
  """What to build. Everything derives from `seed`: same config, same bytes."""

  num_videos: int = 300
  seed: int = 0
  size: int = 64  # frame side in pixels; a multiple of 32 so decord can resize at decode time
  fps: float = 3.0
  min_seconds: float = 8.0
  max_seconds: float = 30.0
  dialogues_per_video: int = 2
  splits: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1))
  num_candidates: int = 10
  rank_decay: float = 0.55
  # Noise of the simulated retriever's scores: 1 ranks look-alike videos (hard negatives) just
  # below the GT; large values give nearly random distractors (an easier task for tiny models).
  retriever_noise: float = 1.0
  chinese_fraction: float = 0.1
  chat_turns: bool = True

  def __post_init__(self):
    if self.size % 32:
      raise ValueError(f"size {self.size} must be a multiple of 32 (decord resizing needs it)")
    if not 0 < self.min_seconds <= self.max_seconds:
      raise ValueError(f"bad duration range [{self.min_seconds}, {self.max_seconds}] s")
    if self.min_seconds * self.fps < 6:
      raise ValueError("videos need at least 6 frames")
    if self.num_videos < max(self.num_candidates + 2, len(self.splits)):
      raise ValueError(f"num_videos {self.num_videos} is too small for "
                       f"{self.num_candidates} candidates and {len(self.splits)} splits")


@dataclasses.dataclass(frozen=True)
class Event:
  """A shape visible on frames `[start_frame, end_frame)`, moving from (x0, y0) to (x1, y1)."""

  colour: str
  shape: str
  motion: str
  start_frame: int
  end_frame: int
  x0: int
  y0: int
  x1: int
  y1: int

  def span(self, fps: float) -> tuple[float, float]:
    """Seconds of the first and one-past-last frame, rounded like frame timestamps."""
    return round(self.start_frame / fps, 1), round(self.end_frame / fps, 1)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  path: str  # relative to the video root, e.g. "toy/v0003.mp4"
  num_frames: int
  fps: float
  background: str
  events: tuple[Event, ...]  # sorted by start frame

  @property
  def duration(self) -> float:
    return self.num_frames / self.fps


@dataclasses.dataclass(frozen=True)
class ToyCorpus:
  root: str
  annotations: str  # the IVCR-schema JSON
  video_root: str  # the directory the JSON's video paths are relative to
  manifest: str  # videos.json


def make_video_specs(cfg: ToyCorpusConfig) -> list[VideoSpec]:
  """The videos' content, decided before anything is drawn."""
  rng = np.random.default_rng([cfg.seed, 0])
  shape_px = cfg.size // 4
  lo, hi = 0, cfg.size - shape_px
  specs = []
  for i in range(cfg.num_videos):
    n = int(rng.integers(round(cfg.min_seconds * cfg.fps), round(cfg.max_seconds * cfg.fps) + 1))
    num_events = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=num_events, replace=False)
    events = []
    for k in chosen:
      colour, shape = pairs[int(k)]
      motion = str(rng.choice(list(MOTIONS)))
      shortest = min(max(2, round(2 * cfg.fps)), n)
      length = int(rng.integers(shortest, max(shortest, int(0.7 * n)) + 1))
      start = int(rng.integers(0, n - length + 1))
      a, b = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
      x0, y0, x1, y1 = {"right": (lo, a, hi, a), "left": (hi, a, lo, a), "down": (a, lo, a, hi),
                        "up": (a, hi, a, lo), "still": (a, b, a, b)}[motion]
      events.append(Event(colour, shape, motion, start, start + length, x0, y0, x1, y1))
    events.sort(key=lambda e: (e.start_frame, e.colour, e.shape))
    specs.append(VideoSpec(path=f"{VIDEO_DIR}/v{i:04d}.mp4", num_frames=n, fps=cfg.fps,
                           background=str(rng.choice(list(BACKGROUNDS))), events=tuple(events)))
  return specs


def render_frames(spec: VideoSpec, size: int) -> np.ndarray:
  """`[T, size, size, 3]` uint8 frames of a video."""
  frames = np.empty((spec.num_frames, size, size, 3), np.uint8)
  frames[:] = BACKGROUNDS[spec.background]
  s = size // 4
  yy, xx = np.mgrid[0:s, 0:s]
  masks = {"square": np.ones((s, s), bool),
           "circle": (yy - (s - 1) / 2) ** 2 + (xx - (s - 1) / 2) ** 2 <= (s / 2) ** 2,
           "triangle": np.abs(xx - (s - 1) / 2) <= yy / 2 + 0.5}
  for e in spec.events:
    steps = max(e.end_frame - e.start_frame - 1, 1)
    for f in range(e.start_frame, e.end_frame):
      u = (f - e.start_frame) / steps
      x = round(e.x0 + u * (e.x1 - e.x0))
      y = round(e.y0 + u * (e.y1 - e.y0))
      frames[f, y:y + s, x:x + s][masks[e.shape]] = COLOURS[e.colour]
  return frames


def write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
  """H.264 (yuv420p) mp4 through the ffmpeg binary that imageio-ffmpeg ships."""
  import imageio_ffmpeg

  writer = imageio_ffmpeg.write_frames(
      path, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_in="rgb24",
      pix_fmt_out="yuv420p", macro_block_size=16, ffmpeg_log_level="error",
      output_params=["-crf", "12"])
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


# ------------------------------------------------------------------------------------------
# Dialogues


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def describe(spec: VideoSpec, zh: bool) -> str:
  if zh:
    return "，然后".join(f"{COLOURS_ZH[e.colour]}{SHAPES_ZH[e.shape]}{MOTIONS_ZH[e.motion]}"
                        for e in spec.events)
  return ", then ".join(f"{_article(e.colour)} {e.colour} {e.shape} {MOTIONS[e.motion]}"
                        for e in spec.events)


def _incidence(sets: Sequence[set | frozenset]) -> np.ndarray:
  """`[len(sets), kinds]` int matrix: 1 where set i holds kind j (kinds: the sorted union)."""
  column = {kind: j for j, kind in enumerate(sorted(set().union(*sets)))}
  out = np.zeros((len(sets), len(column)), np.int64)
  for i, members in enumerate(sets):
    out[i, [column[m] for m in members]] = 1
  return out


class DialogueMaker:
  """Writes dialogues turn by turn; holds the retriever simulation and the text templates."""

  def __init__(self, specs: Sequence[VideoSpec], cfg: ToyCorpusConfig):
    self.specs = specs
    self.cfg = cfg
    self.rng = np.random.default_rng([cfg.seed, 1])
    self.text_id = 0
    self.event_sets = [frozenset((e.colour, e.shape, e.motion) for e in s.events) for s in specs]
    # The retriever's features as 0/1 incidence matrices `[videos, kinds]`: one query scores the
    # whole corpus with a few matrix-vector products.
    self._events = _incidence(self.event_sets)
    self._pairs = _incidence([{(e.colour, e.shape) for e in s.events} for s in specs])
    self._colours = _incidence([{e.colour for e in s.events} for s in specs])
    self._shapes = _incidence([{e.shape for e in s.events} for s in specs])
    self._backgrounds = np.array([s.background for s in specs])

  def _pick(self, options: Sequence[str]) -> str:
    return options[int(self.rng.integers(len(options)))]

  def retrieve(self, gt: int, rank: int | None = None, num_candidates: int | None = None,
               among: np.ndarray | None = None) -> tuple[list[str], int]:
    """Simulated retriever top-k for a query describing video `gt`: (paths, 1-based GT rank).
    `num_candidates` overrides the config's k (the rank prior is then renormalised over k);
    `among`, a mask over the videos, limits the distractors to those it marks."""
    overlap = lambda m: m @ m[gt]
    # Videos holding every event of the query (the GT itself included) would match it too.
    holds_all = overlap(self._events) >= len(self.event_sets[gt])
    eligible = np.flatnonzero(~holds_all if among is None else ~holds_all & among)
    k = num_candidates or self.cfg.num_candidates
    if len(eligible) < k - 1:
      raise ValueError(f"only {len(eligible)} videos can be distractors of {self.specs[gt].path}")
    score = ((2 * overlap(self._pairs) + overlap(self._colours) + overlap(self._shapes))[eligible]
             + 0.5 * (self._backgrounds[eligible] == self._backgrounds[gt])
             + self.cfg.retriever_noise * self.rng.normal(size=len(eligible)))
    distractors = [int(v) for v in eligible[np.lexsort((eligible, -score))[:k - 1]]]
    if rank is None:
      decay = self.cfg.rank_decay ** np.arange(k)
      rank = int(self.rng.choice(k, p=decay / np.sum(decay))) + 1
    order = distractors[:rank - 1] + [gt] + distractors[rank - 1:]
    return [self.specs[v].path for v in order], rank

  def human(self, text: str) -> dict:
    self.text_id += 1
    return {"from": "human", "value": text, "text_id": self.text_id}

  def retrieval_qa(self, gt: int, rank: int, zh: bool) -> tuple[str, str]:
    """A retrieval question describing video `gt` and its answer naming candidate `rank`."""
    spec = self.specs[gt]
    desc = describe(spec, zh)
    if zh:
      question = self._pick([f"找到一个视频：{desc}。", f"我想找这样的视频：{desc}。"])
    else:
      question = self._pick([f"Find the video where {desc}.",
                             f"I am looking for a video in which {desc}.",
                             f"Show me the clip where {desc} on a {spec.background} background."])
    desc_en = describe(spec, False)
    answer = self._pick([
        f"I understand you want to find a video. The video {rank} matches your description: "
        f"{desc_en}.",
        f"You are looking for a specific video. The video {rank} is the best match, since "
        f"{desc_en}.",
        f"I see, you want to retrieve a video. The video {rank} shows {desc_en} on a "
        f"{spec.background} background."])
    return question, answer

  def retrieval_turn(self, gt: int, zh: bool) -> tuple[list[dict], list[str], int]:
    candidates, rank = self.retrieve(gt)
    question, answer = self.retrieval_qa(gt, rank, zh)
    gpt = {"from": "gpt", "value": answer, "video_id": self.specs[gt].path,
           "candidate_videos": candidates, "gt_se": [-1, -1]}
    return [self.human(question), gpt], candidates, rank

  def moment_qa(self, gt: int, rank: int, event: Event, zh: bool) -> tuple[str, str]:
    """A question about `event` of video `gt` (candidate `rank`) and its answer with the span."""
    c, s, m = event.colour, event.shape, event.motion
    if zh:
      question = self._pick([f"{COLOURS_ZH[c]}{SHAPES_ZH[s]}什么时候出现？",
                             f"找到{COLOURS_ZH[c]}{SHAPES_ZH[s]}{MOTIONS_ZH[m]}的片段。"])
    else:
      question = self._pick([f"When does the {c} {s} appear?",
                             f"Find the moment when the {c} {s} {MOTIONS[m]}.",
                             f"At what time can I see the {c} {s}?"])
    start, end = event.span(self.specs[gt].fps)
    span = f"{format_seconds(start)}s-{format_seconds(end)}s"
    answer = self._pick([
        f"I understand you want to locate a moment in the video. In video {rank}, the {c} {s} "
        f"{MOTIONS[m]} during {span}.",
        f"You want to find a specific moment. The {c} {s} is visible in video {rank} at {span}."])
    return question, answer

  def moment_turn(self, gt: int, candidates: list[str], rank: int, event: Event,
                  zh: bool) -> list[dict]:
    question, answer = self.moment_qa(gt, rank, event, zh)
    gpt = {"from": "gpt", "value": answer, "video_id": self.specs[gt].path,
           "candidate_videos": candidates, "gt_se": list(event.span(self.specs[gt].fps))}
    return [self.human(question), gpt]

  def chat_turn(self, gt: int, rank: int, zh: bool) -> list[dict]:
    spec = self.specs[gt]
    n = len(spec.events)
    shapes = ", ".join(f"{_article(e.colour)} {e.colour} {e.shape}" for e in spec.events)
    options = [
        ("What colour is the background of that video?",
         f"The background of video {rank} is {spec.background}."),
        ("How many shapes appear in it?",
         f"{_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} appear{'' if n > 1 else 's'} in "
         f"video {rank}: {shapes}."),
        ("Thank you!", "You are welcome! Tell me if you want to find another video or moment.")]
    if zh:
      options = [("谢谢！", "不客气！Tell me if you want to find another video or moment."),
                 ("背景是什么颜色？", f"The background of video {rank} is {spec.background}.")]
    question, answer = options[int(self.rng.integers(len(options)))]
    return [self.human(question), {"from": "gpt", "value": answer, "video_id": None,
                                   "gt_se": None}]

  def dialogue(self, first: int, pool: Sequence[int], split: str) -> dict:
    kind = int(self.rng.choice(list(_TYPE_WEIGHTS), p=list(_TYPE_WEIGHTS.values())))
    if not self.cfg.chat_turns and kind == 5:
      kind = 1
    zh = bool(self.rng.random() < self.cfg.chinese_fraction)
    used = {first}

    def another() -> int:
      choices = [v for v in pool if v not in used] or list(pool)
      v = int(choices[int(self.rng.integers(len(choices)))])
      used.add(v)
      return v

    def events_of(v: int, count: int) -> list[Event]:
      ev = self.specs[v].events
      idx = self.rng.permutation(len(ev))
      return [ev[int(idx[i % len(ev)])] for i in range(count)]

    convs: list[dict] = []
    if kind == 3:
      candidates, rank = self.retrieve(first, rank=1)
      convs += self.moment_turn(first, candidates, rank, events_of(first, 1)[0], zh)
    else:
      rounds = {1: [("R", 0)], 2: [("R", 1)], 4: [("R", 2)], 5: [("R", 0), ("C",), ("R", 0)],
                6: [("R", 1), ("C",), ("R", 1)]}[kind]
      if kind == 6 and self.rng.random() < 0.15:
        rounds = [*rounds, ("R", 1), ("R", 1)]
      gt = first
      for step in rounds:
        if step[0] == "C":
          if self.cfg.chat_turns:
            convs += self.chat_turn(gt, rank, zh)
          continue
        gt = first if not convs else another()
        turns, candidates, rank = self.retrieval_turn(gt, zh)
        convs += turns
        for event in events_of(gt, step[1]):
          convs += self.moment_turn(gt, candidates, rank, event, zh)
    return {"split": split, "type": [kind], "conversations": convs}


def split_videos(cfg: ToyCorpusConfig) -> dict[str, list[int]]:
  """Video indices per split (every split gets at least one video)."""
  order = np.random.default_rng([cfg.seed, 2]).permutation(cfg.num_videos)
  fractions = np.array([f for _, f in cfg.splits], float)
  counts = np.maximum(1, np.floor(fractions / fractions.sum() * cfg.num_videos)).astype(int)
  counts[0] += cfg.num_videos - counts.sum()
  bounds = np.concatenate([[0], np.cumsum(counts)])
  return {name: sorted(int(v) for v in order[bounds[i]:bounds[i + 1]])
          for i, (name, _) in enumerate(cfg.splits)}


def make_dialogues(specs: Sequence[VideoSpec], cfg: ToyCorpusConfig) -> list[dict]:
  """Annotation records in the IVCR-200K schema for videos `specs`."""
  maker = DialogueMaker(specs, cfg)
  records = []
  for split, pool in split_videos(cfg).items():
    for v in pool:
      for _ in range(cfg.dialogues_per_video):
        records.append(maker.dialogue(v, pool, split))
  return records


def _config_json(cfg: ToyCorpusConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_toy_corpus(out_dir: str, cfg: ToyCorpusConfig = ToyCorpusConfig(), *,
                     workers: int = 2, progress: bool = False) -> ToyCorpus:
  """Builds the corpus under `out_dir` (skipped when a complete one with the same config is there).

  Layout: `annotations.json`, `videos.json`, `videos/toy/vNNNN.mp4`.
  """
  corpus = ToyCorpus(root=out_dir, annotations=os.path.join(out_dir, "annotations.json"),
                     video_root=os.path.join(out_dir, "videos"),
                     manifest=os.path.join(out_dir, "videos.json"))
  if (os.path.exists(corpus.manifest) and os.path.exists(corpus.annotations)
      and read_json(corpus.manifest).get("config") == _config_json(cfg)):
    return corpus
  specs = make_video_specs(cfg)
  records = make_dialogues(specs, cfg)
  os.makedirs(os.path.join(corpus.video_root, VIDEO_DIR), exist_ok=True)

  def build(spec: VideoSpec) -> None:
    write_mp4(os.path.join(corpus.video_root, spec.path), render_frames(spec, cfg.size), cfg.fps)

  # The encoding runs in ffmpeg subprocesses, so threads overlap it well.
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    jobs = pool.map(build, specs)
    if progress:
      from tqdm import tqdm

      jobs = tqdm(jobs, total=len(specs), desc="toy videos", unit="video")
    for _ in jobs:
      pass

  manifest = {"config": _config_json(cfg), "fps": cfg.fps, "size": [cfg.size, cfg.size],
              "videos": {s.path: {"num_frames": s.num_frames, "duration": s.duration,
                                  "background": s.background,
                                  "events": [dataclasses.asdict(e) for e in s.events]}
                         for s in specs}}
  write_json(corpus.annotations, records)
  write_json(corpus.manifest, manifest)  # last: its presence marks a complete corpus
  return corpus
