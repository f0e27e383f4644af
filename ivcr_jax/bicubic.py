"""torch's bicubic interpolation as a matrix, shared by the two places that resize on the host:
the ViT's position embedding when the image size changes (`models.eva_vit`) and the random
resized crop of training frames (`data.frames`). Here, not in either, because models and data
must not import each other."""

from __future__ import annotations

import numpy as np


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """`[out, in]` float64 weights of torch's bicubic `interpolate` along one axis (A = -0.75,
  align_corners=False, no antialiasing, taps clamped at the borders)."""

  def cubic(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  weights = np.zeros((out_size, in_size))
  for offset in range(-1, 3):
    idx = np.clip(base + offset, 0, in_size - 1)
    np.add.at(weights, (np.arange(out_size), idx), cubic(offset - frac))
  return weights
