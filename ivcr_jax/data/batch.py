"""The batch spec: the static shapes of a batch (`Layout`) and every key the train step reads,
its shape, dtype, padding value and meaning (`FIELDS`). `pipeline.assemble` allocates batches
from it, `pipeline.pad_batch` pads them by it, and shape-only callers (`scripts/plan_7b.py`, the
train-step tests) build abstract or synthetic batches from it, so the schema is written once.

A batch is a dict of numpy arrays keyed by field name (what the step and the model take). Its
dimensions: B rows, S positions (a sequence bucket), K index or span answers per row, D digits per
number, V rows of the video table (a video bucket), T most frames of a video, F rows of the packed
frame table (a frame bucket), L Q-Former timestamp tokens per frame; a frame row holds `[H, W, 3]`
uint8 pixels (`frames`) or `[N, W]` ViT features in the feature store's dtype (`features`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ivcr_jax import video_windows
from ivcr_jax.data.prompt import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shapes of a batch and how videos become LLM tokens."""

  batch_size: int
  seq_buckets: tuple[int, ...]  # allowed sequence lengths after splicing (ascending)
  video_buckets: tuple[int, ...]  # allowed video-table sizes (ascending)
  frame_buckets: tuple[int, ...]  # allowed frame-table sizes (ascending)
  frames: int  # T: the most frames of a video (the width of `frame_slot`)
  text_len: int  # L: Q-Former timestamp tokens per frame
  queries: int  # video Q-Former queries per window
  stride: int  # sliding-window stride in frames
  max_numbers: int  # index answers / span answers per sequence
  max_digits: int  # digits per number

  def tokens_per_video(self, num_frames: int) -> int:
    return video_windows.tokens_per_video(num_frames, queries=self.queries, stride=self.stride)

  @classmethod
  def from_config(cls, config, batch_size: int | None = None, process_count: int = 1) -> Layout:
    """The layout of a batch of `batch_size` (default `train.batch_size`) rows, or of one
    process's share when `process_count` > 1: 1/P of the rows and of every video bucket
    (`data.video_buckets` size the global table), so the samples fit alike on any number of
    processes. `data.frame_buckets` () are the video buckets times T: the frame tables of
    full-length videos."""
    m, d = config.model, config.data
    frames = max(d.frames_retrieval, d.frames_moment)
    batch = batch_size or config.train.batch_size
    if batch % process_count:
      raise ValueError(f"batch size {batch} is not a multiple of the {process_count} processes "
                       "(each assembles an equal share)")
    share = lambda buckets: tuple(-(-b // process_count) for b in buckets)
    frame_buckets = tuple(d.frame_buckets) or tuple(b * frames for b in d.video_buckets)
    return cls(batch_size=batch // process_count, seq_buckets=tuple(d.seq_buckets),
               video_buckets=share(d.video_buckets), frame_buckets=share(frame_buckets),
               frames=frames, text_len=d.qformer_text_len,
               queries=m.video_qformer.num_query_tokens, stride=m.video.stride,
               max_numbers=d.max_turns, max_digits=d.max_digits)


@dataclasses.dataclass(frozen=True)
class Field:
  """One key of a batch."""

  dims: str  # dimension letters (module docstring); "*" is a frame row's item shape
  dtype: Any  # None: the frame or feature store's item dtype
  fill: int | float | bool  # what padding holds (positions, rows, videos, frames)
  doc: str


FRAME_FIELDS = ("frames", "features")  # a batch holds one of the two
FIELDS: dict[str, Field] = {
    "input_ids": Field("B S", np.int32, 0, "token ids, every <VIDEOTOKEN> repeated once per "
                       "embedding its video yields"),
    "labels": Field("B S", np.int32, IGNORE_INDEX, "next-token targets, IGNORE_INDEX where "
                    "nothing is supervised (prompts, video tokens, padding)"),
    "video_slot": Field("B S", np.int32, -1, "-1 for text, else the row of the flattened "
                        "[V * tokens_per_video(T)] video-embedding table the position takes"),
    "attention_mask": Field("B S", np.bool_, False, "real positions (not padding)"),
    "position_ids": Field("B S", np.int32, 0, "0, 1, ... along each row's real positions"),
    "index_pos": Field("B K", np.int32, 0, "position of each index answer's digit, for the aux "
                       "index loss"),
    "index_target": Field("B K", np.int32, 1, "the answered video index (1-10)"),
    "index_valid": Field("B K", np.bool_, False, "index answers that count"),
    "span_pos": Field("B K 2 D", np.int32, 0, "positions of the digits of each span's start and "
                      "end, for the aux span loss"),
    "span_place": Field("B K 2 D", np.float32, 0.0, "place value of each of those digits"),
    "span_target": Field("B K 2", np.float32, 0.0, "each span's start and end in seconds"),
    "span_valid": Field("B K", np.bool_, False, "span answers that count"),
    "frames": Field("F *", np.uint8, 0, "the packed frame table: the batch's distinct videos' "
                    "frames, video after video"),
    "features": Field("F *", None, 0, "the packed frame table as stored ViT features"),
    "frame_slot": Field("V T", np.int32, -1, "each video's rows of the frame table, -1 past "
                        "its frames (padding videos have none)"),
    "qformer_text_ids": Field("F L", np.int32, 0, "each frame's timestamp text for the image "
                              "Q-Former (`assemble` pads unused rows with its pad id)"),
    "qformer_text_mask": Field("F L", np.bool_, False, "real tokens of that text"),
}


class ShapeDtype(NamedTuple):
  """What `jax.ShapeDtypeStruct(*spec)` takes."""

  shape: tuple[int, ...]
  dtype: np.dtype


def batch_spec(layout: Layout, *, seq: int, videos: int, frames: int, field: str = "frames",
               item_shape: Sequence[int], item_dtype: Any = None) -> dict[str, ShapeDtype]:
  """Shape and dtype of every key of a batch for one (sequence, video-table, frame-table) bucket
  triple, in `FIELDS` order, with `field` ("frames" or "features") as its frame table of
  `item_shape` rows (`item_dtype`: the feature store's; frames are uint8)."""
  if field not in FRAME_FIELDS:
    raise ValueError(f"the frame table is one of {FRAME_FIELDS}, got {field!r}")
  size = {"B": (layout.batch_size,), "S": (seq,), "K": (layout.max_numbers,),
          "D": (layout.max_digits,), "2": (2,), "V": (videos,), "T": (layout.frames,),
          "F": (frames,), "L": (layout.text_len,), "*": tuple(item_shape)}
  spec = {}
  for key, f in FIELDS.items():
    if key in FRAME_FIELDS and key != field:
      continue
    shape = tuple(n for dim in f.dims.split() for n in size[dim])
    spec[key] = ShapeDtype(shape, np.dtype(item_dtype if f.dtype is None else f.dtype))
  return spec


def empty_batch(spec: dict[str, ShapeDtype]) -> dict[str, np.ndarray]:
  """Arrays of `spec`, every element its field's padding value."""
  return {key: np.full(shape, FIELDS[key].fill, dtype) for key, (shape, dtype) in spec.items()}
