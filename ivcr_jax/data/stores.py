"""TFDS ArrayRecord stores, written and read without TensorFlow (SPEC §4.2).

- Frame store (`ivcr_frames`): one record per video: uint8 frames sampled as configured, their
  frame indices and timestamps, fps, frame count and duration. Videos that cannot be decoded are
  left out and listed with the reason; `ivcr_index.json` beside the shards maps each video path
  to its record number, so a reader never scans the frames to find a video.
- Dialogue store (`ivcr_dialogues`): one record per validated dialogue, one TFDS split per
  annotation split: turns (kind, question, answer, text_id, ground-truth video, span, video index)
  and the retriever's candidates (flattened, as TFDS cannot write nested ragged lists without
  TensorFlow). Reading gives `records.Dialogue` back, exactly.

Records keep the order they were written in (`disable_shuffling`), so record numbers are stable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.records import Dialogue, Turn

FRAME_STORE = "ivcr_frames"
DIALOGUE_STORE = "ivcr_dialogues"
STORE_VERSION = "1.0.0"
INDEX_FILE = "ivcr_index.json"


@dataclasses.dataclass(frozen=True)
class FrameSettings:
  """How the frame store samples and decodes (see `ivcr_jax.data.frames`)."""

  num_frames: int = 64  # per video (ignored by sampling "all")
  size: int | None = 224  # square decode size, a multiple of 32; None keeps the video's size
  sampling: str = "uniform"
  seed: int = 0  # for "rand"/"rand_full": each video gets its own stream from (seed, path)

  def __post_init__(self):
    if self.sampling not in frames_lib.SAMPLERS:
      raise ValueError(f"sampling must be one of {frames_lib.SAMPLERS}, got {self.sampling!r}")


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
  """`map` over a thread pool, in order, with a bounded number of results in flight (frames are
  large)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    window = 2 * max(1, workers)
    pending = [pool.submit(fn, x) for x in items[:window]]
    for i in range(len(items)):
      result = pending[i].result()
      pending[i] = None
      if i + window < len(items):
        pending.append(pool.submit(fn, items[i + window]))
      yield result


@functools.cache
def _builder_class(name: str) -> type:
  """A TFDS GeneratorBasedBuilder named `name` that writes the examples it is given (TFDS is
  imported here, lazily: nothing else needs it)."""
  import tensorflow_datasets as tfds

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(STORE_VERSION)

    def __init__(self, *, features: Any, examples: dict[str, Callable[[], Iterable]], **kwargs):
      self._features = features
      self._examples = examples
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=self._features,
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split: str):
      yield from self._examples[split]()

  Builder.name = name
  return Builder


def _float64(shape: tuple[int | None, ...]):
  """An exact float64 feature: TFDS's default serialisation (tf.train.Example) keeps float32."""
  import tensorflow_datasets as tfds

  return tfds.features.Tensor(shape=shape, dtype=np.float64,
                              encoding=tfds.features.Encoding.BYTES)


def _frame_features(size: int | None):
  import tensorflow_datasets as tfds

  f = tfds.features
  return f.FeaturesDict({
      "video": f.Text(),
      # Raw bytes: the default (one protobuf int64 per pixel) is ~50x slower to write and read.
      "frames": f.Tensor(shape=(None, size, size, 3), dtype=np.uint8,
                         encoding=f.Encoding.BYTES),
      "frame_indices": f.Tensor(shape=(None,), dtype=np.int32),
      "timestamps": _float64((None,)),
      "fps": _float64(()),
      "num_video_frames": f.Scalar(dtype=np.int32),
      "duration": _float64(())})


@dataclasses.dataclass
class FrameStoreResult:
  path: str  # the versioned store directory
  videos: list[str]  # in record order
  durations: dict[str, float]
  failures: dict[str, str]  # video -> why it is not in the store


