"""A trained InterLLaVA as Hugging Face / PyTorch parts, plus the official IVCR checkpoint.

`OUT/` after `export`:
- `llm/`: `LlamaForCausalLM`, LoRA merged, with the tokenizer (incl. the five IVCR tokens);
- `llm_lora/`: the PEFT LoRA adapter; its base is Llama-2 with mean rows for the IVCR tokens,
  or `llm_base/` (written only when the base is not that: toy presets, a trained base);
- `vision/`: `InstructBlipVisionModel` (ViT + `post_layernorm` = `ln_vision`, whose eps is 1e-5
  while HF uses one eps for every LayerNorm: set `post_layernorm.eps` after loading);
- `qformer/`, `video_qformer/`: `InstructBlipQFormerModel`s; the video Q-Former has no text input,
  so HF's unused text parts are written at initial values (vocabulary and positions of size 1);
- `projector.safetensors`: query tokens, video query tokens, frame position embedding and
  `llama_proj`, under their official names;
- `interllava_config.json`: frames, windows, prompt settings, eps, token ids;
- `ivcr_official.pth`: the trainable parameters in the official IVCR layout (reference App. B),
  loadable by the official code (needs torch; skipped with a message without it);
- `README.md`: the model card (how to load and assemble the parts in PyTorch).

Nothing here imports torch except the `.pth` writer.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from ivcr_jax import experiment
from ivcr_jax.convert import checkpoint_chain, llama_hf
from ivcr_jax.convert.mapping import Path, export_params
from ivcr_jax.convert.vision import qformer_rules, vit_rules
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data import toy_tokenizer
from ivcr_jax.models.eva_vit import CLIP_MEAN, CLIP_STD
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.models.qformer import QFormer
from ivcr_jax.training import trainer

Log = Callable[[str], None]
FORMAT = "ivcr_jax-export-1"
PROJECTOR_GROUPS = ("query_tokens", "video_query_tokens", "frame_position_embedding",
                    "projection")
# Sizes of the video Q-Former's text embeddings that HF's class creates but never reads.
UNUSED_TEXT_SIZE = 1


class ModuleParams(Mapping):
  """Path -> host array of a module's variables, fetched on access with one cached, so an
  export walking a table target by target holds one tensor at a time."""

  def __init__(self, module: nnx.Module):
    self.variables = dict(nnx.to_flat_state(nnx.state(module)))
    self._cached: tuple[Path, np.ndarray] | None = None

  def __getitem__(self, path: Path) -> np.ndarray:
    if self._cached is None or self._cached[0] != path:
      self._cached = None  # release the previous tensor first
      self._cached = (path, np.asarray(jax.device_get(self.variables[path].get_value())))
    return self._cached[1]

  def __iter__(self):
    return iter(self.variables)

  def __len__(self):
    return len(self.variables)


def _write_json(obj: Mapping, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _dtype_name(module: nnx.Module) -> str:
  return np.dtype(jax.tree.leaves(nnx.state(module))[0].dtype).name


# ------------------------------------------------------------------------------ HF configs


def vision_hf_config(vit: ml_collections.ConfigDict, dtype: str) -> dict:
  """`InstructBlipVisionConfig` of the EVA ViT (`layer_norm_eps` is the blocks' eps)."""
  return {"architectures": ["InstructBlipVisionModel"], "model_type": "instructblip_vision_model",
          "hidden_size": vit.width, "intermediate_size": vit.mlp_dim,
          "num_hidden_layers": vit.depth, "num_attention_heads": vit.heads,
          "image_size": vit.image_size, "patch_size": vit.patch_size, "hidden_act": "gelu",
          "layer_norm_eps": vit.ln_eps, "qkv_bias": True, "attention_dropout": 0.0,
          "dtype": dtype}


def qformer_hf_config(q: ml_collections.ConfigDict, *, encoder_width: int, vocab_size: int,
                      max_position: int, dtype: str) -> dict:
  """`InstructBlipQFormerConfig` of a Q-Former."""
  return {"architectures": ["InstructBlipQFormerModel"], "model_type": "instructblip_qformer",
          "vocab_size": vocab_size, "hidden_size": q.hidden, "num_hidden_layers": q.depth,
          "num_attention_heads": q.heads, "intermediate_size": q.mlp_dim, "hidden_act": "gelu",
          "hidden_dropout_prob": q.dropout, "attention_probs_dropout_prob": q.attention_dropout,
          "max_position_embeddings": max_position, "layer_norm_eps": q.ln_eps,
          "cross_attention_frequency": q.cross_attention_freq,
          "encoder_hidden_size": encoder_width, "pad_token_id": 0, "dtype": dtype}


def _hf_qformer_cfg(q: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`q` with the text sizes HF needs; the video Q-Former has none, so they get size 1."""
  extra = {} if "vocab_size" in q else {"vocab_size": UNUSED_TEXT_SIZE,
                                        "max_position": UNUSED_TEXT_SIZE}
  return ml_collections.ConfigDict({**q, **extra})


# ---------------------------------------------------------------------------------- parts


def write_vision(model: InterLLaVA, directory: str) -> None:
  """`InstructBlipVisionModel` directory of the ViT and `ln_vision`."""
  vit = model.vision.cfg.vit
  os.makedirs(directory, exist_ok=True)
  _write_json(vision_hf_config(vit, _dtype_name(model.vision.vit)),
              os.path.join(directory, "config.json"))
  tensors = export_params(vit_rules(vit, "hf"), ModuleParams(model.vision))
  llama_hf.write_safetensors(tensors, directory, "model")


def write_qformer(model: InterLLaVA, name: str, directory: str,
                  tokenizer: Any | None = None) -> None:
  """`InstructBlipQFormerModel` directory of `name` ("qformer" or "video_qformer").

  HF's class always has the text embeddings and text feed-forward networks; a Q-Former without
  text input gets them from a freshly initialised twin (they are never used), so
  `from_pretrained` reports no missing weights.
  """
  cfg = model.vision.cfg
  module = getattr(model.vision, name)
  q = _hf_qformer_cfg(cfg[name])
  encoder_width = cfg.vit.width if name == "qformer" else cfg[name].hidden
  os.makedirs(directory, exist_ok=True)
  _write_json(qformer_hf_config(q, encoder_width=encoder_width, vocab_size=q.vocab_size,
                                max_position=q.max_position, dtype=_dtype_name(module)),
              os.path.join(directory, "config.json"))
  params: Mapping[Path, np.ndarray] = ModuleParams(module)
  if module.embeddings.word is None:
    twin = QFormer(q, encoder_width=encoder_width, text_input=True,
                   param_dtype=np.dtype(_dtype_name(module)), rngs=nnx.Rngs(0))
    params = {**ModuleParams(twin), **params}
  llama_hf.write_safetensors(export_params(qformer_rules(q, "hf", "", "", text_input=True),
                                           params), directory, "model")
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)


def write_projector(model: InterLLaVA, directory: str) -> None:
  """`projector.safetensors`: query tokens, frame position embedding and `llama_proj` under
  their official names."""
  rules = checkpoint_chain.official_rules(model.vision.cfg, PROJECTOR_GROUPS)
  llama_hf.write_safetensors(export_params(rules, ModuleParams(model)), directory, "projector")


def official_state_dict(model: InterLLaVA) -> Iterable[tuple[str, np.ndarray]]:
  """`(key, array)` of an official IVCR checkpoint's `model` entry (reference §6.2, App. B):
  both Q-Formers, query tokens, frame position embedding, projection and LoRA."""
  return export_params(checkpoint_chain.official_rules(model.vision.cfg), ModuleParams(model))


def write_official_checkpoint(model: InterLLaVA, path: str, log: Log = logging.info) -> bool:
  """`torch.save({"model": state_dict})` in the official IVCR layout; False (with a message)
  when torch is not installed."""
  if importlib.util.find_spec("torch") is None:
    log(f"torch is not installed: skipped {path} (the official-layout checkpoint)")
    return False
  import torch  # the .pth format is torch's pickle

  def tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(a.copy())

  torch.save({"model": {k: tensor(v) for k, v in official_state_dict(model)}}, path)
  return True


# -------------------------------------------------------------------------------- config


def interllava_config(config: ml_collections.ConfigDict, model: InterLLaVA, tokenizer: Any,
                      *, step: int | None, base: str) -> dict:
  """What the PyTorch assembly needs besides the weights (written as interllava_config.json)."""
  m, d = model.vision.cfg, config.data
  return {
      "format": FORMAT, "preset": config.preset, "step": step,
      "parts": {"llm": "llm/", "llm_lora": "llm_lora/", "llm_lora_base": base,
                "vision": "vision/", "qformer": "qformer/", "video_qformer": "video_qformer/",
                "projector": "projector.safetensors", "official": "ivcr_official.pth"},
      "frames": {"retrieval": d.frames_retrieval, "moment": d.frames_moment,
                 "sample_eval": d.sample_eval, "image_size": m.vit.image_size,
                 "clip_mean": list(CLIP_MEAN), "clip_std": list(CLIP_STD)},
      "video": {"window": m.video.window, "stride": m.video.stride,
                "max_frame_positions": m.video.max_frame_pos,
                "attend_qformer_text": m.video.attend_qformer_text,
                "num_query_tokens": m.qformer.num_query_tokens,
                "num_video_query_tokens": m.video_qformer.num_query_tokens},
      "eps": {"vit_layer_norm": m.vit.ln_eps, "ln_vision": m.vit.ln_vision_eps,
              "qformer_layer_norm": m.qformer.ln_eps,
              "video_qformer_layer_norm": m.video_qformer.ln_eps, "llm_rms": m.llm.rms_eps},
      "prompt": {"template": "llama-2 chat", "ivcr_tokens": {
          t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer_lib.IVCR_TOKENS},
          "video_placeholder": tokenizer_lib.VIDEO_PLACEHOLDER,
          "qformer_text": "qformer tokenizer" if d.qformer_tokenizer else "llm tokenizer ids",
          "qformer_text_len": d.qformer_text_len,
          "qformer_last_frame_quirk": d.qformer_last_frame_quirk, "max_turns": d.max_turns,
          "num_candidates": d.num_candidates},
      "lora": {"rank": m.lora.rank, "alpha": m.lora.alpha, "targets": list(m.lora.targets)},
      "generation": _generation(config),
  }


def _generation(config: ml_collections.ConfigDict) -> dict:
  g = config.generation
  out = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample}
  if g.do_sample:
    out.update(temperature=g.temperature, top_p=g.top_p)
  return out


# ---------------------------------------------------------------------------------- export


def llama_source(config: ml_collections.ConfigDict) -> str | None:
  """The HF LLaMA directory the model's base weights are (plus mean rows for the IVCR tokens),
  per the init checkpoint's record; None when they are not a checkpoint's (random toy weights,
  a trained base), in which case the export writes them as the adapter's base."""
  w = config.weights
  if "llm" in config.model.trainable or not w.init_checkpoint:
    return None
  return checkpoint_chain.read_meta(w.init_checkpoint).get("weights", {}).get("llama")


def write_export(model: InterLLaVA, config: ml_collections.ConfigDict, out: str, *,
                 tokenizer: Any, qformer_tokenizer: Any | None = None, step: int | None = None,
                 log: Log = logging.info) -> None:
  """Writes every part of `OUT/` (see the module docstring) for `model`."""
  os.makedirs(out, exist_ok=True)
  llm, ids = model.llm, dict(bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  llama_hf.save_hf_llama(llm, os.path.join(out, "llm"), tokenizer=tokenizer,
                         generation=_generation(config), **ids)
  log(f"wrote {out}/llm (LlamaForCausalLM, LoRA merged, tokenizer)")
  base = llama_source(config)
  if base is None:
    base = os.path.join(out, "llm_base")
    llama_hf.save_hf_llama(llm, base, merge_lora=False, **ids)
    log(f"wrote {base} (the adapter's base: LLaMA weights without LoRA)")
  if llama_hf.lora_targets(llm):
    llama_hf.save_peft_adapter(llm, os.path.join(out, "llm_lora"),
                               base_model_name_or_path=base)
    log(f"wrote {out}/llm_lora (PEFT adapter)")
  write_vision(model, os.path.join(out, "vision"))
  write_qformer(model, "qformer", os.path.join(out, "qformer"), qformer_tokenizer)
  write_qformer(model, "video_qformer", os.path.join(out, "video_qformer"))
  write_projector(model, out)
  log(f"wrote {out}/vision, qformer, video_qformer, projector.safetensors")
  meta = interllava_config(config, model, tokenizer, step=step,
                           base="llm_base/" if base == os.path.join(out, "llm_base")
                           else f"{base} + mean rows")
  _write_json(meta, os.path.join(out, "interllava_config.json"))
  if write_official_checkpoint(model, os.path.join(out, "ivcr_official.pth"), log):
    log(f"wrote {out}/ivcr_official.pth (official IVCR layout)")
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write(model_card(meta))


def run_tokenizers(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any | None]:
  """The LLM and Q-Former tokenizers a run used (as `experiment.open_data` picks them, without
  opening the data stores)."""
  d = config.data
  path = d.tokenizer or toy_tokenizer.build_toy_tokenizer(
      os.path.join(workdir, "toy_data", "tokenizer"))
  qformer = tokenizer_lib.load_plain_tokenizer(d.qformer_tokenizer) if d.qformer_tokenizer \
      else None
  return tokenizer_lib.load_tokenizer(path), qformer


def export(config: ml_collections.ConfigDict, workdir: str, out: str, *,
           step: int | None = None, log: Log = logging.info) -> int:
  """Builds the model as training did, restores the trained parameters of `workdir` (latest or
  `step`) and writes `out`; returns the step exported."""
  tokenizer, qformer_tokenizer = run_tokenizers(config, workdir)
  model = experiment.build_model(config, tokenizer)
  step = trainer.load_trained(config, os.path.join(workdir, "checkpoints"), model, step)
  log(f"restored step {step} from {workdir}/checkpoints")
  write_export(model, config, out, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
               step=step, log=log)
  return step


# ------------------------------------------------------------------------------ model card


def model_card(meta: Mapping) -> str:
  """README.md: what each part is and how to assemble them in PyTorch."""
  v, eps, p = meta["video"], meta["eps"], meta["prompt"]
  return CARD.format(step=meta["step"], preset=meta["preset"], base=meta["parts"]["llm_lora_base"],
                     ln_vision=eps["ln_vision"], vit_eps=eps["vit_layer_norm"],
                     window=v["window"], stride=v["stride"], nq=v["num_query_tokens"],
                     nvq=v["num_video_query_tokens"], placeholder=p["video_placeholder"],
                     tokens=json.dumps(p["ivcr_tokens"]))


CARD = '''# InterLLaVA (IVCR-200K), exported from ivcr_jax

Preset `{preset}`, training step {step}. Every part loads with `transformers` / `peft`; the
video branch is assembled by hand (below), exactly as the JAX model computes it.

- `llm/`: Llama-2 with LoRA merged and the tokenizer with the IVCR tokens {tokens}
  (`LlamaForCausalLM.from_pretrained`).
- `llm_lora/`: the LoRA adapter alone (`PeftModel.from_pretrained(base, "llm_lora")`); base:
  {base}.
- `vision/`: EVA ViT-g with `ln_vision` as `post_layernorm` (`InstructBlipVisionModel`).
- `qformer/`: the image Q-Former (`InstructBlipQFormerModel`); its whole output (queries and
  timestamp text, 32+L positions) feeds the video branch.
- `video_qformer/`: the video Q-Former (`InstructBlipQFormerModel`, `query_embeds` only; its text
  embeddings and text FFN exist in HF's class but are unused).
- `projector.safetensors`: `query_tokens`, `video_query_tokens`,
  `video_frame_position_embedding.weight`, `llama_proj.{{weight,bias}}` (`load_file`).
- `interllava_config.json`: frames, windows, prompt settings, eps, token ids.
- `ivcr_official.pth`: the trainable parameters in the official IVCR layout,
  `{{"model": state_dict}}`, for the official code's `ckpt:`.

**LayerNorm eps.** HF's vision model uses one eps ({vit_eps}) for every LayerNorm, but LAVIS'
`ln_vision` (= `post_layernorm`) uses {ln_vision}: set `vision.post_layernorm.eps = {ln_vision}`
after loading.

**Adapter base.** `llm_lora/` applies to the LLaMA base weights without LoRA: Llama-2-7b-chat-hf
with the 5 IVCR tokens appended, each new row of `embed_tokens` and `lm_head` the mean of the old
rows (or `llm_base/` when written). With Llama-2:
`base.resize_token_embeddings(32005)`, then set rows 32000-32004 of both tables to the means.

## Assembly (float32)

```python
import json, math, torch
from safetensors.torch import load_file
from transformers import InstructBlipQFormerModel, InstructBlipVisionModel, LlamaForCausalLM

cfg = json.load(open("interllava_config.json"))
vision = InstructBlipVisionModel.from_pretrained("vision").eval()
vision.post_layernorm.eps = cfg["eps"]["ln_vision"]
qformer = InstructBlipQFormerModel.from_pretrained("qformer").eval()
video_qformer = InstructBlipQFormerModel.from_pretrained("video_qformer").eval()
llm = LlamaForCausalLM.from_pretrained("llm").eval()
glue = load_file("projector.safetensors")
window, stride = cfg["video"]["window"], cfg["video"]["stride"]  # {window}, {stride}


@torch.no_grad()
def video_tokens(pixels, text_ids, text_mask):
  """One video: pixels [T, 3, H, W] (CLIP-normalised), its timestamp text [T, L] padded to the
  video's longest text, mask [T, L] -> [ceil(T / stride) * {nvq}, llm_hidden]."""
  t = pixels.shape[0]
  image = vision(pixel_values=pixels).last_hidden_state
  queries = glue["query_tokens"].expand(t, -1, -1)  # {nq} queries
  mask = torch.cat([torch.ones(t, queries.shape[1], dtype=text_mask.dtype), text_mask], 1)
  hidden = qformer(input_ids=text_ids, attention_mask=mask, query_embeds=queries,
                   encoder_hidden_states=image).last_hidden_state  # [T, 32+L, D]: unsliced
  hidden = hidden + glue["video_frame_position_embedding.weight"][:t, None]
  out = []
  for start in range(0, t, stride):
    clip = hidden[start:start + window]
    clip = clip.reshape(1, -1, clip.shape[-1])  # the window's frames x (32+L) tokens
    vq = glue["video_query_tokens"]
    h = video_qformer(input_ids=None, query_embeds=vq, encoder_hidden_states=clip)
    out.append(h.last_hidden_state[0] @ glue["llama_proj.weight"].T + glue["llama_proj.bias"])
  return torch.cat(out)


# The prompt's single {placeholder} token of each video is replaced by that video's tokens:
# embeds = llm.get_input_embeddings()(ids) with the rows spliced in, then
# logits = llm(inputs_embeds=embeds, attention_mask=mask).logits
```
'''
