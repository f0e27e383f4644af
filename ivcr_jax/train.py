"""Train InterLLaVA.

  python -m ivcr_jax.train --config=configs/interllava.py[:PRESET] --workdir=DIR \
      [--config.train.num_steps=N ...]

PRESET: official (default; needs the real weights and data, and says what is missing), paper,
small, tiny, demo (builds a toy IVCR corpus and trains a tiny model on CPU in minutes). Running
the same command again resumes from the latest checkpoint in DIR. Multi-host: run the same
command on every host.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ivcr_jax import experiment
from ivcr_jax.data import pipeline
from ivcr_jax.evaluation import evaluator
from ivcr_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/interllava.py", "Config file[:preset]; override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, event files, "
                               "evaluation outputs (and the toy corpus for toy presets).")


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes (SLURM, a
  coordinator address, or multi-host TPU/GPU environments); a no-op on one machine."""
  env = os.environ
  multi = (env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
           or int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "")
           .count(",") > 0 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi:
    jax.distributed.initialize()


def train(config, workdir: str) -> trainer.Result:
  """Builds the data and model of `config` and trains (library entry for notebooks/tests)."""
  experiment.check_inputs(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1))
  data = experiment.open_data(config, workdir)
  model = experiment.build_model(config, data.tokenizer)
  samples = data.samples("train", config.data.sample_mode)
  encoder = data.encoder(config, training=True, model=model)
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size {config.train.batch_size} is not a multiple of the "
                     f"{jax.process_count()} processes")
  batches = iter(pipeline.train_dataset(samples, encoder, data.layout, seed=config.seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()))
  val_samples = data.samples("val", config.data.sample_mode)
  val_encoder = data.encoder(config, training=False, model=model)

  def val_batches():
    layout = data.layout
    for i in range(0, len(val_samples) - layout.batch_size + 1, layout.batch_size):
      yield pipeline.assemble([val_encoder(s) for s in val_samples[i:i + layout.batch_size]],
                              layout)

  logging.info("%d training samples (%s mode), %d validation samples", len(samples),
               config.data.sample_mode, len(val_samples))
  result = trainer.run(config, workdir, model, batches, trainer.digits_of(data.tokenizer),
                       val_batches=val_batches if val_samples else None)
  if encoder.truncated:
    logging.info("over-long samples shortened: %s", dict(encoder.truncated))
  with open(os.path.join(workdir, "train_history.json"), "w", encoding="utf-8") as f:
    json.dump(result.history, f, indent=1)
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  maybe_initialize_distributed()
  config = _CONFIG.value
  logging.info("config (%s):\n%s", config.preset, config)
  try:
    result = train(config, _WORKDIR.value)
    if config.train.evaluate_after:
      metrics = evaluator.run(config, _WORKDIR.value, split="test")
      last = result.history[-1] if result.history else {}
      print(f"step {result.step}: train loss {last.get('loss', float('nan')):.4f}, "
            f"val loss_lm {last.get('val_loss_lm', float('nan')):.4f}")
      print("test: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in (
          "r@1", "r@10", "r@1_iou0.3", "r@1_iou0.5", "r@1_iou0.7", "miou", "bleu4")))
      print(f"(outputs in {os.path.join(_WORKDIR.value, 'eval', 'test')})")
  except experiment.MissingInputsError as e:
    print(e, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
