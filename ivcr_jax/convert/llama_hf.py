"""Hugging Face LLaMA and PEFT LoRA <-> `ivcr_jax.models.llama.Llama`, without torch.

One rule table per format (`llama_rules`, `lora_rules`) drives import and export. Import reads
one tensor at a time (memory-mapped safetensors, or torch files with `mmap=True`) straight into
the model's variables, building the model abstractly first, so a 7B bf16 checkpoint converts
with one copy of the weights in memory. Export writes `LlamaForCausalLM` directories (LoRA merged
on the fly, tensor by tensor) and PEFT adapter directories with `safetensors.numpy`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ivcr_jax import sharding
from ivcr_jax.convert.mapping import (
  CheckpointError,
  HostParams,
  Linear,
  Log,
  Rule,
  assign_params,
  export_params,
  rule,
)
from ivcr_jax.convert.sources import TensorSource, directory_source
from ivcr_jax.data.tokenizer import IVCR_TOKENS
from ivcr_jax.jsonfile import read_json, write_json
from ivcr_jax.models.llama import PROJECTIONS, Llama, LoRADense

PEFT_PREFIX = "base_model.model."
# `model.llm` field -> HF config key, for the fields a checkpoint fixes.
DIMS = {"hidden": "hidden_size", "depth": "num_hidden_layers", "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "mlp_dim": "intermediate_size",
        "rms_eps": "rms_norm_eps", "rope_theta": "rope_theta",
        "rope_scaling_factor": "rope_scaling.factor"}
MAX_SHARD_BYTES = 5 * 2**30



# ----------------------------------------------------------------------------------- config


def read_config(path: str | os.PathLike, default_name: str) -> dict:
  """A JSON file, or `default_name` inside a directory."""
  path = os.fspath(path)
  return read_json(os.path.join(path, default_name) if os.path.isdir(path) else path)


def llm_config_from_hf(config: Mapping | str | os.PathLike) -> dict:
  """The `model.llm` fields of an HF Llama `config.json` (a dict, the file or its directory).

  Understands both the transformers 5 `rope_parameters` and the older `rope_theta` +
  `rope_scaling` keys. Raises CheckpointError for variants this model does not implement.
  """
  c = dict(config) if isinstance(config, Mapping) else read_config(config, "config.json")
  unsupported = {"hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                 "mlp_bias": False}
  for key, wanted in unsupported.items():
    if c.get(key, wanted) != wanted:
      raise CheckpointError(f"config.json: {key}={c[key]!r} is not supported (needs {wanted!r})")
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear"):
    raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported "
                          "(default or linear)")
  heads = c["num_attention_heads"]
  return dict(
      vocab_size=c["vocab_size"], hidden=c["hidden_size"], depth=c["num_hidden_layers"],
      heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
      rms_eps=float(c.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
      rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
      max_position=c.get("max_position_embeddings", 4096))


def hf_config(llm: Mapping, *, dtype: str, bos_token_id: int | None = 1,
              eos_token_id: int | Sequence[int] | None = 2,
              pad_token_id: int | None = None) -> dict:
  """A transformers 5 `LlamaForCausalLM` `config.json` for `model.llm` fields."""
  rope = {"rope_type": "default", "rope_theta": llm["rope_theta"]}
  if llm["rope_scaling_factor"] != 1.0:
    rope.update(rope_type="linear", factor=llm["rope_scaling_factor"])
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": llm["vocab_size"], "hidden_size": llm["hidden"],
      "intermediate_size": llm["mlp_dim"], "num_hidden_layers": llm["depth"],
      "num_attention_heads": llm["heads"], "num_key_value_heads": llm["kv_heads"],
      "head_dim": llm["head_dim"], "hidden_act": "silu", "rms_norm_eps": llm["rms_eps"],
      "max_position_embeddings": llm["max_position"], "rope_parameters": rope,
      "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
      "dtype": dtype, "use_cache": True,
  }


# ------------------------------------------------------------------------------------ rules


def llama_rules(depth: int) -> list[Rule]:
  """HF `LlamaForCausalLM` state dict <-> `Llama` base parameters (adapters excluded)."""
  rules = [rule("model.embed_tokens.weight", "embed_tokens/embedding"),
           rule("model.norm.weight", "norm/scale"),
           rule("lm_head.weight", "lm_head/kernel", Linear(1))]
  for name, (parent, n_in) in PROJECTIONS.items():
    rules += [rule(f"model.layers.{i}.{parent}.{name}.weight", f"layers/{parent}/{name}/kernel",
                   Linear(n_in), layer=i) for i in range(depth)]
  for norm in ("input_layernorm", "post_attention_layernorm"):
    rules += [rule(f"model.layers.{i}.{norm}.weight", f"layers/{norm}/scale", layer=i)
              for i in range(depth)]
  return rules


def lora_rules(depth: int, targets: Iterable[str]) -> list[Rule]:
  """PEFT adapter file (`adapter_model.safetensors`) <-> `lora_a` / `lora_b` of `targets`.

  `lora_A.weight` `[r, in]` is the kernel `[*in, r]`, `lora_B.weight` `[out, r]` is `[r, *out]`.
  """
  rules = []
  for name in sorted(targets):
    parent, n_in = PROJECTIONS[name]
    for part, target, transform in (("lora_A", "lora_a", Linear(n_in)),
                                    ("lora_B", "lora_b", Linear(1))):
      rules += [rule(f"{PEFT_PREFIX}model.layers.{i}.{parent}.{name}.{part}.weight",
                     f"layers/{parent}/{name}/{target}", transform, layer=i)
                for i in range(depth)]
  return rules


# ----------------------------------------------------------------------------------- import


def _check_dims(llm: Mapping, found: Mapping, where: str) -> None:
  for field, key in DIMS.items():
    if llm[field] != found[field]:
      raise CheckpointError(f"{where}: {key}={found[field]!r} but the model config has "
                            f"llm.{field}={llm[field]!r}")


def append_mean_rows(table: np.ndarray, num_new: int, axis: int = 0) -> np.ndarray:
  """`table` with `num_new` entries along `axis`, each the (float32) mean of the old ones: the
  rows of the IVCR tokens (reference §6.4, `resize_token_embeddings` with mean resizing)."""
  mean = np.mean(table, axis=axis, keepdims=True, dtype=np.float32).astype(table.dtype)
  return np.concatenate([table, np.repeat(mean, num_new, axis=axis)], axis=axis)


class MeanRowsSource(TensorSource):
  """`source` with `extra` rows appended to the vocabulary tensors (`[vocab, hidden]`: embedding
  and `lm_head`), each the mean of that tensor's old rows (reference §6.4, the IVCR tokens)."""

  def __init__(self, source: TensorSource, keys: Iterable[str], extra: int):
    self.source, self.grow, self.extra = source, set(keys), extra
    self.name = source.name

  def keys(self):
    return self.source.keys()

  def get(self, key):
    tensor = self.source.get(key)
    return append_mean_rows(tensor, self.extra) if key in self.grow else tensor


