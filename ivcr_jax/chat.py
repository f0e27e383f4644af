"""Talk to a trained InterLLaVA run in the terminal: retrieve videos, then ground moments in them.

  python -m ivcr_jax.chat --config=configs/interllava.py:demo --workdir=DIR --retriever=RDIR \\
      [--retriever_config=configs/retriever.py:demo] [--config.generation.do_sample=true ...]

A new query retrieves the top-10 of the whole corpus with the phase-1 retriever of RDIR
(python -m ivcr_jax.retriever.train); the model re-ranks them and answers "video N" with its
explanation, and the chosen video's id and file are printed. A question about time ("When does
the red circle appear?", "红色圆形什么时候出现？") grounds a moment in the chosen video and prints
the parsed span; other messages continue the dialogue. English and Chinese both work.

Commands at the prompt:
  /new          start a new topic (forget the dialogue, the candidates and the chosen video)
  /candidates   show the ten candidates of the last retrieval
  /pick N       talk about candidate N from now on
  /help         the commands
  /quit         leave (also /exit or Ctrl-D)

Prompts are rendered exactly as in training, the history in the official format with the
model's own answers, truncated by whole turns; generation uses the KV-cache generator with
`config.generation`'s options (greedy by default; do_sample, temperature, top_p, seed) and
compiles once per shape bucket, so only the first turn of a kind waits for compilation.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from ivcr_jax import configs, experiment
from ivcr_jax.evaluation.session import ChatSession, run_repl

_CONFIG = configs.define_config_flag(
    "config", "The trained run's config file[:preset] (and the same --config.a.b=value "
    "overrides).")
_RETRIEVER_CONFIG = configs.define_config_flag(
    "retriever_config", "The retriever run's config[:preset].", default="retriever.py:demo")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained InterLLaVA run directory.")
_RETRIEVER = flags.DEFINE_string("retriever", None, "The trained retriever's run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def open_session(argv: list[str]) -> ChatSession:
  """The session of this command's flags (shared with `ivcr_jax.web_demo`), with both configs
  logged; exits with the message when the run, the retriever or the data are missing."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _RETRIEVER.value:
    raise app.UsageError("--workdir (the trained run) and --retriever (the retriever run) are "
                         "required")
  config = _CONFIG.value
  logging.info("config (%s):\n%s", config.preset, config)
  logging.info("retriever config (%s):\n%s", _RETRIEVER_CONFIG.value.preset,
               _RETRIEVER_CONFIG.value)
  try:
    experiment.check_inputs(config)
    return experiment.chat_session(config, _WORKDIR.value, _RETRIEVER_CONFIG.value,
                                   _RETRIEVER.value, _STEP.value)
  except (experiment.MissingInputsError, FileNotFoundError, ValueError) as e:
    print(e, file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  for stream in (sys.stdin, sys.stdout):  # Chinese input and output whatever the locale
    stream.reconfigure(encoding="utf-8", errors="replace")
  session = open_session(argv)
  run_repl(session, read=input, write=lambda text: print(text, flush=True))


if __name__ == "__main__":
  app.run(main)
