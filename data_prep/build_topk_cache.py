"""A trained retriever's top-k candidate lists for every query turn -> an ArrayRecord store.

  python -m data_prep.build_topk_cache --config=configs/retriever.py:demo --retriever=RDIR \\
      [--config.data.stores=STORES] [--out=DIR] [--splits=train,val,test] [--overwrite]

--config must be the retriever run's (same preset and overrides). The stores are the run's
(`data.stores`, or RDIR/toy_data for a toy preset). The cache goes next to the dialogue store
(default `<stores>/topk_xpool`) with the fingerprints of the retriever checkpoint and of the
corpus; the LLM uses it with `--config.data.candidates=DIR`, which refuses a cache built for
other stores. Running it again with the same retriever keeps the cache; with another retriever
it refuses unless --overwrite.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from ivcr_jax import configs, experiment
from ivcr_jax.data import prepare
from ivcr_jax.retriever import topk, training

_CONFIG = configs.define_config_flag(
    "config", "The retriever run's config file[:preset] (and the same --config.a.b=value "
    "overrides).", default="retriever.py")
_RETRIEVER = flags.DEFINE_string("retriever", None, "The retriever's run directory (its latest "
                                 "checkpoint is used).")
_OUT = flags.DEFINE_string("out", None, "Cache directory (default <stores>/topk_xpool).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to cover (default: every split of the "
                            "dialogue store).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a cache of another retriever/corpus.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _RETRIEVER.value:
    raise app.UsageError("--retriever is required")
  config = _CONFIG.value
  logging.info("retriever config (%s):\n%s", config.preset, config)
  try:
    experiment.check_data_inputs(config)
    store_dir, tokenizer_dir = experiment.store_dirs(config.data, config.frame_size,
                                                     _RETRIEVER.value)
    trained = training.restore(config, _RETRIEVER.value,
                               training.open_stores(config, store_dir, tokenizer_dir))
  except (experiment.MissingInputsError, FileNotFoundError, ValueError) as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  splits = _SPLITS.value or sorted((prepare.read_report(store_dir) or {}).get("splits", {}))
  if not splits:
    print(f"no splits known for {store_dir} (no {prepare.REPORT_FILE}); pass --splits",
          file=sys.stderr)
    sys.exit(2)
  out = _OUT.value or os.path.join(store_dir, "topk_xpool")
  try:
    meta = topk.build_cache(config, trained, out, splits, retriever_dir=_RETRIEVER.value,
                            overwrite=_OVERWRITE.value)
  except FileExistsError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  print(f"top-{meta['k']} cache of retriever {meta['retriever']['fingerprint'][:12]} (step "
        f"{meta['retriever']['step']}) for {', '.join(meta['splits'])} -> {out}\n"
        f"use it: --config.data.candidates={out}")


if __name__ == "__main__":
  app.run(main)
