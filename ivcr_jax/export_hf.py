"""Export a trained InterLLaVA as Hugging Face / PyTorch parts and the official IVCR checkpoint.

  python -m ivcr_jax.export_hf --config=configs/interllava.py[:PRESET] --workdir=DIR --out=OUT \
      [--step=N]

Builds the model as training did (initial weights of the preset), restores the trained
parameters of DIR/checkpoints (latest or `--step`) and writes OUT/: llm/ (LoRA merged, with the
tokenizer), llm_lora/ (PEFT), vision/, qformer/, video_qformer/ (transformers InstructBLIP
classes), projector.safetensors, interllava_config.json, ivcr_official.pth and README.md (how
to assemble the parts in PyTorch); see `ivcr_jax.convert.export`.
"""

from __future__ import annotations

from absl import app, flags

from ivcr_jax import configs, experiment

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset] (as used for training).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  with experiment.faults_reported():
    step = experiment.export(_CONFIG.value, _WORKDIR.value, _OUT.value, step=_STEP.value)
  print(f"exported step {step} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
