"""Train the phase-1 X-Pool retriever, then rank the evaluation split's corpus.

  python -m ivcr_jax.retriever.train --config=configs/retriever.py[:PRESET] --workdir=DIR \\
      [--config.train.num_steps=N ...]

PRESET: official (default; vision-tower features of IVCR-200K from a feature store), demo (the
toy corpus's pixels, a few CPU minutes), tiny (tests). The same command resumes from the latest
checkpoint in DIR. Outputs in DIR: checkpoints/ (orbax), tensorboard/, train_history.json, and
eval/<split>.json with R@1/R@5/R@10, median and mean rank over the frame store's videos, next to
the same figures of the annotation's own candidate lists.

Then build the LLM's candidate lists with python -m data_prep.build_topk_cache.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from ivcr_jax import configs, experiment
from ivcr_jax.retriever import training

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset]; override fields with --config.a.b=value.",
    default="retriever.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, event files, "
                               "evaluation (and the toy corpus when data.stores is empty).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  logging.info("retriever config (%s):\n%s", config.preset, config)
  workdir = _WORKDIR.value
  experiment.save_config(config, workdir)
  with experiment.faults_reported():
    experiment.check_data_inputs(config)
    store_dir, tokenizer_dir = experiment.store_dirs(config.data, config.frame_size, workdir)
    result = training.train(config, workdir, store_dir, tokenizer_dir)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
