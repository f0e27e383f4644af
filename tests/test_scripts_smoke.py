"""The benchmark and probe scripts keep working: bench_train's runner times the trainer's step
on a real toy batch, plan_7b's abstract batch and compile match what the pipeline and the trainer
use (at the tiny preset, dropout off to halve the compile times), and probe_binding trains."""

import numpy as np
import pytest

from ivcr_jax import experiment
from ivcr_jax.data import records
from scripts import bench_train, plan_7b, probe_binding


def _no_dropout(cfg):
  with cfg.unlocked():
    for section in (cfg.model.qformer, cfg.model.video_qformer):
      section.dropout = section.attention_dropout = 0.0
    cfg.model.lora.dropout = 0.0
  return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The benchmark's tiny config, its toy corpus, and the batch of a retrieval-turn sample."""
  config = _no_dropout(bench_train.bench_config("tiny", scan=False))
  data = experiment.open_data(config, str(tmp_path_factory.mktemp("bench")))
  dialogue = bench_train.find_dialogue(data.dialogues("train"),
                                       lambda kinds: kinds == ["retrieval", "moment"], "R>M")
  sample = records.make_samples([dialogue], "prefix")[0]
  return config, data, bench_train.batch_of(data.encoder(config, training=True), [sample])


def test_bench_train_step(toy):
  config, data, batch = toy
  m = bench_train.Runner(config, data, repeats=1).measure(batch)
  assert m.seconds > 0 and m.compile_s > 0
  # XLA's count of the unrolled step and plan_7b's analytic count agree (no remat at tiny).
  analytic = plan_7b.analytic_flops(experiment.model_config(config, data.tokenizer),
                                    batch["input_ids"].shape[1],
                                    len(batch["num_frames"]), data.layout.frames,
                                    data.layout.text_len)["total"]
  assert 0.8 < m.flops / analytic < 1.5


def test_plan_7b_compiles_abstract_step(toy):
  config, data, batch = toy
  seq, videos = batch["input_ids"].shape[1], len(batch["num_frames"])
  size = config.model.vit.image_size
  abstract = plan_7b.abstract_batch(data.layout, seq, videos, (size, size, 3))
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}

  c = plan_7b.compile_step(_no_dropout(plan_7b.plan_config("tiny", mesh=(1, 2, 2))), 2, seq,
                           videos)
  assert c.flops > 0 and c.memory.temp_size_in_bytes > 0
  # FSDP over 2 devices: one device holds less than all the (f32) trainable parameters.
  assert 0 < c.state_bytes["params"] < 4 * c.params[0]


def test_probe_binding_runs():
  accuracy = probe_binding.main(["--steps", "4", "--report_every", "2", "--batch", "2"])
  assert 0.0 <= accuracy <= 1.0
