"""The official initialisation chain (reference §6.3) -> one orbax checkpoint of the full model.

Steps, in order, each optional (an empty `weights.<name>` skips it with a log line):
1. `eva_vit`: EVA ViT-g, LAVIS `eva_vit_g.pth` (no key prefix) or an HF
   `InstructBlipVisionModel` / `Blip2VisionModel` (or whole InstructBLIP) directory.
2. `instructblip`: LAVIS `instruct_blip_vicuna7b_trimmed.pth` (key `model`): Q-Former, query
   tokens, `ln_vision` when present; or an HF `InstructBlipForConditionalGeneration` directory.
3. `llama`: an HF Llama-2 directory, vocabulary grown to the model's with mean rows (§6.4).
4. `timechat`: `timechat_7b.pth` (key `model`): Q-Former, query tokens, video Q-Former, video
   queries, projection, LoRA, frame position embedding (96 rows resized to 64, nearest).
5. `videollama`: `VL_LLaMA_2_7B_Finetuned.pth`: only the keys starting with `video_Qformer`,
   overriding TimeChat's video Q-Former.
With `weights.ivcr` (an official IVCR checkpoint, for evaluation) steps 4-5 are replaced by it.
`weights.ivcr` may also be a full `torch.save(model.state_dict())` dump of the official `IVCR`
(no "model" entry): its ViT, `ln_vision` and the LLaMA base under PEFT names
(`llama_model.base_model.model.….base_layer.weight`, or `….weight` before PEFT 0.7; LLM.int8
weights with their `SCB` are dequantised) are then loaded too, so it alone makes the model.

A LAVIS-layout file is read by parameter group (`official_groups`, built from the mapping tables
of `ivcr_jax.convert.vision` and `llama_hf`): a step's required groups must be complete, any other
group is loaded when the file has it (the official `load_state_dict(strict=False)` semantics),
known-irrelevant keys are skipped with a log line, and any other key is an error naming it.
The model is built abstractly; only the parameters no step supplies are initialised (as the
model's constructor would with the same seed), and every tensor is read one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
from absl import logging
from flax import nnx

from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.mapping import Int8Linear, Linear, Log, Path, Rule, assign_params
from ivcr_jax.convert.sources import (
    SafetensorsSource,
    TensorSource,
    TorchFileSource,
    directory_source,
)
from ivcr_jax.convert.vision import qformer_rules, vision_tower_rules, vit_rules
from ivcr_jax.models import trainable
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import checkpointing
from ivcr_jax.training.checkpointing import CheckpointError, some

# Chain order; `ivcr` replaces `timechat` and `videollama` (official evaluation, §6.3).
STEPS = ("eva_vit", "instructblip", "llama", "timechat", "videollama", "ivcr")
# Keys the official code also skips or that it never uses (§6.1-6.2): buffers, the unused BERT LM
# head, InstructBLIP's own LLM projection and LLM, and bitsandbytes int8 side buffers.
LAVIS_IGNORED = (r"(^|\.)position_ids$", r"^Qformer\.cls\.", r"^llm_proj\.", r"^llm_model\.",
                 r"\.SCB$", r"\.weight_format$", r"\.rotary_emb\.inv_freq$")
# EVA-CLIP heads that LAVIS' encoder does not have.
EVA_IGNORED = (r"^(norm|fc_norm|head)\.",)
HF_BLIP_IGNORED = (r"(^|\.)position_ids$", r"^language_model\.", r"^language_projection\.")
VIDEO_LLAMA_PREFIX = "video_Qformer"
OFFICIAL_LORA_PREFIX = "llama_model."


def official_lora_key(peft_key: str) -> str:
  """PEFT adapter-file key -> the key inside the official IVCR model (§6.1):
  `base_model.model.….lora_A.weight` -> `llama_model.base_model.model.….lora_A.default.weight`."""
  stem, _, leaf = peft_key.rpartition(".")
  return f"{OFFICIAL_LORA_PREFIX}{stem}.default.{leaf}"


def rooted(rules: Iterable[Rule], root: Path,
           rename: Callable[[str], str] | None = None) -> list[Rule]:
  """`rules` of a submodule re-targeted at the full model (and their source keys renamed)."""
  return [dataclasses.replace(r, target=(*root, *r.target),
                              sources=tuple(map(rename, r.sources)) if rename else r.sources)
          for r in rules]


def _vit_group(r: Rule) -> str:
  return "ln_vision" if "ln_vision" in r.target else "visual_encoder"


def _by_group(rules: Iterable[Rule], root: Path, group: Callable[[Rule], str],
              ) -> dict[str, list[Rule]]:
  out: dict[str, list[Rule]] = {}
  for r in rooted(rules, root):
    out.setdefault(group(r), []).append(r)
  return out


def official_groups(cfg: ml_collections.ConfigDict) -> dict[str, list[Rule]]:
  """The official IVCR / LAVIS state-dict layout (reference App. B) by parameter group, targeting
  `InterLLaVA` paths: `visual_encoder`, `ln_vision`, `qformer`, `query_tokens`,
  `frame_position_embedding`, `video_qformer`, `video_query_tokens`, `projection`, `lora`."""
  group = lambda r: _vit_group(r) if r.target[1] == "vit" else r.target[1]
  groups = _by_group(vision_tower_rules(cfg), ("vision",), group)
  if cfg.lora.rank:
    groups["lora"] = rooted(llama_hf.lora_rules(cfg.llm.depth, cfg.lora.targets), ("llm",),
                            official_lora_key)
  return groups


def official_llama_rules(cfg: ml_collections.ConfigDict, keys: Iterable[str]) -> list[Rule]:
  """The LLaMA base of a full official `model.state_dict()` dump (§6.1), targeting `llm`: the
  HF names (`llama_rules`) under `llama_model.base_model.model.`, a LoRA-wrapped projection's
  weight at `….base_layer.weight` when `keys` use that PEFT >= 0.7 name, and an LLM.int8 weight
  read with its `SCB` when `keys` hold both (official 8-bit loading; a trainable-only checkpoint
  may carry stray `SCB` buffers without weights, §6.2)."""
  keys = set(keys)
  base_layer = any(k.endswith(".base_layer.weight") for k in keys)
  wrapped = tuple(f".{t}.weight" for t in cfg.lora.targets) if cfg.lora.rank else ()
  out = []
  for r in rooted(llama_hf.llama_rules(cfg.llm.depth), ("llm",)):
    (hf_key,) = r.sources
    if base_layer and hf_key.endswith(wrapped):
      hf_key = hf_key.removesuffix(".weight") + ".base_layer.weight"
    key = f"{OFFICIAL_LORA_PREFIX}{llama_hf.PEFT_PREFIX}{hf_key}"
    scb = key.removesuffix(".weight") + ".SCB"
    if scb in keys and key in keys:
      if not isinstance(r.transform, Linear):
        raise CheckpointError(f"{key}: int8 statistics {scb} on a parameter that is not a Linear")
      out.append(dataclasses.replace(r, sources=(key, scb),
                                     transform=Int8Linear(r.transform.n_in)))
    else:
      out.append(dataclasses.replace(r, sources=(key,)))
  return out


def official_rules(cfg: ml_collections.ConfigDict,
                   groups: Sequence[str] = trainable.OFFICIAL) -> list[Rule]:
  """The rules of `groups` of `official_groups` (default: an IVCR checkpoint's content)."""
  table = official_groups(cfg)
  return [r for g in groups if g in table for r in table[g]]


# ------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class FileStep:
  """A step of the chain that reads parameter groups from one checkpoint file (LAVIS, TimeChat,
  Video-LLaMA, IVCR or an HF vision directory): which groups of `source` go into which
  parameters."""

  step: str
  source: TensorSource
  groups: dict[str, list[Rule]]
  required: tuple[str, ...]
  ignored: tuple[str, ...] = ()  # regexes of keys skipped on purpose
  only_prefix: str = ""  # every other key is skipped (Video-LLaMA's video Q-Former only)

  def check(self, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """`(groups to load, keys skipped)`, after checking, before anything is read, that the
    file has every key of those groups with the right shape and no key that is not known to
    be irrelevant (CheckpointError naming the file and key otherwise)."""
    name = f"{self.source.name} ({self.step})"
    keys = set(self.source.keys())
    present = [g for g, rules in self.groups.items()
               if g in self.required or any(k in keys for r in rules for k in r.sources)]
    rules = self.rules(present)
    read = {k for r in rules for k in r.sources}
    missing = sorted(read - keys)
    if missing:
      raise CheckpointError(f"{name}: missing keys: {some(missing)}")
    rest = sorted(keys - read)
    skipped = [k for k in rest if (self.only_prefix and not k.startswith(self.only_prefix))
               or any(re.search(p, k) for p in self.ignored)]
    unknown = sorted(set(rest) - set(skipped))
    if unknown:
      raise CheckpointError(f"{name}: unexpected keys: {some(unknown)}; the file does not fit "
                            "the model config or the expected layout")
    for r in rules:
      shape = shapes[r.target][1:] if r.layer is not None else shapes[r.target]
      for key, expected in zip(r.sources, r.transform.source_shapes(shape), strict=True):
        found = self.source.shape(key)
        if expected is not None and found != tuple(expected):
          raise CheckpointError(f"{name}: key {key!r} has shape {found}, expected "
                                f"{tuple(expected)} for {'/'.join(map(str, r.target))}")
    return present, skipped

  def rules(self, groups: Iterable[str]) -> list[Rule]:
    return [r for g in groups for r in self.groups[g]]


@dataclasses.dataclass
class HFLlamaStep:
  """The HF LLaMA step (`llama_hf.load_hf_weights`: config check, mean rows, strict keys)."""

  step: str
  path: str
  depth: int

  def check(self, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Checked by `load_hf_weights` itself (against `config.json`) when loading."""
    return ["llm"], []

  def rules(self, groups: Iterable[str]) -> list[Rule]:
    return rooted(llama_hf.llama_rules(self.depth), ("llm",))


def open_source(path: str, key: str | None = None, *, bare: bool = False) -> TensorSource:
  """A checkpoint file or HF directory; unreadable (corrupt, truncated, wrong kind of) files
  raise CheckpointError naming the file. `bare`: a torch file without the `key` entry may be
  the state dict itself."""
  try:
    if os.path.isdir(path):
      return directory_source(path)
    if path.endswith((".safetensors", ".safetensors.index.json")):
      return SafetensorsSource(path)
    return TorchFileSource(path, key=key, bare=bare)
  except Exception as e:  # torch, pickle, zipfile and safetensors each raise their own types
    raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e


def _hf_prefix(source: TensorSource, prefix: str) -> str:
  """`prefix` when the directory holds a composite model (keys under it), else ""."""
  return prefix if any(k.startswith(prefix) for k in source.keys()) else ""


def _eva_load(cfg: ml_collections.ConfigDict, path: str) -> FileStep:
  source = open_source(path)
  if os.path.isdir(path):
    prefix = _hf_prefix(source, "vision_model.")
    groups = _by_group(vit_rules(cfg.vit, "hf", prefix=prefix), ("vision",), _vit_group)
    return FileStep("eva_vit", source, groups, ("visual_encoder",), only_prefix=prefix)
  groups = _by_group(vit_rules(cfg.vit, "lavis"), ("vision",), _vit_group)
  return FileStep("eva_vit", source, groups, ("visual_encoder",), EVA_IGNORED)


def _instructblip_load(cfg: ml_collections.ConfigDict, path: str) -> FileStep:
  if not os.path.isdir(path):
    return FileStep("instructblip", open_source(path, "model"), official_groups(cfg),
                ("qformer", "query_tokens"), LAVIS_IGNORED)
  source = open_source(path)
  groups = _by_group(vit_rules(cfg.vit, "hf", prefix="vision_model."), ("vision",), _vit_group)
  groups["qformer"] = rooted(qformer_rules(cfg.qformer, "hf", "qformer.", "qformer",
                                           text_input=cfg.qformer.text_input), ("vision",))
  groups["query_tokens"] = official_groups(cfg)["query_tokens"]
  return FileStep("instructblip", source, groups, ("qformer", "query_tokens"), HF_BLIP_IGNORED)


def plan(cfg: ml_collections.ConfigDict, weights: Mapping[str, str]
         ) -> list[FileStep | HFLlamaStep]:
  """The loads of the configured chain, files opened (not read); raises FileNotFoundError
  naming every configured file that does not exist."""
  names = [s for s in STEPS if weights.get(s)]
  missing = [f"weights.{s} = {weights[s]}" for s in names if not os.path.exists(weights[s])]
  if missing:
    raise FileNotFoundError("missing initial weights:\n  " + "\n  ".join(missing))
  loads: list[FileStep | HFLlamaStep] = []
  for step in names:
    path = os.fspath(weights[step])
    if step == "eva_vit":
      loads.append(_eva_load(cfg, path))
    elif step == "instructblip":
      loads.append(_instructblip_load(cfg, path))
    elif step == "llama":
      loads.append(HFLlamaStep(step, path, cfg.llm.depth))
    elif step in ("timechat", "ivcr"):
      if step == "timechat" and weights.get("ivcr"):
        continue
      groups = official_groups(cfg)
      source = open_source(path, "model", bare=step == "ivcr")
      if step == "ivcr":
        groups["llama"] = official_llama_rules(cfg, source.keys())
      loads.append(FileStep(step, source, groups,
                        tuple(g for g in trainable.OFFICIAL if g in groups), LAVIS_IGNORED))
    elif step == "videollama" and not weights.get("ivcr"):
      groups = {"video_qformer": official_groups(cfg)["video_qformer"]}
      loads.append(FileStep(step, open_source(path, "model"), groups, ("video_qformer",),
                        LAVIS_IGNORED, only_prefix=VIDEO_LLAMA_PREFIX))
  return loads


# ---------------------------------------------------------------------------------- build


def build_initial_model(cfg: ml_collections.ConfigDict, weights: Mapping[str, str], *,
                        seed: int, log: Log = logging.info) -> InterLLaVA:
  """InterLLaVA with the chain's weights (`weights`: the config's `weights` section).

  Args:
    cfg: the `model` section (its LLM vocabulary fitted to the tokenizer).
    seed: initialises what no step supplies, exactly as `InterLLaVA(cfg, rngs=nnx.Rngs(seed))`.
  Raises:
    FileNotFoundError for configured files that do not exist; CheckpointError for unreadable
    files, missing or unexpected keys and wrong shapes (each named with its file).
  """
  loads = plan(cfg, weights)
  for step in STEPS:
    if not weights.get(step):
      log(f"{step}: skipped (weights.{step} is empty)")
    elif step in ("timechat", "videollama") and weights.get("ivcr"):
      log(f"{step}: skipped (replaced by the IVCR checkpoint weights.ivcr)")
  make = lambda: InterLLaVA(cfg, rngs=nnx.Rngs(seed))
  model = nnx.eval_shape(make)
  shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
  checked = [(load, *load.check(shapes)) for load in loads]  # fail before reading anything
  covered = {r.target for load, present, _ in checked for r in load.rules(present)}
  fresh = lambda path, _: tuple(path) not in covered
  # Only the fresh parameters are outputs, so XLA never materialises the ones loaded below.
  nnx.update(model, jax.jit(lambda: nnx.state(make(), fresh))())
  log(f"initialised {len(shapes) - len(covered)} parameters that no step supplies (seed {seed})")
  for load, present, skipped in checked:
    if isinstance(load, HFLlamaStep):
      llama_hf.load_hf_weights(model.llm, load.path, log=lambda m, s=load.step: log(f"{s}: {m}"))
      continue
    assign_params(model, load.rules(present), load.source, strict=False,
                           log=lambda m, s=load.step: log(f"{s}: {m}"))
    log(f"{load.step}: loaded {', '.join(present)}"
        + (f"; skipped {len(skipped)} keys ({', '.join(skipped[:5])}"
           f"{', ...' if len(skipped) > 5 else ''})" if skipped else ""))
  return model


def import_chain(cfg: ml_collections.ConfigDict, weights: Mapping[str, str],
                 out: str | os.PathLike, *, seed: int, overwrite: bool = False,
                 log: Log = logging.info) -> InterLLaVA:
  """Runs the chain and writes the full-model checkpoint that `experiment.build_model` loads
  (`weights.init_checkpoint`); returns the model."""
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
  lines: list[str] = []

  def record(message: str) -> None:
    lines.append(message)
    log(message)

  model = build_initial_model(cfg, weights, seed=seed, log=record)
  meta = {"weights": {s: os.fspath(weights[s]) for s in STEPS if weights.get(s)}, "seed": seed,
          "model": json.loads(cfg.to_json_best_effort()), "log": lines}
  checkpointing.save_model(model, out, meta, overwrite=overwrite)
  log(f"wrote {out}")
  return model
