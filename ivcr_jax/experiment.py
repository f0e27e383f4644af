"""What every entry point builds from a config: tokenizer, data stores, samples, model.

`train`, `evaluate`, `chat`, `web_demo` and `export_hf` call these so that a preset means the
same thing everywhere; the library below never imports this module. Presets whose
`data.annotations` is empty (tiny, demo) use the toy corpus, built with its stores under the
workdir when absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from ivcr_jax import multihost, sharding
from ivcr_jax.convert import export as export_lib
from ivcr_jax.convert.mapping import Log
from ivcr_jax.data import (
  feature_store,
  prepare,
  records,
  stores,
  topk_store,
  toy_corpus,
  toy_tokenizer,
)
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data.batch import Layout
from ivcr_jax.data.pipeline import SampleEncoder
from ivcr_jax.evaluation import evaluator, metrics
from ivcr_jax.evaluation.session import ChatSession
from ivcr_jax.jsonfile import read_json, write_json
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.retriever import training as retriever_training
from ivcr_jax.training import checkpointing
from ivcr_jax.training.checkpointing import CheckpointError
from ivcr_jax.training.step import NonFiniteLossError

# Where the official initial weights and the dataset come from (reference §6.3, §4).
SOURCES = {
    "eva_vit": "LAVIS: https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/"
               "BLIP2/eva_vit_g.pth",
    "instructblip": "LAVIS: https://storage.googleapis.com/sfr-vision-language-research/LAVIS/"
                    "models/InstructBLIP/instruct_blip_vicuna7b_trimmed.pth",
    "llama": "Hugging Face meta-llama/Llama-2-7b-chat-hf (licence required; a local directory)",
    "timechat": "Hugging Face ShuhuaiRen/TimeChat-7b (timechat_7b.pth)",
    "videollama": "Hugging Face DAMO-NLP-SG/Video-LLaMA-2-7B-Finetuned "
                  "(VL_LLaMA_2_7B_Finetuned.pth)",
    "annotations": "IVCR-200K (IVCR-200K.json and the compressed videos; link in the official "
                   "README at github.com/ivcr200k/ivcr200k.github.io)",
}


class MissingInputsError(FileNotFoundError):
  """The preset needs local weights or data that are not there; the message says what and how."""


# Damaged or bad run files and data: the message names the file (or batch) and what to do, so the
# entry points print it alone (exit 1) instead of burying it under a traceback.
FAULTS = (CheckpointError, stores.StoreError, NonFiniteLossError)


@contextlib.contextmanager
def faults_reported() -> Iterator[None]:
  """For an entry point's `main`: missing inputs exit with code 2, `FAULTS` with code 1, each
  with its message alone on stderr."""
  try:
    yield
  except MissingInputsError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  except FAULTS as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`workdir/config.json`: what the run was started with (every field, overrides included)."""
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))


def uses_toy_corpus(config: ml_collections.ConfigDict) -> bool:
  return not config.data.annotations


def _missing_data(d: ml_collections.ConfigDict) -> list[str]:
  """What a real-data `data` section lacks: stores (or what builds them) and the tokenizer."""
  missing = []
  if not os.path.isdir(d.stores):
    if not os.path.exists(d.annotations):
      missing.append(f"  data.annotations = {d.annotations}\n      get: "
                     f"{SOURCES['annotations']}")
    if not os.path.isdir(d.video_root):
      missing.append(f"  data.video_root = {d.video_root}\n      get: "
                     f"{SOURCES['annotations']}")
    missing.append(f"  data.stores = {d.stores}\n      build: python -m "
                   f"data_prep.build_stores --annotations {d.annotations} --video_root "
                   f"{d.video_root} --out {d.stores}")
  if not d.tokenizer or not os.path.isdir(d.tokenizer):
    missing.append(f"  data.tokenizer = {d.tokenizer!r} (the Llama-2 directory)")
  return missing


