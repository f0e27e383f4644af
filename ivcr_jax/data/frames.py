"""Frame sampling and decoding (reference §4.4), with the official samplers and their quirks.

- `uniform`: the official `np.arange(0, vlen, vlen / n).astype(int)`, written as
  `(arange(n) * (vlen / n)).astype(int)`: the same values (numpy fills `i * step`), but always
  exactly n of them (an `arange` with a float step may give n + 1).
- `rand`: the official per-interval sampler: n = min(n, vlen) intervals from
  `linspace(0, vlen, n + 1).astype(int)`, one random frame in `[a, b - 2]` of each `[a, b)` (it
  builds `range(a, b - 1)`: the last frame of an interval is never picked, B16); if any interval
  is then empty (always when vlen < 2n) it falls back to a sorted random subset of n frames.
- `rand_full`: the same without B16: a random frame anywhere in each interval, no fallback.
- `all`: every frame (for a frame store that later samples with `rand` at training time).

Timestamps are `index / fps` with decord's average fps; the texts round them with
`answers.format_seconds`, i.e. `round(t, 1)` as the official `load_video` does.

Decoding resizes at decode time (decord, through ffmpeg's scaler): `squash` to size x size as the
official reader does (aspect ratio not kept), or `shorter_side_crop`: the shorter side to `size`
with the aspect ratio kept, then the centre size x size crop.

Training augmentation (`random_resized_crop_box` + `resized_crop`): the official
`RandomResizedCropVideo` (torchvision's crop sampling, torch's bicubic `interpolate`), one crop
for all frames of a video, on the host, on uint8 frames of a fixed size so shapes stay static.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ivcr_jax.bicubic import bicubic_matrix

SAMPLERS = ("uniform", "rand", "rand_full", "all")
RESIZE_MODES = ("squash", "shorter_side_crop")
CropBox = tuple[int, int, int, int]  # (top, left, height, width) in the frame


# How far (seconds; at least one frame) a frame may be shown from `index / fps`, where every
# timestamp and span of the data puts it.
TIMELINE_TOLERANCE_S = 0.5


class VideoError(RuntimeError):
  """A video that cannot be used (missing, empty, corrupt, or frames that are not shown at
  `index / fps`); the message names it and says why."""


def sample_indices(vlen: int, n: int, mode: str, rng: np.random.Generator | None = None
                   ) -> np.ndarray:
  """Frame indices (int32, sorted) of `min(n, vlen)` frames of a `vlen`-frame video."""
  if vlen < 1:
    raise ValueError(f"a video needs at least one frame, got {vlen}")
  if mode == "all":
    return np.arange(vlen, dtype=np.int32)
  n = min(n, vlen)
  if n < 1:
    raise ValueError(f"cannot sample {n} frames")
  if mode == "uniform":
    return (np.arange(n) * (vlen / n)).astype(np.int32)
  if mode not in ("rand", "rand_full"):
    raise ValueError(f"frame sampling must be one of {SAMPLERS}, got {mode!r}")
  if rng is None:
    raise ValueError(f"{mode!r} sampling needs a random generator")
  bounds = np.linspace(0, vlen, n + 1).astype(np.int64)
  lo, hi = bounds[:-1], bounds[1:] - (1 if mode == "rand" else 0)  # pick in [lo, hi)
  if mode == "rand" and np.any(hi <= lo):
    return np.sort(rng.permutation(vlen)[:n]).astype(np.int32)
  return (lo + np.floor(rng.random(n) * (hi - lo))).astype(np.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledVideo:
  """Where some frames of a video are in it; subclasses add per-frame data (pixels, features)."""

  indices: np.ndarray  # [T] int32, frame numbers in the video
  fps: float
  num_video_frames: int

  @property
  def times(self) -> np.ndarray:
    """Seconds of each sampled frame (float64, unrounded)."""
    return self.indices / self.fps

  @property
  def duration(self) -> float:
    return self.num_video_frames / self.fps


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoFrames(SampledVideo):
  frames: np.ndarray  # [T, H, W, 3] uint8


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the shorter side `size` and the aspect ratio kept (rounded)."""
  if height <= width:
    return size, max(size, round(width * size / height))
  return max(size, round(height * size / width)), size


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
  """The centre `size` x `size` of `[T, H, W, C]` frames (torchvision's `CenterCrop` offsets)."""
  top = int(round((frames.shape[1] - size) / 2))
  left = int(round((frames.shape[2] - size) / 2))
  return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def load_video(path: str, *, num_frames: int, size: int | None, mode: str = "uniform",
               rng: np.random.Generator | None = None, resize: str = "squash") -> VideoFrames:
  """Decodes the sampled frames of `path` at `size` x `size` (official: 224), resized as `resize`
  says (see the module docstring), or at their own size when `size` is None.

  Raises `VideoError` naming the file when it is missing, empty or cannot be decoded, or when
  its frames are not shown at `index / fps` (`check_timeline`).
  """
  if size is not None and (size <= 0 or size % 32):
    raise ValueError(f"decode size {size} must be a positive multiple of 32 (decord resizing)")
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if not os.path.isfile(path):
    raise VideoError(f"video {path!r} not found")
  if os.path.getsize(path) == 0:
    raise VideoError(f"video {path!r} is empty (0 bytes)")
  import decord

  crop = size is not None and resize == "shorter_side_crop"
  try:
    height = width = size or -1
    if crop:  # the native size first (a reader at the native size, one frame decoded)
      height, width = shorter_side_size(*decord.VideoReader(path).next().shape[:2], size)
    reader = decord.VideoReader(path, width=width, height=height)
    vlen = len(reader)
    fps = float(reader.get_avg_fps())
    if vlen < 1 or not fps > 0:
      raise VideoError(f"video {path!r} has {vlen} frames at {fps} fps")
    check_timeline(path, reader.get_frame_timestamp(list(range(vlen)))[:, 0], fps)
    indices = sample_indices(vlen, num_frames, mode, rng)
    try:
      frames = reader.get_batch(indices.tolist()).asnumpy()
    except decord.DECORDError:
      if not crop:
        raise
      # decord's decode-time resize fails at a few small widths (16, 24, 48 and 72 here) and
      # works one pixel wider: the centre crop moves by half a pixel at most.
      reader = decord.VideoReader(path, width=width + 1, height=height)
      frames = reader.get_batch(indices.tolist()).asnumpy()
  except VideoError:
    raise
  except Exception as e:  # decord raises its own error types, and RuntimeError on bad files
    raise VideoError(f"cannot decode video {path!r}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if crop:
    frames = center_crop(frames, size)
  return VideoFrames(frames=np.ascontiguousarray(frames, np.uint8), indices=indices, fps=fps,
                     num_video_frames=vlen)


def check_timeline(path: str, shown: np.ndarray, fps: float) -> None:
  """Raises `VideoError` unless frame i is shown (`shown[i]`, seconds: its presentation time)
  at `i / fps` within `TIMELINE_TOLERANCE_S`. Sampling, the timestamp texts and the spans all
  place frames there (as the official reader does), so a variable frame rate, or a container
  timeline (an edit list) that disagrees with the frame count, would silently misplace every
  moment; such a video is refused with a re-encoding hint instead."""
  expected = np.arange(len(shown)) / fps
  off = np.abs(shown - expected)
  worst = int(np.argmax(off))
  if off[worst] <= max(TIMELINE_TOLERANCE_S, 1 / fps):
    return
  if abs(shown[0]) > max(TIMELINE_TOLERANCE_S, 1 / fps):
    why = (f"its container shows the first of its {len(shown)} frames at {shown[0]:.3f} s, not "
           f"0 (an edit list: the container's duration disagrees with {len(shown)} frames at "
           f"{fps:g} fps)")
  else:
    why = (f"variable frame rate: frame {worst} is shown at {shown[worst]:.3f} s, but frame / "
           f"average fps ({fps:g}) puts it at {expected[worst]:.3f} s")
  raise VideoError(f"video {path!r}: {why}; re-encode it at a constant frame rate to use it "
                   "(ffmpeg -i IN -fps_mode cfr OUT)")


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: np.random.Generator) -> CropBox:
  """torchvision's `RandomResizedCrop.get_params` (10 tries at a random area fraction in `scale`
  and log-uniform aspect ratio in `ratio`, then the centre crop at the nearest allowed ratio), with
  a numpy generator so the pipeline can seed it."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(frames: np.ndarray, box: CropBox, size: tuple[int, int]) -> np.ndarray:
  """`box` of every frame of `[T, H, W, 3]` uint8 frames, resized to `size` (height, width) with
  torch's bicubic kernel, rounded and clamped to uint8 (the official casts without clamping, B15).

  Two float32 GEMMs (the kernel is separable), laid out so each is one large BLAS call.
  """
  top, left, h, w = box
  t, c = frames.shape[0], frames.shape[3]
  out_h, out_w = size
  crop = np.ascontiguousarray(frames[:, top:top + h, left:left + w].transpose(0, 1, 3, 2),
                              dtype=np.float32)  # [T, h, C, w]
  x = crop.reshape(-1, w) @ bicubic_matrix(w, out_w).astype(np.float32).T  # [T * h * C, out_w]
  x = np.ascontiguousarray(x.reshape(t, h, c * out_w).transpose(1, 0, 2)).reshape(h, -1)
  y = (bicubic_matrix(h, out_h).astype(np.float32) @ x).reshape(out_h, t, c, out_w)
  np.rint(y, out=y)
  np.clip(y, 0, 255, out=y)
  return np.ascontiguousarray(y.astype(np.uint8).transpose(1, 0, 3, 2))