def load_hf_weights(model: Llama, path: str | os.PathLike, *,
                    shardings: nnx.State | None = None, log: Log | None = None) -> None:
  """Reads an HF `LlamaForCausalLM` directory into `model`'s base weights in place (adapters
  are left alone); e.g. `load_hf_weights(interllava.llm, path)`.

  `config.json` must match the model's dimensions; a checkpoint vocabulary smaller by at most
  the IVCR tokens gets mean rows up to the model's (Llama-2's 32000 -> InterLLaVA's 32005). A
  larger gap means that the model's vocabulary comes from another tokenizer than the
  checkpoint's, and is refused instead of padded with thousands of mean rows.
  """
  config = os.path.join(os.fspath(path), "config.json")
  found = llm_config_from_hf(config)
  _check_dims(model.cfg, found, config)
  extra = model.cfg.vocab_size - found["vocab_size"]
  if not 0 <= extra <= len(IVCR_TOKENS):
    raise CheckpointError(
        f"{config}: vocab_size={found['vocab_size']} but the model config has "
        f"llm.vocab_size={model.cfg.vocab_size}; only the {len(IVCR_TOKENS)} IVCR tokens may be "
        "added as mean rows (is data.tokenizer the checkpoint's tokenizer?)")
  source = directory_source(path)
  if extra:
    source = MeanRowsSource(source, ("model.embed_tokens.weight", "lm_head.weight"), extra)
  assign_params(model, llama_rules(model.cfg.depth), source, shardings=shardings, log=log)


