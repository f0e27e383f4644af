"""Training, evaluating and restoring the phase-1 retriever (library behind
`python -m ivcr_jax.retriever.train`, `data_prep.build_topk_cache` and the chat).

Training uses the conventions of the LLM trainer: a functional jitted step over plain parameter
dicts with the train state donated, optax AdamW with the same schedule (`training.optimizer`),
orbax checkpoints (`training.checkpointing.Checkpointer`: parameters, optimizer state, step and
a JSON meta), TensorBoard event files, a progress bar and every logged row in
`train_history.json`. The batch of step i is a pure function of (seed, i): sample positions
[i*B, (i+1)*B) of an endless sequence of per-epoch permutations of the training pairs, with
frames drawn per (seed, epoch, video); so a resumed run continues exactly where it stopped.

Evaluation ranks every video of the frame store (the corpus the candidate lists are drawn
from) for each video-retrieval turn of a split (`ranking.rank_metrics`), and reports next to it
the same figures of the annotation's candidate lists (the simulated or official retriever:
ranks past its list count as misses, so its median and mean rank are not defined).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from ivcr_jax.data import feature_store as feature_store_lib
from ivcr_jax.data import stores
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data.records import RETRIEVAL, Dialogue
from ivcr_jax.jsonfile import write_json
from ivcr_jax.models.retriever import XPoolRetriever, contrastive_loss
from ivcr_jax.retriever.data import Query, TextEncoder, VideoBank, retrieval_queries
from ivcr_jax.retriever.ranking import Ranker, rank_metrics
from ivcr_jax.training import optimizer
from ivcr_jax.training.checkpointing import Checkpointer, abstract_like
from ivcr_jax.training.history import RunHistory
from ivcr_jax.training.step import NonFiniteLossError


@dataclasses.dataclass
class Stores:
  """The stores and tokenizer a retriever reads."""

  store_dir: str
  tokenizer: Any
  frame_store: stores.FrameStore
  bank: VideoBank
  features: str | None  # the feature store's fingerprint (features input), else None

  def dialogues(self, split: str) -> list[Dialogue]:
    source = stores.DialogueStore(
        os.path.join(self.store_dir, stores.DIALOGUE_STORE, stores.STORE_VERSION), split)
    return [source[i] for i in range(len(source))]


def open_stores(config: ml_collections.ConfigDict, store_dir: str, tokenizer_dir: str) -> Stores:
  """The frame store (and feature store, `model.input = "features"`) and tokenizer of a run."""
  frame_store = stores.FrameStore(os.path.join(store_dir, stores.FRAME_STORE,
                                               stores.STORE_VERSION))
  fingerprint = None
  if config.model.input == "features":
    if not config.data.features:
      raise ValueError("model.input 'features' reads a feature store: set data.features (build "
                       "one with python -m data_prep.build_feature_store)")
    source = feature_store_lib.FeatureStore(config.data.features)
    if source.record_of.keys() != frame_store.record_of.keys():
      raise feature_store_lib.FeatureStoreMismatch(
          f"the feature store {config.data.features} holds other videos than the frame store "
          f"{frame_store.path}")
    fingerprint = source.fingerprint
  else:
    source = frame_store
    if frame_store.settings.size != config.frame_size:
      raise ValueError(f"the frame store {frame_store.path} holds {frame_store.settings.size} px "
                       f"frames, the config expects frame_size {config.frame_size}")
  bank = VideoBank(source, features=config.model.input == "features",
                   num_frames=config.model.max_frames, seed=config.seed,
                   train_sampling=config.train.frame_sampling)
  return Stores(store_dir, tokenizer_lib.load_tokenizer(tokenizer_dir), frame_store, bank,
                fingerprint)


def build_model(config: ml_collections.ConfigDict, data: Stores) -> XPoolRetriever:
  feature_dim = int(data.bank.item_shape[-1]) if config.model.input == "features" else 0
  return XPoolRetriever(config.model, len(data.tokenizer), feature_dim,
                        rngs=nnx.Rngs(config.seed))


def fingerprint(params: Any, step: int, config: ml_collections.ConfigDict) -> str:
  """sha256 of a retriever's parameters, step and model config (what its rankings depend on)."""
  h = hashlib.sha256(json.dumps({"step": int(step), "model": config.model.to_dict()},
                                sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Trained:
  """A retriever restored from a run directory."""

  model: XPoolRetriever
  step: int
  fingerprint: str
  data: Stores

  def ranker(self, config: ml_collections.ConfigDict) -> Ranker:
    return Ranker(self.model, self.data.bank, TextEncoder(self.data.tokenizer,
                                                          config.model.max_text_len),
                  query_batch=config.evaluation.query_batch,
                  video_batch=config.evaluation.video_batch)


def _split(model: XPoolRetriever):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

  def merge(pure: dict) -> XPoolRetriever:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state, rest)

  return nnx.to_pure_dict(params), merge


def restore(config: ml_collections.ConfigDict, workdir: str, data: Stores,
            step: int | None = None) -> Trained:
  """The retriever of run `workdir` at `step` (default: its latest checkpoint); refuses a run
  trained on other features than `data`'s."""
  model = build_model(config, data)
  params, merge = _split(model)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no retriever checkpoint in {workdir}/checkpoints (train one with "
                              "python -m ivcr_jax.retriever.train)")
    meta = ckpt.restore_meta(step=step)
    if meta.get("features") != data.features:
      raise feature_store_lib.FeatureStoreMismatch(
          f"the retriever in {workdir} was trained on features {meta.get('features')}, the "
          f"configured feature store has {data.features}")
    params, step = ckpt.restore_params(abstract_like(params), step=step)
  finally:
    ckpt.close()
  return Trained(merge(params), step, fingerprint(params, step, config), data)


def annotation_ranks(dialogues: list[Dialogue]) -> list[float]:
  """Ranks of the ground truth in the annotation's candidate lists (inf: not in the list)."""
  return [t.candidates.index(t.video_id) + 1 if t.video_id in t.candidates else np.inf
          for d in dialogues for t in d.turns if t.kind == RETRIEVAL]


def evaluate(ranker: Ranker, queries: list[Query], corpus_videos: list[str]) -> dict:
  """Text->video metrics of `queries` over `corpus_videos`."""
  corpus = ranker.index(corpus_videos)
  ranks = ranker.ranks([q.text for q in queries], [q.video for q in queries], corpus)
  return rank_metrics(ranks)


def train(config: ml_collections.ConfigDict, workdir: str, store_dir: str,
          tokenizer_dir: str) -> dict:
  """Trains (or resumes) the retriever of `config` in `workdir`; returns the final evaluation
  (also written to `workdir/eval/<evaluation.split>.json`)."""
  tc, ec = config.train, config.evaluation
  data = open_stores(config, store_dir, tokenizer_dir)
  pairs = retrieval_queries(data.dialogues("train"))
  eval_dialogues = data.dialogues(ec.split)
  eval_queries = retrieval_queries(eval_dialogues)
  if not pairs or not eval_queries:
    raise ValueError(f"no video-retrieval turns to train on ({len(pairs)}) or to evaluate on "
                     f"({len(eval_queries)}, split {ec.split!r}) in {store_dir}")
  corpus_videos = data.bank.videos
  column = {v: j for j, v in enumerate(corpus_videos)}
  text = TextEncoder(data.tokenizer, config.model.max_text_len)
  model = build_model(config, data)
  params, merge = _split(model)
  tx = optimizer.make_optimizer(tc)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  logging.info("retriever: %s parameters; %d training pairs, %d %s queries, %d corpus videos",
               f"{sum(x.size for x in jax.tree.leaves(params)):,}", len(pairs),
               len(eval_queries), ec.split, len(corpus_videos))

  train_step = _train_step(merge, tx)
  batch_at = _batches(pairs, data.bank, text, column, seed=config.seed,
                      batch_size=tc.batch_size)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  start = 0
  resumed = ckpt.restore_latest(abstract_like(state))
  if resumed is not None:
    state, meta, start = resumed
    if meta.get("features") != data.features:
      raise feature_store_lib.FeatureStoreMismatch(
          f"{workdir} holds a retriever trained on features {meta.get('features')}, not "
          f"{data.features}; use another workdir")
    logging.info("resumed the retriever from step %d", start)
  end = min(tc.num_steps, tc.stop_after) if tc.stop_after else tc.num_steps
  history = RunHistory(workdir, start)

  def ranker(params) -> Ranker:
    return Ranker(merge(params), data.bank, text, query_batch=ec.query_batch,
                  video_batch=ec.video_batch)

  pending, t0 = [], time.perf_counter()
  try:
    for i in tqdm(range(start, end), initial=start, total=tc.num_steps, desc="retriever",
                  unit="step", dynamic_ncols=True):
      state, metrics = train_step(state, batch_at(i))
      pending.append(metrics)
      step = i + 1
      due_eval = step % tc.eval_every == 0 or step == tc.num_steps
      due_ckpt = step % tc.checkpoint_every == 0 or step == end
      if step % tc.log_every == 0 or due_eval or due_ckpt:
        rows = [{k: float(v) for k, v in m.items()} for m in pending]
        pending = []
        row = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        if not np.isfinite(row["loss"]) or not np.isfinite(row["grad_norm"]):
          raise NonFiniteLossError(f"retriever loss or gradient non-finite before step {step}; "
                                   f"the last good checkpoint is step {ckpt.latest_step()}")
        row["lr"] = float(optimizer.learning_rate(tc)(i))
        row["steps_per_s"] = len(rows) / (time.perf_counter() - t0)
        if due_eval:
          val = evaluate(ranker(state["params"]), eval_queries, corpus_videos)
          row.update({f"{ec.split}_{k}": v for k, v in val.items() if k != "queries"})
        history.add(step, row)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if due_ckpt:
          ckpt.save(step, state, force=step == end, meta={
              "loss": row["loss"], "features": data.features, "batch_size": tc.batch_size})
        t0 = time.perf_counter()
  finally:
    ckpt.close()
    history.close()
  if end < tc.num_steps:
    return {"step": end, "stopped_after": end}
  result = {
      "step": end, "split": ec.split, "corpus_videos": len(corpus_videos),
      "retriever": evaluate(ranker(state["params"]), eval_queries, corpus_videos),
      "annotation_candidates": rank_metrics(annotation_ranks(eval_dialogues))}
  for figures in (result["retriever"], result["annotation_candidates"]):
    for key in ("median_rank", "mean_rank"):  # undefined when some ranks are past the list
      if not np.isfinite(figures[key]):
        figures.pop(key)
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  write_json(os.path.join(workdir, "eval", f"{ec.split}.json"), result)
  return result


def _train_step(merge: Callable, tx: optax.GradientTransformation) -> Callable:
  """The jitted contrastive step `(state, batch) -> (state, metrics)`, state donated."""

  def loss_fn(p, batch):
    logits = merge(p).logits(batch["ids"], batch["text_mask"], batch["inputs"],
                             batch["frame_mask"])
    same = batch["video"][:, None] == batch["video"][None, :]
    hit = jnp.take_along_axis(same, jnp.argmax(logits, axis=1)[:, None], axis=1)
    return contrastive_loss(logits, same), {"t2v_acc": jnp.mean(hit)}

  def train_step(state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "temperature": jnp.exp(-params["log_scale"]), **aux}
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  return jax.jit(train_step, donate_argnums=(0,))


def _batches(pairs: Sequence[Query], bank: VideoBank, text: TextEncoder,
             column: Mapping[str, int], *, seed: int, batch_size: int
             ) -> Callable[[int], dict]:
  """`batch_at(step)`: the batch of `step`, a pure function of (seed, step), hence exact
  resumption (each epoch a fresh permutation of the training pairs)."""
  order = functools.lru_cache(maxsize=2)(
      lambda epoch: np.random.default_rng([seed, epoch]).permutation(len(pairs)))

  def batch_at(step: int) -> dict:
    picked, inputs, frame_mask = [], [], []
    for pos in range(step * batch_size, (step + 1) * batch_size):
      epoch, j = divmod(pos, len(pairs))
      q = pairs[int(order(epoch)[j])]
      x, m = bank.batch([q.video], epoch=epoch)
      picked.append(q)
      inputs.append(x[0])
      frame_mask.append(m[0])
    ids, text_mask = text([q.text for q in picked])
    return {"ids": ids, "text_mask": text_mask, "inputs": np.stack(inputs),
            "frame_mask": np.stack(frame_mask),
            "video": np.array([column[q.video] for q in picked], np.int32)}

  return batch_at
