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

Per-video stores (frames here, ViT features in `feature_store`) are written shard by shard
(`write_video_store`): decoding 12k videos takes hours, so a build that stops is started again
with the same command and redoes only the shards it had not finished. The same inputs give the
same bytes, however many workers decode and however often the build was resumed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.records import Dialogue, Turn
from ivcr_jax.jsonfile import read_json, write_json

FRAME_STORE = "ivcr_frames"
DIALOGUE_STORE = "ivcr_dialogues"
STORE_VERSION = "1.0.0"
INDEX_FILE = "ivcr_index.json"  # written last: its presence marks a complete per-video store
BUILD_DIR = "unfinished"  # the plan and per-shard markers of a build in progress
VIDEO_SPLIT = "videos"
SHARD_VIDEOS = 32  # videos per shard: ~300 MB of 64 uint8 frames at 224 px before compression


@dataclasses.dataclass(frozen=True)
class FrameSettings:
  """How the frame store samples and decodes (see `ivcr_jax.data.frames`)."""

  num_frames: int = 64  # per video (ignored by sampling "all")
  size: int | None = 224  # square decode size, a multiple of 32; None keeps the video's size
  sampling: str = "uniform"
  seed: int = 0  # for "rand"/"rand_full": each video gets its own stream from (seed, path)
  resize: str = "squash"  # "squash" (official, aspect not kept) | "shorter_side_crop"

  def __post_init__(self):
    if self.sampling not in frames_lib.SAMPLERS:
      raise ValueError(f"sampling must be one of {frames_lib.SAMPLERS}, got {self.sampling!r}")
    if self.resize not in frames_lib.RESIZE_MODES:
      raise ValueError(f"resize must be one of {frames_lib.RESIZE_MODES}, got {self.resize!r}")
    if self.resize == "shorter_side_crop" and self.size is None:
      raise ValueError("resize 'shorter_side_crop' needs a size")


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
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


def float64_feature(shape: tuple[int | None, ...]):
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
      "timestamps": float64_feature((None,)),
      "fps": float64_feature(()),
      "num_video_frames": f.Scalar(dtype=np.int32),
      "duration": float64_feature(())})


# A video's record and what the index keeps about it (JSON), or why it has no record.
RecordOrFailure = tuple[dict[str, Any], dict[str, Any]] | str


@dataclasses.dataclass
class VideoStoreResult:
  path: str  # the versioned store directory
  index: dict[str, Any]  # what `INDEX_FILE` holds
  shards: int
  shards_reused: int  # finished by an earlier, interrupted build (or all: the store was complete)


def _read_json(path: str) -> Any:
  """The JSON at `path`, or None when it is missing or unreadable (a build marker that an
  interrupted build may have left half-written: redone, not an error)."""
  try:
    return read_json(path)
  except (OSError, ValueError):
    return None


class StoreError(RuntimeError):
  """A store file is missing, truncated or unreadable; the message names the file and the
  command that rebuilds the store."""


def read_settings(path: str, rebuild: str) -> Any:
  """The JSON file of a store's settings at `path`, or None when it does not exist; a file that
  is there but unreadable is a `StoreError` (it is damaged, not absent)."""
  try:
    return read_json(path)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    cause = e.__cause__ or e  # the parser's error, which `read_json` wraps to name the file
    raise StoreError(f"{path} is damaged ({type(cause).__name__}: {cause}); {rebuild}") from e


