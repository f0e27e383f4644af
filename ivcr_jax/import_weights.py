"""Build InterLLaVA's initial weights from the official checkpoints (reference §6.3).

  python -m ivcr_jax.import_weights --config=configs/interllava.py[:PRESET] [--out=DIR] \
      [--overwrite] [--config.weights.ivcr=/path/ivcr.pth ...]

Reads the files named in `config.weights` (EVA ViT-g, InstructBLIP, Llama-2, TimeChat,
Video-LLaMA, or an official IVCR checkpoint instead of the last two; an empty field skips its
step) and writes an orbax checkpoint of the full model to DIR (default:
`weights.init_checkpoint`), which `train`, `evaluate` and `export_hf` then restore.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from ivcr_jax import configs, experiment
from ivcr_jax.convert import checkpoint_chain
from ivcr_jax.convert.mapping import CheckpointError
from ivcr_jax.data import tokenizer as tokenizer_lib

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset]; its `weights` section names the "
    "files.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: weights.init_checkpoint).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  out = _OUT.value or config.weights.init_checkpoint
  if not out:
    raise app.UsageError("--out is required (the preset has no weights.init_checkpoint)")
  w = config.weights
  missing = [f"  weights.{s} = {w[s]}\n      get: {experiment.SOURCES.get(s, 'your file')}"
             for s in checkpoint_chain.STEPS if w[s] and not os.path.exists(w[s])]
  if missing:
    print("missing initial weights (point the config at local copies, e.g. "
          "--config.weights.llama=/path, or empty a field to skip its step):\n"
          + "\n".join(missing), file=sys.stderr)
    sys.exit(2)
  tokenizer = None
  if config.data.tokenizer and os.path.isdir(config.data.tokenizer):
    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  else:
    logging.warning("no tokenizer at data.tokenizer=%r: LLM vocabulary from the config (%d)",
                    config.data.tokenizer, config.model.llm.vocab_size)
  cfg = experiment.model_config(config, tokenizer) if tokenizer else config.model
  try:
    checkpoint_chain.import_chain(cfg, w, os.path.abspath(out), seed=config.seed,
                                  overwrite=_OVERWRITE.value)
  except (CheckpointError, FileExistsError) as e:
    print(f"import failed: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
