"""Key-mapping tables of the video branch (ViT, `ln_vision`, both Q-Formers, projection).

Formats:
- `hf`: `transformers` `InstructBlipVisionModel`/`Blip2VisionModel` (`post_layernorm` is our
  `ln_vision`) and `InstructBlipQFormerModel` state dicts.
- `lavis`: the LAVIS / TimeChat / official IVCR layout (reference §6.1, App. B):
  `visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens`, `video_Qformer.bert.*`,
  `video_query_tokens`, `video_frame_position_embedding.weight`, `llama_proj.*`.

Target paths are relative to a `VisionTower`. The same tables serve import and export.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from ivcr_jax.convert.mapping import (
    IDENTITY,
    CheckpointError,
    Concat,
    Conv2d,
    Flatten,
    Linear,
    Rule,
    Transform,
    rule,
)
from ivcr_jax.models.eva_vit import resize_pos_embed

FORMATS = ("hf", "lavis")


@dataclasses.dataclass(frozen=True)
class PosEmbed(Transform):
  """ViT position embedding `[1, 1+g*g, D]`; a checkpoint with another grid is resized (bicubic)."""

  def source_shapes(self, shape):
    return [None]

  def to_jax(self, tensors, shape):
    pos = tensors[0]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != shape[2]:
      raise CheckpointError(f"position embedding of shape {pos.shape} does not fit {shape}")
    new_grid = int(round((shape[1] - 1) ** 0.5))
    return resize_pos_embed(pos, new_grid)


@dataclasses.dataclass(frozen=True)
class NearestRows(Transform):
  """Frame position embedding `[P, D]`; other row counts are resized by nearest interpolation
  (torch `F.interpolate(mode='nearest')`: row i <- row floor(i * P_old / P_new)), as the official
  code does when loading TimeChat's 96 rows into 64 (reference §1.3)."""

  def source_shapes(self, shape):
    return [None]

  def to_jax(self, tensors, shape):
    rows = tensors[0]
    if rows.ndim != 2 or rows.shape[1] != shape[1]:
      raise CheckpointError(f"frame position embedding of shape {rows.shape} does not fit {shape}")
    idx = np.floor(np.arange(shape[0]) * (rows.shape[0] / shape[0])).astype(int)
    return rows[idx]


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def vit_rules(vit: ml_collections.ConfigDict, fmt: str, prefix: str = "",
              ln_vision_prefix: str | None = None, target: str = "vit") -> list[Rule]:
  """EVA ViT + ln_vision. `prefix` precedes the ViT keys; LAVIS keeps `ln_vision.*` outside the
  encoder (`ln_vision_prefix`, default `ln_vision.`), HF names it `post_layernorm`."""
  _check_format(fmt)
  t = target
  if fmt == "hf":
    rules = [
        rule(f"{prefix}embeddings.class_embedding", f"{t}/cls_token"),
        rule(f"{prefix}embeddings.position_embedding", f"{t}/pos_embed", PosEmbed()),
        rule(f"{prefix}embeddings.patch_embedding.weight", f"{t}/patch_embed/kernel", Conv2d()),
        rule(f"{prefix}embeddings.patch_embedding.bias", f"{t}/patch_embed/bias"),
    ]
    ln = f"{prefix}post_layernorm." if ln_vision_prefix is None else ln_vision_prefix
    block = f"{prefix}encoder.layers.{{i}}."
    names = dict(norm1="layer_norm1", norm2="layer_norm2", qkv="self_attn.qkv",
                 proj="self_attn.projection", fc1="mlp.fc1", fc2="mlp.fc2")
  else:
    rules = [
        rule(f"{prefix}cls_token", f"{t}/cls_token"),
        rule(f"{prefix}pos_embed", f"{t}/pos_embed", PosEmbed()),
        rule(f"{prefix}patch_embed.proj.weight", f"{t}/patch_embed/kernel", Conv2d()),
        rule(f"{prefix}patch_embed.proj.bias", f"{t}/patch_embed/bias"),
    ]
    ln = "ln_vision." if ln_vision_prefix is None else ln_vision_prefix
    block = f"{prefix}blocks.{{i}}."
    names = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", proj="attn.proj",
                 fc1="mlp.fc1", fc2="mlp.fc2")
  rules += [rule(f"{ln}weight", f"{t}/ln_vision/scale"), rule(f"{ln}bias", f"{t}/ln_vision/bias")]
  for i in range(vit.depth):
    b = block.format(i=i)
    layer = [
        (f"{b}{names['norm1']}.weight", "norm1/scale", IDENTITY),
        (f"{b}{names['norm1']}.bias", "norm1/bias", IDENTITY),
        (f"{b}{names['qkv']}.weight", "qkv/kernel", Linear()),
        (f"{b}{names['proj']}.weight", "proj/kernel", Linear(n_in=2)),
        (f"{b}{names['proj']}.bias", "proj/bias", IDENTITY),
        (f"{b}{names['norm2']}.weight", "norm2/scale", IDENTITY),
        (f"{b}{names['norm2']}.bias", "norm2/bias", IDENTITY),
        (f"{b}{names['fc1']}.weight", "fc1/kernel", Linear()),
        (f"{b}{names['fc1']}.bias", "fc1/bias", IDENTITY),
        (f"{b}{names['fc2']}.weight", "fc2/kernel", Linear()),
        (f"{b}{names['fc2']}.bias", "fc2/bias", IDENTITY),
    ]
    if fmt == "hf":  # one [3D] bias whose k slice is zero
      layer.append((f"{b}self_attn.qkv.bias", "qkv_bias", Flatten()))
    else:  # separate q and v biases; the k bias does not exist
      layer.append(((f"{b}attn.q_bias", f"{b}attn.v_bias"), "qkv_bias",
                    Concat((True, False, True))))
    rules += [rule(src, f"{t}/blocks/{dst}", tf, layer=i) for src, dst, tf in layer]
  return rules


