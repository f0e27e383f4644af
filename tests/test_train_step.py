"""The jitted train step: sharded equals single-device, differentiable aux terms, official mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib

DIGITS = tuple(range(100, 110))


def synthetic_batch(cfg, model, *, batch=4, videos=4, frames=12, seq=96, seed=0):
  """A batch in the pipeline's layout: a video table, splice plan, labels and aux positions."""
  rng = np.random.default_rng(seed)
  size = cfg.model.vit.image_size
  per_video = model.vision.tokens_per_video(frames)
  slot = -np.ones((batch, seq), np.int32)
  for b in range(batch):
    start = 4 + b
    slot[b, start:start + per_video] = (b % videos) * per_video + np.arange(per_video)
  ids = rng.integers(3, 99, (batch, seq)).astype(np.int32)
  labels = np.full((batch, seq), -100, np.int32)
  labels[:, 40:70] = ids[:, 40:70]
  ids[:, 50] = DIGITS[3]  # an index answer "3" at position 50 ...
  ids[:, 60:62] = [DIGITS[1], DIGITS[2]]  # ... and a span "12-" / "-15"
  ids[:, 64:66] = [DIGITS[1], DIGITS[5]]
  labels[:, 40:70] = ids[:, 40:70]
  text_len = 6
  return {
      "frames": rng.integers(0, 256, (videos, frames, size, size, 3), dtype=np.uint8),
      "num_frames": np.array([frames, frames - 3, frames, 5][:videos], np.int32),
      "qformer_text_ids": rng.integers(3, 60, (videos, frames, text_len)).astype(np.int32),
      "qformer_text_mask": np.ones((videos, frames, text_len), bool),
      "input_ids": ids, "video_slot": slot, "labels": labels,
      "attention_mask": np.ones((batch, seq), bool),
      "index_pos": np.full((batch, 1), 50, np.int32),
      "index_target": np.full((batch, 1), 3, np.int32),
      "index_valid": np.ones((batch, 1), bool),
      "span_pos": np.tile(np.array([[[[60, 61], [64, 65]]]], np.int32), (batch, 1, 1, 1)),
      "span_place": np.tile(np.array([[[[10.0, 1.0], [10.0, 1.0]]]], np.float32), (batch, 1, 1, 1)),
      "span_target": np.tile(np.array([[[12.0, 15.0]]], np.float32), (batch, 1, 1)),
      "span_valid": np.ones((batch, 1), bool),
  }


def _setup(cfg, mesh_shape, *, alpha=0.01, beta=0.01):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = mesh_shape
    cfg.train.update(dict(alpha=alpha, beta=beta, grad_accum=1))
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)
  split = step_lib.Split.of(model, cfg.model.trainable)
  tx = optimizer.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  state, frozen = step_lib.place(split, tx, mesh, cfg.mesh.rules)
  loss_cfg = step_lib.LossConfig.from_config(cfg.train, DIGITS)
  fn = step_lib.jit_train_step(step_lib.make_train_step(split, tx, loss_cfg), state, frozen,
                               batch, mesh, cfg.mesh.rules)
  return fn, state, frozen, batch, split


def test_sharded_step_equals_single_device(tiny_config):
  results = []
  for shape in ((1, 1, 1), (2, 2, 2)):
    fn, state, frozen, batch, _ = _setup(tiny_config, shape)
    devices = {d for leaf in jax.tree.leaves(state["params"]) for d in leaf.devices()}
    assert len(devices) == int(np.prod(shape))
    losses = []
    for _ in range(2):
      state, metrics = fn(state, frozen, batch, jax.random.key(0))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.tree.map(np.asarray, state["params"])))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
    np.testing.assert_allclose(b, a, atol=2e-5)
  _, initial, _, _, _ = _setup(tiny_config, (1, 1, 1))
  moved = lambda get: not np.allclose(get(p1), np.asarray(get(initial["params"])))
  assert moved(lambda p: p["llm"]["layers"]["self_attn"]["q_proj"]["lora_b"])
  assert moved(lambda p: p["vision"]["projection"]["kernel"])
  assert moved(lambda p: p["vision"]["qformer"]["layers"][0]["mlp_query"]["fc1"]["kernel"])


def test_aux_terms_alone_have_gradients_on_trainable_params(tiny_config):
  cfg = tiny_config
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)
  split = step_lib.Split.of(model, cfg.model.trainable)
  loss_cfg = step_lib.LossConfig(alpha=0.01, beta=0.01, span_loss="giou", digit_ids=DIGITS)

  def aux_only(params):
    _, m = step_lib.loss_and_metrics(split.merge(params, split.frozen), batch, loss_cfg, None)
    return 0.01 * m["loss_index"] + 0.01 * m["loss_span"]

  grads = jax.jit(jax.grad(aux_only))(split.params)
  norms = {k: float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(v))))
           for k, v in grads["vision"].items()}
  lora = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads["llm"]))))
  assert all(np.isfinite(list(norms.values()))) and np.isfinite(lora)
  assert norms["projection"] > 0 and norms["qformer"] > 0 and lora > 0


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0)])
def test_zero_weights_give_the_official_lm_only_loss(tiny_config, alpha, beta):
  fn, state, frozen, batch, _ = _setup(tiny_config, (1, 1, 1), alpha=alpha, beta=beta)
  _, metrics = fn(state, frozen, batch, jax.random.key(0))
  assert "loss_index" not in metrics and "loss_span" not in metrics
  assert float(metrics["loss"]) == float(metrics["loss_lm"])
