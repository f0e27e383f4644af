"""The grain input pipeline: samples + frame store -> static-shape batches with a splice plan.

Per sample (a `records.Sample`): sample each video's frames (official `rand` in training, with a
stream per (seed, epoch, video) so a video shared by two samples of a batch is sampled alike),
render and tokenise the chat prompt (`prompt.encode`), and drop the oldest whole turns while the
spliced sequence is longer than `max_len` or the sample shows more videos or frames than its
share of the largest video or frame table (counted by reason in `SampleEncoder.truncated`). In
training, `data.random_resized_crop` crops each sampled video once (one random resized crop for
all its frames, drawn from the same stream, so batches and iterator resumption stay exact).

With a feature store (`data.features`, `ivcr_jax.data.feature_store`) the same sampling picks
rows of stored ViT features instead of frames, and batches carry `features [F, N, W]` (in the
store's float16/bfloat16, cast on the device) instead of `frames`; the store must come from the
model's own ViT (checked by fingerprint).

Per batch (`assemble`): collect the batch's distinct sampled videos (video path + frame indices)
into one table (each encoded once on device), pack their real frames into one frame table
(`frames [F, H, W, 3]`, video after video: no padding frames, so retrieval candidates of 12
frames beside a 96-frame moment video cost 12 frames each) with `frame_slot [V, T]` naming each
video's rows, expand every `<VIDEOTOKEN>` into as many slots as its video yields embeddings, and
write `video_slot` (-1 for text, else the row of the flattened `[V * tokens_per_video]`
video-embedding table), labels, positions and the digit positions of every index/span answer for
the aux losses. Sequence length, video-table size and frame-table size are rounded up to a few
buckets, so the train step compiles once per bucket triple, never per batch.

Several processes: each assembles its own rows of a global batch (`train_dataset`), then
`pad_batch` brings every share to the shapes all processes agreed on and points its
`video_slot` and `frame_slot` at its own rows of the global tables (`ivcr_jax.training.feed`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import threading
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from ivcr_jax.data import feature_store as feature_store_lib
from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data import prompt
from ivcr_jax.data.batch import FIELDS, Layout, batch_spec, empty_batch
from ivcr_jax.data.records import MOMENT, RecordError, Sample

IGNORE = prompt.IGNORE_INDEX
# Turns are dropped (oldest first) for these reasons; anything else is an error.
_SHORTENABLE = ("context_too_long", "too_many_videos", "too_many_frames")

# (video path, sampled frame indices, crop box or ()): one table row
VideoKey = tuple[str, tuple[int, ...], tuple[int, ...]]
Video = frames_lib.VideoFrames | feature_store_lib.VideoFeatures


class MissingVideoError(LookupError):
  """A sample needs a video that its store does not hold; the message names both."""


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


class SampleEncoder:
  """Turns one `Sample` into a host-side element: tokens, labels, numbers, sampled frames (or
  features).

  `truncated` counts the turns dropped from over-long samples, by reason (`context_too_long`,
  `too_many_videos`, `too_many_frames`), in this process (grain worker processes keep their own
  counts).
  """

  def __init__(self, config, tokenizer, frame_store, *, training: bool, layout: Layout,
               qformer_tokenizer=None, feature_store=None, vit_fingerprint: str | None = None):
    """Args:
      frame_store: a `stores.FrameStore` whose frames the model's ViT takes.
      feature_store: a `feature_store.FeatureStore` to read ViT features from instead; default:
        the one at `config.data.features` if set.
      vit_fingerprint: `feature_store.vit_fingerprint(model.vision)`; a feature store from any
        other ViT is refused.
    """
    d = config.data
    self.data = d
    self._tokenizers = (tokenizer, qformer_tokenizer or tokenizer)
    self._local = threading.local()
    self.qformer_vocab = config.model.qformer.vocab_size
    if feature_store is None and d.features:
      feature_store = feature_store_lib.FeatureStore(d.features)
    image_size = config.model.vit.image_size
    if frame_store.settings.resize != d.resize_mode:
      raise ValueError(f"the frame store was decoded with resize {frame_store.settings.resize!r} "
                       f"but data.resize_mode is {d.resize_mode!r}; rebuild it with python -m "
                       f"data_prep.build_stores --resize {d.resize_mode} (or match the config)")
    self.crop = ((tuple(d.crop_scale), tuple(d.crop_ratio))
                 if training and d.random_resized_crop else None)
    if feature_store is not None:
      if self.crop is not None:
        raise ValueError("data.random_resized_crop needs frames: a feature store holds the ViT "
                         "features of uncropped frames (set data.features='' or turn it off)")
      if "vit" in config.model.trainable:
        raise ValueError("data.features: this config trains the ViT (model.trainable has 'vit'), "
                         "so stored ViT features would be stale; train from frames")
      feature_store.check(vit_fingerprint, frame_store)
      self.store, self.field = feature_store, "features"
      self.item_shape, self.item_dtype = tuple(feature_store.shape), feature_store.item_dtype
    else:
      size = frame_store.settings.size
      if size != image_size:
        raise ValueError(f"the frame store holds {size} px frames but the ViT takes "
                         f"{image_size} px; rebuild it with python -m data_prep.build_stores "
                         f"--size {image_size}")
      self.store, self.field = frame_store, "frames"
      self.item_shape, self.item_dtype = (image_size, image_size, 3), np.dtype(np.uint8)
    self.training = training
    self.layout = layout
    self.sampling = d.sample_train if training else d.sample_eval
    self.seed = config.seed
    self.max_len = layout.seq_buckets[-1]
    self.max_videos = layout.video_buckets[-1] // layout.batch_size
    self.max_frames = layout.frame_buckets[-1] // layout.batch_size
    if self.max_videos < 1 or self.max_frames < layout.frames:
      raise ValueError(f"the largest video table ({layout.video_buckets[-1]}) or frame table "
                       f"({layout.frame_buckets[-1]}) cannot hold one video per sample of a batch "
                       f"of {layout.batch_size}")
    self.truncated = collections.Counter()

  def __getstate__(self):  # for grain worker processes: thread-local copies are rebuilt there
    state = dict(self.__dict__)
    state["_local"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def tokenizers(self):
    """This thread's (LLM, Q-Former) tokenizers. HF fast tokenizers keep truncation/padding as
    mutable state, so concurrent calls from grain's threads must not share one object."""
    if not hasattr(self._local, "pair"):
      llm, qformer = self._tokenizers
      self._local.pair = (copy.deepcopy(llm), copy.deepcopy(qformer))
    return self._local.pair

  def sampled_video(self, video: str, kind: str, epoch: int) -> tuple[VideoKey, Video]:
    """This epoch's frames (or feature rows) of `video` and their table key: the stored ones
    resampled with the configured sampler, and cropped if `self.crop`."""
    n = self.data.frames_moment if kind == MOMENT else self.data.frames_retrieval
    stored = self.store[video]
    rng = np.random.default_rng([self.seed, epoch, zlib.crc32(video.encode()), n])
    idx = frames_lib.sample_indices(len(stored.indices), n, self.sampling, rng)
    picked = dataclasses.replace(stored, indices=stored.indices[idx],
                                 **{self.field: getattr(stored, self.field)[idx]})
    box = ()
    if self.crop is not None:
      size = picked.frames.shape[1:3]
      box = frames_lib.random_resized_crop_box(*size, *self.crop, rng)
      picked = dataclasses.replace(picked, frames=frames_lib.resized_crop(picked.frames, box, size))
    return (video, tuple(picked.indices.tolist()), box), picked

  def __call__(self, sample: Sample, epoch: int = 0, generation: bool = False) -> dict[str, Any]:
    """Encodes `sample`, dropping its oldest turns while it is too long (counted)."""
    while True:
      try:
        return self._encode(sample, epoch, generation)
      except RecordError as e:
        shorter = _drop_oldest_turn(sample) if sample.num_turns > 1 else None
        if e.reason not in _SHORTENABLE or shorter is None or not (
            shorter.supervised or generation):
          raise
        sample = shorter
        self.truncated[e.reason] += 1

  def _encode(self, sample: Sample, epoch: int, generation: bool) -> dict[str, Any]:
    turns = sample.turns
    videos: list[VideoKey] = []  # per placeholder
    loaded: dict[VideoKey, Video] = {}
    frame_times = []
    for turn in turns:
      times = None
      for video in turn.videos:
        try:
          key, frames = self.sampled_video(video, turn.kind, epoch)
        except KeyError as e:
          raise MissingVideoError(f"{sample.dialogue.name}, turn text_id {turn.text_id!r}: "
                                  f"{e.args[0]}") from e
        loaded.setdefault(key, frames)
        videos.append(key)
        times = [round(float(t), 1) for t in frames.times]
      frame_times.append(times if turn.kind == MOMENT else None)
    if len(loaded) > self.max_videos:
      raise RecordError("too_many_videos", f"{sample.dialogue.name}: {len(loaded)} videos, more "
                        f"than {self.max_videos} (largest video table / batch size)")
    num_frames = sum(len(k[1]) for k in loaded)
    if num_frames > self.max_frames:
      raise RecordError("too_many_frames", f"{sample.dialogue.name}: {num_frames} frames, more "
                        f"than {self.max_frames} (largest frame table / batch size)")
    llm_tok, qformer_tok = self.tokenizers()
    enc = prompt.encode(sample, llm_tok, frame_times, generation=generation,
                        num_candidates=self.data.num_candidates,
                        tokens_per_video=[self.layout.tokens_per_video(len(k[1])) for k in videos],
                        max_len=self.max_len)
    text = {key: prompt.qformer_text_ids(
        vf.times, qformer_tok, max_len=self.layout.text_len, pad_to=self.layout.text_len,
        last_frame_quirk=self.data.qformer_last_frame_quirk, vocab_size=self.qformer_vocab)
        for key, vf in loaded.items()}
    return {"encoded": enc, "videos": videos, "frames": loaded, "qformer_text": text,
            "sample": sample, "qformer_pad": qformer_tok.pad_token_id, "field": self.field,
            "item_shape": self.item_shape, "item_dtype": self.item_dtype}


