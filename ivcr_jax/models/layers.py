"""Building blocks shared by every model: parameters with logical axes, dense layers, norms,
attention (one function and mask for every stack) and dropout.

Conventions used across `ivcr_jax.models`:
- Every parameter carries its logical axis names in the `out_sharding` metadata (eager sharding
  off); `ivcr_jax.sharding` maps them to mesh axes with the rules from the config.
- Kernels are stored as `[*in_dims, *out_dims]` (torch Linear weights are `[out, in]`).
- Dropout is functional: a module takes `dropout_key=None` (deterministic, eval) or a PRNG key
  (training) and derives sub-keys with `fold_in`, so the hot path stays a pure function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ivcr_jax import sharding

Axes = tuple[str | None, ...]
DType = jnp.dtype | str

def sub_key(key: jax.Array | None, tag: int) -> jax.Array | None:
  """A sub-key of `key` for the `tag`-th consumer, or None when deterministic."""
  return None if key is None else jax.random.fold_in(key, tag)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout as in torch; identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = hashed_bits(key, x.shape) >= jnp.uint32(round(rate * 2**32))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Uniform uint32 per element: a counter hash keyed by two words drawn from `key`.

  Dropout masks only need independent-looking bits, not threefry's cryptographic strength; on
  XLA:CPU `jax.random.bernoulli` costs ~8x an elementwise pass (100 ms for a [518, 64, 256] mask
  on the 2-core machine), this 1.3x (16 ms). The counter is the element's flat index, which
  XLA's partitioner splits like any iota, so every device draws its own part of one mask. It is
  summed from per-dimension iotas in uint32, so beyond 2^32 elements it wraps instead of failing."""
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  for dim in range(len(shape)):
    stride = math.prod(shape[dim + 1:]) % 2**32
    index = index + jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), dim) * jnp.uint32(stride)
  return _mix32(_mix32(index ^ seed[0]) + seed[1])


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


def fan_in_init(module: nnx.Module, key: jax.Array, *, embedding_std: float | None = None
                ) -> None:
  """Redraws every `Dense` kernel under `module` from N(0, 1 / fan_in) (MaxText's convention),
  and with `embedding_std` every `nnx.Embed` table from N(0, embedding_std^2).

  The official modules draw kernels with std 0.02 (BERT, EVA, LLaMA): about 1/sqrt(fan_in) at
  their widths (768-4096), and irrelevant once pretrained weights are loaded. Narrow models
  trained from scratch need the fan-in scale: at width 64 the post-LN Q-Formers' cross-attention
  adds ~3% to unit-scale queries, so the image reaches the video tokens with ~0.1% of their
  variance and no gradient teaches the LLM to look at the videos.

  A LLaMA's token embeddings enter its residual stream as they are, beside blocks that write
  unit-scale outputs once their kernels are fan-in scaled: at the official 0.02 the token's
  identity is ~2% of the stream after one block. MaxText draws them with std 1; on the toy
  world's candidate lists (4 x 64 LLaMA, issue #13) that made the matching learn about twice as
  fast per step as 0.02 did.
  """
  for _, m in nnx.iter_graph(module):
    if isinstance(m, Dense):
      key, sub = jax.random.split(key)
      kernel = m.kernel[...]
      std = 1.0 / math.sqrt(math.prod(m.in_shape))
      m.kernel[...] = (std * jax.random.normal(sub, kernel.shape)).astype(kernel.dtype)
    elif isinstance(m, nnx.Embed) and embedding_std is not None:
      key, sub = jax.random.split(key)
      table = m.embedding[...]
      m.embedding[...] = (embedding_std * jax.random.normal(sub, table.shape)).astype(table.dtype)


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


ATTENTION_IMPLS = ("xla", "cudnn", "tpu_splash", "auto")
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked logit: exp underflows to 0, no inf


