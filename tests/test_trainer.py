"""The training loop: exact resume (weights, optimizer, data position), NaN guard, event files."""

import jax
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.data.batch import Layout
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import step as step_lib
from ivcr_jax.training import trainer
from tests.test_train_step import DIGITS, synthetic_batch


def _config(tiny_config, steps, **train):
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.train.update(dict(num_steps=steps, log_every=1, checkpoint_every=3, eval_every=3,
                          grad_accum=1, warmup_steps=2, lr=1e-3), **train)
  return cfg


def _batches(cfg, model):
  """`train_batches(start)`: distinct synthetic batches from global sample position `start`."""
  size = cfg.train.batch_size
  return lambda start: (synthetic_batch(cfg, model, seed=i) for i in range(start // size, 100))


class Killed(Exception):
  pass


def _killed_after(batches, n):
  """`batches` whose iterators die when asked for batch `n` (as a killed process would)."""

  def make(start):
    it = batches(start)
    for _ in range(n):
      yield next(it)
    raise Killed

  return make


def _train(cfg, workdir, steps=None, kill_after=None, on_log=None):
  model = InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  if steps is not None:
    with cfg.unlocked():
      cfg.train.num_steps = steps
  batches = _batches(cfg, model)
  if kill_after is not None:
    batches = _killed_after(batches, kill_after)
  val = lambda: [synthetic_batch(cfg, model, seed=1000)]
  return trainer.run(cfg, str(workdir), model, batches, DIGITS, layout=Layout.from_config(cfg),
                     val_batches=val, on_log=on_log)


def test_resume_is_exact(tiny_config, tmp_path):
  cfg = _config(tiny_config, 6)
  straight = _train(cfg, tmp_path / "a")
  logged = []
  with pytest.raises(Killed):  # killed right after the step-3 checkpoint
    _train(cfg, tmp_path / "b", kill_after=3, on_log=lambda s, m: logged.append((s, m["loss"])))
  second = _train(cfg, tmp_path / "b")  # restarted with the same command
  assert [s for s, _ in logged] == [1, 2, 3]
  assert [h["step"] for h in second.history] == [4, 5, 6]
  losses = [h["loss"] for h in straight.history]
  np.testing.assert_allclose([loss for _, loss in logged] + [h["loss"] for h in second.history],
                             losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(second.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "val_loss_lm" in straight.history[2] and "val_perplexity" in straight.history[5]
  _check_tensorboard(tmp_path / "a" / "tensorboard", straight.history)


def _check_tensorboard(directory, history):
  """TensorBoard's own reader (not ours) sees every logged scalar at its step."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(directory))
  acc.Reload()
  assert {"loss", "loss_lm", "loss_index", "loss_span", "lr", "val_loss_lm"} <= set(
      acc.Tags()["scalars"])
  loss = acc.Scalars("loss")
  assert [e.step for e in loss] == [h["step"] for h in history]
  np.testing.assert_allclose([e.value for e in loss], [h["loss"] for h in history], rtol=1e-6)
  val = [(h["step"], h["val_loss_lm"]) for h in history if "val_loss_lm" in h]
  assert [e.step for e in acc.Scalars("val_loss_lm")] == [s for s, _ in val] != []
  np.testing.assert_allclose([e.value for e in acc.Scalars("val_loss_lm")], [v for _, v in val],
                             rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  cfg = _config(tiny_config, 6)
  with pytest.raises(Killed):
    _train(cfg, tmp_path, kill_after=3)
  with cfg.unlocked():
    cfg.train.lr = 1e30  # diverges at once
  with pytest.raises(step_lib.NonFiniteLossError, match="last good checkpoint is step 3"):
    _train(cfg, tmp_path)
  from ivcr_jax.training.checkpointing import Checkpointer

  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]