def _drop_oldest_turn(sample: Sample) -> Sample:
  """The sample without its first turn (the system prompt stays; supervision shifts)."""
  d = sample.dialogue
  shorter = dataclasses.replace(d, turns=d.turns[1:])
  supervised = tuple(t - 1 for t in sample.supervised if t > 0)
  return Sample(shorter, sample.num_turns - 1, supervised)


class SplicedRow(NamedTuple):
  """One sequence with its `<VIDEOTOKEN>`s expanded (`splice_row`)."""

  input_ids: np.ndarray
  labels: np.ndarray
  video_slot: np.ndarray
  shift: np.ndarray  # [len(encoded ids) + 1]: how far each encoded position moved


def splice_row(enc: prompt.EncodedSample, videos: Sequence[VideoKey], table: dict[VideoKey, int],
               layout: Layout) -> SplicedRow:
  """The splice plan of one encoded sequence: each placeholder becomes as many positions as its
  video yields embeddings, unsupervised, pointing at that video's rows of the flattened
  `[V * tokens_per_video(T)]` embedding table (`table`: video -> its row of the video table)."""
  per_video = layout.tokens_per_video(layout.frames)
  ids, labels, slots, shift = [], [], [], np.zeros(len(enc.input_ids) + 1, np.int64)
  start = 0
  for p, key in zip(enc.placeholder_positions, videos, strict=True):
    ids.append(enc.input_ids[start:p])
    labels.append(enc.labels[start:p])
    slots.append(np.full(p - start, -1, np.int32))
    n = layout.tokens_per_video(len(key[1]))
    ids.append(np.full(n, enc.input_ids[p], np.int32))
    labels.append(np.full(n, IGNORE, np.int32))
    slots.append(table[key] * per_video + np.arange(n, dtype=np.int32))
    shift[p + 1:] += n - 1
    start = p + 1
  ids.append(enc.input_ids[start:])
  labels.append(enc.labels[start:])
  slots.append(np.full(len(enc.input_ids) - start, -1, np.int32))
  return SplicedRow(np.concatenate(ids), np.concatenate(labels), np.concatenate(slots), shift)


