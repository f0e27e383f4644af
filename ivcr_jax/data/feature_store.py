"""Post-ViT feature store (SPEC §4.2): the frozen ViT + ln_vision run once per stored frame, so
training reads features and skips the most expensive frozen part.

One record per video of a frame store: `features [T, N, W]` of every stored frame (so `rand`
sampling still works at training time: the pipeline samples feature rows exactly as it samples
frames), their frame indices, fps and frame count. Storage type:
- `float16` (default): half the bytes of float32, 11-bit mantissa; ln_vision outputs are O(1),
  far inside its range;
- `bfloat16`: the same bytes, kept as the raw uint16 bits (TFDS has no bfloat16), 8-bit mantissa
  like a bf16-trained ViT's own activations;
- `float32`: exact (tests, or when disk does not matter).
Reads give the stored type (bfloat16 as `ml_dtypes.bfloat16`): features travel to the device at
half the bytes of float32 and are cast there. A ViT-g/14 video of 64 frames at 224 px is
64 x 257 x 1408 values:
46 MB in float16, against 9.6 MB of uint8 frames; the store trades disk for ViT compute.

Features are only valid for the ViT and the frames they came from: the index records
`vit_fingerprint` (a hash of the ViT + ln_vision parameters and the settings that change their
output) and the frame store's settings and videos, and `FeatureStore.check` refuses any other ViT
or frame store with a message saying how to rebuild. The store is written shard by shard like the
frame store (`stores.write_video_store`): an interrupted build resumes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data import stores

FEATURE_STORE = "ivcr_features"
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
# The vit settings that change the features (remat/scan_layers change only how they are computed).
_VIT_KEYS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "ln_eps",
             "ln_vision_eps")


class FeatureStoreMismatch(ValueError):
  """The feature store was built from another ViT than the model's."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoFeatures(frames_lib.SampledVideo):
  """A video's ViT features, the counterpart of `frames.VideoFrames`."""

  features: np.ndarray  # [T, N, W] in the store's dtype


def vit_fingerprint(vision) -> str:
  """sha256 of a `VisionTower`'s ViT (+ ln_vision) parameters, their layout and the settings that
  change `encode_frames` (ViT shape, compute dtype)."""
  import jax
  from flax import nnx

  cfg = vision.cfg
  h = hashlib.sha256(json.dumps({"vit": {k: cfg.vit[k] for k in _VIT_KEYS},
                                 "dtype": str(cfg.dtype)}, sort_keys=True).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.state(vision.vit, nnx.Param))
  for path, leaf in leaves:
    array = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def _features_spec(num_tokens: int, width: int, dtype: str):
  import tensorflow_datasets as tfds

  f = tfds.features
  stored = np.uint16 if dtype == "bfloat16" else np.dtype(dtype).type
  return f.FeaturesDict({
      "video": f.Text(),
      "features": f.Tensor(shape=(None, num_tokens, width), dtype=stored,
                           encoding=f.Encoding.BYTES),
      "frame_indices": f.Tensor(shape=(None,), dtype=np.int32),
      "fps": stores.float64_feature(()),
      "num_video_frames": f.Scalar(dtype=np.int32)})


def _encoded(videos: list[str], frame_store: stores.FrameStore, encode, batch_frames: int,
             item_shape: tuple[int, ...]) -> Iterator[tuple[str, Any, np.ndarray]]:
  """(video, stored frames, features) in order; frames of consecutive videos share fixed-size
  ViT batches (one compilation, no padding waste on short videos)."""
  waiting: collections.deque = collections.deque()  # (video, frames) without all features yet
  frames_in: list[np.ndarray] = []  # frames not yet encoded, in order
  rows_out: list[np.ndarray] = []  # encoded rows not yet handed out, in order
  num_in = num_out = 0

  def flush(final: bool):
    nonlocal frames_in, num_in, num_out
    while num_in >= batch_frames or (final and num_in):
      flat = np.concatenate(frames_in)
      chunk, rest = flat[:batch_frames], flat[batch_frames:]
      batch = np.zeros((batch_frames, *item_shape), np.uint8)
      batch[:len(chunk)] = chunk
      rows_out.append(encode(batch)[:len(chunk)])
      num_out += len(chunk)
      frames_in, num_in = ([rest] if len(rest) else []), len(rest)

  def ready() -> Iterator[tuple[str, Any, np.ndarray]]:
    nonlocal rows_out, num_out
    while waiting and len(waiting[0][1].indices) <= num_out:
      video, vf = waiting.popleft()
      flat = np.concatenate(rows_out)
      n = len(vf.indices)
      yield video, vf, flat[:n]
      rows_out, num_out = ([flat[n:]] if len(flat) > n else []), len(flat) - n

  for video, vf in zip(videos, stores.ordered_map(frame_store.__getitem__, videos, 2),
                       strict=True):
    waiting.append((video, vf))
    frames_in.append(vf.frames)
    num_in += len(vf.frames)
    flush(final=False)
    yield from ready()
  flush(final=True)
  yield from ready()


@dataclasses.dataclass
class FeatureStoreResult:
  path: str  # the versioned store directory
  videos: list[str]
  fingerprint: str
  shards_reused: int  # finished by an interrupted earlier build


