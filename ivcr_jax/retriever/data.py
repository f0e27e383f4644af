"""What the retriever reads: query texts of dialogue turns, and per-frame inputs of videos.

Training pairs are the video-retrieval turns (question -> ground-truth video). Videos come from
the frame store (pixels, `model.input = "pixels"`) or a feature store of the vision tower
(`"features"`: each stored frame's first token, the ViT's class token, as its feature), sampled
to `max_frames` frames: `train.frame_sampling` in training (official: random per interval; a
stream per (seed, epoch, video), so a resumed run sees the same frames), uniform otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence

import numpy as np

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.records import MOMENT, RETRIEVAL, Dialogue


@dataclasses.dataclass(frozen=True)
class Query:
  text: str
  video: str  # the ground-truth video


def retrieval_queries(dialogues: Sequence[Dialogue]) -> list[Query]:
  """(question, ground-truth video) of every video-retrieval turn."""
  return [Query(t.question, t.video_id) for d in dialogues for t in d.turns
          if t.kind == RETRIEVAL]


def list_queries(d: Dialogue) -> list[str | int | None]:
  """What each turn's candidate list comes from: its own question (retrieval turns, and a moment
  turn that opens the dialogue), the turn index of the latest retrieval turn (later moment
  turns: their video was chosen from that list), or None (chat turns: no list)."""
  out: list[str | int | None] = []
  latest = None
  for i, t in enumerate(d.turns):
    if t.kind == RETRIEVAL:
      latest = i
      out.append(t.question)
    elif t.kind == MOMENT:
      out.append(t.question if latest is None else latest)
    else:
      out.append(None)
  return out


class TextEncoder:
  """Query texts -> `[Q, L]` token ids and mask (LLM tokenizer, no special tokens)."""

  def __init__(self, tokenizer, max_len: int):
    self.tokenizer, self.max_len = tokenizer, max_len

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), self.max_len), np.int32)
    mask = np.zeros((len(texts), self.max_len), bool)
    for i, text in enumerate(texts):
      tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.max_len]
      if not tokens:
        raise ValueError(f"query {text!r} has no tokens")
      ids[i, :len(tokens)] = tokens
      mask[i, :len(tokens)] = True
    return ids, mask


class VideoBank:
  """Per-frame retriever inputs of videos, read from a frame or feature store (module docstring).

  Stored videos are kept in memory once read (`cache` of them): pixels at the frame store's
  size, or one feature vector per frame.
  """

  def __init__(self, store, *, features: bool, num_frames: int, seed: int,
               train_sampling: str = "rand", cache: int = 4096):
    self.store, self.features, self.train_sampling = store, features, train_sampling
    self.num_frames, self.seed = num_frames, seed
    self._read = functools.lru_cache(maxsize=cache)(self._load)
    first = self._read(store.index["videos"][0])
    self.item_shape, self.dtype = first[0].shape[1:], first[0].dtype

  def _load(self, video: str) -> tuple[np.ndarray, int]:
    try:
      stored = self.store[video]
    except KeyError as e:
      raise KeyError(f"the retriever needs {e.args[0]}") from e
    data = stored.features[:, 0] if self.features else stored.frames
    return np.ascontiguousarray(data), len(stored.indices)

  @property
  def videos(self) -> list[str]:
    return list(self.store.index["videos"])

  def batch(self, videos: Sequence[str], *, epoch: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """`[V, T, ...]` inputs and `[V, T]` frame mask; `epoch` None: uniform (evaluation), else
    this epoch's random training sample."""
    t = self.num_frames
    out = np.zeros((len(videos), t, *self.item_shape), self.dtype)
    mask = np.zeros((len(videos), t), bool)
    for i, video in enumerate(videos):
      data, n = self._read(video)
      if epoch is None:
        idx = frames_lib.sample_indices(n, t, "uniform")
      else:
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(video.encode())])
        idx = frames_lib.sample_indices(n, t, self.train_sampling, rng)
      out[i, :len(idx)] = data[idx]
      mask[i, :len(idx)] = True
    return out, mask
