"""The training loop: jitted sharded steps, checkpoints with exact resume, metrics, NaN guard.

`run(...)` is what `python -m ivcr_jax.train` calls after building the model and the data; tests
and notebooks can call it directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from ivcr_jax import multihost, sharding
from ivcr_jax.data.batch import Layout
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib
from ivcr_jax.training.checkpointing import Checkpointer, abstract_like
from ivcr_jax.training.feed import Feed, batch_shape
from ivcr_jax.training.history import RunHistory


@dataclasses.dataclass
class Result:
  step: int
  history: list[dict]  # logged metrics (host floats) with their step
  params: dict  # final trainable parameters (pure dict, device arrays)
  frozen: nnx.State
  split: step_lib.TrainableSplit


def _host(metrics: dict) -> dict:
  """Host floats of step metrics (replicated global scalars: any local copy is the value)."""
  return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
          for k, v in metrics.items()}


def _mean(rows: list[dict]) -> dict:
  keys = set().union(*rows) if rows else set()
  return {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted(keys)}


def run(config: ml_collections.ConfigDict, workdir: str, model: nnx.Module,
        train_batches: Callable[[int], Iterator[dict]], digit_ids, *, layout: Layout,
        val_batches: Callable[[], Iterable[dict]] | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        describe: Callable[[int, int], list[str]] | None = None) -> Result:
  """Trains `model` for `config.train.num_steps` micro-steps, resuming from `workdir`.

  Args:
    config: the full config (train, mesh, model.trainable).
    workdir: checkpoints in `workdir/checkpoints`; event files in `workdir/tensorboard` and every
      logged row in `workdir/train_history.json` (whole across resumes), by process 0 only.
    model: the InterLLaVA model with its initial weights (ideally already in its shardings,
      `experiment.build_model`).
    train_batches: `train_batches(start)` iterates this process's host batches (numpy dicts, its
      rows of each global batch) from global sample position `start`. That position is the
      data state in checkpoints (`samples_seen`), so a resume is exact on any process count.
    digit_ids: token ids of "0".."9" (the aux losses read their distributions).
    layout: the per-process batch layout (pads and offsets the shares of several processes).
    val_batches: returns this process's validation batches, evaluated every `train.eval_every`.
    describe: `describe(first, count)` names the samples at global positions `first` ..
      `first + count - 1` (their dialogues), for the message when a step goes non-finite.

  Raises:
    NonFiniteLossError: a step's loss or gradient is NaN/inf; nothing after the last good
      checkpoint is saved.
    CheckpointError: a checkpoint could not be written, or none of the existing ones can be read.
  """
  tc = config.train
  rules = config.mesh.rules
  mesh = sharding.make_mesh(config.mesh)
  split = step_lib.TrainableSplit.of(model, config.model.trainable)
  tx = optimizer.make_optimizer(tc)
  state, frozen = step_lib.place(split, tx, mesh, rules)
  loss_cfg = step_lib.LossConfig.from_config(tc, digit_ids)
  _log_sizes(state["params"], frozen, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  start = samples_seen = 0
  resumed = ckpt.restore_latest(abstract_like(state))
  if resumed is not None:
    state, meta, start = resumed
    samples_seen = int(meta.get("samples_seen", start * tc.batch_size))
    logging.info("resumed from step %d (%s); data position: sample %d of the global order%s",
                 start, meta, samples_seen, _moved(meta))
  train_step = step_lib.jit_train_step(step_lib.make_train_step(split, tx, loss_cfg), state,
                                       mesh, rules)
  eval_step = jax.jit(step_lib.with_activation_sharding(
      step_lib.make_eval_step(split, loss_cfg), mesh, rules))
  main = multihost.is_main()
  history = RunHistory(workdir, start, write=main, on_log=on_log)
  key = jax.jit(lambda: jax.random.key(config.seed),
                out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))()
  pending: list[tuple[int, int, dict]] = []  # (step, first sample, metrics) not yet logged
  end = min(tc.num_steps, tc.stop_after) if tc.stop_after else tc.num_steps
  feed = Feed(train_batches(samples_seen) if start < end else iter(()), layout, mesh, rules,
              name=f"train@{start}")
  progress = tqdm(range(start, end), initial=start, total=tc.num_steps, desc="train",
                  unit="step", dynamic_ncols=True, disable=not main)
  t0 = time.perf_counter()
  try:
    shapes = set()
    for i in progress:
      batch = next(feed)
      shape = batch_shape(batch)
      if shape not in shapes:  # a new bucket triple: its program is compiled now
        shapes.add(shape)
        logging.info("step %d: batch shape %dx%dx%d (sequence x video table x frame table, "
                     "global)", i + 1, *shape)
      state, metrics = train_step(state, frozen, batch, key)
      step = i + 1
      pending.append((step, samples_seen, metrics))
      samples_seen += tc.batch_size
      due_log = step % tc.log_every == 0 or step == end
      due_ckpt = step % tc.checkpoint_every == 0 or step == end
      due_eval = val_batches is not None and tc.eval_every and (
          step % tc.eval_every == 0 or step == tc.num_steps)
      if not (due_log or due_ckpt or due_eval):
        continue
      logged = _summary(pending, tc, i, time.perf_counter() - t0, describe, ckpt)
      pending = []
      if due_eval:
        val = Feed(iter(val_batches()), layout, mesh, rules, name=f"val@{step}")
        try:
          losses = validation_losses(eval_step, state["params"], frozen, val)
          logged.update({f"val_{k}": v for k, v in losses.items()})
        finally:
          val.close()
      history.add(step, logged)
      progress.set_postfix(loss=f"{logged['loss']:.4f}")
      if due_log:
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
      if due_ckpt:
        ckpt.save(step, state, force=step == end, meta={
            "loss": logged["loss"], "samples_seen": samples_seen,
            "batch_size": tc.batch_size, "processes": jax.process_count()})
      t0 = time.perf_counter()
  finally:
    feed.close()
    ckpt.close()
    history.close()
  return Result(max(start, end), history.rows, state["params"], frozen, split)


def _log_sizes(params: dict, frozen: nnx.State, mesh: jax.sharding.Mesh) -> None:
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  logging.info("parameters: %s trainable, %s frozen; mesh %s over %d process(es)",
               f"{n_train:,}", f"{n_frozen:,}", dict(mesh.shape), jax.process_count())


def _summary(pending: list[tuple[int, int, dict]], tc: ml_collections.ConfigDict, i: int,
             seconds: float, describe: Callable[[int, int], list[str]] | None,
             ckpt: Checkpointer) -> dict:
  """The logged row of the steps since the last one: their mean metrics, the learning rate
  and the speed. Fetching the metrics is the loop's only host sync; a non-finite step among
  them stops training (`NonFiniteLossError` naming its batch)."""
  rows = [_host(m) for _, _, m in pending]
  bad = [(s, first, r) for (s, first, _), r in zip(pending, rows, strict=True) if not r["finite"]]
  if bad:
    raise _non_finite(*bad[0], tc.batch_size, describe, ckpt)
  logged = _mean(rows)
  logged.pop("finite")
  logged["lr"] = float(optimizer.learning_rate(tc)(i))
  logged["steps_per_s"] = len(rows) / seconds
  return logged


def _non_finite(step: int, first: int, row: dict, batch_size: int,
                describe: Callable[[int, int], list[str]] | None, ckpt: Checkpointer
                ) -> step_lib.NonFiniteLossError:
  """The error for the first non-finite step, naming its batch's dialogues (to find the bad
  data) and the checkpoint training can go back to."""
  batch = (f" on the batch of samples {first}..{first + batch_size - 1}: "
           + "; ".join(describe(first, batch_size)) if describe else "")
  last = ckpt.latest_step()
  good = ("no checkpoint was written yet" if last is None else
          f"the last good checkpoint is step {last} in {ckpt.directory}")
  return step_lib.NonFiniteLossError(
      f"non-finite loss or gradient at step {step} (loss {row['loss']}, grad norm "
      f"{row['grad_norm']}){batch}. Stopped without saving: {good}")


def _moved(meta: dict) -> str:
  """What a restore onto another process count means for the data (nothing: said so)."""
  saved = meta.get("processes")
  if saved is None or saved == jax.process_count():
    return ""
  return (f" (saved by {saved} process(es), resumed on {jax.process_count()}: the global order "
          "does not depend on the number of processes, so training continues with the same "
          "samples; only each process's share of a batch changes)")


def validation_losses(eval_step: Callable, params: dict, frozen: nnx.State,
             batches: Iterable[dict]) -> dict:
  """Token-weighted validation losses over `batches`."""
  total: dict[str, float] = {}
  weight: dict[str, float] = {}
  counts = {"loss_lm": "tokens", "loss_index": "index_items", "loss_span": "span_items",
            "index_acc": "index_items", "span_iou": "span_items"}
  for batch in batches:
    m = _host(eval_step(params, frozen, batch))
    for loss, count in counts.items():
      if loss in m and m[count] > 0:
        total[loss] = total.get(loss, 0.0) + m[loss] * m[count]
        weight[loss] = weight.get(loss, 0.0) + m[count]
  out = {k: total[k] / weight[k] for k in total}
  if "loss_lm" in out:
    out["perplexity"] = math.exp(min(out["loss_lm"], 50.0))
  return out


