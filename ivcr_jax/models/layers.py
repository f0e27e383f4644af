"""Building blocks shared by every model: parameters with logical axes, dense layers, norms,
attention and dropout.

Conventions used across `ivcr_jax.models`:
- Every parameter carries its logical axis names in the `out_sharding` metadata (eager sharding
  off); `ivcr_jax.sharding` maps them to mesh axes with the rules from the config.
- Kernels are stored as `[*in_dims, *out_dims]` (torch Linear weights are `[out, in]`).
- Dropout is functional: a module takes `dropout_key=None` (deterministic, eval) or a PRNG key
  (training) and derives sub-keys with `fold_in`, so the hot path stays a pure function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
DType = jnp.dtype | str

def sub_key(key: jax.Array | None, tag: int) -> jax.Array | None:
  """A sub-key of `key` for the `tag`-th consumer, or None when deterministic."""
  return None if key is None else jax.random.fold_in(key, tag)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout as in torch; identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def with_axes(init: Callable, axes: Axes) -> Callable:
  """Wraps an initializer so that the created parameter carries logical axis names."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
          dtype: DType = jnp.float32) -> nnx.Param:
  """A free-standing parameter (query tokens, class token, ...) with logical axes."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class Dense(nnx.Module):
  """A linear map contracting the trailing `len(in_shape)` dims of the input.

  Multi-dimensional kernels (e.g. `[embed, heads, head_dim]`) let attention heads be sharded by
  name, and make the torch `[out, in]` layout a pure reshape + transpose away.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
               axes: Axes, use_bias: bool = True, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
    self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    if len(axes) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(f"axes {axes} do not match kernel {self.in_shape + self.out_shape}")
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(init_std), self.in_shape + self.out_shape,
                        axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, self.out_shape, axes[len(self.in_shape):],
                       param_dtype) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    x = x.astype(self.dtype)
    y = jax.lax.dot_general(
        x, self.kernel[...].astype(self.dtype),
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def fan_in_init(module: nnx.Module, key: jax.Array) -> None:
  """Redraws every `Dense` kernel under `module` from N(0, 1 / fan_in) (MaxText's convention).

  The official modules draw kernels with std 0.02 (BERT, EVA, LLaMA): about 1/sqrt(fan_in) at
  their widths (768-4096), and irrelevant once pretrained weights are loaded. Narrow models
  trained from scratch need the fan-in scale: at width 64 the post-LN Q-Formers' cross-attention
  adds ~3% to unit-scale queries, so the image reaches the video tokens with ~0.1% of their
  variance and no gradient teaches the LLM to look at the videos.
  """
  for _, m in nnx.iter_graph(module):
    if isinstance(m, Dense):
      key, sub = jax.random.split(key)
      kernel = m.kernel[...]
      std = 1.0 / math.sqrt(math.prod(m.in_shape))
      m.kernel[...] = (std * jax.random.normal(sub, kernel.shape)).astype(kernel.dtype)


def layer_norm(features: int, eps: float, *, dtype: DType, param_dtype: DType,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """torch-equivalent LayerNorm: variance as E[(x-mean)^2] (no fast variance), f32 statistics."""
  return nnx.LayerNorm(
      features, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
      scale_init=with_axes(nnx.initializers.ones, ("norm",)),
      bias_init=with_axes(nnx.initializers.zeros, ("norm",)), rngs=rngs)


def embed(num: int, features: int, axes: Axes, *, param_dtype: DType, rngs: nnx.Rngs,
          init_std: float = 0.02) -> nnx.Embed:
  return nnx.Embed(num, features, param_dtype=param_dtype,
                   embedding_init=with_axes(nnx.initializers.normal(init_std), axes), rngs=rngs)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              bias: jax.Array | None = None, dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None) -> jax.Array:
  """Softmax attention, portable across CPU/GPU/TPU.

  Args:
    q: `[B, Lq, H, Dh]`; k, v: `[B, Lk, H, Dh]`.
    key_mask: `[B, Lk]` booleans, False for keys no query may attend (padding).
    bias: optional additive logits broadcastable to `[B, H, Lq, Lk]`.
  Logits and softmax are computed in float32; attention-probability dropout as in BERT.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, dropout_key)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def scan_layers(blocks: nnx.Module, x: jax.Array, fn: Callable, *, num_layers: int,
                dropout_key: jax.Array | None, remat: bool, unroll: bool = False) -> jax.Array:
  """Runs `fn(block, x, key) -> x` over layer-stacked `blocks` with `lax.scan`.

  Scanned, one compiled block serves any depth (fast compiles for 39/32-layer stacks);
  `unroll=True` inlines every layer instead (slower compiles, whole-program scheduling, and XLA
  cost analysis that counts every layer). `remat` rematerialises each block's activations in the
  backward pass.
  """
  graphdef, state = nnx.split(blocks)
  keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

  def body(carry, inputs):
    layer_state, key = inputs
    return fn(nnx.merge(graphdef, layer_state), carry, key), None

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  x, _ = jax.lax.scan(body, x, (state, keys), unroll=num_layers if unroll else 1)
  return x


def stacked(num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """Builds `num_layers` copies of a block with a leading `layers` axis on every parameter."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> nnx.Module:
    return make(r)

  return create(rngs)