def assemble(elements: Sequence[dict[str, Any]], layout: Layout) -> dict[str, np.ndarray]:
  """One static-shape batch from encoded elements (see the module docstring)."""
  b = layout.batch_size
  if len(elements) > b:
    raise ValueError(f"{len(elements)} elements for batch size {b}")
  if not elements:
    raise ValueError("a batch needs at least one element")
  table: dict[VideoKey, int] = {}
  frames_of: dict[VideoKey, Video] = {}
  text_of: dict[VideoKey, tuple[np.ndarray, np.ndarray]] = {}
  for el in elements:
    for key in el["videos"]:
      if key not in table:
        table[key] = len(table)
        frames_of[key] = el["frames"][key]
        text_of[key] = el["qformer_text"][key]
  rows = [splice_row(el["encoded"], el["videos"], table, layout) for el in elements]
  counts = [len(frames_of[key].indices) for key in table]
  s = _bucket(max(len(r.input_ids) for r in rows), layout.seq_buckets, "spliced sequence length")
  v = _bucket(max(len(table), 1), layout.video_buckets,
              "videos per batch (raise data.video_buckets)")
  f = _bucket(sum(counts), layout.frame_buckets, "frames per batch (raise data.frame_buckets)")
  field = elements[0]["field"]
  out = empty_batch(batch_spec(layout, seq=s, videos=v, frames=f, field=field,
                               item_shape=elements[0]["item_shape"],
                               item_dtype=elements[0]["item_dtype"]))

  for i, (row, el) in enumerate(zip(rows, elements, strict=True)):
    n = len(row.input_ids)
    out["input_ids"][i, :n] = row.input_ids
    out["labels"][i, :n] = row.labels
    out["video_slot"][i, :n] = row.video_slot
    out["attention_mask"][i, :n] = True
    out["position_ids"][i, :n] = np.arange(n)
    _write_numbers(out, i, el["encoded"].numbers, row.shift, layout.max_numbers,
                   layout.max_digits)

  out["frame_slot"] = frame_slots(counts, v, layout.frames)
  out["qformer_text_ids"][:] = elements[0]["qformer_pad"]
  start = 0
  for key, n in zip(table, counts, strict=True):
    frame_rows = slice(start, start + n)
    out[field][frame_rows] = getattr(frames_of[key], field)
    ids, mask = text_of[key]
    out["qformer_text_ids"][frame_rows] = ids
    out["qformer_text_mask"][frame_rows] = mask.astype(bool)
    start += n
  return out