def open_builder(path: str, rebuild: str) -> Any:
  """The TFDS builder of the store at `path`, its shards checked (`check_shards`)."""
  import tensorflow_datasets as tfds

  for name in ("dataset_info.json", "features.json"):  # TFDS's own errors would not name them
    read_settings(os.path.join(path, name), rebuild)
  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # a file that parses but is not TFDS's: the error says what
    raise StoreError(f"the TFDS metadata of {path} (dataset_info.json, features.json) cannot be "
                     f"read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     f"{rebuild}") from e
  for split in builder.info.splits.values():
    check_shards(zip(map(os.fspath, split.filepaths), split.shard_lengths, strict=True),
                 rebuild)
  return builder


def check_shards(shards: Iterable[tuple[str, int]], rebuild: str) -> None:
  """Raises `StoreError` naming the first ArrayRecord file of `(path, records)` that is missing
  or does not hold its records. A truncated ArrayRecord file opens as an empty one (its footer is
  gone), so the record count is what tells."""
  from array_record.python import array_record_module

  for path, expected in shards:
    if not os.path.isfile(path):
      raise StoreError(f"the shard {path} is missing; {rebuild}")
    try:
      reader = array_record_module.ArrayRecordReader(path)
      try:
        found = reader.num_records()
      finally:
        reader.close()
    except Exception as e:  # e.g. shorter than ArrayRecord's first 64 KiB block
      raise StoreError(f"the shard {path} is damaged (truncated?): it cannot be opened "
                       f"({type(e).__name__}{': ' if str(e) else ''}{e}); {rebuild}") from e
    if found != expected:
      raise StoreError(f"the shard {path} is damaged (truncated?): {found} readable records of "
                       f"{expected}; {rebuild}")


def _write_shard(path: str, partial: str, features: Any, videos: list[str],
                 produced: Iterator[RecordOrFailure]) -> dict[str, Any]:
  """Writes the records of `videos` to `partial`, then renames it to `path`; returns the shard's
  marker (what the index needs from it, and the file size that validates it)."""
  from array_record.python import array_record_module

  shard = {"videos": [], "info": {}, "failures": {}, "num_bytes": 0}
  writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
  try:
    for video in videos:
      item = next(produced)
      if isinstance(item, str):
        shard["failures"][video] = item
        continue
      example, info = item
      record = features.serialize_example(example)
      writer.write(record)
      shard["videos"].append(video)
      shard["info"][video] = info
      shard["num_bytes"] += len(record)
  finally:
    writer.close()
  os.replace(partial, path)
  shard["file_bytes"] = os.path.getsize(path)
  return shard


def write_video_store(out_dir: str, name: str, features: Any, plan: dict[str, Any],
                      videos: Sequence[str],
                      produce: Callable[[Sequence[str]], Iterable[RecordOrFailure]],
                      *, shard_videos: int = SHARD_VIDEOS, overwrite: bool = False,
                      progress: str = "") -> VideoStoreResult:
  """Writes TFDS store `name` (one ArrayRecord split, `VIDEO_SPLIT`) of one record per video of
  `videos`, in that order, `shard_videos` videos per shard, and its index.

  `produce(some_videos)` yields, in order, each video's (example, index info) or the reason it has
  none. `plan` (JSON) is what the records are made from. Each finished shard is renamed into place
  and then marked done; a build started again with the same plan and videos produces only the
  shards not marked done (a marker whose shard file has another size does not count). A store,
  complete or not, of another plan is an error unless `overwrite`; a complete one of this plan is
  returned as it is.
  """
  import tensorflow_datasets as tfds

  target = os.path.join(out_dir, name, STORE_VERSION)
  build = os.path.join(target, BUILD_DIR)
  wanted = json.loads(json.dumps({"plan": plan, "requested": list(videos),
                                  "shard_videos": shard_videos}))
  chunks = [wanted["requested"][k:k + shard_videos]
            for k in range(0, max(len(videos), 1), shard_videos)]
  index = _read_json(os.path.join(target, INDEX_FILE))
  if index is not None and {k: index.get(k) for k in wanted} == wanted and not overwrite:
    return VideoStoreResult(target, index, len(chunks), len(chunks))
  started = _read_json(os.path.join(build, "plan.json"))
  resume = index is None and started == wanted and not overwrite
  if os.path.exists(target) and not resume:
    if not overwrite and (index or started or set(os.listdir(target)) - {BUILD_DIR}):
      raise FileExistsError(f"{target} holds a {'complete' if index else 'partial'} {name} store "
                            "built from other settings or videos; choose another directory or "
                            "overwrite")
    shutil.rmtree(target)
  os.makedirs(build, exist_ok=True)
  write_json(os.path.join(build, "plan.json"), wanted)

  template = tfds.core.ShardedFileTemplate(
      data_dir=target, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=name, split=VIDEO_SPLIT, filetype_suffix="array_record")
  paths = [os.fspath(p) for p in template.sharded_filepaths(len(chunks))]
  markers = [os.path.join(build, f"shard-{k:05d}.json") for k in range(len(chunks))]
  done = _finished_shards(paths, markers)
  todo = [k for k in range(len(chunks)) if k not in done]
  produced = iter(produce([v for k in todo for v in chunks[k]]))
  if progress:
    from tqdm import tqdm

    produced = iter(tqdm(produced, total=len(videos), initial=sum(len(chunks[k]) for k in done),
                         desc=progress, unit="video"))
  for k in todo:
    done[k] = _write_shard(paths[k], os.path.join(build, os.path.basename(paths[k])),
                           features, chunks[k], produced)
    write_json(markers[k], done[k])

  index = _finish(target, features, template, wanted, [done[k] for k in range(len(chunks))])
  shutil.rmtree(build)
  return VideoStoreResult(target, index, len(chunks), len(chunks) - len(todo))


def _finished_shards(paths: Sequence[str], markers: Sequence[str]) -> dict[int, dict]:
  """Shard number -> its marker, for the shards an earlier build finished: marked done, and the
  shard file still of the size the marker recorded."""
  done = {}
  for k, (path, marker) in enumerate(zip(paths, markers, strict=True)):
    shard = _read_json(marker)
    if (isinstance(shard, dict) and os.path.exists(path)
        and shard.get("file_bytes") == os.path.getsize(path)):
      done[k] = shard
  return done


def _finish(target: str, features: Any, template: Any, wanted: dict[str, Any],
            shards: Sequence[dict]) -> dict[str, Any]:
  """Writes the TFDS metadata and then the index (last: it marks the store complete) of the
  store at `target` from its finished `shards`' markers; returns the index."""
  import tensorflow_datasets as tfds

  split = tfds.core.SplitInfo(name=VIDEO_SPLIT, shard_lengths=[len(s["videos"]) for s in shards],
                              num_bytes=sum(s["num_bytes"] for s in shards),
                              filename_template=template)
  tfds.folder_dataset.write_metadata(data_dir=target, features=features, split_infos=[split],
                                     filename_template=template, check_data=False,
                                     disable_shuffling=True)
  index = {**wanted, "videos": [v for s in shards for v in s["videos"]],
           "info": {v: i for s in shards for v, i in s["info"].items()},
           "failures": {v: why for s in shards for v, why in s["failures"].items()}}
  write_json(os.path.join(target, INDEX_FILE), index)
  return index


class VideoStore:
  """Random access by video path to a store written by `write_video_store`."""

  what = "store"  # for messages
  command = ""  # the command that builds one

  def __init__(self, path: str):
    rebuild = self.rebuild_hint(path)
    index = read_settings(os.path.join(path, INDEX_FILE), rebuild)
    if index is None:
      raise FileNotFoundError(f"no complete {self.what} at {path} (build it with python -m "
                              f"{self.command}; an interrupted build resumes)")
    if "plan" not in index:
      raise ValueError(f"the {self.what} at {path} was written by an older ivcr_jax; rebuild it "
                       f"with python -m {self.command} --overwrite")
    self.path = path
    self.index: dict[str, Any] = index
    self.record_of = {v: i for i, v in enumerate(index["videos"])}
    self._source = open_builder(path, rebuild).as_data_source(split=VIDEO_SPLIT)

  def rebuild_hint(self, path: str) -> str:
    """What to run to replace the store at `path` (for messages about its damaged files)."""
    return (f"rebuild the {self.what} with python -m {self.command} --overwrite and the "
            "arguments it was built with")

  def __len__(self) -> int:
    return len(self.record_of)

  def __contains__(self, video: str) -> bool:
    return video in self.record_of

  def missing(self, video: str) -> str:
    """Why `video` has no record."""
    return f"video {video!r} is not in the {self.what} {self.path}"

  def record(self, video: str) -> dict[str, Any]:
    if video not in self.record_of:
      raise KeyError(self.missing(video))
    return self._source[self.record_of[video]]


@dataclasses.dataclass
class FrameStoreResult:
  path: str  # the versioned store directory
  videos: list[str]  # in record order
  durations: dict[str, float]
  failures: dict[str, str]  # video -> why it is not in the store
  short: dict[str, str]  # video -> note: stored with fewer frames than requested (all it has)
  shards: int
  shards_reused: int  # finished by an interrupted earlier build


def write_frame_store(out_dir: str, videos: Sequence[str], video_root: str,
                      settings: FrameSettings, *, workers: int = 2, progress: bool = True,
                      shard_videos: int = SHARD_VIDEOS, overwrite: bool = False
                      ) -> FrameStoreResult:
  """Decodes `videos` (paths relative to `video_root`) into a frame store under `out_dir`,
  `workers` videos at a time; resumes an interrupted build (see `write_video_store`)."""

  def decode(path: str) -> RecordOrFailure:
    rng = np.random.default_rng([settings.seed, zlib.crc32(path.encode())])
    try:
      v = frames_lib.load_video(os.path.join(video_root, path), num_frames=settings.num_frames,
                                size=settings.size, mode=settings.sampling, rng=rng,
                                resize=settings.resize)
    except frames_lib.VideoError as e:
      return str(e)
    example = {"video": path, "frames": v.frames, "frame_indices": v.indices,
               "timestamps": v.times, "fps": v.fps, "num_video_frames": v.num_video_frames,
               "duration": v.duration}
    info = {"duration": v.duration}
    if settings.sampling != "all" and len(v.indices) < settings.num_frames:
      info["short"] = (f"video {os.path.join(video_root, path)!r} has {v.num_video_frames} "
                       f"frames, fewer than the {settings.num_frames} requested: all of them "
                       "are stored")
    return example, info

  result = write_video_store(
      out_dir, FRAME_STORE, _frame_features(settings.size),
      {"settings": dataclasses.asdict(settings), "video_root": video_root}, sorted(set(videos)),
      lambda todo: ordered_map(decode, todo, workers), shard_videos=shard_videos,
      overwrite=overwrite, progress="decoding videos" if progress else "")
  index = result.index
  return FrameStoreResult(result.path, index["videos"],
                          {v: i["duration"] for v, i in index["info"].items()},
                          index["failures"],
                          {v: i["short"] for v, i in index["info"].items() if "short" in i},
                          result.shards, result.shards_reused)


class FrameStore(VideoStore):
  """Random access to a frame store by video path."""

  what = "frame store"
  command = "data_prep.build_stores"

  def rebuild_hint(self, path: str) -> str:
    return rebuild_stores_hint(os.path.dirname(os.path.dirname(path)))

  def __init__(self, path: str):
    super().__init__(path)
    self.settings = FrameSettings(**self.index["plan"]["settings"])
    self.durations = {v: i["duration"] for v, i in self.index["info"].items()}
    self.failures: dict[str, str] = self.index["failures"]

  def missing(self, video: str) -> str:
    why = self.failures.get(video, "it was not part of the annotations")
    return f"video {video!r} is not in the frame store: {why}"

  def __getitem__(self, video: str) -> frames_lib.VideoFrames:
    ex = self.record(video)
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
          "gt_span": float64_feature((2,)),  # NaN when there is none
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


def rebuild_stores_hint(root: str) -> str:
  """How to rebuild the frame and dialogue stores under `root` (`data_prep.build_stores`)."""
  return (f"rebuild the stores with python -m data_prep.build_stores --out {root} --overwrite and "
          f"the arguments of their first build (their recipe is in {root}/prep_report.json; the "
          "toy presets' training command rebuilds its toy stores once that file is deleted)")


class DialogueStore:
  """One split of a dialogue store as a sequence of `records.Dialogue`."""

  def __init__(self, path: str, split: str):
    rebuild = rebuild_stores_hint(os.path.dirname(os.path.dirname(path)))
    self._source = open_builder(path, rebuild).as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Dialogue:
    return example_to_dialogue(self._source[i])