class Mask(NamedTuple):
  """Which keys each query sees, in a form every attention implementation can use without a
  dense `[B, Lq, S]` array. A query with no visible key (a padding row) sees every key, so that
  no implementation returns NaN there.

  causal: query `i` sees keys at slots `<= q_offset + i` (self-attention over slots).
  q_offset: the slot of the first query (KV-cache decoding); a traced value runs on `xla`.
  key_valid: `[B, S]` False for padding keys.
  key_lengths: `[B]`, a promise that `key_valid` is a prefix of this length (right padding),
    which lets fused kernels skip the padding (cuDNN sequence lengths).
  segment_ids: `[B, S]` packed-sequence ids; queries share the key slots and see their segment.
  """

  causal: bool = False
  q_offset: jax.Array | int = 0
  key_valid: jax.Array | None = None
  key_lengths: jax.Array | None = None
  segment_ids: jax.Array | None = None

  def visible(self, lq: int, s: int) -> jax.Array | None:
    """Booleans broadcastable to `[B, 1, 1, Lq, S]` (None: every key), built from iotas and
    per-key vectors, so XLA fuses them into their consumer instead of storing a mask."""
    out = None
    add = lambda m: m if out is None else out & m
    if self.causal:
      q_slot = self.q_offset + jnp.arange(lq)
      out = add((jnp.arange(s)[None, :] <= q_slot[:, None])[None, None, None])
    if self.key_valid is not None:
      out = add(self.key_valid.astype(bool)[:, None, None, None, :])
    if self.segment_ids is not None:
      seg = self.segment_ids
      out = add((seg[:, :, None] == seg[:, None, :])[:, None, None])
    return out


CAUSAL_QUERY_CHUNK = 128  # the fewest queries per block of `_causal_chunked_attention`
CAUSAL_CHUNKS = 8  # longer sequences are cut into this many blocks