def write_frame_store(out_dir: str, videos: Sequence[str], video_root: str,
                      settings: FrameSettings, *, workers: int = 2,
                      progress: bool = True) -> FrameStoreResult:
  """Decodes `videos` (paths relative to `video_root`) into a frame store under `out_dir`."""
  videos = sorted(set(videos))
  result = FrameStoreResult(path="", videos=[], durations={}, failures={})

  def decode(path: str) -> frames_lib.VideoFrames | str:
    rng = np.random.default_rng([settings.seed, zlib.crc32(path.encode())])
    try:
      return frames_lib.load_video(os.path.join(video_root, path), num_frames=settings.num_frames,
                                   size=settings.size, mode=settings.sampling, rng=rng)
    except frames_lib.VideoError as e:
      return str(e)

  def examples() -> Iterator[tuple[int, dict[str, Any]]]:
    decoded = _ordered_map(decode, videos, workers)
    if progress:
      from tqdm import tqdm

      decoded = tqdm(decoded, total=len(videos), desc="decoding videos", unit="video")
    for path, v in zip(videos, decoded, strict=True):
      if isinstance(v, str):
        result.failures[path] = v
        continue
      key = len(result.videos)
      result.videos.append(path)
      result.durations[path] = v.duration
      yield key, {"video": path, "frames": v.frames, "frame_indices": v.indices,
                  "timestamps": v.times, "fps": v.fps, "num_video_frames": v.num_video_frames,
                  "duration": v.duration}

  builder = _builder_class(FRAME_STORE)(
      features=_frame_features(settings.size), examples={"videos": examples}, data_dir=out_dir,
      file_format="array_record")
  builder.download_and_prepare()
  result.path = builder.data_dir
  index = {"settings": dataclasses.asdict(settings), "videos": result.videos,
           "durations": result.durations, "failures": result.failures}
  with open(os.path.join(result.path, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, ensure_ascii=False, indent=1)
  return result


class FrameStore:
  """Random access to a frame store by video path."""

  def __init__(self, path: str):
    import tensorflow_datasets as tfds

    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
      index = json.load(f)
    self.settings = FrameSettings(**index["settings"])
    self.durations: dict[str, float] = index["durations"]
    self.failures: dict[str, str] = index["failures"]
    self.record_of = {v: i for i, v in enumerate(index["videos"])}
    self._source = tfds.builder_from_directory(path).as_data_source(split="videos")

  def __len__(self) -> int:
    return len(self.record_of)

  def __contains__(self, video: str) -> bool:
    return video in self.record_of

  def __getitem__(self, video: str) -> frames_lib.VideoFrames:
    if video not in self.record_of:
      why = self.failures.get(video, "it was not part of the annotations")
      raise KeyError(f"video {video!r} is not in the frame store: {why}")
    ex = self._source[self.record_of[video]]
    return frames_lib.VideoFrames(frames=ex["frames"], indices=ex["frame_indices"],
                                  fps=float(ex["fps"]),
                                  num_video_frames=int(ex["num_video_frames"]))


def _dialogue_features():
  import tensorflow_datasets as tfds

  f = tfds.features
  return f.FeaturesDict({
      "index": f.Scalar(dtype=np.int64),
      "split": f.Text(),
      "type": f.Scalar(dtype=np.int64),
      "turns": f.Sequence({
          "kind": f.Text(), "question": f.Text(), "answer": f.Text(),
          "text_id": f.Text(),  # JSON, so that int and str ids come back as they were
          "video_id": f.Text(),  # "" for chat turns
          "gt_span": _float64((2,)),  # NaN when there is none
          "video_index": f.Scalar(dtype=np.int64),  # -1 for None
          "num_candidates": f.Scalar(dtype=np.int64)}),
      "candidates": f.Sequence(f.Text())})  # all turns' candidates, concatenated


def dialogue_to_example(d: Dialogue) -> dict[str, Any]:
  return {
      "index": d.index, "split": d.split, "type": d.type,
      "turns": [{"kind": t.kind, "question": t.question, "answer": t.answer,
                 "text_id": json.dumps(t.text_id, ensure_ascii=False),
                 "video_id": t.video_id or "",
                 "gt_span": np.array(t.gt_span if t.gt_span else (math.nan, math.nan)),
                 "video_index": -1 if t.video_index is None else t.video_index,
                 "num_candidates": len(t.candidates)} for t in d.turns],
      "candidates": [c for t in d.turns for c in t.candidates]}


def example_to_dialogue(ex: dict[str, Any]) -> Dialogue:
  text = lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b)
  cands = [text(c) for c in ex["candidates"]]
  tt = ex["turns"]
  turns, offset = [], 0
  for i in range(len(tt["kind"])):
    n = int(tt["num_candidates"][i])
    span = tt["gt_span"][i]
    index = int(tt["video_index"][i])
    turns.append(Turn(
        kind=text(tt["kind"][i]), question=text(tt["question"][i]), answer=text(tt["answer"][i]),
        text_id=json.loads(text(tt["text_id"][i])), video_id=text(tt["video_id"][i]) or None,
        candidates=tuple(cands[offset:offset + n]),
        gt_span=None if np.isnan(span).any() else (float(span[0]), float(span[1])),
        video_index=None if index < 0 else index))
    offset += n
  return Dialogue(index=int(ex["index"]), split=text(ex["split"]), type=int(ex["type"]),
                  turns=tuple(turns))


def write_dialogue_store(out_dir: str, dialogues: Sequence[Dialogue]) -> str:
  """Writes one TFDS split per annotation split; returns the versioned store directory."""
  splits = sorted({d.split for d in dialogues})

  def examples(split: str) -> Callable[[], Iterator[tuple[int, dict[str, Any]]]]:
    return lambda: ((d.index, dialogue_to_example(d)) for d in dialogues if d.split == split)

  builder = _builder_class(DIALOGUE_STORE)(
      features=_dialogue_features(), examples={s: examples(s) for s in splits}, data_dir=out_dir,
      file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


class DialogueStore:
  """One split of a dialogue store as a sequence of `records.Dialogue`."""

  def __init__(self, path: str, split: str):
    import tensorflow_datasets as tfds

    self._source = tfds.builder_from_directory(path).as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Dialogue:
    return example_to_dialogue(self._source[i])
