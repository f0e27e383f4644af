"""Ranking a video corpus with the retriever, and the text->video retrieval metrics.

Frame embeddings are computed once per video (`Ranker.index`); each query then pools over every
video (X-Pool), in fixed-size blocks of queries and videos so that one compiled program serves
any corpus. Metrics are the field's: R@1, R@5, R@10 (the fraction of queries whose ground truth
ranks within K), median and mean rank (1-based) over the queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.models.retriever import XPoolRetriever
from ivcr_jax.retriever.data import TextEncoder, VideoBank


def rank_metrics(ranks: Sequence[int]) -> dict:
  """R@1/5/10, median and mean rank of 1-based ground-truth ranks."""
  r = np.asarray(ranks, np.float64)
  if r.size == 0:
    raise ValueError("no queries to score")
  return {"r@1": float(np.mean(r <= 1)), "r@5": float(np.mean(r <= 5)),
          "r@10": float(np.mean(r <= 10)), "median_rank": float(np.median(r)),
          "mean_rank": float(np.mean(r)), "queries": int(r.size)}


@dataclasses.dataclass
class CorpusIndex:
  videos: list[str]
  frames: jax.Array  # [N, T, W] frame embeddings (N padded to the video block)
  mask: jax.Array  # [N, T]


class Ranker:
  """Scores queries against a corpus with fixed-shape jitted blocks (module docstring)."""

  def __init__(self, model: XPoolRetriever, bank: VideoBank, text: TextEncoder, *,
               query_batch: int = 64, video_batch: int = 64):
    self.bank, self.text = bank, text
    self.query_batch, self.video_batch = query_batch, video_batch
    graphdef, state = nnx.split(model)
    self._state = state
    self._frames = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).encode_frames(x, m))
    self._texts = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))
    self._scores = jax.jit(lambda s, t, f, m: nnx.merge(graphdef, s).similarity(t, f, m))

  def index(self, videos: Sequence[str]) -> CorpusIndex:
    """Frame embeddings of `videos` (uniformly sampled frames)."""
    blocks, masks = [], []
    b = self.video_batch
    for i in range(0, len(videos), b):
      chunk = list(videos[i:i + b])
      x, m = self.bank.batch(chunk + chunk[-1:] * (b - len(chunk)))
      blocks.append(self._frames(self._state, x, m))
      masks.append(m)
    return CorpusIndex(list(videos), jnp.concatenate(blocks), jnp.asarray(np.concatenate(masks)))

  def scores(self, queries: Sequence[str], corpus: CorpusIndex) -> np.ndarray:
    """`[Q, N]` similarities of `queries` with every video of `corpus`."""
    n, qb, vb = len(corpus.videos), self.query_batch, self.video_batch
    out = np.zeros((len(queries), n), np.float32)
    for i in range(0, len(queries), qb):
      chunk = list(queries[i:i + qb])
      ids, mask = self.text(chunk + chunk[-1:] * (qb - len(chunk)))
      text = self._texts(self._state, ids, mask)
      row = [self._scores(self._state, text, corpus.frames[j:j + vb], corpus.mask[j:j + vb])
             for j in range(0, corpus.frames.shape[0], vb)]
      out[i:i + len(chunk)] = np.asarray(jnp.concatenate(row, axis=1))[:len(chunk), :n]
    return out

  def top_k(self, queries: Sequence[str], corpus: CorpusIndex, k: int
            ) -> tuple[list[list[str]], np.ndarray]:
    """The `k` best videos of each query (best first) and their similarities `[Q, k]`."""
    s = self.scores(queries, corpus)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ([[corpus.videos[j] for j in row] for row in order],
            np.take_along_axis(s, order, axis=1))

  def ranks(self, queries: Sequence[str], gt: Sequence[str], corpus: CorpusIndex) -> np.ndarray:
    """1-based rank of each query's ground-truth video in `corpus` (ties count against it)."""
    s = self.scores(queries, corpus)
    col = {v: j for j, v in enumerate(corpus.videos)}
    missing = [v for v in gt if v not in col]
    if missing:
      raise KeyError(f"ground-truth video {missing[0]!r} is not in the ranked corpus")
    target = s[np.arange(len(gt)), [col[v] for v in gt]]
    return np.sum(s >= target[:, None], axis=1)
