"""The BLIP-2/InstructBLIP Q-Former (BERT, post-LN), used twice by InterLLaVA.

- Image Q-Former (reference §1.2): 32 learned queries, optional instruction text appended after
  them (word + position embeddings), bidirectional self-attention over [queries; text] with padded
  text keys masked, cross-attention to the image features every `cross_attention_freq` layers on
  the query positions only, and separate query/text feed-forward networks. The output keeps all
  32 + L positions (the official model does not slice to the queries; bug B3, kept for parity).
- Video Q-Former (reference §1.4): the same stack with no text input, cross-attention in every
  layer; only the embeddings LayerNorm is applied to the query tokens.

Equal to `transformers` `InstructBlipQFormerModel` (called with `query_embeds`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models import layers


class MultiHeadAttention(nnx.Module):
  def __init__(self, hidden: int, kv_width: int, heads: int, *, impl: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.impl = impl
    head_dim = hidden // heads
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_axes = ("embed", "heads", "head_dim")
    self.query = layers.Dense(hidden, (heads, head_dim), axes=in_axes, **dense)
    self.key = layers.Dense(kv_width, (heads, head_dim), axes=in_axes, **dense)
    self.value = layers.Dense(kv_width, (heads, head_dim), axes=in_axes, **dense)
    self.output = layers.Dense((heads, head_dim), hidden, axes=("heads", "head_dim", "embed"),
                               **dense)

  def __call__(self, x: jax.Array, kv: jax.Array, key_mask: jax.Array | None, *,
               attention_dropout: float, dropout_key: jax.Array | None) -> jax.Array:
    out = layers.attention(self.query(x), self.key(kv), self.value(kv),
                           layers.Mask(key_valid=key_mask), impl=self.impl,
                           dropout_rate=attention_dropout, dropout_key=dropout_key)
    return self.output(out)


class FeedForward(nnx.Module):
  def __init__(self, hidden: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.Dense(hidden, mlp_dim, axes=("embed", "mlp"), **dense)
    self.fc2 = layers.Dense(mlp_dim, hidden, axes=("mlp", "embed"), **dense)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class QFormerLayer(nnx.Module):
  """Self-attention -> [cross-attention on queries] -> query FFN / text FFN, each post-LN."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, encoder_width: int, has_cross: bool,
               text_input: bool, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = cfg.hidden
    self.cfg = cfg
    self.attention = MultiHeadAttention(hidden, hidden, cfg.heads, impl=attention_impl, **kw)
    self.attention_norm = layers.layer_norm(hidden, cfg.ln_eps, **kw)
    if has_cross:
      self.cross_attention = MultiHeadAttention(hidden, encoder_width, cfg.heads,
                                                impl=attention_impl, **kw)
      self.cross_attention_norm = layers.layer_norm(hidden, cfg.ln_eps, **kw)
    else:
      self.cross_attention = self.cross_attention_norm = None
    self.mlp_query = FeedForward(hidden, cfg.mlp_dim, **kw)
    self.mlp_query_norm = layers.layer_norm(hidden, cfg.ln_eps, **kw)
    if text_input:
      self.mlp_text = FeedForward(hidden, cfg.mlp_dim, **kw)
      self.mlp_text_norm = layers.layer_norm(hidden, cfg.ln_eps, **kw)
    else:
      self.mlp_text = self.mlp_text_norm = None

  def _residual(self, norm: nnx.LayerNorm, update: jax.Array, x: jax.Array,
                key: jax.Array | None) -> jax.Array:
    return norm(layers.dropout(update, self.cfg.dropout, key) + x)

  def __call__(self, x: jax.Array, mask: jax.Array | None, encoder: jax.Array,
               encoder_mask: jax.Array | None, num_queries: int,
               dropout_key: jax.Array | None) -> jax.Array:
    key = lambda i: layers.sub_key(dropout_key, i)
    attn_drop = self.cfg.attention_dropout
    x = self._residual(self.attention_norm,
                       self.attention(x, x, mask, attention_dropout=attn_drop, dropout_key=key(0)),
                       x, key(1))
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if self.cross_attention is not None:
      cross = self.cross_attention(queries, encoder, encoder_mask, attention_dropout=attn_drop,
                                   dropout_key=key(2))
      queries = self._residual(self.cross_attention_norm, cross, queries, key(3))
    queries = self._residual(self.mlp_query_norm, self.mlp_query(queries), queries, key(4))
    if text.shape[1] == 0:
      return queries
    if self.mlp_text is None:
      raise ValueError("text tokens given to a Q-Former built without text input")
    text = self._residual(self.mlp_text_norm, self.mlp_text(text), text, key(5))
    return jnp.concatenate([queries, text], axis=1)


