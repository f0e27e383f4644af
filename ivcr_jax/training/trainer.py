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

from ivcr_jax import sharding
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib
from ivcr_jax.training.checkpointing import Checkpointer, abstract_like
from ivcr_jax.training.event_file import EventFileWriter


class NonFiniteLossError(FloatingPointError):
  """Loss or gradients became NaN/inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class Result:
  step: int
  history: list[dict]  # logged metrics (host floats) with their step
  params: dict  # final trainable parameters (pure dict, device arrays)
  frozen: nnx.State
  split: step_lib.Split


def _host(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _mean(rows: list[dict]) -> dict:
  keys = set().union(*rows) if rows else set()
  return {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted(keys)}


def run(config: ml_collections.ConfigDict, workdir: str, model: nnx.Module,
        train_iter: Iterator[dict], digit_ids, *,
        val_batches: Callable[[], Iterable[dict]] | None = None,
        on_log: Callable[[int, dict], None] | None = None) -> Result:
  """Trains `model` for `config.train.num_steps` micro-steps, resuming from `workdir`.

  Args:
    config: the full config (train, mesh, model.trainable).
    workdir: checkpoints in `workdir/checkpoints`, event files in `workdir/tensorboard`.
    model: the InterLLaVA model with its initial weights.
    train_iter: host batches (numpy dicts); if it has `get_state`/`set_state` (grain), its
      position is checkpointed and restored with the weights.
    digit_ids: token ids of "0".."9" (the aux losses read their distributions).
    val_batches: returns the validation batches, evaluated every `train.eval_every` steps.
  """
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  split = step_lib.Split.of(model, config.model.trainable)
  tx = optimizer.make_optimizer(tc)
  state, frozen = step_lib.place(split, tx, mesh, config.mesh.rules)
  loss_cfg = step_lib.LossConfig.from_config(tc, digit_ids)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  logging.info("parameters: %s trainable, %s frozen; mesh %s", f"{n_train:,}", f"{n_frozen:,}",
               dict(mesh.shape))

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  data_state = train_iter if hasattr(train_iter, "get_state") else None
  start = 0
  if ckpt.latest_step() is not None:
    state, meta, start = ckpt.restore(abstract_like(state), data_iterator=data_state)
    logging.info("resumed from step %d (%s)", start, meta)

  first = next(train_iter)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(split, tx, loss_cfg), state,
                                       frozen, to_global(first, mesh, config.mesh.rules), mesh,
                                       config.mesh.rules)
  eval_step = jax.jit(step_lib.pinned(step_lib.make_eval_step(split, loss_cfg), mesh,
                                     config.mesh.rules))
  writer = EventFileWriter(os.path.join(workdir, "tensorboard"))
  key = jax.random.key(config.seed)
  history: list[dict] = []
  pending: list[dict] = []
  batch = first
  progress = tqdm(range(start, tc.num_steps), initial=start, total=tc.num_steps,
                  desc="train", unit="step", dynamic_ncols=True)
  t0 = time.perf_counter()
  try:
    for i in progress:
      state, metrics = train_step(state, frozen, to_global(batch, mesh, config.mesh.rules), key)
      pending.append(metrics)
      step = i + 1
      due_log = step % tc.log_every == 0 or step == tc.num_steps
      due_ckpt = step % tc.checkpoint_every == 0 or step == tc.num_steps
      due_eval = val_batches is not None and tc.eval_every and (
          step % tc.eval_every == 0 or step == tc.num_steps)
      if due_log or due_ckpt or due_eval:
        rows = [_host(m) for m in pending]
        pending = []
        bad = [r for r in rows if not r["finite"]]
        if bad:
          raise NonFiniteLossError(
              f"non-finite loss or gradient before step {step} (loss {bad[0]['loss']}, grad norm "
              f"{bad[0]['grad_norm']}); stopped without saving: the last good checkpoint is "
              f"step {ckpt.latest_step()} in {ckpt.directory}")
        logged = _mean(rows)
        logged.pop("finite")
        logged["lr"] = float(optimizer.learning_rate(tc)(i))
        logged["steps_per_s"] = len(rows) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        if due_eval:
          logged.update({f"val_{k}": v for k, v in evaluate(eval_step, state["params"], frozen,
                                                            val_batches()).items()})
        history.append({"step": step, **logged})
        writer.scalars(step, logged)
        progress.set_postfix(loss=f"{logged['loss']:.4f}")
        if on_log:
          on_log(step, logged)
        if due_log:
          logging.info("step %d: %s", step,
                       ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
        if due_ckpt:
          ckpt.save(step, state, data_iterator=data_state, meta={"loss": logged["loss"]},
                    force=step == tc.num_steps)
      if step < tc.num_steps:
        batch = next(train_iter)
  finally:
    ckpt.close()
    writer.close()
  return Result(tc.num_steps, history, state["params"], frozen, split)


def to_global(batch: dict, mesh: jax.sharding.Mesh, rules) -> dict:
  """Multi-process runs: each process holds its slice of the global batch (per-host data
  sharding at the source); global arrays are assembled from the process-local pieces."""
  if jax.process_count() == 1:
    return batch
  out = {}
  for k, v in batch.items():
    global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(
        sharding.data_sharding(mesh, rules, global_shape), v, global_shape)
  return out


def evaluate(eval_step: Callable, params: dict, frozen: nnx.State,
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


def digits_of(tokenizer) -> np.ndarray:
  """Token ids of "0".."9" as single tokens (LLaMA splits numbers into digits)."""
  ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
  if any(i is None or i == tokenizer.unk_token_id for i in ids):
    raise ValueError("the tokenizer has no single-token digits 0-9 (required by the aux losses)")
  return np.asarray(ids, np.int32)


def load_trained(config: ml_collections.ConfigDict, checkpoint_dir: str, model: nnx.Module,
                 step: int | None = None) -> int:
  """Writes the trainable parameters of a training checkpoint into `model`; returns the step.

  Frozen weights are not in checkpoints: `model` must already hold them (initial weights).
  """
  split = step_lib.Split.of(model, config.model.trainable)
  tx = optimizer.make_optimizer(config.train)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
  abstract = {"params": jax.tree.map(spec, split.params),
              "opt": jax.tree.map(spec, jax.eval_shape(tx.init, split.params)),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=device)}
  ckpt = Checkpointer(checkpoint_dir)
  try:
    state, _, step = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  nnx.update(model, nnx.state(split.merge(state["params"], split.frozen)))
  return step
