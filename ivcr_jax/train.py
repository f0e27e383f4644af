"""Train InterLLaVA.

  python -m ivcr_jax.train --config=configs/interllava.py[:PRESET] --workdir=DIR \
      [--config.train.num_steps=N ...]

PRESET: official (default; needs the real weights and data, and says what is missing), paper,
small, tiny, demo (builds a toy IVCR corpus and trains a tiny model on CPU in minutes). Running
the same command again resumes from the latest checkpoint in DIR.

Several processes (TPU pod slices, GPU clusters): the same command on every host. TPU pods,
SLURM and Open MPI are detected; elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the JAX_* variables). To try it on one machine:
  python -m ivcr_jax.launch --num_processes=2 -- python -m ivcr_jax.train ...
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from ivcr_jax import configs, experiment, multihost
from ivcr_jax.data import pipeline
from ivcr_jax.data.tokenizer import digits_of
from ivcr_jax.evaluation import metrics as eval_metrics
from ivcr_jax.training import trainer

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset]; override fields with "
    "--config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, event files, "
                               "evaluation outputs (and the toy corpus for toy presets). Several "
                               "processes: a directory they all see (shared file system).")
_INITIALIZE = multihost.define_flags()


def train(config, workdir: str) -> trainer.Result:
  """Builds the data and model of `config` and trains (library entry for notebooks/tests)."""
  experiment.check_inputs(config)
  experiment.use_compilation_cache(config)
  os.makedirs(workdir, exist_ok=True)
  if multihost.is_main():
    experiment.save_config(config, workdir)
  data = experiment.open_data(config, workdir)
  model = experiment.build_model(config, data.tokenizer)
  samples = data.samples("train", config.data.sample_mode)
  encoder = data.encoder(config, training=True, model=model)
  layout = data.layout  # this process's share of each global batch

  def train_batches(start: int):
    return iter(pipeline.train_dataset(samples, encoder, layout, seed=config.seed, start=start,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()))

  val_samples = data.samples("val", config.data.sample_mode)
  val_encoder = data.encoder(config, training=False, model=model)

  def val_batches():
    """Every full global batch of the split, this process's rows of each."""
    share, total = layout.batch_size, config.train.batch_size
    for i in range(0, len(val_samples) - total + 1, total):
      first = i + jax.process_index() * share
      yield pipeline.assemble([val_encoder(s) for s in val_samples[first:first + share]], layout)

  logging.info("%d training samples (%s mode), %d validation samples", len(samples),
               config.data.sample_mode, len(val_samples))
  def describe(first: int, count: int) -> list[str]:
    return [s.dialogue.name for s in pipeline.samples_at(samples, config.seed, first, count)]

  result = trainer.run(config, workdir, model, train_batches, digits_of(data.tokenizer),
                       layout=layout,
                       val_batches=val_batches if len(val_samples) >= config.train.batch_size
                       else None, describe=describe)
  if encoder.truncated:
    logging.info("over-long samples shortened: %s", dict(encoder.truncated))
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  _INITIALIZE()
  config = _CONFIG.value
  if multihost.is_main():
    logging.info("config (%s):\n%s", config.preset, config)
  with experiment.faults_reported():
    result = train(config, _WORKDIR.value)
    if config.train.evaluate_after and result.step >= config.train.num_steps:
      metrics = experiment.evaluate(config, _WORKDIR.value, split="test")
      last = result.history[-1] if result.history else {}
      if multihost.is_main():
        print(f"step {result.step}: train loss {last.get('loss', float('nan')):.4f}, "
              f"val loss_lm {last.get('val_loss_lm', float('nan')):.4f}")
        print("test: " + eval_metrics.summary(metrics))
        print(f"(outputs in {os.path.join(_WORKDIR.value, 'eval', 'test')})")


if __name__ == "__main__":
  app.run(main)
