"""Pretrain the demo's LLaMA on the toy world in words, and export it as a Hugging Face LLaMA.

  python -m ivcr_jax.pretrain_llm --config=configs/toy_llm.py[:PRESET] --workdir=DIR \\
      [--config.train.num_steps=N ...]

The official recipe starts from a pretrained LLaMA-2; the demo has none to download. This run
makes one for the toy world (issue #13): the demo preset's LLaMA trained on conversations in the
official layouts whose videos are written as words (`ivcr_jax.data.toy_text`), to find the
candidate a question describes and copy its index and an event's span (README "The demo" says
how far it gets). The same command
resumes from the latest checkpoint in DIR. Outputs in DIR: checkpoints/ (orbax), tensorboard/,
train_history.json, pretrain_curves.png (index and span accuracy, training and held out),
tokenizer/, and hf/: a `LlamaForCausalLM` directory (config, safetensors, tokenizer) with
`pretrain_llm.json` (held-out figures, the safetensors' sha256). The InterLLaVA chain takes it
as its LLaMA: `python -m ivcr_jax.import_weights --config=configs/interllava.py:demo
--config.weights.llama=DIR/hf --config.data.tokenizer=DIR/hf --config.weights.eva_vit=
--config.weights.instructblip= --config.weights.timechat= --config.weights.videollama=
--out=INIT`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from ivcr_jax import configs, experiment
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import file_sha256
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data import toy_tokenizer
from ivcr_jax.evaluation import plots
from ivcr_jax.jsonfile import read_json, write_json
from ivcr_jax.training import text_pretraining
from ivcr_jax.training.history import HISTORY_FILE

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset]; override fields with --config.a.b=value.",
    default="toy_llm.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, event files, the "
                               "toy tokenizer and the exported model (hf/).")
REPORT = "pretrain_llm.json"
CURVES = ("index_acc", "heldout_index_acc_first", "heldout_index_acc_follow", "span_acc",
          "heldout_span_acc")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.info("toy LLM config (%s):\n%s", config.preset, config)
  experiment.save_config(config, workdir)
  with experiment.faults_reported():
    tokenizer = tokenizer_lib.load_tokenizer(
        toy_tokenizer.build_toy_tokenizer(os.path.join(workdir, "tokenizer")))
    model, result = text_pretraining.pretrain(config, workdir, tokenizer)
    history = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(history):  # absent when checkpoints were restored and nothing was logged
      plots.learning_curves(
          read_json(history), CURVES, os.path.join(workdir, "pretrain_curves.png"),
          title=f"toy LLM ({config.preset}): teacher-forced accuracy of the answers' numbers")
    if result["step"] < config.train.num_steps:
      print(json.dumps({"stopped_after": result["step"]}))
      return
    out = os.path.join(workdir, "hf")
    llama_hf.save_hf_llama(model, out, tokenizer=tokenizer,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    result["model_safetensors_sha256"] = file_sha256(os.path.join(out, "model.safetensors"))
    result["config"] = f"configs/toy_llm.py:{config.preset}"
    write_json(os.path.join(out, REPORT), result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
