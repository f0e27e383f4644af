"""Building a top-k cache store (`ivcr_jax.data.topk_store`) with a trained retriever.

Every video of the frame store is indexed once; each turn that needs a candidate list gets the
retriever's top-k for its query (`data.list_queries`): a retrieval turn's question, or for a
later moment turn the list of the retrieval turn its video was chosen from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ivcr_jax.data import topk_store
from ivcr_jax.retriever.data import list_queries
from ivcr_jax.retriever.training import Trained


def build_cache(config: ml_collections.ConfigDict, trained: Trained, out: str,
                splits: Sequence[str], *, retriever_dir: str, overwrite: bool = False) -> dict:
  """Writes the top-k cache of `trained` over its stores to `out`; returns its meta.

  A complete cache of the same retriever and corpus at `out` is kept as it is; one of another
  retriever or corpus is refused unless `overwrite`.
  """
  k = config.topk
  corpus_videos = trained.data.bank.videos
  corpus = topk_store.corpus_fingerprint(trained.data.frame_store.index["videos"])
  retriever = {"fingerprint": trained.fingerprint, "step": trained.step,
               "workdir": os.path.abspath(retriever_dir), "preset": config.preset,
               "features": trained.data.features}
  old = None if overwrite else topk_store.read_meta(out)  # (a damaged one is replaced, too)
  if old is not None:
    same = (old["retriever"]["fingerprint"] == trained.fingerprint and old["corpus"] == corpus
            and old["k"] == k and set(old["splits"]) == set(splits))
    if same:
      logging.info("the top-k cache %s is up to date", out)
      return old
    raise FileExistsError(
        f"{out} holds a top-k cache of another retriever, corpus or splits (retriever "
        f"{old['retriever']['fingerprint'][:12]} step {old['retriever']['step']}, this one "
        f"{trained.fingerprint[:12]} step {trained.step}); choose another --out or --overwrite")
  ranker = trained.ranker(config)
  index = ranker.index(corpus_videos)
  written = {}
  for split in splits:
    dialogues = trained.data.dialogues(split)
    plans = [list_queries(d) for d in dialogues]
    texts = sorted({q for plan in plans for q in plan if isinstance(q, str)})
    found: dict[str, tuple[list[str], np.ndarray]] = {}
    for i in tqdm(range(0, len(texts), ranker.query_batch), desc=f"top-{k} {split}",
                  unit="batch"):
      chunk = texts[i:i + ranker.query_batch]
      videos, scores = ranker.top_k(chunk, index, k)
      found.update({t: (v, s) for t, v, s in zip(chunk, videos, scores, strict=True)})
    lists = []
    for plan in plans:
      turns = []
      for q in plan:
        if q is None:
          turns.append(([], np.zeros(0)))
        else:
          turns.append(found[q] if isinstance(q, str) else turns[q])
      lists.append(turns)
    written[split] = (dialogues, lists)
  topk_store.write_topk_store(out, written, k=k, retriever=retriever, corpus=corpus)
  return topk_store.read_meta(out)
