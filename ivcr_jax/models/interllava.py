"""InterLLaVA: the video branch's embeddings spliced into LLaMA's input by a static splice plan.

The batch carries a table of the distinct videos of the batch (each encoded once) and, for every
LLM position, `video_slot`: -1 for a text token, otherwise the row of the flattened
`[V * tokens_per_video]` video-embedding table that replaces it. The data pipeline expands each
`<VIDEOTOKEN>` placeholder into as many slots as its video has embeddings (official: the
placeholder is replaced by 32 * ceil(T / 32) embeddings, reference §2.4), so shapes are static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ivcr_jax.models import layers
from ivcr_jax.models.llama import FAN_IN_EMBEDDING_STD, Llama
from ivcr_jax.models.vision_tower import VisionTower


def splice(text_embeds: jax.Array, video_tokens: jax.Array, video_slot: jax.Array) -> jax.Array:
  """`text_embeds [B, S, D]` with the positions where `video_slot [B, S] >= 0` replaced by
  `video_tokens.reshape(-1, D)[video_slot]`."""
  table = video_tokens.reshape(-1, video_tokens.shape[-1]).astype(text_embeds.dtype)
  gathered = jnp.take(table, jnp.maximum(video_slot, 0), axis=0)
  return jnp.where(video_slot[..., None] >= 0, gathered, text_embeds)


class InterLLaVA(nnx.Module):
  """`vision` (ViT, Q-Formers, projection) + `llm` (LLaMA with LoRA)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """`cfg` is the config's `model` section."""
    fan_in_parts = tuple(cfg.get("fan_in_init", ()))
    if unknown := set(fan_in_parts) - {"vision", "llm"}:
      raise ValueError(f"model.fan_in_init: unknown parts {sorted(unknown)}; choose vision, llm")
    self.vision = VisionTower(cfg, rngs=rngs)
    self.llm = Llama(cfg, lora=bool(cfg.lora.rank), rngs=rngs)
    for part in fan_in_parts:  # the LLM's token embeddings too (see layers.fan_in_init)
      layers.fan_in_init(getattr(self, part), rngs.params(),
                         embedding_std=FAN_IN_EMBEDDING_STD if part == "llm" else None)

  def video_embeddings(self, batch: dict, dropout_key: jax.Array | None = None) -> jax.Array:
    """`[V, tokens_per_video, llm_hidden]` for the batch's video table, from its packed frame
    table (frames or features) and `frame_slot`."""
    features = batch.get("features")
    if features is None:
      features = self.vision.encode_frames(batch["frames"])
    tokens, _ = self.vision(features, batch["frame_slot"],
                            text_ids=batch.get("qformer_text_ids"),
                            text_mask=batch.get("qformer_text_mask"), dropout_key=dropout_key)
    return tokens

  def input_embeddings(self, batch: dict, dropout_key: jax.Array | None = None) -> jax.Array:
    """LLM input embeddings `[B, S, hidden]` with every video block spliced in."""
    videos = self.video_embeddings(batch, dropout_key)
    return splice(self.llm.embed(batch["input_ids"]), videos, batch["video_slot"])

  def __call__(self, batch: dict, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits `[B, S, vocab]` for a training/scoring batch (see `ivcr_jax.data` for its keys)."""
    return self.llm.logits(self.hidden_states(batch, dropout_key=dropout_key))

  def hidden_states(self, batch: dict, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """The LLM's final-norm hidden states `[B, S, hidden]`; `llm.logits` turns any of them into
    logits (the losses read them only where they are supervised)."""
    embeds = self.input_embeddings(batch, layers.sub_key(dropout_key, 0))
    mask = batch.get("attention_mask")
    # Batches are right-padded (`pipeline.assemble`): fused attention skips the padding.
    lengths = None if mask is None else jnp.sum(mask, axis=-1, dtype=jnp.int32)
    return self.llm.hidden_states(
        inputs_embeds=embeds, attention_mask=mask, position_ids=batch.get("position_ids"),
        lengths=lengths,
        dropout_key=layers.sub_key(dropout_key, 1))
