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

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ivcr_jax import experiment, sharding
from ivcr_jax.data import prepare, topk_store
from ivcr_jax.data.pipeline import Layout
from ivcr_jax.evaluation.evaluator import Evaluator
from ivcr_jax.evaluation.session import ChatSession, run_repl
from ivcr_jax.retriever import training as retriever_training
from ivcr_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/interllava.py", "The trained run's config file[:preset] (and the same "
    "--config.a.b=value overrides).", lock_config=True)
_RETRIEVER_CONFIG = config_flags.DEFINE_config_file(
    "retriever_config", "configs/retriever.py:demo", "The retriever run's config[:preset].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained InterLLaVA run directory.")
_RETRIEVER = flags.DEFINE_string("retriever", None, "The trained retriever's run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def build_session(config, workdir: str, rconfig, retriever_dir: str,
                  step: int | None = None) -> ChatSession:
  """The model and retriever of two runs, ready to talk (refuses a retriever of other videos)."""
  data = experiment.open_data(config, workdir)
  model = experiment.build_model(config, data.tokenizer)
  step = trainer.load_trained(config, os.path.join(workdir, "checkpoints"), model, step)
  rstores, rtokenizer = experiment.store_dirs(rconfig.data, rconfig.frame_size, retriever_dir)
  retriever = retriever_training.restore(
      rconfig, retriever_dir, retriever_training.open_stores(rconfig, rstores, rtokenizer))
  ours = topk_store.corpus_fingerprint(data.frame_store.index["videos"])
  if topk_store.corpus_fingerprint(retriever.data.bank.videos) != ours:
    raise topk_store.TopKMismatch(
        f"the retriever in {retriever_dir} ranks other videos ({rstores}) than the model's "
        f"frame store ({data.store_dir}); train it on the same stores (--config.data.stores)")
  ranker = retriever.ranker(rconfig)
  corpus = ranker.index(retriever.data.bank.videos)
  encoder = data.encoder(config, training=False, model=model,
                         layout=Layout.from_config(config, batch_size=1))
  evaluator = Evaluator(model, encoder, data.tokenizer, config.generation, batch_size=1,
                        mesh=sharding.make_mesh(config.mesh), rules=config.mesh.rules)
  logging.info("chat: model step %d, retriever step %d over %d videos", step, retriever.step,
               len(corpus.videos))
  report = prepare.read_report(data.store_dir) or {}
  return ChatSession(evaluator, ranker, corpus, video_root=report.get("video_root") or "",
                     num_candidates=config.data.num_candidates,
                     max_turns=config.data.max_turns)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _RETRIEVER.value:
    raise app.UsageError("--workdir (the trained run) and --retriever (the retriever run) are "
                         "required")
  for stream in (sys.stdin, sys.stdout):  # Chinese input and output whatever the locale
    stream.reconfigure(encoding="utf-8", errors="replace")
  config = _CONFIG.value
  logging.info("config (%s):\n%s", config.preset, config)
  logging.info("retriever config (%s):\n%s", _RETRIEVER_CONFIG.value.preset,
               _RETRIEVER_CONFIG.value)
  try:
    experiment.check_inputs(config)
    session = build_session(config, _WORKDIR.value, _RETRIEVER_CONFIG.value, _RETRIEVER.value,
                            _STEP.value)
  except (experiment.MissingInputsError, FileNotFoundError, ValueError) as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  run_repl(session, read=input, write=lambda text: print(text, flush=True))


if __name__ == "__main__":
  app.run(main)