def load_hf_llama(path: str | os.PathLike, cfg: ml_collections.ConfigDict, *, lora: bool = True,
                  seed: int = 0, mesh: Mesh | None = None,
                  rules: sharding.Rules | None = None, log: Log | None = None) -> Llama:
  """A `Llama` with the weights of an HF `LlamaForCausalLM` directory (see `load_hf_weights`).

  The model is built abstractly (`nnx.eval_shape`), every base weight is read into its variable
  tensor by tensor, and only the LoRA adapters are initialised (seeded with `seed`, exactly as
  `Llama(cfg, rngs=nnx.Rngs(seed))` would), so the random base weights never exist.

  Args:
    path: directory with `config.json` and `model.safetensors[.index.json]` (or torch `.bin`).
    cfg: the `model` config section; its `llm` dimensions must match `config.json`.
    mesh, rules: when given, parameters are placed with their logical-axis shardings.
  """
  make = lambda: Llama(cfg, lora=lora, rngs=nnx.Rngs(seed))
  model = nnx.eval_shape(make)
  shardings = None
  if mesh is not None:
    shardings = sharding.state_shardings(nnx.state(model), mesh, rules or ())
  adapters = nnx.state(model, nnx.LoRAParam)
  if adapters:
    # Only the adapters are outputs, so XLA never materialises the random base weights.
    out = None if mesh is None else sharding.state_shardings(adapters, mesh, rules or ())
    nnx.update(model, jax.jit(lambda: nnx.state(make(), nnx.LoRAParam), out_shardings=out)())
  load_hf_weights(model, path, shardings=shardings, log=log)
  return model


def lora_targets(model: Llama) -> set[str]:
  """Names of the projections that carry adapters."""
  return {path[-1] for path, m in nnx.iter_modules(model)
          if isinstance(m, LoRADense) and m.lora_a is not None}


def load_peft_adapter(model: Llama, path: str | os.PathLike, *, log: Log | None = None) -> None:
  """Loads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
  into `model`'s adapters in place; their scale and dropout follow `adapter_config.json`."""
  config = read_config(path, "adapter_config.json")
  where = os.path.join(os.fspath(path), "adapter_config.json")
  if config.get("peft_type") != "LORA":
    raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
  for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
              "modules_to_save", "fan_in_fan_out"):
    if config.get(key):
      raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported")
  if config.get("bias", "none") != "none":
    raise CheckpointError(f"{where}: bias={config['bias']!r} is not supported")
  targets = config.get("target_modules")
  if not isinstance(targets, list) or set(targets) != lora_targets(model):
    raise CheckpointError(f"{where}: target_modules {targets!r} differ from the model's adapters "
                          f"{sorted(lora_targets(model))} (set model.lora.targets)")
  rank = config["r"]
  for _, m in nnx.iter_modules(model):
    if isinstance(m, LoRADense) and m.lora_a is not None:
      m.lora_scale = config["lora_alpha"] / rank
      m.lora_dropout = float(config.get("lora_dropout", 0.0))
  assign_params(model, lora_rules(model.cfg.depth, targets),
                directory_source(path, "adapter_model"), log=log)