def _refuse(config: ml_collections.ConfigDict, missing: list[str], demo: str) -> None:
  if missing:
    raise MissingInputsError(
        f"preset {config.preset!r} uses the real IVCR-200K data, and these are missing:\n"
        + "\n".join(missing) + "\nPoint the config at local copies (e.g. "
        f"--config.data.stores=/path), or try the self-contained demo: {demo}")


def check_data_inputs(config: ml_collections.ConfigDict) -> None:
  """`check_inputs` for configs that need only the data (the retriever's)."""
  if not uses_toy_corpus(config):
    _refuse(config, _missing_data(config.data), "python -m ivcr_jax.retriever.train "
            "--config=configs/retriever.py:demo --workdir=/tmp/ivcr_retriever")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Stops at once, before any work, when a real-data preset lacks its files."""
  if uses_toy_corpus(config):
    return
  missing = _missing_data(config.data)
  w = config.weights
  if w.init_checkpoint and not os.path.exists(w.init_checkpoint):
    for name in ("eva_vit", "instructblip", "llama", "timechat", "videollama"):
      path = w[name]
      if path and not os.path.exists(path):
        missing.append(f"  weights.{name} = {path}\n      get: {SOURCES[name]}")
    missing.append(f"  weights.init_checkpoint = {w.init_checkpoint}\n      build: python -m "
                   "ivcr_jax.import_weights --config=configs/interllava.py "
                   f"--out={w.init_checkpoint}")
  _refuse(config, missing, "python -m ivcr_jax.train --config=configs/interllava.py:demo "
          "--workdir=/tmp/ivcr_demo")


@dataclasses.dataclass
class Data:
  """Opened stores, tokenizers and the pieces the pipeline needs."""

  tokenizer: Any
  qformer_tokenizer: Any
  frame_store: stores.FrameStore
  store_dir: str
  layout: Layout
  # `data.candidates`: None keeps the annotation's lists; else the top-k cache that replaces them.
  topk: topk_store.TopKStore | None = None
  num_candidates: int = 10

  def dialogues(self, split: str) -> list[records.Dialogue]:
    """The split's dialogues, on the top-k cache's candidate lists when one is configured
    (official test filter: dropped turns are counted and logged)."""
    source = stores.DialogueStore(_store_path(self.store_dir, stores.DIALOGUE_STORE), split)
    dialogues = [source[i] for i in range(len(source))]
    if self.topk is None:
      return dialogues
    applied = self.topk.with_candidates(
        dialogues, split, topk_store.corpus_fingerprint(self.frame_store.index["videos"]),
        self.num_candidates)
    logging.info("%s candidates from the top-k cache %s: %s", split, self.topk.path,
                 applied.summary())
    return applied.dialogues

  def samples(self, split: str, mode: str) -> list[records.Sample]:
    return records.make_samples(self.dialogues(split), mode)

  def encoder(self, config: ml_collections.ConfigDict, training: bool,
              model: InterLLaVA | None = None, layout: Layout | None = None) -> SampleEncoder:
    """The per-sample encoder for batches of `layout` (default: this process's share of a
    training batch); `model` is needed with a feature store (`data.features`), whose ViT must
    be the model's."""
    fingerprint = None
    if config.data.features:
      if model is None:
        raise ValueError("a feature store needs the model whose ViT it must match")
      fingerprint = feature_store.vit_fingerprint(model.vision)
    return SampleEncoder(config, self.tokenizer, self.frame_store, training=training,
                         layout=layout or self.layout, qformer_tokenizer=self.qformer_tokenizer,
                         vit_fingerprint=fingerprint)


def use_compilation_cache(config: ml_collections.ConfigDict) -> str:
  """Points JAX's persistent compilation cache at `config.jax_compilation_cache_dir` ("": off,
  `~` expanded), so a restarted run or an evaluation loads the programs of every bucket triple
  instead of compiling them again (minutes each at 7B). Returns the directory used."""
  path = os.path.expanduser(config.jax_compilation_cache_dir)
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # a cache JAX opened before (another directory) is closed
  return path


