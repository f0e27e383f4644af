"""Abstract-first state: after the model is built (or restored) and placed, every device holds
exactly the bytes its shards take, checked on the live arrays; the old way (build on one device,
then place) fails the same check."""

import collections
import gc

import jax
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import checkpointing, optimizer
from ivcr_jax.training import step as step_lib


def _live_bytes() -> collections.Counter:
  gc.collect()
  out = collections.Counter()
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return out


def _shard_bytes(*trees) -> collections.Counter:
  out = collections.Counter()
  for tree in trees:
    for x in jax.tree.leaves(tree):
      for shard in x.addressable_shards:
        out[shard.device] += shard.data.nbytes
  return out


def _config(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (1, 8, 1)
    cfg.train.grad_accum = 1
  return cfg


def _placed(cfg, model):
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
  return step_lib.place(split, optimizer.make_optimizer(cfg.train),
                        sharding.make_mesh(cfg.mesh), cfg.mesh.rules)


def _extra(before, state, frozen) -> dict:
  """Bytes per device beyond the placed state's own shards."""
  live = _live_bytes()
  expected = _shard_bytes(state, frozen)
  return {d: live[d] - before[d] - expected[d] for d in jax.devices()}


def test_built_and_placed_state_holds_no_whole_copy(tiny_config):
  cfg = _config(tiny_config)
  mesh = sharding.make_mesh(cfg.mesh)
  make = lambda: InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  whole = sum(x.size * x.dtype.itemsize
              for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make))))
  before = _live_bytes()
  model = sharding.create_sharded(make, mesh, cfg.mesh.rules)
  state, frozen = _placed(cfg, model)
  extra = _extra(before, state, frozen)
  assert all(b <= 0 for b in extra.values()), extra
  assert max(_shard_bytes(state["params"]).values()) < whole / 2  # the parameters are split
  del model, state, frozen

  # The old way keeps a whole copy of the model alive on device 0 (the control).
  before = _live_bytes()
  model = make()
  state, frozen = _placed(cfg, model)
  extra = _extra(before, state, frozen)
  assert extra[jax.devices()[0]] > 0.9 * whole, (extra, whole)


def test_restored_initial_weights_go_straight_into_their_shardings(tiny_config, tmp_path):
  cfg = _config(tiny_config)
  mesh = sharding.make_mesh(cfg.mesh)
  make = lambda: InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  source = make()
  checkpointing.save_model(source, tmp_path / "init", {})
  expected = nnx.to_pure_dict(nnx.state(source))
  del source
  before = _live_bytes()
  model = checkpointing.restore_model(tmp_path / "init", make, mesh, cfg.mesh.rules)
  state, frozen = _placed(cfg, model)
  extra = _extra(before, state, frozen)
  assert all(b <= 0 for b in extra.values()), extra
  restored = nnx.to_pure_dict(nnx.state(model))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
    assert (jax.numpy.asarray(a) == jax.numpy.asarray(b)).all()
