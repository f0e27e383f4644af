"""The jitted train step: sharded equals single-device, optimizer state and activations sharded,
differentiable aux terms, official mode."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ivcr_jax import sharding
from ivcr_jax.data.batch import Layout, batch_spec, empty_batch
from ivcr_jax.data.pipeline import frame_slots
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import feed, optimizer
from ivcr_jax.training import step as step_lib
from ivcr_jax.training.checkpointing import Checkpointer, abstract_like

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
  counts = [frames, frames - 3, frames, 5][:videos]
  table = sum(counts) + 2  # the packed frame table, with two padding rows
  layout = Layout(batch_size=batch, seq_buckets=(seq,), video_buckets=(videos,),
                  frame_buckets=(table,), frames=frames, text_len=text_len,
                  queries=cfg.model.video_qformer.num_query_tokens, stride=cfg.model.video.stride,
                  max_numbers=1, max_digits=2)
  out = empty_batch(batch_spec(layout, seq=seq, videos=videos, frames=table,
                               item_shape=(size, size, 3)))
  out["frames"][:] = rng.integers(0, 256, (table, size, size, 3), dtype=np.uint8)
  out["frame_slot"][:] = frame_slots(counts, videos, frames)
  out["qformer_text_ids"][:] = rng.integers(3, 60, (table, text_len))
  out["qformer_text_mask"][:] = True
  out["input_ids"][:], out["video_slot"][:], out["labels"][:] = ids, slot, labels
  out["attention_mask"][:] = True
  out["position_ids"][:] = np.arange(seq)
  out["index_pos"][:], out["index_target"][:], out["index_valid"][:] = 50, 3, True
  out["span_pos"][:] = [[60, 61], [64, 65]]
  out["span_place"][:] = [[10.0, 1.0], [10.0, 1.0]]
  out["span_target"][:] = [12.0, 15.0]
  out["span_valid"][:] = True
  return out


def _setup(cfg, mesh_shape, *, alpha=0.01, beta=0.01):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = mesh_shape
    cfg.train.update(dict(alpha=alpha, beta=beta, grad_accum=1))
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
  tx = optimizer.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  state, frozen = step_lib.place(split, tx, mesh, cfg.mesh.rules)
  loss_cfg = step_lib.LossConfig.from_config(cfg.train, DIGITS)
  fn = step_lib.jit_train_step(step_lib.make_train_step(split, tx, loss_cfg), state, mesh,
                               cfg.mesh.rules)
  return fn, state, frozen, feed.place_batch(batch, mesh, cfg.mesh.rules), split


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
    for moment in ("mu", "nu"):  # the step keeps the moments where the parameters are
      assert jax.tree.map(lambda m, p: m.sharding == p.sharding,
                          optax.tree.get(state["opt"], moment), state["params"])
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


@pytest.mark.parametrize("accum", [1, 4])
def test_optimizer_state_is_sharded_like_the_parameters(tiny_config, accum, tmp_path):
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (1, 8, 1)
    cfg.train.grad_accum = accum  # 4: optax.MultiSteps keeps accumulated gradients too
  split = step_lib.TrainableSplit.of(InterLLaVA(cfg.model, rngs=nnx.Rngs(0)), cfg.model.trainable)
  tx = optimizer.make_optimizer(cfg.train)
  state, _ = step_lib.place(split, tx, sharding.make_mesh(cfg.mesh), cfg.mesh.rules)
  params, opt = state["params"], state["opt"]
  copies = ("mu", "nu") + (("acc_grads",) if accum > 1 else ())
  for name in copies:
    part = optax.tree.get(opt, name)
    assert jax.tree.structure(part) == jax.tree.structure(params)
    for m, p in zip(jax.tree.leaves(part), jax.tree.leaves(params), strict=True):
      assert m.sharding == p.sharding and m.shape == p.shape
  counters = [x for x in jax.tree.leaves(opt) if x.ndim == 0]
  assert counters and all(x.sharding.is_fully_replicated for x in counters)
  per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
  total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  # One device holds its parameters' shards once per copy (plus the counters), far less than the
  # replicated state it used to hold.
  assert per_device(opt) == len(copies) * per_device(params) + total(counters)
  assert per_device(opt) < total(opt) / 4
  # A checkpoint of the sharded state restores onto the same shardings (the trainer's resume).
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  ckpt.save(1, state)
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  restored, _, _ = ckpt.restore(abstract_like(state))
  params, _ = ckpt.restore_params(abstract_like(state["params"]))  # evaluation: no optimizer
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_constrain_pins_the_batch_dim_only_under_a_mesh_context(tiny_config):
  rules = tiny_config.mesh.rules
  mesh_cfg = tiny_config.mesh.copy_and_resolve_references()
  with mesh_cfg.unlocked():
    mesh_cfg.shape = (1, 8, 1)
  mesh = sharding.make_mesh(mesh_cfg)
  x = jnp.ones((16, 3))
  pinned = jax.jit(lambda x: sharding.constrain(x * 2, ("batch",)) + 1)
  assert sharding.constrain(x, ("batch",)) is x  # no context: generation, single-device use
  assert pinned(x).sharding.is_fully_replicated
  with sharding.activation_sharding(mesh, rules):
    assert sharding.constrain(jnp.ones((6, 3)), ("batch",)).sharding.is_fully_replicated
    y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch",)) + 1)(x)  # traced in the context
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("fsdp")), y.ndim)
  with mesh_cfg.unlocked():
    mesh_cfg.shape = (1, 1, 1)
  with sharding.activation_sharding(sharding.make_mesh(mesh_cfg), rules):
    assert sharding.constrain(x, ("batch",)) is x


def test_model_activations_are_constrained_to_the_batch_axes(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (2, 2, 2)
  mesh = sharding.make_mesh(cfg.mesh)
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)  # 4 sequences of 96, 4 videos, a table of 40 frames
  graphdef, state = nnx.split(model)
  forward = lambda state, batch: nnx.merge(graphdef, state)(batch)
  lowered = lambda fn: jax.jit(fn).lower(state, batch).as_text()
  assert "sharding_constraint" not in lowered(forward)
  # As the train and eval steps trace it:
  in_context = step_lib.with_activation_sharding(forward, mesh, cfg.mesh.rules)
  lines = [line for line in lowered(in_context).splitlines() if "sharding_constraint" in line]
  assert lines and all('[{"data", "fsdp"}, {}' in line for line in lines)
  hidden = cfg.model.llm.hidden
  for shape in ("40x32x32x3",  # ViT frames (the packed table)
                f"40x{1 + (32 // 8) ** 2}x{cfg.model.vit.width}",  # ViT output, image Q-Former
                f"8x{8 * 14}x{cfg.model.qformer.hidden}",  # video Q-Former keys (8 windows)
                f"4x96x{hidden}"):  # LLaMA input embeddings and hidden states
    assert any(f"tensor<{shape}x" in line for line in lines), shape


def test_aux_terms_alone_have_gradients_on_trainable_params(tiny_config):
  cfg = tiny_config
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
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


def _avals(jaxpr):
  """Every intermediate value's abstract value in `jaxpr` and its sub-jaxprs (scan, remat, ...)."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _avals(sub)


def test_the_step_never_builds_logits_for_every_position(tiny_config):
  """Logits exist `train.lm_loss_chunk` positions at a time (forward and backward), never as
  `[B, S, vocab]`."""
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.train.lm_loss_chunk = 32
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  batch = synthetic_batch(cfg, model)  # 4 sequences of 96 positions
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
  loss_cfg = step_lib.LossConfig.from_config(cfg.train, DIGITS)
  loss = lambda p: step_lib.loss_and_metrics(split.merge(p, split.frozen), batch, loss_cfg,
                                             None)[0]
  vocab = cfg.model.llm.vocab_size
  widest = max(math.prod(a.shape[:-1]) for a in _avals(jax.make_jaxpr(jax.grad(loss))(
      split.params).jaxpr) if getattr(a, "shape", ()) and a.shape[-1] == vocab)
  assert widest == 4 * 32  # one chunk of the 4 x 96 positions