def causal_query_chunk(length: int) -> int:
  """Queries per block of `_causal_chunked_attention` for a `length`-token sequence."""
  return max(CAUSAL_QUERY_CHUNK, -(-length // CAUSAL_CHUNKS))


def resolve_attention(impl: str, dtype: DType, *, dropout: bool = False, decoding: bool = False,
                      backend: str | None = None) -> str:
  """The implementation that runs: `auto` picks per backend (TPU: `tpu_splash`; GPU: `cudnn`
  for bf16/fp16; otherwise `xla`). No fused kernel has attention-probability dropout or a
  traced query offset, so those calls (Q-Former training, KV-cache decoding) run on `xla`."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
  backend = backend or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    impl = {"tpu": "tpu_splash", "gpu": "cudnn" if half else "xla"}.get(backend, "xla")
  if dropout or decoding:
    return "xla"
  if impl == "cudnn" and not half:
    raise ValueError(f"attention_impl 'cudnn' needs bfloat16/float16 compute, got {dtype} "
                     "(model.dtype; or attention_impl 'auto'/'xla')")
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None = None, *,
              impl: str = "xla", dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None) -> jax.Array:
  """Softmax attention for every stack (ViT, Q-Formers, LLaMA), one of `ATTENTION_IMPLS`.

  Args:
    q: `[B, Lq, H, Dh]`; k, v: `[B, S, KV, Dh]` with `H % KV == 0` (query head `h` reads kv
      head `h // (H / KV)`, as HF `repeat_kv`).
    mask: which keys each query sees (`Mask`; None: every key).
    impl: `xla` (portable: float32 logits and softmax), `cudnn` (`jax.nn.dot_product_attention`'s
      fused GPU kernel, sequence lengths and `is_causal` when the mask allows), `tpu_splash` (the
      Pallas splash kernel JAX ships; Pallas interpret mode off TPU, for tests), `auto`
      (`resolve_attention`).
    dropout_rate, dropout_key: attention-probability dropout as in BERT (training).
  """
  mask = Mask() if mask is None else mask
  drops = dropout_key is not None and dropout_rate > 0.0
  decoding = not isinstance(mask.q_offset, int)  # a traced offset: KV-cache decoding
  impl = resolve_attention(impl, q.dtype, dropout=drops, decoding=decoding)
  if impl == "cudnn":
    return fused_attention(q, k, v, mask, implementation="cudnn")
  if impl == "tpu_splash":
    return splash_attention(q, k, v, mask)
  if (mask.causal and not drops and not decoding and mask.q_offset == 0
      and mask.segment_ids is None and q.shape[1] == k.shape[1] > CAUSAL_QUERY_CHUNK):
    return _causal_chunked_attention(q, k, v, mask)
  return _xla_attention(q, k, v, mask, dropout_rate if drops else 0.0, dropout_key)


def _causal_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask
                              ) -> jax.Array:
  """Causal self-attention on `xla` in query chunks, each over the keys up to its end, so the
  masked upper triangle is mostly not computed. Forward + backward on XLA:CPU (4 heads of 16,
  one core, beside other jobs): 2.0x faster at 768 tokens, 2.3x at 1,024, about even at 256,
  with chunks of 96-128 queries. Longer sequences want fewer, larger chunks
  (`causal_query_chunk`): the `small` LLaMA's forward + backward at 4,096 tokens took 13.5 s in
  chunks of 128, 7.8 s of 256, 6.1 s of 512 and 7.6 s of 1,024 (2,048 tokens: 2.9, 2.2, 2.1,
  2.4 s; one core). The result equals the one-block softmax up to summation order."""
  lq = q.shape[1]
  size = causal_query_chunk(lq)
  outputs = []
  for start in range(0, lq, size):
    end = min(start + size, lq)
    chunk = Mask(causal=True, q_offset=start,
                 key_valid=None if mask.key_valid is None else mask.key_valid[:, :end])
    outputs.append(_xla_attention(q[:, start:end], k[:, :end], v[:, :end], chunk, 0.0, None))
  return jnp.concatenate(outputs, axis=1)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, dropout_rate: float,
                   dropout_key: jax.Array | None) -> jax.Array:
  """Softmax attention as plain batched matmuls, laid out for XLA:CPU (2x faster there than one
  einsum over `[B, L, H, D]`: ViT forward 936 -> 504 ms, LLaMA forward + backward 87 -> 35 ms per
  layer on the `small` shapes, 2-core machine).

  Heads lead (`[B, KV, G*Lq, D]`: a GQA group's queries share their kv head's keys, so no key is
  repeated). The softmax is normalised after the value matmul, on `[.., Lq, D]` instead of
  `[.., Lq, S]`; without dropout its denominator is that matmul's extra column of ones. The max
  carries no gradient (softmax does not depend on it), so the backward of `exp` needs no mask.
  Logits and the normalisation are float32 whatever the compute dtype; the value matmul, and
  with it the ones-column denominator, accumulates in float32 over weights cast to V's dtype.
  """
  b, lq, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = h // kv
  q = (q * d ** -0.5).reshape(b, lq, kv, g, d)
  q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * lq, d)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, S, D]
  logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
  visible = mask.visible(lq, s)
  if visible is not None:
    # An additive bias, not a select: the backward pass needs no mask, so none is stored per
    # head (a select keeps its broadcast predicate for the gradient). A row without visible keys
    # sees every key.
    bias = jnp.where(visible, 0.0, MASKED)  # broadcastable to [B, 1, 1, Lq, S]
    logits = (logits.reshape(b, kv, g, lq, s) + bias).reshape(logits.shape)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  if dropout_rate:
    total = weights.sum(-1, keepdims=True)
    dropped = dropout(weights, dropout_rate, dropout_key).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", dropped, v, preferred_element_type=jnp.float32) / total
  else:
    v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out[..., :d] / out[..., d:]
  out = out.astype(q.dtype).reshape(b, kv, g, lq, d)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, lq, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *,
                    implementation: str | None) -> jax.Array:
  """`jax.nn.dot_product_attention` (cuDNN: bf16/fp16 on GPU) with the mask as arguments the
  flash kernel takes where it can: `is_causal` and sequence lengths; a dense `[B, 1, Lq, S]`
  mask only for packed segments or arbitrary key masks without lengths."""
  lq, s = q.shape[1], k.shape[1]
  kw = dict(is_causal=mask.causal)
  dense = None
  if mask.key_lengths is not None:
    # A row without keys gets one (a padding row: its output is never read).
    lengths = jnp.maximum(mask.key_lengths, 1).astype(jnp.int32)
    kw["key_value_seq_lengths"] = lengths
    if mask.causal and lq == s:
      kw["query_seq_lengths"] = lengths
  elif mask.key_valid is not None:
    dense = mask.key_valid.astype(bool)[:, None, None, :]
  if mask.segment_ids is not None:
    seg = mask.segment_ids
    same = (seg[:, :, None] == seg[:, None, :])[:, None]
    dense = same if dense is None else dense & same
  if dense is not None:
    if mask.causal:
      dense = dense & (jnp.arange(s)[None, :] <= jnp.arange(lq)[:, None])
    dense = dense | ~dense.any(axis=-1, keepdims=True)  # no NaN on rows without keys
  return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=implementation, **kw)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """The Pallas TPU splash-attention kernel (compiled on TPU, interpreted elsewhere), per
  example (vmapped) and per device (`sharding.local` over the batch and heads axes).

  The mask becomes segment ids: sequences are padded to multiples of 128 (the kernel's lanes),
  and padding keys and the mask's invalid keys get segment id 0, which real queries never see.
  Queries are scaled here (the kernel does not), and grouped kv heads are repeated to the query
  heads.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash,
  )

  b, lq, h, d = q.shape
  s = k.shape[1]
  if mask.causal and lq != s:
    raise ValueError("tpu_splash: causal attention needs queries on the key slots")
  lq_pad, s_pad = -(-lq // 128) * 128, -(-s // 128) * 128
  valid = jnp.ones((b, s), bool) if mask.key_valid is None else mask.key_valid.astype(bool)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  if mask.causal or mask.segment_ids is not None:  # queries on the key slots
    seg = 0 if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)
    kv_seg = pad(jnp.where(valid, seg + 1, 0), s_pad)
    # A padding query sees the padding keys up to itself (a finite row, never read).
    q_seg = kv_seg
  else:  # a key mask: every query sees the valid keys, or all of them if there are none
    valid = valid | ~valid.any(axis=-1, keepdims=True)
    kv_seg = pad(valid.astype(jnp.int32), s_pad)
    q_seg = jnp.ones((b, lq_pad), jnp.int32)
  heads_first = lambda x, n: jnp.swapaxes(pad(x, n), 1, 2)  # [B, H, L, D]
  rep = h // k.shape[2]
  q_, k_, v_ = (heads_first(q * jnp.asarray(d ** -0.5, q.dtype), lq_pad),
                heads_first(jnp.repeat(k, rep, axis=2), s_pad),
                heads_first(jnp.repeat(v, rep, axis=2), s_pad))
  kernel = _splash_kernel(h, lq_pad, s_pad, mask.causal, jax.default_backend() != "tpu")

  def run(q_, k_, v_, q_seg, kv_seg):
    return jax.vmap(kernel)(q_, k_, v_, segment_ids=splash.SegmentIds(q_seg, kv_seg))

  out = sharding.local(run, (q_, k_, v_, q_seg, kv_seg),
                       (("batch", "heads"),) * 3 + (("batch",),) * 2, ("batch", "heads"))
  return jnp.swapaxes(out, 1, 2)[:, :lq].astype(q.dtype)


@functools.cache
def _splash_kernel(heads: int, lq: int, s: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_mask as splash_mask,
  )

  one = splash_mask.CausalMask((lq, s)) if causal else splash_mask.FullMask((lq, s))
  bq, bkv = (next(b for b in (512, 256, 128) if n % b == 0) for n in (lq, s))
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                             block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():  # concrete mask tables, reusable by every trace
    return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


_REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
          "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device",
                                                                            "pinned_host")}
