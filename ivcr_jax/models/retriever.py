"""The phase-1 retriever: an X-Pool-style two-tower model (paper §4.2; Gorti et al., CVPR 2022).

The text tower embeds a query; the video tower embeds each frame (pixels through a small conv
stem, or stored vision-tower features through a projection) and mixes them with a temporal
encoder. X-Pool's point is that the video embedding depends on the query: each text attends
over the frames of each video (scaled dot-product attention, text as the query, frames as keys
and values), so a long video is summarised by the frames that matter to that text. Similarity
is the cosine of the text embedding and its text-conditioned video embedding, scaled by a
learned temperature.

Frame embeddings do not depend on the text, so ranking a corpus encodes every video once
(`encode_frames`) and only the light pooling runs per (query, video) pair (`similarity`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

# CLIP's pixel statistics (the toy frames and the official frames are RGB in 0..255).
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32) * 255
_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32) * 255


class _Block(nnx.Module):
  """Pre-LayerNorm transformer encoder block over a masked sequence."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    pair = mask[..., None, :, None] & mask[..., None, None, :]
    x = x + self.attn(self.ln1(x), mask=pair)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class _ConvStem(nnx.Module):
  """uint8 frames `[..., H, W, 3]` -> one vector per frame (max and mean over positions: the
  presence of a colour or shape anywhere, and the overall layout)."""

  def __init__(self, channels: tuple[int, ...], out: int, *, rngs: nnx.Rngs):
    chans = (3, *channels)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=(2, 2), rngs=rngs)
                           for a, b in zip(chans[:-1], chans[1:], strict=True)])
    self.proj = nnx.Linear(2 * chans[-1], out, rngs=rngs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    lead = frames.shape[:-3]
    x = (frames.reshape(-1, *frames.shape[-3:]).astype(jnp.float32) - _MEAN) / _STD
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))
    x = jnp.concatenate([x.max(axis=(1, 2)), x.mean(axis=(1, 2))], axis=-1)
    return self.proj(x).reshape(*lead, -1)


