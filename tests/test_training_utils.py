"""Optimizer schedule and weight-decay mask; TensorBoard event files written without TF."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.interllava import get_config
from ivcr_jax.training import event_file, optimizer


def test_official_schedule_values():
  train = get_config("official").train
  lr = optimizer.learning_rate(train)
  assert float(lr(0)) == pytest.approx(1e-6)
  assert float(lr(25_000)) == pytest.approx(1e-6 + (3e-5 - 1e-6) / 2)
  # Cosine on the global micro-step: ~2.81e-5 when warmup ends (reference §7), 1e-5 at the end.
  assert float(lr(50_000)) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 5)))
  assert float(lr(50_000)) == pytest.approx(2.81e-5, abs=1e-7)
  assert float(lr(250_000)) == pytest.approx(1e-5)


def test_weight_decay_mask_follows_torch_ndim():
  params = {"qformer": {"query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))},
                        "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
            "vit": {"qkv_bias": jnp.ones((3, 2, 2))},
            "query_tokens": jnp.ones((1, 8, 4)), "lora_a": jnp.ones((4, 2))}
  mask = optimizer.weight_decay_mask(params)
  assert mask["qformer"]["query"] == {"kernel": True, "bias": False}
  assert mask["qformer"]["norm"] == {"scale": False, "bias": False}
  assert mask["vit"]["qkv_bias"] is False
  assert mask["query_tokens"] is True and mask["lora_a"] is True


def test_accumulation_updates_every_k_micro_steps_with_the_micro_step_lr():
  cfg = get_config("tiny").copy_and_resolve_references()
  with cfg.unlocked():
    cfg.train.update(dict(grad_accum=4, weight_decay=0.0, warmup_steps=8, lr=1e-2,
                          warmup_lr=0.0, b1=0.0, b2=0.0, eps=1e-30))
  tx = optimizer.make_optimizer(cfg.train)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  updates_seen = []
  for _ in range(8):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    updates_seen.append(float(updates["w"][0]))
  # No update on micro-steps 0-2 and 4-6; with b1=b2=0 each update is -lr(micro-step 3 / 7).
  lr = optimizer.learning_rate(cfg.train)
  np.testing.assert_allclose(updates_seen, [0, 0, 0, -float(lr(3)), 0, 0, 0, -float(lr(7))],
                             rtol=1e-5)


def test_event_file_round_trip(tmp_path):
  assert event_file.crc32c(b"123456789") == 0xE3069283
  writer = event_file.EventFileWriter(str(tmp_path))
  writer.scalars(1, {"loss": 2.5, "lr": 1e-4})
  writer.scalars(2, {"loss": 1.25})
  writer.close()
  got = event_file.read_scalars(writer.path)
  assert [(s, t) for s, t, _ in got] == [(1, "loss"), (1, "lr"), (2, "loss")]
  np.testing.assert_allclose([v for *_, v in got], [2.5, 1e-4, 1.25], rtol=1e-6)
  data = bytearray(open(writer.path, "rb").read())
  data[-6] ^= 0xFF
  open(writer.path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    event_file.read_scalars(writer.path)


def test_checkpoint_round_trip_onto_another_mesh(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from ivcr_jax import sharding
  from ivcr_jax.training.checkpointing import Checkpointer, abstract_like

  mesh_cfg = get_config("tiny").mesh.copy_and_resolve_references()
  with mesh_cfg.unlocked():
    mesh_cfg.shape = (1, 8, 1)
  mesh8 = sharding.make_mesh(mesh_cfg)
  state = {"params": {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4),
                                          NamedSharding(mesh8, PartitionSpec("fsdp", None)))},
           "opt": {"mu": jnp.ones((3,))}, "step": jnp.int32(7)}
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, save_every=1)
  for step in (1, 2, 3):
    ckpt.save(step, state, meta={"note": f"s{step}", "samples_seen": 4 * step})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, save_every=1)
  assert ckpt.all_steps() == [2, 3]  # keep-N
  with mesh_cfg.unlocked():
    mesh_cfg.shape = (1, 2, 4)
  mesh24 = sharding.make_mesh(mesh_cfg)
  replicated = NamedSharding(mesh24, PartitionSpec())
  target = abstract_like(state, {
      "params": {"w": NamedSharding(mesh24, PartitionSpec("tensor", "fsdp"))},
      "opt": {"mu": replicated}, "step": replicated})
  restored, meta, step = ckpt.restore(target)
  params, params_step = ckpt.restore_params(target["params"], step=2)
  ckpt.close()
  assert step == 3 and meta == {"note": "s3", "samples_seen": 12} and params_step == 2
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.arange(32.0).reshape(8, 4))
  assert restored["params"]["w"].sharding.spec == PartitionSpec("tensor", "fsdp")
  assert int(restored["step"]) == 7 and np.asarray(restored["opt"]["mu"]).tolist() == [1.0] * 3
  assert params["w"].sharding.spec == PartitionSpec("tensor", "fsdp")