def frame_slots(counts: Sequence[int], videos: int, frames: int) -> np.ndarray:
  """`frame_slot [videos, frames]` of videos with `counts` frames packed one after another in a
  frame table (-1: no such frame; rows past the counts are empty videos)."""
  slot = np.full((videos, frames), -1, np.int32)
  start = 0
  for row, n in enumerate(counts):
    slot[row, :n] = start + np.arange(n)
    start += n
  return slot


def _write_numbers(batch: dict, row: int, numbers: Sequence[prompt.NumberTarget], shift: np.ndarray,
                   k: int, dmax: int) -> None:
  """Digit positions (in spliced coordinates) of the index and span answers of one sequence."""
  index = [n for n in numbers if n.role == "index"]
  spans = collections.defaultdict(dict)
  for n in numbers:
    if n.role in ("start", "end"):
      spans[n.turn][n.role] = n
  for j, n in enumerate(index[:k]):
    batch["index_pos"][row, j] = n.positions[0] + shift[n.positions[0]]
    batch["index_target"][row, j] = int(round(n.value))
    batch["index_valid"][row, j] = 1 <= n.value <= 10
  for j, (_, pair) in enumerate(sorted(spans.items())[:k]):
    if set(pair) != {"start", "end"}:
      continue
    for e, role in enumerate(("start", "end")):
      n = pair[role]
      if len(n.positions) > dmax:
        break
      pos = np.asarray(n.positions) + shift[np.asarray(n.positions)]
      batch["span_pos"][row, j, e, :len(pos)] = pos
      batch["span_place"][row, j, e, :len(pos)] = n.places
      batch["span_target"][row, j, e] = n.value
    else:
      batch["span_valid"][row, j] = True


