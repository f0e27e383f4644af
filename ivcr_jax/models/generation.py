"""Autoregressive generation with a fixed-size KV cache, compiled once per shape bucket.

The prompt (token ids, or input embeddings such as text with video blocks spliced in) is padded
on the right to a bucket length, so prompts of different lengths in one bucket share a compiled
program; the cache holds `bucket + max_new_tokens` slots and decoding is one `lax.while_loop`
(no recompilation per step, early exit once every row has emitted EOS). Padding anywhere in a
prompt (left or right) is exact: positions count real tokens only and padded slots are masked,
so each row generates what it would generate alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.models.llama import KVCache, Llama

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Generation(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] int32; `pad_token_id` after a row's EOS
  lengths: jax.Array  # [B] generated tokens per row, EOS included


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket >= n (beyond the largest: the next multiple of it)."""
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return -(-n // top) * top


def top_p_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Nucleus filter as HF `TopPLogitsWarper`: keeps the most likely tokens whose cumulative
  probability reaches `top_p` (always at least one); the rest get -inf."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  keep_sorted = before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def select_token(logits: jax.Array, key: jax.Array, *, do_sample: bool,
                 temperature: jax.Array | float, top_p: jax.Array | float) -> jax.Array:
  """Greedy argmax, or a sample from `softmax(logits / temperature)` restricted to top-p."""
  if not do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = top_p_mask(logits / temperature, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, mask: jax.Array,
              key: jax.Array, temperature: jax.Array, top_p: jax.Array, eos: jax.Array,
              pad: jax.Array, *, max_new_tokens: int, do_sample: bool) -> Generation:
  model = nnx.merge(graphdef, state)
  x = model.embed(prompt) if prompt.ndim == 2 else prompt.astype(model.dtype)
  batch, length = mask.shape
  cache = KVCache.create(model.cfg, batch, length + max_new_tokens, model.dtype)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.decode(x, position_ids=positions, attention_mask=mask, cache=cache)
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  logits = model.logits(hidden[jnp.arange(batch), last]).astype(jnp.float32)
  pick = functools.partial(select_token, do_sample=do_sample, temperature=temperature,
                           top_p=top_p)
  token = pick(logits, jax.random.fold_in(key, 0))
  out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, pos, done, out, lengths = carry
    hidden, cache = model.decode(model.embed(token[:, None]), position_ids=pos[:, None],
                                 attention_mask=jnp.ones((batch, 1), bool), cache=cache)
    logits = model.logits(hidden[:, 0]).astype(jnp.float32)
    token = jnp.where(done, pad, pick(logits, jax.random.fold_in(key, i)))
    out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    return i + 1, token, cache, pos + 1, done | jnp.isin(token, eos), out, lengths

  carry = (jnp.int32(1), token, cache, mask.sum(axis=1).astype(jnp.int32), done, out, lengths)
  *_, out, lengths = jax.lax.while_loop(cond, body, carry)
  return Generation(out, lengths)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How many tokens and how they are chosen (the fields of `config.generation`): greedy, or
  with `do_sample` drawn at `temperature` from the top-`top_p` mass, from `seed`."""

  max_new_tokens: int
  do_sample: bool = False
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0

  @classmethod
  def from_config(cls, generation_cfg: Mapping) -> Sampling:
    return cls(**{f.name: generation_cfg[f.name] for f in dataclasses.fields(cls)})


def generate(model: Llama, input_ids: jax.Array | np.ndarray | None = None, *,
             inputs_embeds: jax.Array | np.ndarray | None = None,
             attention_mask: jax.Array | np.ndarray | None = None, sampling: Sampling,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             buckets: Sequence[int] = DEFAULT_BUCKETS) -> Generation:
  """Generates up to `sampling.max_new_tokens` tokens per row.

  Compiled once per (batch size, prompt bucket, `max_new_tokens`, `do_sample`, ids or embeds);
  temperature, top-p, seed and EOS/pad ids are runtime values.

  Args:
    input_ids: `[B, n]` prompt ids, or None when `inputs_embeds` `[B, n, hidden]` is given.
    attention_mask: `[B, n]`, 0 at padding (left or right); None: no padding.
    eos_token_id: id(s) that end a row; None: always `max_new_tokens` tokens.
    pad_token_id: fills a row after its EOS (default: the first EOS id, else 0).
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  prompt = input_ids if inputs_embeds is None else inputs_embeds
  # Device arrays stay on their devices (embeddings spliced on a mesh of several processes).
  xp = jnp if isinstance(prompt, jax.Array) else np
  prompt = xp.asarray(prompt, np.int32) if inputs_embeds is None else xp.asarray(prompt)
  batch, n = prompt.shape[:2]
  mask = np.ones((batch, n), bool) if attention_mask is None else np.asarray(attention_mask, bool)
  extra = bucket_length(n, buckets) - n
  prompt = xp.pad(prompt, [(0, 0), (0, extra)] + [(0, 0)] * (prompt.ndim - 2))
  mask = np.pad(mask, [(0, 0), (0, extra)])
  eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
  if pad_token_id is None:
    pad_token_id = eos[0] if eos else 0
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt), jnp.asarray(mask),
                   jax.random.key(sampling.seed), jnp.float32(sampling.temperature),
                   jnp.float32(sampling.top_p), jnp.asarray(eos or [-1], jnp.int32),
                   jnp.int32(pad_token_id), max_new_tokens=sampling.max_new_tokens,
                   do_sample=sampling.do_sample)