def _store_path(root: str, name: str) -> str:
  """The versioned directory of store `name` under `root` (TFDS layout `name/version`)."""
  path = os.path.join(root, name, stores.STORE_VERSION)
  if not os.path.isdir(path):
    raise MissingInputsError(f"no {name} store at {path}; build it with python -m "
                             "data_prep.build_stores")
  return path


def toy_store_dir(workdir: str, toy_seed: int) -> str:
  """`<workdir>/toy_data` for the default corpus (seed 0), `<workdir>/toy_data_seed<N>` for
  another: evaluating a run on a corpus it has never seen builds that one beside the training
  corpus instead of over it."""
  return os.path.join(workdir, "toy_data" if toy_seed == 0 else f"toy_data_seed{toy_seed}")


def tokenizer_dir(data_cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The LLM tokenizer's directory: `data.tokenizer`, else the toy tokenizer's, beside the toy
  stores."""
  d = data_cfg
  return d.tokenizer or os.path.join(d.stores or toy_store_dir(workdir, d.toy_seed), "tokenizer")


def store_dirs(data_cfg: ml_collections.ConfigDict, image_size: int, workdir: str
               ) -> tuple[str, str]:
  """(store directory, tokenizer directory) of a `data` config section. Toy presets (empty
  `annotations`): the toy corpus and its stores under `data.stores` or else `toy_store_dir`,
  (re)built when absent or built from other settings, with the toy tokenizer beside them."""
  d = data_cfg
  if d.annotations:
    return d.stores, d.tokenizer
  store_dir = d.stores or toy_store_dir(workdir, d.toy_seed)
  # Every stored frame: the pipeline samples from them per epoch (`data.sample_train`).
  wanted = dict(toy=toy_corpus.ToyCorpusConfig(num_videos=d.toy_num_videos, seed=d.toy_seed,
                                               size=d.toy_size, fps=d.toy_fps,
                                               min_seconds=d.toy_seconds[0],
                                               max_seconds=d.toy_seconds[1],
                                               retriever_noise=d.toy_retriever_noise),
                frames=stores.FrameSettings(size=image_size, sampling="all",
                                            resize=d.resize_mode),
                options=records.RecordOptions.from_config(d))
  tokenizer_path = tokenizer_dir(d, workdir)
  if multihost.is_main():  # one writer; the other processes wait for it
    built = prepare.read_report(store_dir)
    if built is None or built.get("recipe") != prepare.recipe(annotations=None,
                                                              video_root=None, **wanted):
      logging.info("building the toy corpus and its stores in %s", store_dir)
      prepare.build_stores(store_dir, **wanted, progress=False, overwrite=True)
    if not d.tokenizer:
      toy_tokenizer.build_toy_tokenizer(tokenizer_path)
  multihost.barrier(f"toy_data:{os.path.abspath(store_dir)}", timeout_s=3600)
  return store_dir, tokenizer_path


def load_tokenizers(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str
                    ) -> tuple[Any, Any | None]:
  """The LLM tokenizer (with the IVCR tokens) of `tokenizer_dir` and the Q-Former's own
  (`data.qformer_tokenizer`), or None when the Q-Former reads the LLM's ids (official, B1)."""
  qformer = data_cfg.qformer_tokenizer
  return (tokenizer_lib.load_tokenizer(tokenizer_dir),
          tokenizer_lib.load_plain_tokenizer(qformer) if qformer else None)


def open_tokenizers(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any | None]:
  """`load_tokenizers` of a run without opening its stores (the toy tokenizer is built when
  absent: its recipe does not depend on the corpus)."""
  path = tokenizer_dir(config.data, workdir)
  if not config.data.tokenizer:
    toy_tokenizer.build_toy_tokenizer(path)
  return load_tokenizers(config.data, path)


def open_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """Tokenizers and stores of `config` (`store_dirs`)."""
  d = config.data
  store_dir, tokenizer_path = store_dirs(d, config.model.vit.image_size, workdir)
  tokenizer, qformer_tokenizer = load_tokenizers(d, tokenizer_path)
  frame_store = stores.FrameStore(_store_path(store_dir, stores.FRAME_STORE))
  # Checked now, before any model is built: a damaged store stops the run at once.
  stores.open_builder(_store_path(store_dir, stores.DIALOGUE_STORE),
                      stores.rebuild_stores_hint(store_dir))
  # Each process assembles its share of the global batch (train.batch_size).
  layout = Layout.from_config(config, process_count=jax.process_count())
  topk = None if d.candidates == "annotation" else topk_store.TopKStore(d.candidates)
  return Data(tokenizer, qformer_tokenizer or tokenizer, frame_store, store_dir, layout, topk,
              d.num_candidates)


def model_config(config: ml_collections.ConfigDict, tokenizer) -> ml_collections.ConfigDict:
  """The `model` section with the LLM vocabulary fitted to the tokenizer (+ the IVCR tokens)."""
  m = config.model.copy_and_resolve_references()
  if m.llm.vocab_size != len(tokenizer):
    logging.info("LLM vocabulary %d -> %d (the tokenizer's)", m.llm.vocab_size, len(tokenizer))
    with m.unlocked():
      m.llm.vocab_size = len(tokenizer)
  return m


def build_model(config: ml_collections.ConfigDict, tokenizer, seed: int | None = None, *,
                mesh: jax.sharding.Mesh | None = None) -> InterLLaVA:
  """InterLLaVA restored from `weights.init_checkpoint` (the full model that
  `python -m ivcr_jax.import_weights` writes), or randomly initialised when that is empty, its
  parameters on `mesh` (default: `config.mesh`) by `config.mesh.rules`.

  Abstract-first: the model is `nnx.eval_shape`d, then initialised (jitted, with output
  shardings) or restored straight into the shardings, so no parameter ever lives whole on one
  device unless the rules replicate it, and a restored model's random weights never exist.
  """
  cfg = model_config(config, tokenizer)
  make = lambda: InterLLaVA(cfg, rngs=nnx.Rngs(config.seed if seed is None else seed))
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  path = config.weights.init_checkpoint
  if not path:
    return sharding.create_sharded(make, mesh, config.mesh.rules)
  if not os.path.exists(path):
    raise MissingInputsError(
        f"weights.init_checkpoint = {path} does not exist; build it from the official initial "
        f"weights with: python -m ivcr_jax.import_weights --config=configs/interllava.py"
        f"{':' + config.preset if config.preset != 'official' else ''} --out={path}")
  logging.info("restoring the initial weights from %s", path)
  return checkpointing.restore_model(path, make, mesh, config.mesh.rules)


# ------------------------------------------------------------- runs of the entry points


def trained_model(config: ml_collections.ConfigDict, tokenizer, workdir: str,
                  step: int | None = None) -> tuple[InterLLaVA, int]:
  """The model of a training run: its initial weights (`build_model`) with the trainable
  parameters of `workdir/checkpoints` (latest, or `step`); returns it and the step."""
  model = build_model(config, tokenizer)
  step = checkpointing.restore_trained(model, config.model.trainable,
                                       os.path.join(workdir, "checkpoints"), step)
  return model, step


def load_official_denominators(config: ml_collections.ConfigDict, store_dir: str, split: str
                               ) -> metrics.Denominators:
  """The official counts from the annotation file the stores were built from (else
  `data.annotations`)."""
  report = prepare.read_report(store_dir) or {}
  path = report.get("annotations") or config.data.annotations
  if not path or not os.path.exists(path):
    raise MissingInputsError(
        f"official denominators count the turns of the annotation file, which is not there "
        f"({path!r}; from {store_dir}/{prepare.REPORT_FILE} or data.annotations)")
  return metrics.official_denominators(read_json(path), split, source=path)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split: str = "test",
             history: str = "oracle", step: int | None = None, max_dialogues: int = 0,
             official_parsing: bool | None = None, official_denominators: bool | None = None
             ) -> dict:
  """Restores a run's checkpoint, answers every turn of `split`, writes the outputs under
  `workdir/eval/<split>[_interactive]` and returns the metrics (the demo's training run calls
  this too). `official_parsing` / `official_denominators` default to `config.evaluation`'s."""
  ev_cfg = config.evaluation
  official_parsing = ev_cfg.official_parsing if official_parsing is None else official_parsing
  if official_denominators is None:
    official_denominators = ev_cfg.official_denominators
  check_inputs(config)
  use_compilation_cache(config)
  data = open_data(config, workdir)
  denominators = None
  if official_denominators:
    denominators = load_official_denominators(config, data.store_dir, split)
    if max_dialogues:
      logging.warning("official denominators count every %s turn, but only %d dialogues are "
                      "evaluated: the figures are lower bounds", split, max_dialogues)
  model, step = trained_model(config, data.tokenizer, workdir, step)
  dialogues = data.dialogues(split)
  if max_dialogues:
    dialogues = dialogues[:max_dialogues]
  scored = evaluator.scored_dialogues(dialogues, official_denominators)
  if len(scored) < len(dialogues):
    logging.info("official denominators: %d type-[%d] dialogues are counted as misses, not "
                 "answered (B10)", len(dialogues) - len(scored),
                 metrics.OFFICIAL_UNSCORED_TYPE)
  dialogues = scored
  # Every process assembles whole batches (the same ones), so the layout is the global one.
  encoder = data.encoder(config, training=False, model=model, layout=Layout.from_config(config))
  ev = evaluator.Evaluator(model, encoder, data.tokenizer, config.generation,
                           batch_size=config.train.batch_size,
                           mesh=sharding.make_mesh(config.mesh), rules=config.mesh.rules)
  preds = evaluator.evaluate_dialogues(ev, dialogues, history, official_parsing=official_parsing)
  preds = evaluator.with_ranking(ev, dialogues, preds)
  out_dir = os.path.join(workdir, "eval", split if history == "oracle" else f"{split}_{history}")
  if multihost.is_main():  # every process computed the same answers; one writes them
    out = evaluator.write_outputs(preds, out_dir, official_parsing=official_parsing,
                                  denominators=denominators)
  else:
    out = metrics.compute([p.result for p in preds], denominators=denominators)
  multihost.barrier(f"eval:{out_dir}")
  out["checkpoint_step"] = step
  out["generation"] = dict(ev.stats)
  logging.info("evaluated step %d on %d %s dialogues -> %s", step, len(dialogues), split, out_dir)
  return out