REMAT_POLICIES = tuple(_REMAT)


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of a `remat_policy` name (None: `none`, no remat; see
  `remat`)."""
  if name not in _REMAT:
    raise ValueError(f"remat_policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
  return _REMAT[name]


def remat(fn: Callable, policy: str, **kwargs) -> Callable:
  """`fn` with its activations for the backward pass chosen by `policy`:
  - `none`: all kept (fastest, most memory);
  - `full`: only the inputs kept, everything recomputed;
  - `minimal` (MaxText's): the outputs of matmuls without batch dimensions (the projections
    and MLPs) kept, the cheap element-wise work and the attention scores recomputed;
  - `offload`: as `minimal`, with the kept matmul outputs moved to pinned host memory (backends
    with host memory spaces: GPU, TPU, and XLA:CPU).
  """
  saved = remat_policy(policy)
  return fn if saved is None else jax.checkpoint(fn, policy=saved, **kwargs)


def remat_module(fn: Callable, module: nnx.Module, policy: str) -> Callable:
  """`lambda *args: fn(module, *args)` rematerialised by `policy` (`remat`), with the module's
  state an explicit input of the checkpointed function: plain JAX, so it also works inside
  other JAX transforms (an NNX transform would update the module across trace levels)."""
  if remat_policy(policy) is None:
    return functools.partial(fn, module)
  graphdef, state = nnx.split(module)
  run = remat(lambda state, *args: fn(nnx.merge(graphdef, state), *args), policy)
  return functools.partial(run, state)


def scan_layers(blocks: nnx.Module, x: jax.Array, fn: Callable, *, num_layers: int,
                dropout_key: jax.Array | None, remat_policy: str = "none",
                unroll: bool = False) -> jax.Array:
  """Runs `fn(block, x, key) -> x` over layer-stacked `blocks` with `lax.scan`.

  Scanned, one compiled block serves any depth (fast compiles for 39/32-layer stacks);
  `unroll=True` inlines every layer instead (slower compiles, whole-program scheduling, and XLA
  cost analysis that counts every layer). Each block's activations for the backward pass follow
  `remat_policy` (`remat`).
  """
  graphdef, state = nnx.split(blocks)
  keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

  def body(carry, inputs):
    layer_state, key = inputs
    return fn(nnx.merge(graphdef, layer_state), carry, key), None

  body = remat(body, remat_policy, prevent_cse=False)
  x, _ = jax.lax.scan(body, x, (state, keys), unroll=num_layers if unroll else 1)
  return x


def stacked(num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """Builds `num_layers` copies of a block with a leading `layers` axis on every parameter."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> nnx.Module:
    return make(r)

  return create(rngs)
