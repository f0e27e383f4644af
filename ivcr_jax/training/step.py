"""The jitted training step: a pure function of (train state, frozen weights, batch, key).

The model is split once into a graph definition, the trainable parameters and the frozen ones
(`model.trainable` groups). Only trainable leaves are differentiated and live in the optimizer
state; frozen weights are an input that is never donated or updated. Parameters travel as plain
nested dicts (orbax- and optax-friendly paths) and are merged back into the NNX model inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models import trainable as trainable_lib
from ivcr_jax.training import losses

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Loss or gradients became NaN/inf (the step's `finite` metric is false); the last good
  checkpoint is left untouched. Raised by the trainers that run a step."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
  alpha: float
  beta: float
  span_loss: str
  digit_ids: tuple[int, ...]  # token ids of "0".."9"
  lm_chunk: int | None = None  # positions whose logits exist at a time in L_M (None: all)

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict, digit_ids) -> LossConfig:
    return cls(float(train.alpha), float(train.beta), str(train.span_loss),
               tuple(int(i) for i in digit_ids), int(train.lm_loss_chunk) or None)


def loss_and_metrics(model: nnx.Module, batch: dict, cfg: LossConfig,
                     dropout_key: jax.Array | None) -> tuple[jax.Array, dict]:
  """L = L_M + alpha * L_V + beta * L_C (each a mean over its items), with each term logged.

  With alpha = beta = 0 the aux losses are not computed (official dynamics); the diagnostics
  `index_acc` and `span_iou` are logged either way and carry no gradient. Logits are read from
  the final hidden states only where a term needs them (`losses`).
  """
  hidden = model.hidden_states(batch, dropout_key=dropout_key)
  head = model.llm.logits
  lm_sum, lm_count = losses.lm_loss(hidden, batch["labels"], head, cfg.lm_chunk)
  lm = lm_sum / jnp.maximum(lm_count, 1)
  metrics = {"loss_lm": lm, "tokens": lm_count}
  total = lm
  digits = jnp.asarray(np.asarray(cfg.digit_ids, np.int32))
  if "index_pos" in batch:
    valid = batch["index_valid"]
    count = jnp.sum(valid)
    correct = losses.index_correct(hidden, batch["index_pos"], batch["index_target"], digits,
                                   head)
    metrics.update(index_acc=jnp.sum(correct & valid) / jnp.maximum(count, 1), index_items=count)
    if cfg.alpha:
      v_sum, _ = losses.index_loss(hidden, batch["index_pos"], batch["index_target"], digits,
                                   valid, head)
      lv = v_sum / jnp.maximum(count, 1)
      total = total + cfg.alpha * lv
      metrics["loss_index"] = lv
  if "span_pos" in batch:
    valid = batch["span_valid"]
    count = jnp.sum(valid)
    soft = losses.soft_numbers(hidden, batch["span_pos"], batch["span_place"], digits, head)

    def mean(x):
      return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(count, 1)

    metrics.update(span_iou=mean(1.0 - losses.span_loss(soft, batch["span_target"], "iou")),
                   span_items=count)
    if cfg.beta:
      lc = mean(losses.span_loss(soft, batch["span_target"], cfg.span_loss))
      total = total + cfg.beta * lc
      metrics["loss_span"] = lc
  metrics["loss"] = total
  return total, metrics


@dataclasses.dataclass
class TrainableSplit:
  """A model split for the functional step: graph, trainable params (pure dict), frozen state."""

  graphdef: Any
  params: PyTree
  frozen: nnx.State
  template: nnx.State  # abstract trainable state, to rebuild NNX state from the pure dict
  axes: PyTree  # logical axis names of every trainable parameter (pure dict of tuples)

  @classmethod
  def of(cls, model: nnx.Module, groups) -> TrainableSplit:
    graphdef, train, frozen = trainable_lib.split_trainable(model, groups)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train)
    axes = nnx.to_pure_dict(sharding.logical_axes(train))
    return cls(graphdef, nnx.to_pure_dict(train), frozen, template, axes)

  def merge(self, params: PyTree, frozen: nnx.State) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, frozen)


def make_train_step(split: TrainableSplit, tx: optax.GradientTransformation, loss_cfg: LossConfig
                    ) -> Callable:
  """`step(state, frozen, batch, key) -> (state, metrics)` with `state = {params, opt, step}`."""

  def step(state, frozen, batch, key):
    def loss_fn(params):
      model = split.merge(params, frozen)
      return loss_and_metrics(model, batch, loss_cfg, jax.random.fold_in(key, state["step"]))

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  return step


def make_eval_step(split: TrainableSplit, loss_cfg: LossConfig) -> Callable:
  """`eval_step(params, frozen, batch) -> metrics` (deterministic: no dropout)."""

  def eval_step(params, frozen, batch):
    return loss_and_metrics(split.merge(params, frozen), batch, loss_cfg, None)[1]

  return eval_step


def train_state_shardings(split: TrainableSplit, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh, rules) -> tuple[dict, nnx.State]:
  """Shardings of the train state `{params, opt, step}` and of the frozen weights on `mesh`.

  Every parameter-shaped part of the optimizer state (AdamW moments, MultiSteps' accumulated
  gradients) takes its parameter's sharding; counters are replicated. `jit(tx.init)` alone would
  leave the moments replicated (2.9 GB per device at 7B instead of 0.36 on 8 devices). The one
  place that decides where state lives: `place` and the AOT planner (`scripts/plan_7b.py`).
  `split.params` may hold arrays or `ShapeDtypeStruct`s.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  params = jax.tree.map(
      lambda axes, p: jax.sharding.NamedSharding(
          mesh, sharding.logical_to_spec(axes, p.shape, mesh, rules)),
      split.axes, split.params, is_leaf=lambda x: isinstance(x, tuple))
  opt = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, split.params),
                              params, transform_non_params=lambda _: replicated)
  frozen = sharding.state_shardings(split.frozen, mesh, rules)
  return {"params": params, "opt": opt, "step": replicated}, frozen


