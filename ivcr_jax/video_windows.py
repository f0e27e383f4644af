"""How many sliding windows the video Q-Former runs over a video, and so how many LLM tokens the
video becomes: the model computes them (`models.vision_tower`) and the data pipeline reserves
that many sequence positions per `<VIDEOTOKEN>` (`data.batch`). Here, not in either, because
models and data must not import each other."""

from __future__ import annotations

import math


def num_windows(num_frames: int, stride: int) -> int:
  """Windows start at 0, stride, 2*stride, ... below `num_frames` (the official loop)."""
  return math.ceil(num_frames / stride)


def tokens_per_video(num_frames: int, *, queries: int, stride: int) -> int:
  """LLM embeddings of a video of `num_frames` frames: `queries` per window."""
  return queries * num_windows(num_frames, stride)
