"""LLaMA-2 (`transformers` `LlamaForCausalLM`) with optional LoRA adapters, in Flax NNX.

Same math as the Hugging Face model (reference §1.6, §6.5): RMSNorm in float32, `rotate_half`
RoPE (theta and linear scaling from the config), SwiGLU MLP, grouped-query attention, untied
`lm_head`. Parameter names mirror the HF module tree (`layers/self_attn/q_proj/kernel`, ...) so
the conversion table in `ivcr_jax.convert.llama_hf` reads as a rename.

LoRA (PEFT semantics): each targeted projection gains `lora_a` `[*in, r]` and `lora_b`
`[r, *out]` (`nnx.LoRAParam`, whose `lora_` path prefix `ivcr_jax.models.trainable` selects) and
computes `W x + (alpha / r) * B A dropout(x)`.

Attention is masked explicitly (causal by slot, padding, optional packed segments: a
`layers.Mask`, never a dense array) and RoPE uses explicit positions, so padded and packed
batches are exact. The same stack runs incrementally
over a fixed-size `KVCache` for generation (`ivcr_jax.models.generation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models import layers

FAN_IN_EMBEDDING_STD = 1.0  # token embeddings of a LLaMA trained from scratch (MaxText's)

# Projection name -> (parent module, number of input dims of its kernel).
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn", 1), "k_proj": ("self_attn", 1), "v_proj": ("self_attn", 1),
    "o_proj": ("self_attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}


class KVCache(NamedTuple):
  """Keys and values of every layer in fixed-size slots (static shapes for `jit`).

  `valid[b, s]` says slot `s` of row `b` holds a real token; `index` is the next slot to write
  (shared by the batch: prompts are padded to one length).
  """

  k: jax.Array  # [depth, B, S, kv_heads, head_dim]
  v: jax.Array
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # int32 scalar

  @classmethod
  def create(cls, llm: ml_collections.ConfigDict, batch: int, length: int,
             dtype: layers.DType) -> KVCache:
    shape = (llm.depth, batch, length, llm.kv_heads, llm.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
  """`scale * (x / sqrt(mean(x^2) + eps))`, statistics in float32 as HF `LlamaRMSNorm`."""

  def __init__(self, dim: int, eps: float, *, param_dtype: layers.DType, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * h.astype(x.dtype)).astype(x.dtype)


class LoRADense(layers.Dense):
  """A bias-free `Dense` with an optional PEFT-style low-rank update (rank 0: plain Dense)."""

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
               axes: layers.Axes, rank: int = 0, alpha: float = 1.0, dropout: float = 0.0,
               lora_param_dtype: layers.DType = jnp.float32, dtype: layers.DType,
               param_dtype: layers.DType, rngs: nnx.Rngs):
    super().__init__(in_shape, out_shape, axes=axes, use_bias=False, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    n_in = len(self.in_shape)
    self.lora_scale = alpha / rank if rank else 0.0
    self.lora_dropout = dropout
    lora_a = lora_b = None
    if rank:
      # PEFT: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(+-1/sqrt(fan_in)); B = 0 (no-op at start).
      bound = 1.0 / math.sqrt(math.prod(self.in_shape))
      a = jax.random.uniform(rngs.params(), (*self.in_shape, rank), lora_param_dtype, -bound,
                             bound)
      lora_a = nnx.LoRAParam(a, out_sharding=(*axes[:n_in], "lora_rank"), eager_sharding=False)
      lora_b = nnx.LoRAParam(jnp.zeros((rank, *self.out_shape), lora_param_dtype),
                             out_sharding=("lora_rank", *axes[n_in:]), eager_sharding=False)
    self.lora_a, self.lora_b = nnx.data(lora_a), nnx.data(lora_b)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    y = super().__call__(x)
    if self.lora_a is None:
      return y
    n_in = len(self.in_shape)
    h = layers.dropout(x.astype(self.dtype), self.lora_dropout, dropout_key)
    h = jax.lax.dot_general(h, self.lora_a[...].astype(self.dtype),
                            ((tuple(range(h.ndim - n_in, h.ndim)), tuple(range(n_in))), ((), ())))
    h = jnp.tensordot(h, self.lora_b[...].astype(self.dtype), axes=1)
    return y + h * jnp.asarray(self.lora_scale, self.dtype)

  def merged_kernel(self) -> jax.Array:
    """`W + (alpha / r) A B` in the kernel's dtype (leading dims beyond `[*in, *out]`, e.g. the
    `layers` axis of a stacked block, are batch dims)."""
    kernel = self.kernel[...]
    if self.lora_a is None:
      return kernel
    lead = kernel.shape[:kernel.ndim - len(self.in_shape) - len(self.out_shape)]
    a = self.lora_a[...].astype(jnp.float32).reshape(*lead, math.prod(self.in_shape), -1)
    b = self.lora_b[...].astype(jnp.float32).reshape(*lead, a.shape[-1], -1)
    delta = (a @ b).reshape(kernel.shape) * self.lora_scale
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

  def merge(self) -> None:
    """Folds the adapter into the kernel and drops it."""
    self.kernel[...] = self.merged_kernel()
    self.lora_a = self.lora_b = None


def rope_frequencies(head_dim: int, theta: float, scaling_factor: float) -> np.ndarray:
  """HF's `inv_freq` (default or `linear` RoPE), with the same float32 rounding steps."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  powers = (theta ** exponents.astype(np.float64)).astype(np.float32)
  return (np.float32(1.0) / powers) / np.float32(scaling_factor)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nnx.Module):
  def __init__(self, llm: ml_collections.ConfigDict, lora: dict[str, dict], *, impl: str, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.impl = impl
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    heads, kv, hd = llm.heads, llm.kv_heads, llm.head_dim
    if heads % kv:
      raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv}")
    self.q_proj = LoRADense(llm.hidden, (heads, hd), axes=("embed", "heads", "head_dim"),
                            **lora.get("q_proj", {}), **dense)
    self.k_proj = LoRADense(llm.hidden, (kv, hd), axes=("embed", "kv_heads", "head_dim"),
                            **lora.get("k_proj", {}), **dense)
    self.v_proj = LoRADense(llm.hidden, (kv, hd), axes=("embed", "kv_heads", "head_dim"),
                            **lora.get("v_proj", {}), **dense)
    self.o_proj = LoRADense((heads, hd), llm.hidden, axes=("heads", "head_dim", "embed"),
                            **lora.get("o_proj", {}), **dense)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: layers.Mask, *,
               cache: tuple | None = None, dropout_key: jax.Array | None = None):
    """`cache`: `(k_all, v_all, layer, index)`; the new keys/values are written at slots
    `index..index+L` of `layer` and attention reads the whole layer. Returns `(out, (k, v))`."""
    key = lambda i: layers.sub_key(dropout_key, i)
    q, k, v = (self.q_proj(x, key(0)), self.k_proj(x, key(1)), self.v_proj(x, key(2)))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if cache is not None:
      k_all, v_all, layer, index = cache
      start = (layer, 0, index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
      v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
      k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
      cache = (k_all, v_all)
    out = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.impl)
    return self.o_proj(out, key(3)), cache