def storage_dtype(dtype: str) -> np.dtype:
  """The numpy dtype of features stored as `dtype` (one of `STORAGE_DTYPES`)."""
  return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def write_feature_store(out_dir: str, frame_store: stores.FrameStore,
                        encode: Callable[[np.ndarray], np.ndarray], *, model_cfg: Any,
                        fingerprint: str, dtype: str = "float16", batch_frames: int = 64,
                        progress: bool = True, shard_videos: int = stores.SHARD_VIDEOS,
                        overwrite: bool = False) -> FeatureStoreResult:
  """Encodes every stored frame of `frame_store` with `encode` into a feature store under
  `out_dir`.

  The caller runs the model: `encode` maps `[batch_frames, H, W, 3]` uint8 frames to their
  `[batch_frames, N, W]` ViT features in `storage_dtype(dtype)` (`VisionTower.encode_frames`,
  e.g. through `vision_tower.frame_encoder`); `model_cfg` is that ViT's model config and
  `fingerprint` its `vit_fingerprint`, recorded so that the features are only used with it.
  Resumes an interrupted build of the same ViT, dtype and frame store; a store of anything else
  there is an error unless `overwrite` (see `stores.write_video_store`).
  """
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"feature dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  vit = model_cfg.vit
  size = frame_store.settings.size
  if size != vit.image_size:
    raise ValueError(f"the frame store holds {size} px frames but the ViT takes "
                     f"{vit.image_size} px; rebuild the frame store with --size "
                     f"{vit.image_size}")
  stored = storage_dtype(dtype)

  def encode_stored(frames: np.ndarray) -> np.ndarray:
    out = np.asarray(encode(frames))
    if out.dtype != stored:
      raise TypeError(f"encode gave {out.dtype} features for a {dtype} feature store")
    return out.view(np.uint16) if dtype == "bfloat16" else out  # TFDS has no bfloat16

  num_tokens = (size // vit.patch_size) ** 2 + 1

  def produce(videos: list[str]) -> Iterator[stores.RecordOrFailure]:
    for video, vf, feats in _encoded(videos, frame_store, encode_stored, batch_frames,
                                     (size, size, 3)):
      yield {"video": video, "features": feats, "frame_indices": vf.indices, "fps": vf.fps,
             "num_video_frames": vf.num_video_frames}, {}

  plan = {"vit_fingerprint": fingerprint, "dtype": dtype, "shape": [num_tokens, vit.width],
          "vit": {k: vit[k] for k in _VIT_KEYS}, "compute_dtype": str(model_cfg.dtype),
          "frame_settings": dataclasses.asdict(frame_store.settings)}
  result = stores.write_video_store(
      out_dir, FEATURE_STORE, _features_spec(num_tokens, vit.width, dtype), plan,
      sorted(frame_store.record_of, key=frame_store.record_of.get), produce,
      shard_videos=shard_videos, overwrite=overwrite, progress="ViT features" if progress else "")
  return FeatureStoreResult(result.path, result.index["videos"], fingerprint,
                            result.shards_reused)


class FeatureStore(stores.VideoStore):
  """Random access to a feature store by video path (features in the stored dtype)."""

  what = "feature store"
  command = "data_prep.build_feature_store"

  def __init__(self, path: str):
    super().__init__(path)
    plan = self.index["plan"]
    self.fingerprint: str = plan["vit_fingerprint"]
    self.dtype: str = plan["dtype"]
    self.shape: tuple[int, int] = tuple(plan["shape"])  # (N, W) per frame
    self.item_dtype = storage_dtype(self.dtype)
    self.frame_settings = stores.FrameSettings(**plan["frame_settings"])

  def check(self, fingerprint: str | None, frame_store: stores.FrameStore) -> None:
    """Refuses features from another ViT than the one whose `vit_fingerprint` is given, or from
    another frame store than `frame_store` (other settings or videos)."""
    if fingerprint is None:
      raise FeatureStoreMismatch(
          f"reading the feature store {self.path} needs the model's ViT fingerprint to check it "
          "against: pass vit_fingerprint=feature_store.vit_fingerprint(model.vision)")
    if fingerprint != self.fingerprint:
      raise FeatureStoreMismatch(
          f"the feature store {self.path} was built from the ViT with fingerprint "
          f"{self.fingerprint[:12]}, but the model's ViT has fingerprint {fingerprint[:12]}: its "
          "features are not this model's. Rebuild it with python -m "
          "data_prep.build_feature_store for this model's weights, or train from frames "
          "(data.features='').")
    if (self.frame_settings != frame_store.settings
        or self.record_of.keys() != frame_store.record_of.keys()):
      raise FeatureStoreMismatch(
          f"the feature store {self.path} was built from another frame store (settings "
          f"{self.frame_settings} and {len(self)} videos; this one has {frame_store.settings} and "
          f"{len(frame_store)} videos). Rebuild it with python -m data_prep.build_feature_store.")

  def __getitem__(self, video: str) -> VideoFeatures:
    ex = self.record(video)
    return VideoFeatures(features=ex["features"].view(self.item_dtype), indices=ex["frame_indices"],
                         fps=float(ex["fps"]), num_video_frames=int(ex["num_video_frames"]))