def export(config: ml_collections.ConfigDict, workdir: str, out: str, *,
           step: int | None = None, log: Log = logging.info) -> int:
  """Builds the model as training did, restores the trained parameters of `workdir` (latest or
  `step`) and writes `out`; returns the step exported."""
  tokenizer, qformer_tokenizer = open_tokenizers(config, workdir)
  model, step = trained_model(config, tokenizer, workdir, step)
  log(f"restored step {step} from {workdir}/checkpoints")
  export_lib.write_export(model, config, out, tokenizer=tokenizer,
                          qformer_tokenizer=qformer_tokenizer, step=step, log=log)
  return step


def chat_session(config: ml_collections.ConfigDict, workdir: str,
                 rconfig: ml_collections.ConfigDict, retriever_dir: str, step: int | None = None
                 ) -> ChatSession:
  """The model and retriever of two runs, ready to talk (refuses a retriever of other videos)."""
  use_compilation_cache(config)
  data = open_data(config, workdir)
  model, step = trained_model(config, data.tokenizer, workdir, step)
  rstores, rtokenizer = store_dirs(rconfig.data, rconfig.frame_size, retriever_dir)
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
  answerer = evaluator.Evaluator(model, encoder, data.tokenizer, config.generation,
                                 batch_size=1, mesh=sharding.make_mesh(config.mesh),
                                 rules=config.mesh.rules)
  logging.info("chat: model step %d, retriever step %d over %d videos", step, retriever.step,
               len(corpus.videos))
  report = prepare.read_report(data.store_dir) or {}
  return ChatSession(answerer, ranker, corpus, video_root=report.get("video_root") or "",
                     num_candidates=config.data.num_candidates,
                     max_turns=config.data.max_turns, durations=data.frame_store.durations)