def pad_batch(batch: dict[str, np.ndarray], layout: Layout, *, seq_len: int, videos: int,
              frames: int, first_video_row: int = 0, first_frame_row: int = 0
              ) -> dict[str, np.ndarray]:
  """`batch` padded to `seq_len` positions, a video table of `videos` rows and a frame table of
  `frames` rows, its `video_slot` and `frame_slot` pointing into global tables in which this
  batch's rows start at `first_video_row` and `first_frame_row`.

  Multi-process runs: every process pads its share to the shapes all processes agreed on, and
  process k's rows follow those of processes 0..k-1 in the global tables. Padding positions are
  masked text, padding videos have no frames, padding frames no text; no slot refers to them.
  """
  b, s = batch["input_ids"].shape
  v = batch["frame_slot"].shape[0]
  f = len(batch["qformer_text_ids"])
  if seq_len < s or videos < v or frames < f:
    raise ValueError(f"cannot pad a batch of {s} positions, {v} videos and {f} frames to "
                     f"{seq_len}, {videos} and {frames}")
  rows = {"V": videos, "F": frames}  # the padded tables' sizes, by their first dimension
  out = {}
  for key, x in batch.items():
    dims, fill = FIELDS[key].dims.split(), FIELDS[key].fill
    if dims[:2] == ["B", "S"]:
      out[key] = np.pad(x, [(0, 0), (0, seq_len - s)], constant_values=fill)
    elif dims[0] in rows:
      out[key] = np.pad(x, [(0, rows[dims[0]] - len(x))] + [(0, 0)] * (x.ndim - 1),
                        constant_values=fill)
    else:
      out[key] = x
  if first_video_row:
    slot = out["video_slot"]
    per_video = layout.tokens_per_video(layout.frames)
    out["video_slot"] = np.where(slot >= 0, slot + first_video_row * per_video, slot)
  if first_frame_row:
    slot = out["frame_slot"]
    out["frame_slot"] = np.where(slot >= 0, slot + first_frame_row, slot)
  return out


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of the samples in `epoch`: a fresh permutation per epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_samples)


def samples_at(samples: Sequence[Sample], seed: int, first: int, count: int) -> list[Sample]:
  """The samples at global positions `first` .. `first + count - 1` of the training order (what
  a step's batch held, e.g. to name a batch that made the loss non-finite)."""
  out = []
  for position in range(first, first + count):
    epoch, j = divmod(position, len(samples))
    out.append(samples[int(epoch_order(len(samples), seed, epoch)[j])])
  return out


class _EncodeAtPosition:
  """Position in this process's stream -> encoded element. Global sample positions run through
  epochs (a fresh permutation each) in global batches of `local_batch * process_count`; process
  k takes rows `[k * local_batch, (k + 1) * local_batch)` of each, so the global order does not
  depend on the number of processes. A plain object (not a closure) so that grain can pickle it
  into worker processes."""

  def __init__(self, samples: Sequence[Sample], encoder: SampleEncoder, seed: int, *,
               start: int, local_batch: int, process_index: int, process_count: int):
    self.samples, self.encoder, self.seed = samples, encoder, seed
    self.start, self.local_batch = start, local_batch
    self.process_index, self.process_count = process_index, process_count
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), one swap per epoch

  def order(self, epoch: int) -> np.ndarray:
    cached = self._order
    if cached is None or cached[0] != epoch:
      cached = (epoch, epoch_order(len(self.samples), self.seed, epoch))
      self._order = cached
    return cached[1]

  def position(self, i: int) -> int:
    """The global sample position of this process's `i`-th element."""
    batch, row = divmod(int(i), self.local_batch)
    return (self.start + batch * self.local_batch * self.process_count
            + self.process_index * self.local_batch + row)

  def __call__(self, i: int) -> dict[str, Any]:
    epoch, j = divmod(self.position(i), len(self.samples))
    return self.encoder(self.samples[int(self.order(epoch)[j])], epoch)


def train_dataset(samples: Sequence[Sample], encoder: SampleEncoder, layout: Layout, *,
                  seed: int, start: int = 0, process_index: int = 0, process_count: int = 1,
                  read_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
  """Shuffled (per epoch), repeated batches of this process's share, from global sample position
  `start` on (`layout.batch_size` is the per-process batch).

  The position in the global order is the whole data state: a run resumes exactly, on any
  number of processes, from `start = samples seen`. Batches are built ahead by `read_threads`
  threads, at most `prefetch` of them: grain's default (16 threads, 500 elements) would hold
  hundreds of full batches of frames in memory. Worker processes:
  `.mp_prefetch(grain.MultiprocessingOptions(num_workers=k))` on the result (grain spawns them:
  absl flags must be parsed, and the encoder is pickled into each).
  """
  n = len(samples)
  if n == 0:
    raise ValueError("no training samples")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} of {process_count}")
  # Index-addressable and effectively endless: a position is a plain integer.
  ds = grain.MapDataset.range(n * 10**6).map(_EncodeAtPosition(
      samples, encoder, seed, start=start, local_batch=layout.batch_size,
      process_index=process_index, process_count=process_count))
  ds = ds.batch(layout.batch_size, drop_remainder=True,
                batch_fn=functools.partial(assemble, layout=layout))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))