class MLP(nnx.Module):
  def __init__(self, llm: ml_collections.ConfigDict, lora: dict[str, dict], *, dtype,
               param_dtype, rngs: nnx.Rngs):
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = LoRADense(llm.hidden, llm.mlp_dim, axes=("embed", "mlp"),
                               **lora.get("gate_proj", {}), **dense)
    self.up_proj = LoRADense(llm.hidden, llm.mlp_dim, axes=("embed", "mlp"),
                             **lora.get("up_proj", {}), **dense)
    self.down_proj = LoRADense(llm.mlp_dim, llm.hidden, axes=("mlp", "embed"),
                               **lora.get("down_proj", {}), **dense)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    key = lambda i: layers.sub_key(dropout_key, i)
    h = jax.nn.silu(self.gate_proj(x, key(0))) * self.up_proj(x, key(1))
    return self.down_proj(h, key(2))


class DecoderLayer(nnx.Module):
  """x += attn(norm(x)); x += mlp(norm(x))."""

  def __init__(self, llm: ml_collections.ConfigDict, lora: dict[str, dict], *, impl: str, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(llm.hidden, llm.rms_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(llm, lora, impl=impl, **kw)
    self.post_attention_layernorm = RMSNorm(llm.hidden, llm.rms_eps, param_dtype=param_dtype,
                                            rngs=rngs)
    self.mlp = MLP(llm, lora, **kw)

  def __call__(self, x, cos, sin, mask, *, cache=None, dropout_key=None):
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache,
                              dropout_key=layers.sub_key(dropout_key, 0))
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), layers.sub_key(dropout_key, 1))
    return x, cache