# ----------------------------------------------------------------------------------- export


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str, stem: str, *,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Streams `(key, tensor)` into `{stem}.safetensors`, or into numbered shards plus
  `{stem}.safetensors.index.json` past `max_shard_bytes`; returns the files written."""
  from safetensors.numpy import save_file

  parts: list[tuple[str, list[str], int]] = []  # (temporary name, keys, bytes)
  shard: dict[str, np.ndarray] = {}

  def flush():
    name = f"{stem}.part{len(parts)}.tmp"
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    parts.append((name, list(shard), sum(t.nbytes for t in shard.values())))
    shard.clear()

  for key, tensor in tensors:
    tensor = np.ascontiguousarray(tensor)
    if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
      flush()
    shard[key] = tensor
  flush()
  if len(parts) == 1:
    names = [f"{stem}.safetensors"]
  else:
    names = [f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    index = {"metadata": {"total_size": sum(n for _, _, n in parts)},
             "weight_map": {k: name for (_, keys, _), name in zip(parts, names, strict=True)
                            for k in keys}}
    write_json(os.path.join(directory, f"{stem}.safetensors.index.json"), index, indent=2,
               sort_keys=True)
  for (tmp, _, _), name in zip(parts, names, strict=True):
    os.replace(os.path.join(directory, tmp), os.path.join(directory, name))
  return names


def save_hf_llama(model: Llama, path: str | os.PathLike, *, dtype: str | None = None,
                  tokenizer: object | None = None, bos_token_id: int | None = 1,
                  eos_token_id: int | Sequence[int] | None = 2, pad_token_id: int | None = None,
                  generation: Mapping | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES, merge_lora: bool = True) -> None:
  """Writes a `LlamaForCausalLM` directory, adapters merged (`W + (alpha/r) B A`).

  Args:
    dtype: tensor dtype on disk ("bfloat16", "float16", "float32"; None: the embedding's).
    tokenizer: anything with `save_pretrained(path)` (an HF tokenizer), saved alongside.
    generation: extra `generation_config.json` fields (e.g. the config's `generation`).
    merge_lora: False writes the base weights alone (the base of a PEFT adapter export).
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  np_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
  dtype = np.dtype(np_dtype or model.embed_tokens.embedding.dtype).name
  llm = dict(model.cfg)
  llm["vocab_size"] = model.embed_tokens.embedding.shape[0]
  tokens = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  write_json(os.path.join(path, "config.json"), hf_config(llm, dtype=dtype, **tokens), indent=2,
             sort_keys=True)
  gen = {k: v for k, v in tokens.items() if v is not None}
  write_json(os.path.join(path, "generation_config.json"), {**gen, **dict(generation or {})},
             indent=2, sort_keys=True)
  params = HostParams(model, merge_lora=merge_lora, dtype=np_dtype)
  write_safetensors(export_params(llama_rules(model.cfg.depth), params), path,
                    "model", max_shard_bytes=max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)


def save_peft_adapter(model: Llama, path: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> None:
  """Writes the adapters as a PEFT LoRA directory for `PeftModel.from_pretrained(base, path)`."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  modules = [m for _, m in nnx.iter_modules(model)
             if isinstance(m, LoRADense) and m.lora_a is not None]
  if not modules:
    raise ValueError("the model has no LoRA adapters")
  rank = modules[0].lora_a.shape[-1]
  targets = sorted(lora_targets(model))
  write_json(os.path.join(path, "adapter_config.json"), {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
      "lora_alpha": _number(modules[0].lora_scale * rank), "lora_dropout": modules[0].lora_dropout,
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
  }, indent=2, sort_keys=True)
  params = HostParams(model)
  write_safetensors(export_params(lora_rules(model.cfg.depth, targets), params), path,
                    "adapter_model")



def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else x