class XPoolRetriever(nnx.Module):
  """Two towers and X-Pool's text-conditioned pooling (module docstring).

  Config (`model` of configs/retriever.py): `input` ("pixels" | "features"), `width`, `heads`,
  `text_layers`, `temporal_layers`, `max_text_len`, `max_frames`, `conv_channels` (pixels),
  `init_temperature`.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, feature_dim: int = 0, *,
               rngs: nnx.Rngs):
    w = cfg.width
    self.input = cfg.input
    if cfg.input == "pixels":
      self.frame_in = _ConvStem(tuple(cfg.conv_channels), w, rngs=rngs)
    elif cfg.input == "features":
      if feature_dim < 1:
        raise ValueError("input 'features' needs the feature width (feature_dim)")
      self.frame_in = nnx.Sequential(nnx.LayerNorm(feature_dim, rngs=rngs),
                                     nnx.Linear(feature_dim, w, rngs=rngs))
    else:
      raise ValueError(f"model.input must be 'pixels' or 'features', got {cfg.input!r}")
    self.frame_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_frames, w)))
    self.temporal = nnx.List([_Block(w, cfg.heads, rngs=rngs)
                              for _ in range(cfg.temporal_layers)])
    self.frame_ln = nnx.LayerNorm(w, rngs=rngs)

    self.token_embed = nnx.Embed(vocab_size, w, rngs=rngs)
    self.text_pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_text_len, w)))
    self.text_blocks = nnx.List([_Block(w, cfg.heads, rngs=rngs)
                                 for _ in range(cfg.text_layers)])
    self.text_ln = nnx.LayerNorm(w, rngs=rngs)
    self.text_out = nnx.Linear(w, w, rngs=rngs)

    # X-Pool's pooling: text queries, frame keys/values, then a projection and a residual MLP.
    self.heads = cfg.heads
    self.pool_q = nnx.Linear(w, w, rngs=rngs)
    self.pool_k = nnx.Linear(w, w, rngs=rngs)
    self.pool_v = nnx.Linear(w, w, rngs=rngs)
    self.pool_out = nnx.Linear(w, w, rngs=rngs)
    self.pool_ln1 = nnx.LayerNorm(w, rngs=rngs)
    self.pool_fc1 = nnx.Linear(w, 2 * w, rngs=rngs)
    self.pool_fc2 = nnx.Linear(2 * w, w, rngs=rngs)
    self.pool_ln2 = nnx.LayerNorm(w, rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(-np.log(cfg.init_temperature), jnp.float32))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """`[Q, L]` token ids and mask -> `[Q, W]` text embeddings (masked mean of the encoder)."""
    x = self.token_embed(ids) + self.text_pos[:ids.shape[-1]]
    for block in self.text_blocks:
      x = block(x, mask)
    m = mask[..., None].astype(x.dtype)
    x = (self.text_ln(x) * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)
    return self.text_out(x)

  def encode_frames(self, inputs: jax.Array, mask: jax.Array) -> jax.Array:
    """`[V, T, ...]` frames (uint8 pixels, or `[V, T, W_in]` features) and `[V, T]` mask ->
    `[V, T, W]` frame embeddings, contextualised over time."""
    x = self.frame_in(inputs) + self.frame_pos[:inputs.shape[1]]
    for block in self.temporal:
      x = block(x, mask)
    return self.frame_ln(x)

  def pool(self, text: jax.Array, frames: jax.Array, mask: jax.Array) -> jax.Array:
    """X-Pool: `[Q, W]` texts over `[V, T, W]` frames -> `[Q, V, W]` text-conditioned videos."""
    q_n, (v_n, t_n, w) = text.shape[0], frames.shape
    h = self.heads
    q = self.pool_q(text).reshape(q_n, h, w // h)
    k = self.pool_k(frames).reshape(v_n, t_n, h, w // h)
    v = self.pool_v(frames).reshape(v_n, t_n, h, w // h)
    logits = jnp.einsum("qhd,vthd->qvht", q, k) / np.sqrt(w // h)
    logits = jnp.where(mask[None, :, None, :], logits, -1e9)
    attn = jax.nn.softmax(logits, axis=-1)
    r = self.pool_ln1(self.pool_out(jnp.einsum("qvht,vthd->qvhd", attn, v).reshape(q_n, v_n, w)))
    return self.pool_ln2(r + self.pool_fc2(jax.nn.gelu(self.pool_fc1(r))))

  def similarity(self, text: jax.Array, frames: jax.Array, mask: jax.Array) -> jax.Array:
    """`[Q, V]` cosine similarities of each text with its pooled view of each video."""
    video = self.pool(text, frames, mask)
    t = text / jnp.linalg.norm(text, axis=-1, keepdims=True).clip(1e-6)
    video = video / jnp.linalg.norm(video, axis=-1, keepdims=True).clip(1e-6)
    return jnp.einsum("qw,qvw->qv", t, video)

  def logits(self, ids: jax.Array, text_mask: jax.Array, inputs: jax.Array,
             frame_mask: jax.Array) -> jax.Array:
    """`[Q, V]` scaled similarities of a batch of queries against a batch of videos."""
    text = self.encode_text(ids, text_mask)
    frames = self.encode_frames(inputs, frame_mask)
    return jnp.exp(self.log_scale) * self.similarity(text, frames, frame_mask)


def contrastive_loss(logits: jax.Array, same: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over `[B, B]` text-video logits (row i: query i, column j: the video of
  query j). `same[i, j]` marks columns that show query i's ground-truth video: two queries of one
  video in a batch are both positives, never each other's negatives."""
  pos = jnp.where(same, logits, -1e9)
  t2v = jax.nn.logsumexp(logits, axis=1) - jax.nn.logsumexp(pos, axis=1)
  v2t = jax.nn.logsumexp(logits, axis=0) - jax.nn.logsumexp(pos, axis=0)
  return 0.5 * (t2v.mean() + v2t.mean())