class Llama(nnx.Module):
  """Causal LM: token ids or input embeddings -> logits `[B, L, vocab]`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, lora: bool = True, rngs: nnx.Rngs):
    """Args:
      cfg: the `model` section of the config (`llm`, `lora`, `dtype`, `param_dtype`,
        `frozen_param_dtype`, `attention_impl`). Base weights use `frozen_param_dtype`,
        adapters `param_dtype`.
      lora: whether to attach adapters to `cfg.lora.targets` (rank `cfg.lora.rank`).
    """
    llm = cfg.llm
    # Frozen: hashable, so the graphdef can be a static `jit` argument (split/merge pattern).
    self.cfg = ml_collections.FrozenConfigDict(llm)
    self.dtype = jnp.dtype(cfg.dtype)
    frozen = jnp.dtype(cfg.frozen_param_dtype)
    adapters = {}
    if lora and cfg.lora.rank:
      unknown = set(cfg.lora.targets) - set(PROJECTIONS)
      if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {sorted(PROJECTIONS)}")
      spec = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                  lora_param_dtype=jnp.dtype(cfg.param_dtype))
      adapters = {t: spec for t in cfg.lora.targets}
    self.embed_tokens = layers.embed(llm.vocab_size, llm.hidden, ("vocab", "embed"),
                                     param_dtype=frozen, rngs=rngs)
    self.layers = layers.stacked(
        llm.depth,
        lambda r: DecoderLayer(llm, adapters, impl=cfg.attention_impl, dtype=self.dtype,
                               param_dtype=frozen, rngs=r), rngs)
    self.norm = RMSNorm(llm.hidden, llm.rms_eps, param_dtype=frozen, rngs=rngs)
    self.lm_head = layers.Dense(llm.hidden, llm.vocab_size, axes=("embed", "vocab"),
                                use_bias=False, dtype=self.dtype, param_dtype=frozen, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids).astype(self.dtype)

  def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, L, head_dim]` for integer `positions` `[B, L]` (HF: f32, then cast)."""
    c = self.cfg
    inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_factor)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`lm_head` on hidden states `[..., hidden]` (vocabulary axis sharded by the rules)."""
    return sharding.constrain(self.lm_head(hidden), ("batch",) + (None,) * (hidden.ndim - 2)
                              + ("vocab",))

  def __call__(self, input_ids: jax.Array | None = None, **kwargs) -> jax.Array:
    """Logits `[B, L, vocab]`; the arguments are those of `hidden_states`."""
    return self.logits(self.hidden_states(input_ids, **kwargs))

  def hidden_states(self, input_ids: jax.Array | None = None, *,
                    inputs_embeds: jax.Array | None = None,
                    attention_mask: jax.Array | None = None,
                    position_ids: jax.Array | None = None, lengths: jax.Array | None = None,
                    dropout_key: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward (training, scoring) up to the final norm, `[B, L, hidden]`.

    Training reads logits from these only where it needs them (`ivcr_jax.training.losses`):
    a `[B, L, vocab]` float32 array is 1-2 GB per sample at 4096 positions.

    Args:
      input_ids: `[B, L]` int, or None when `inputs_embeds` `[B, L, hidden]` is given.
      attention_mask: `[B, L]`, 0 for padding (None: no padding).
      position_ids: `[B, L]` (None: `arange(L)`, like HF; pass `cumsum(mask) - 1` to make a
        left-padded row identical to the unpadded one).
      lengths: `[B]`, a promise that `attention_mask` is right padding of these lengths (the
        pipeline's batches): fused attention kernels then skip the padding.
      dropout_key: PRNG key for LoRA dropout in training, None otherwise.
    """
    x = sharding.constrain(self._inputs(input_ids, inputs_embeds), ("batch",))
    b, length = x.shape[:2]
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), (b, length))
    cos, sin = self.rope(position_ids)
    mask = layers.Mask(causal=True, key_valid=attention_mask, key_lengths=lengths)
    x = self._run_layers(
        x, lambda blk, h, key: sharding.constrain(
            blk(h, cos, sin, mask, dropout_key=key)[0], ("batch",)),
        dropout_key=dropout_key, remat_policy=self.cfg.remat_policy)
    return self.norm(x)

  def decode(self, inputs_embeds: jax.Array, *, position_ids: jax.Array,
             attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs `L` new tokens against `cache` (prefill when L > 1, one step when L == 1).

    Returns the final-norm hidden states `[B, L, hidden]` and the cache with the tokens written
    at slots `index..index+L`.
    """
    length = inputs_embeds.shape[1]
    cos, sin = self.rope(position_ids)
    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool),
                                         (0, cache.index))
    mask = layers.Mask(causal=True, q_offset=cache.index, key_valid=valid)

    def layer(blk, carry, _):
      h, k_all, v_all, i = carry
      h, (k_all, v_all) = blk(h, cos, sin, mask, cache=(k_all, v_all, i, cache.index))
      return h, k_all, v_all, i + 1

    x, k, v, _ = self._run_layers(
        (inputs_embeds.astype(self.dtype), cache.k, cache.v, jnp.int32(0)), layer,
        dropout_key=None)
    return self.norm(x), KVCache(k, v, valid, cache.index + length)

  def _run_layers(self, carry, fn, *, dropout_key: jax.Array | None, remat_policy: str = "none"):
    """`fn(block, carry, key) -> carry` over the stacked blocks (scanned, or unrolled when
    `scan_layers` is off)."""
    return layers.scan_layers(self.layers, carry, fn, num_layers=self.cfg.depth,
                              dropout_key=dropout_key, remat_policy=remat_policy,
                              unroll=not self.cfg.get("scan_layers", True))

  def _inputs(self, input_ids, inputs_embeds) -> jax.Array:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)


def merge_lora(model: Llama) -> None:
  """Folds every adapter into its base kernel in place, `W + (alpha/r) B A` (inference)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRADense):
      module.merge()