class QFormerEmbeddings(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, text_input: bool, param_dtype,
               rngs: nnx.Rngs):
    if text_input:
      self.word = layers.embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"),
                               param_dtype=param_dtype, rngs=rngs)
      self.position = layers.embed(cfg.max_position, cfg.hidden, (None, "embed"),
                                   param_dtype=param_dtype, rngs=rngs)
    else:
      self.word = self.position = None
    self.layernorm = layers.layer_norm(cfg.hidden, cfg.ln_eps, dtype=jnp.float32,
                                       param_dtype=param_dtype, rngs=rngs)


class QFormer(nnx.Module):
  """`queries [B, Q, D]`, `encoder [B, S, E]`, text ids `[B, L]` -> hidden `[B, Q + L, D]`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, encoder_width: int, text_input: bool,
               dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.embeddings = QFormerEmbeddings(cfg, text_input=text_input, param_dtype=param_dtype,
                                        rngs=rngs)
    self.layers = nnx.List([
        QFormerLayer(cfg, encoder_width=encoder_width,
                     has_cross=i % cfg.cross_attention_freq == 0, text_input=text_input,
                     attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
        for i in range(cfg.depth)
    ])

  def __call__(self, queries: jax.Array, encoder: jax.Array, *,
               encoder_mask: jax.Array | None = None, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Args:
      queries: `[B, Q, D]` query embeddings (already broadcast to the batch).
      encoder: `[B, S, E]` features that the queries cross-attend.
      encoder_mask: `[B, S]` booleans; None attends every position (official).
      text_ids: `[B, L]` token ids of the instruction text (image Q-Former only).
      text_mask: `[B, L]` booleans, False on padding (masked as keys in self-attention).
      dropout_key: PRNG key in training, None for deterministic evaluation.
    """
    num_queries = queries.shape[1]
    batch_axes = ("batch",)  # images (image Q-Former) or windows (video Q-Former)
    x = queries.astype(jnp.float32)
    mask = None
    if text_ids is not None:
      emb = self.embeddings
      length = text_ids.shape[1]
      text = emb.word(text_ids) + emb.position(jnp.arange(length))[None]
      x = jnp.concatenate([x, text.astype(jnp.float32)], axis=1)
      if text_mask is not None:
        ones = jnp.ones((x.shape[0], num_queries), bool)
        mask = jnp.concatenate([ones, text_mask.astype(bool)], axis=1)
    x = layers.dropout(self.embeddings.layernorm(x), self.cfg.dropout,
                       layers.sub_key(dropout_key, 0)).astype(self.dtype)
    x = sharding.constrain(x, batch_axes)
    encoder = sharding.constrain(encoder.astype(self.dtype), batch_axes)
    run = lambda layer, x, mask, encoder, encoder_mask, key: layer(
        x, mask, encoder, encoder_mask, num_queries, key)
    for i, layer in enumerate(self.layers):
      call = layers.remat_module(run, layer, self.cfg.remat_policy)
      x = sharding.constrain(call(x, mask, encoder, encoder_mask,
                                  layers.sub_key(dropout_key, i + 1)), batch_axes)
    return x
