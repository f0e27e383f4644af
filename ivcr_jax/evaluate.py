"""Evaluate InterLLaVA: generate every assistant turn of a split and score it.

  python -m ivcr_jax.evaluate --config=configs/interllava.py[:PRESET] --workdir=DIR \
      [--split=test] [--history=oracle|interactive] [--step=N] [--max_dialogues=N] \
      [--official_parsing] [--official_denominators]

Restores the latest (or `--step`) checkpoint in DIR/checkpoints and writes DIR/eval/<split>/:
predictions.jsonl, metrics.json (R@1, R@10, R@1 at IoU 0.3/0.5/0.7, mIoU, BLEU-4, counts,
per-turn table), per_turn.md, per_turn.png, iou_histogram.png. Generation settings come from
`config.generation` (greedy by default). Evaluation frames are sampled uniformly (deterministic),
unlike the official script's random sampling and crop (B6).

`--official_parsing` reads the generated answers with the official parsers (bugs included) instead
of the improved one; `--official_denominators` divides by every assistant turn of the split in the
annotation file, as the official script does, instead of by the evaluated turns (README "Parsing
generated answers"). Both override `config.evaluation`; metrics.json records what was used.
"""

from __future__ import annotations

import json

from absl import app, flags

from ivcr_jax import configs, experiment, multihost
from ivcr_jax.evaluation import evaluator
from ivcr_jax.evaluation import metrics as eval_metrics

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset] (as used for training).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run directory.")
_SPLIT = flags.DEFINE_string("split", "test", "Dialogue split to evaluate.")
_HISTORY = flags.DEFINE_enum("history", "oracle", list(evaluator.HISTORY_MODES),
                             "oracle: ground-truth history; interactive: the model's own.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX = flags.DEFINE_integer("max_dialogues", 0, "Evaluate only the first N dialogues (0: all).")
_INITIALIZE = multihost.define_flags()
_OFFICIAL_PARSING = flags.DEFINE_bool(
    "official_parsing", None, "Parse generated answers with the official parsers, bugs included "
    "(default: config.evaluation.official_parsing).")
_OFFICIAL_DENOMINATORS = flags.DEFINE_bool(
    "official_denominators", None, "Divide by every assistant turn of the split in the annotation "
    "file, as the official script (default: config.evaluation.official_denominators).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  _INITIALIZE()
  with experiment.faults_reported():
    metrics = experiment.evaluate(_CONFIG.value, _WORKDIR.value, split=_SPLIT.value,
                                  history=_HISTORY.value, step=_STEP.value,
                                  max_dialogues=_MAX.value,
                                  official_parsing=_OFFICIAL_PARSING.value,
                                  official_denominators=_OFFICIAL_DENOMINATORS.value)
  if multihost.is_main():
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_turn"}, indent=1))
    print(eval_metrics.summary(metrics))


if __name__ == "__main__":
  app.run(main)
