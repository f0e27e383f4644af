"""AdamW with the official learning-rate schedule and weight-decay mask, over trainable leaves.

Official (reference §3.5, §7; LAVIS `linear_warmup_cosine_lr`): the schedule advances every
**micro-step** (accumulation 4 means the optimizer updates on every 4th micro-step with the
learning rate of that micro-step); linear warmup from `warmup_lr` to `lr` over `warmup_steps`,
then cosine on the global micro-step from `lr` (at step 0) down to `min_lr` (at `num_steps`).
Weight decay applies to parameters that are at least 2-D in torch's layout, i.e. not biases or
norm scales (our biases can be `[heads, head_dim]`, so the rule goes by name, not ndim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate as a function of the **micro-step** (the official per-iteration schedule)."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = train.warmup_lr + (train.lr - train.warmup_lr) * step / max(train.warmup_steps, 1)
    progress = jnp.clip(step / max(train.num_steps, 1), 0.0, 1.0)
    cosine = train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < train.warmup_steps, warm, cosine)

  return schedule


def decays(path: tuple, value: jax.Array) -> bool:
  """Official weight-decay rule: no decay for biases and norm parameters (torch ndim < 2)."""
  name = str(path[-1])
  return value.ndim >= 2 and name != "bias" and not name.endswith("_bias") and name != "scale"


def weight_decay_mask(params) -> object:
  """A pytree of bools with the structure of `params` (True where weight decay applies)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: decays(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), v),
      params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (+ optional clipping) with accumulation over `train.grad_accum` micro-steps.

  The learning rate of update k is the schedule at micro-step (k + 1) * accum - 1, the micro-step
  on which the official code's accumulated update happens.
  """
  accum = max(int(train.grad_accum), 1)
  micro = learning_rate(train)
  per_update = lambda count: micro((count + 1) * accum - 1)
  chain = []
  if train.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train.grad_clip))
  chain.append(optax.adamw(per_update, b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*chain)
  return optax.MultiSteps(tx, every_k_schedule=accum) if accum > 1 else tx