def qformer_rules(q: ml_collections.ConfigDict, fmt: str, prefix: str, target: str, *,
                  text_input: bool) -> list[Rule]:
  """A BERT Q-Former. LAVIS keys live under `<prefix>bert.`; HF drops the `bert` level and
  renames `attention.self` -> `attention.attention` and `embeddings.LayerNorm` -> `layernorm`."""
  _check_format(fmt)
  hf = fmt == "hf"
  p = prefix if hf else f"{prefix}bert."
  attn_inner = "attention" if hf else "self"
  rules = [
      rule(f"{p}embeddings.{'layernorm' if hf else 'LayerNorm'}.weight",
           f"{target}/embeddings/layernorm/scale"),
      rule(f"{p}embeddings.{'layernorm' if hf else 'LayerNorm'}.bias",
           f"{target}/embeddings/layernorm/bias"),
  ]
  if text_input:
    rules += [
        rule(f"{p}embeddings.word_embeddings.weight", f"{target}/embeddings/word/embedding"),
        rule(f"{p}embeddings.position_embeddings.weight",
             f"{target}/embeddings/position/embedding"),
    ]

  def attention(src: str, dst: str) -> list[Rule]:
    out = []
    for name in ("query", "key", "value"):
      out += [rule(f"{src}.{attn_inner}.{name}.weight", f"{dst}/{name}/kernel", Linear()),
              rule(f"{src}.{attn_inner}.{name}.bias", f"{dst}/{name}/bias", Flatten())]
    return out + [rule(f"{src}.output.dense.weight", f"{dst}/output/kernel", Linear(n_in=2)),
                  rule(f"{src}.output.dense.bias", f"{dst}/output/bias"),
                  rule(f"{src}.output.LayerNorm.weight", f"{dst}_norm/scale"),
                  rule(f"{src}.output.LayerNorm.bias", f"{dst}_norm/bias")]

  def ffn(inner: str, outer: str, dst: str) -> list[Rule]:
    return [rule(f"{inner}.dense.weight", f"{dst}/fc1/kernel", Linear()),
            rule(f"{inner}.dense.bias", f"{dst}/fc1/bias"),
            rule(f"{outer}.dense.weight", f"{dst}/fc2/kernel", Linear()),
            rule(f"{outer}.dense.bias", f"{dst}/fc2/bias"),
            rule(f"{outer}.LayerNorm.weight", f"{dst}_norm/scale"),
            rule(f"{outer}.LayerNorm.bias", f"{dst}_norm/bias")]

  for i in range(q.depth):
    src, dst = f"{p}encoder.layer.{i}", f"{target}/layers/{i}"
    rules += attention(f"{src}.attention", f"{dst}/attention")
    if i % q.cross_attention_freq == 0:
      rules += attention(f"{src}.crossattention", f"{dst}/cross_attention")
    rules += ffn(f"{src}.intermediate_query", f"{src}.output_query", f"{dst}/mlp_query")
    if text_input:
      rules += ffn(f"{src}.intermediate", f"{src}.output", f"{dst}/mlp_text")
  return rules


def vision_tower_rules(model: ml_collections.ConfigDict, *, include_vit: bool = True,
                       ) -> list[Rule]:
  """The whole video branch in the official IVCR / LAVIS layout (reference App. B).

  `include_vit=False` gives the trainable part only, which is what an IVCR checkpoint holds.
  """
  rules = vit_rules(model.vit, "lavis", prefix="visual_encoder.") if include_vit else []
  rules += qformer_rules(model.qformer, "lavis", "Qformer.", "qformer",
                         text_input=model.qformer.text_input)
  rules += qformer_rules(model.video_qformer, "lavis", "video_Qformer.", "video_qformer",
                         text_input=False)
  rules += [
      rule("query_tokens", "query_tokens"),
      rule("video_query_tokens", "video_query_tokens"),
      rule("video_frame_position_embedding.weight", "frame_position_embedding/embedding",
           NearestRows()),
      rule("llama_proj.weight", "projection/kernel", Linear()),
      rule("llama_proj.bias", "projection/bias"),
  ]
  return rules