def place(split: TrainableSplit, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules,
          ) -> tuple[dict, nnx.State]:
  """Puts the train state `{params, opt, step}` and the frozen weights on `mesh` by the rules
  (`train_state_shardings`). Arrays already in their shardings (a model built or restored
  straight into them, `experiment.build_model`) are not copied; the optimizer state is created
  in its shardings. The split keeps no reference to the unplaced arrays afterwards."""
  state_sh, frozen_sh = train_state_shardings(split, tx, mesh, rules)
  params = jax.device_put(split.params, state_sh["params"])
  opt = jax.jit(tx.init, out_shardings=state_sh["opt"])(params)
  frozen = jax.device_put(split.frozen, frozen_sh)
  # Created on the mesh (a device_put of a host value would check it across processes first).
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=state_sh["step"])()
  split.params = split.frozen = None
  return {"params": params, "opt": opt, "step": step}, frozen


def shardings_of(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x.sharding, tree)


def batch_shardings(batch: dict, mesh: jax.sharding.Mesh, rules) -> dict:
  """Every batch array (and the video table) split over the data-parallel axes on its first dim."""
  return {k: sharding.data_sharding(mesh, rules, np.shape(v)) for k, v in batch.items()}


def with_activation_sharding(fn: Callable, mesh: jax.sharding.Mesh, rules) -> Callable:
  """`fn` traced with the models' activations pinned to the batch axes (for `jax.jit`)."""

  def traced(*args):
    with sharding.activation_sharding(mesh, rules):
      return fn(*args)

  return traced


def jit_train_step(step: Callable, state: dict, mesh: jax.sharding.Mesh, rules) -> Callable:
  """`jax.jit` with the train state donated and kept in its shardings, and the models'
  activations pinned to the batch axes (`sharding.activation_sharding`, active while `step` is
  traced). Inputs keep the shardings they arrive with: the state and frozen weights those of
  `place`, each batch that of its own shapes (`ivcr_jax.training.feed`), so a batch from another
  bucket compiles its own program instead of inheriting the first batch's shardings."""
  return jax.jit(with_activation_sharding(step, mesh, rules),
                 out_shardings=(shardings_of(state), None), donate_argnums=(0,))
