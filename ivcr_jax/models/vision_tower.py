"""The video branch of InterLLaVA: frames -> per-video blocks of LLM input embeddings.

frames -> EVA ViT + ln_vision -> image Q-Former (32 queries + timestamp text, full 32+L output)
-> + frame position embedding -> sliding windows -> video Q-Former -> projection, giving
`num_video_queries * ceil(T / stride)` embeddings per video (reference §1.0-1.5).

Everything is batched with static shapes and no work on padding frames: the ViT and the image
Q-Former run over a packed table of the batch's real frames (`[F, ...]`, video after video), and
`frame_slot [V, T]` says which row holds frame `t` of video `v` (-1: the video has no such
frame). Windows are an array axis `[V, n_w, W]` gathered from the packed rows (not looped), and
the frames or tokens a shorter video or a shorter last window does not have are masked out of
the video Q-Former's cross-attention, which gives exactly the official per-window result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ivcr_jax import sharding, video_windows
from ivcr_jax.models import layers
from ivcr_jax.models.eva_vit import EvaViT, clip_normalize
from ivcr_jax.models.qformer import QFormer


class VisionTower(nnx.Module):
  """Turns video frames (or cached ViT features) into LLM-space embeddings per video."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Args:
      cfg: the `model` section of the config (needs `vit`, `qformer`, `video`, `video_qformer`,
        `llm.hidden`, `dtype`, `param_dtype`, `frozen_param_dtype`, `attention_impl`).
    """
    # Frozen, here and in the submodules it is handed to: hashable, so the graphdef can be a
    # static `jit` argument (split/merge pattern).
    cfg = self.cfg = ml_collections.FrozenConfigDict(cfg)
    dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    qcfg, vcfg = cfg.qformer, cfg.video_qformer
    hidden = qcfg.hidden
    if vcfg.hidden != hidden:
      raise ValueError(f"video_qformer.hidden {vcfg.hidden} != qformer.hidden {hidden}")
    attn = cfg.attention_impl
    self.vit = EvaViT(cfg.vit, dtype=dtype, param_dtype=jnp.dtype(cfg.frozen_param_dtype),
                      attention_impl=attn, trained="vit" in cfg.trainable, rngs=rngs)
    self.qformer = QFormer(qcfg, encoder_width=cfg.vit.width, text_input=qcfg.text_input,
                           dtype=dtype, param_dtype=param_dtype, attention_impl=attn, rngs=rngs)
    self.query_tokens = layers.param(rngs, nnx.initializers.normal(0.02),
                                     (1, qcfg.num_query_tokens, hidden), (None, None, "embed"),
                                     param_dtype)
    self.frame_position_embedding = layers.embed(cfg.video.max_frame_pos, hidden, (None, "embed"),
                                                 param_dtype=param_dtype, rngs=rngs)
    self.video_qformer = QFormer(vcfg, encoder_width=hidden, text_input=False, dtype=dtype,
                                 param_dtype=param_dtype, attention_impl=attn, rngs=rngs)
    self.video_query_tokens = layers.param(rngs, nnx.initializers.normal(0.02),
                                           (1, vcfg.num_query_tokens, hidden),
                                           (None, None, "embed"), param_dtype)
    self.projection = layers.Dense(hidden, cfg.llm.hidden, axes=(None, "embed"), dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

  def tokens_per_video(self, num_frames: int) -> int:
    """LLM embeddings produced for a video of `num_frames` frames."""
    return video_windows.tokens_per_video(
        num_frames, queries=self.cfg.video_qformer.num_query_tokens, stride=self.cfg.video.stride)

  def encode_frames(self, frames: jax.Array) -> jax.Array:
    """`[F, H, W, 3]` frames (uint8, or CLIP-normalised floats) -> `[F, N, vit_width]`.

    This is the frozen part; its output is what the feature store caches.
    """

    def encode(tower, frames):
      if frames.dtype == jnp.uint8:
        frames = clip_normalize(frames, jnp.dtype(tower.cfg.dtype))
      return tower.vit(frames)

    return self._in_chunks(encode, frames, policy=self.vit.remat_policy)

  def _in_chunks(self, fn, *tables: jax.Array, policy: str):
    """`fn(tower, *tables)` over rows of frame tables, in `video.frame_chunks` sequential chunks
    (a `lax.map`), each rematerialised by `policy` for the backward pass: the frame table's
    activations then exist one chunk at a time. Chunk `i` holds rows `i, i + n, i + 2n, ...`,
    spread over the devices like the table itself. `fn` is row-wise (rows do not interact)."""
    n = self.cfg.video.frame_chunks
    if n == 1:
      return fn(self, *tables)
    rows = tables[0].shape[0]
    pad = -rows % n
    graphdef, state = nnx.split(self)  # merged inside: modules are not shared across traces

    def split(x):
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      return jnp.swapaxes(x.reshape((rows + pad) // n, n, *x.shape[1:]), 0, 1)

    body = layers.remat(lambda xs: fn(nnx.merge(graphdef, state), *xs), policy)
    out = jax.lax.map(body, tuple(split(x) for x in tables))
    return jnp.swapaxes(out, 0, 1).reshape(rows + pad, *out.shape[2:])[:rows]

  def __call__(self, features: jax.Array, frame_slot: jax.Array, *,
               text_ids: jax.Array | None = None, text_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Video embeddings for the LLM from the ViT features of a packed frame table.

    Args:
      features: `[F, N, vit_width]` from `encode_frames` (or the feature store), the real frames
        of every video (rows no slot names are padding).
      frame_slot: `[V, T]` int, the row of `features` holding frame `t` of video `v` (each row
        named once), -1 where the video has fewer frames (`pipeline.frame_slots`).
      text_ids, text_mask: `[F, L]` Q-Former timestamp text per frame (None: no text).
      dropout_key: PRNG key in training, None in evaluation.
    Returns:
      `(tokens [V, n_w * Qv, llm_hidden], valid [V, n_w * Qv])` with `n_w = ceil(T / stride)`;
      windows a video does not have are marked invalid.
    """
    cfg = self.cfg
    f = features.shape[0]
    v, t = frame_slot.shape
    if t > cfg.video.max_frame_pos:
      raise ValueError(f"{t} frames per video but only {cfg.video.max_frame_pos} frame positions")

    def image_qformer(tower, chunk, features, *text):
      """The image Q-Former on some frames (`chunk`: their chunk, all alike: its dropout)."""
      queries = jnp.broadcast_to(tower.query_tokens[...],
                                 (features.shape[0], *tower.query_tokens.shape[1:]))
      text_ids, text_mask = text if text else (None, None)
      return tower.qformer(queries, features, text_ids=text_ids, text_mask=text_mask,
                           dropout_key=layers.sub_key(layers.sub_key(dropout_key, 0), chunk[0]))

    text = () if text_ids is None else (
        text_ids, jnp.ones(text_ids.shape, bool) if text_mask is None else text_mask)
    chunks = jnp.arange(f) % cfg.video.frame_chunks
    hidden = self._in_chunks(image_qformer, chunks, features, *text,
                             policy=cfg.qformer.remat_policy)  # [F, Q+L, D]
    num_q = self.query_tokens.shape[1]

    # Windows: the frame index (within its video) and packed row of every window position.
    window, stride = cfg.video.window, cfg.video.stride
    n_w = video_windows.num_windows(t, stride)
    if window == stride:  # windows tile the frames: a reshape, and every row is in one window
      frame_idx = jnp.arange(n_w * window).reshape(n_w, window)
      slots = jnp.pad(frame_slot, ((0, 0), (0, n_w * window - t)), constant_values=-1)
      slots = slots.reshape(v, n_w, window)
    else:
      frame_idx = jnp.arange(n_w)[:, None] * stride + jnp.arange(window)[None, :]  # [n_w, W]
      slots = jnp.where(frame_idx < t, frame_slot[:, jnp.minimum(frame_idx, t - 1)], -1)
    in_window = slots >= 0  # [V, n_w, W]
    # Missing frames read out-of-range rows (zeros, masked below). With window == stride every
    # index is distinct, so the backward pass is a plain scatter, not an accumulation.
    rows = jnp.where(in_window, slots, f + jnp.arange(slots.size).reshape(slots.shape))
    rows = rows.reshape(-1)
    clip_feats = jnp.take(hidden, rows, axis=0, mode="fill", fill_value=0,
                          unique_indices=window == stride)
    clip_feats = clip_feats.reshape(v, n_w, window, *hidden.shape[1:])  # [V, n_w, W, Q+L, D]
    frame_pos = self.frame_position_embedding(jnp.minimum(frame_idx, t - 1))  # [n_w, W, D]
    clip_feats = clip_feats + frame_pos[None, :, :, None, :].astype(clip_feats.dtype)

    # Which of the Q+L positions the video Q-Former sees: the official model pads the timestamp
    # text of one video to that video's longest string and attends to all of it (pads included),
    # so with a longer static L only positions beyond the video's own longest text are masked.
    positions = jnp.arange(hidden.shape[1])
    if text_mask is None or not cfg.video.attend_qformer_text:
      token_valid = jnp.broadcast_to(positions < num_q, (v, hidden.shape[1]))
    else:
      frame_text = jnp.take(text_mask.sum(-1), jnp.maximum(frame_slot, 0), axis=0)  # [V, T]
      text_len = jnp.max(jnp.where(frame_slot >= 0, frame_text, 0), axis=1)  # [V]
      token_valid = positions[None, :] < (num_q + text_len)[:, None]

    key_mask = in_window[..., None] & token_valid[:, None, None, :]  # [V, n_w, W, Q+L]
    num_vq = self.video_query_tokens.shape[1]
    keys = clip_feats.reshape(v * n_w, -1, clip_feats.shape[-1])
    video_queries = jnp.broadcast_to(self.video_query_tokens[...],
                                     (v * n_w, num_vq, keys.shape[-1]))
    out = self.video_qformer(video_queries, keys, encoder_mask=key_mask.reshape(v * n_w, -1),
                             dropout_key=layers.sub_key(dropout_key, 1))
    tokens = sharding.constrain(self.projection(out).reshape(v, n_w * num_vq, -1), ("batch",))
    window_valid = in_window[:, :, 0]  # [V, n_w]: a window exists if its first frame does
    return tokens, jnp.repeat(window_valid, num_vq, axis=1)


def frame_encoder(vision: VisionTower, dtype: Any = None) -> Callable[[np.ndarray], np.ndarray]:
  """`vision.encode_frames` on the host's frames, jitted with the weights as arguments (a jitted
  bound method would bake them into the program as constants), the features cast to `dtype` on
  the device (fewer bytes to the host) and returned as numpy: what a feature store is built
  with (`data.feature_store.write_feature_store`)."""
  graphdef, state = nnx.split(vision)

  @jax.jit
  def run(state, frames):
    out = nnx.merge(graphdef, state).encode_frames(frames)
    return out if dtype is None else out.astype(dtype)

  return lambda frames: np.asarray(run(state, frames))
