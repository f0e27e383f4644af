"""Host batches -> global device batches on the mesh, built ahead of the step.

Every process assembles its own rows of each global batch (`pipeline.train_dataset`) at the
smallest buckets that fit them. Before the rows become one global array:
- the processes agree on the buckets (the maximum of each process's sequence length,
  video-table and frame-table size, through the coordinator's key-value store), so every
  process passes arrays of the same shape and the step compiles once per bucket triple on every
  host;
- each process's video and frame tables become its own blocks of the global tables, and its
  `video_slot` and `frame_slot` are offset by the rows of the processes before it
  (`pipeline.pad_batch`), so a sequence is always spliced with its own videos;
- both tables are padded to a multiple of the batch shards, so they are split over the devices
  like the sequences instead of being replicated (every device encoding every frame);
- every array is placed with the sharding of its own shape (batch rows over the `batch` axes).

A background thread keeps `depth` batches on the devices while the current step runs.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from ivcr_jax import multihost, sharding
from ivcr_jax.data.batch import Layout
from ivcr_jax.data.pipeline import pad_batch


class Feed:
  """Iterates global device batches made from this process's host batches (`batches`).

  `name` tags the bucket agreements; it must be the same on every process and unique per feed
  in a run (e.g. the stream and its starting step).
  """

  def __init__(self, batches: Iterator[dict], layout: Layout, mesh: jax.sharding.Mesh, rules, *,
               name: str, depth: int = 2):
    self._batches = batches
    self._layout = layout
    self._mesh, self._rules = mesh, rules
    self._name = name
    self._rows_unit = batch_rows_per_process(mesh, rules, layout.batch_size)
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name=f"feed-{name}", daemon=True)
    self._thread.start()

  def __iter__(self) -> Feed:
    return self

  def __next__(self) -> dict:
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    if item is _END:
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()
      except queue.Empty:
        self._thread.join(timeout=0.1)

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for n, batch in enumerate(self._batches):
        if not self._put(self._globalize(batch, n)) or self._stop.is_set():
          return
      self._put(_END)
    except BaseException as e:  # re-raised in the consumer's thread
      self._put(e)

  def _globalize(self, batch: dict, n: int) -> dict:
    layout = self._layout
    shape = batch_shape(batch)
    seq, videos, frames = shape
    if jax.process_count() > 1:
      seq, videos, frames = multihost.agree_max(f"feed/{self._name}/{n}", shape)
      if n >= 2:
        multihost.forget(f"feed/{self._name}/{n - 2}")  # every process has read it
    # A table the batch shards do not divide would be replicated: every device would encode
    # every frame. Empty padding rows are cheaper (each device encodes its share of them).
    videos, frames = (math.ceil(x / self._rows_unit) * self._rows_unit for x in (videos, frames))
    first = jax.process_index()  # this process's blocks of the global tables
    if (seq, videos, frames) != shape or first:
      batch = pad_batch(batch, layout, seq_len=seq, videos=videos, frames=frames,
                        first_video_row=first * videos, first_frame_row=first * frames)
    return place_batch(batch, self._mesh, self._rules)


def batch_shape(batch: dict) -> tuple[int, int, int]:
  """(sequence length, video-table rows, frame-table rows): what a program is compiled for."""
  return (batch["input_ids"].shape[1], batch["frame_slot"].shape[0],
          batch["qformer_text_ids"].shape[0])


_END = object()


def batch_rows_per_process(mesh: jax.sharding.Mesh, rules, local_batch: int) -> int:
  """How many shards of every batch array each process's devices hold (a video table is padded
  to a multiple of it). One process: the batch shards when they divide the batch, else 1 (the
  batch is replicated anyway). Several processes split the batch between them, so the mesh's
  `batch` axes must span them; the message says what to change otherwise."""
  count = jax.process_count()
  shards = math.prod(mesh.shape[a] for a in _batch_mesh_axes(mesh, rules))
  if count == 1:
    return shards if local_batch % shards == 0 else 1
  if shards % count:
    raise ValueError(f"{count} processes each read their own rows of a batch, so the mesh axes "
                     f"of the 'batch' rule ({_batch_mesh_axes(mesh, rules)}: {shards} devices, "
                     f"mesh {dict(mesh.shape)}) must be a multiple of {count}")
  unit = shards // count
  if local_batch % unit:
    raise ValueError(f"the batch share of each process ({local_batch} = train.batch_size / "
                     f"{count} processes) is not a multiple of the {unit} batch shards per "
                     f"process of mesh {dict(mesh.shape)}")
  rows = local_batch * count
  mine = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  held = sharding.data_sharding(mesh, rules, (rows,)).addressable_devices_indices_map((rows,))
  if any(not (mine.start <= (idx[0].start or 0) and (idx[0].stop or rows) <= mine.stop)
         for idx in held.values()):
    raise ValueError(f"the devices of process {jax.process_index()} do not hold one contiguous "
                     f"block of batch rows on mesh {dict(mesh.shape)}: build the mesh from "
                     "jax.devices() in process order")
  return unit


def _batch_mesh_axes(mesh: jax.sharding.Mesh, rules) -> tuple[str, ...]:
  target = dict(rules).get("batch")
  axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return tuple(a for a in axes if mesh.shape[a] > 1)


def place_batch(batch: dict, mesh: jax.sharding.Mesh, rules) -> dict:
  """Global arrays from this process's rows (every array split over processes on its first
  dimension); each array gets the sharding of its own shape."""
  count = jax.process_count()
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    shape = (local.shape[0] * count, *local.shape[1:])
    sh = sharding.data_sharding(mesh, rules, shape)
    if count > 1 and sh.spec[0] is None:
      raise ValueError(f"batch array {key!r} of global shape {shape} cannot be split over the "
                       f"batch axes of mesh {dict(mesh.shape)} (raise train.batch_size or make "
                       "data.video_buckets multiples of the batch shards)")
    out[key] = jax.make_array_from_process_local_data(sh, local, shape)
  return out
