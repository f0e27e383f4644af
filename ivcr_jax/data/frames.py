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
"""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLERS = ("uniform", "rand", "rand_full", "all")


class VideoError(RuntimeError):
  """A video that cannot be used (missing, corrupt, empty); the message names it."""


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


@dataclasses.dataclass(frozen=True)
class VideoFrames:
  frames: np.ndarray  # [T, H, W, 3] uint8
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


def load_video(path: str, *, num_frames: int, size: int | None, mode: str = "uniform",
               rng: np.random.Generator | None = None) -> VideoFrames:
  """Decodes the sampled frames of `path`, squashed to `size` x `size` (official: 224, aspect
  ratio not kept) or at their own size when `size` is None.

  Raises `VideoError` naming the file when it is missing or cannot be decoded.
  """
  if size is not None and (size <= 0 or size % 32):
    raise ValueError(f"decode size {size} must be a positive multiple of 32 (decord resizing)")
  import decord

  try:
    reader = (decord.VideoReader(path) if size is None
              else decord.VideoReader(path, width=size, height=size))
    vlen = len(reader)
    fps = float(reader.get_avg_fps())
    if vlen < 1 or not fps > 0:
      raise VideoError(f"video {path!r} has {vlen} frames at {fps} fps")
    indices = sample_indices(vlen, num_frames, mode, rng)
    frames = reader.get_batch(indices.tolist()).asnumpy()
  except VideoError:
    raise
  except Exception as e:  # decord raises its own error types, and RuntimeError on bad files
    raise VideoError(f"cannot decode video {path!r}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
  return VideoFrames(frames=np.ascontiguousarray(frames, np.uint8), indices=indices, fps=fps,
                     num_video_frames=vlen)
