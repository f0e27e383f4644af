"""The InterLLaVA loss L = L_M + alpha * L_V + beta * L_C, with differentiable L_V and L_C.

The official L_V and L_C are computed from argmax-decoded text and carry no gradient (reference
§3.4). Here both are read from the LM's own digit-token distributions under teacher forcing, at
the positions where the ground-truth answer writes the video index and the span's numbers:

- L_V: the exact cross-entropy of the ground-truth index over the 10 legal indices "1".."10".
  With the vocabulary restricted to what can legally follow (a first digit 1-9; after "1" either
  "0" or a terminator, i.e. any non-digit token; after any other digit only a terminator), the
  probabilities of the 10 index strings sum to one and
    P(n) = q1(n) for n = 2..9,  P(1) = q1(1) * q2(end | 1),  P(10) = q1(1) * q2(0 | 1),
  where both factors for 1 and 10 are available under teacher forcing because their first digit
  is the ground truth's.
- L_C: the predicted span's numbers are expected values of their digits (softmax restricted to
  the digit tokens) times the digits' place values; L_C = 1 - IoU of that soft span and the
  ground truth. `giou`/`diou` keep a gradient when the spans are disjoint.

Positions follow the labels: the token at sequence position p is predicted by `logits[:, p - 1]`.

Every function reads the model's final hidden states `[B, S, hidden]` and its LM head (`head`:
hidden -> logits); logits exist only where a loss needs them: the digit positions for L_V/L_C,
and `chunk` positions at a time for L_M, recomputed in the backward pass. A `[B, S, vocab]`
float32 array (1-2 GB per sample at 4096 positions and 32k tokens) is never built. With `head`
None the inputs are logits already (tests, small models).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IGNORE = -100

Head = Callable[[jax.Array], jax.Array] | None


def lm_loss(hidden: jax.Array, labels: jax.Array, head: Head = None,
            chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Causal-LM cross-entropy summed over supervised tokens, and their count.

  `labels [B, S]` are aligned with the inputs (HF convention): position t is predicted from
  position t - 1; `IGNORE` marks unsupervised positions. The logits of `chunk` positions (None:
  all) exist at a time, in float32, and are recomputed for the backward pass.
  """
  b, s = labels.shape
  targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE)
  chunk = min(chunk or s, s)
  n = -(-s // chunk)
  pad = n * chunk - s
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)

  @jax.checkpoint
  def chunk_sum(h: jax.Array, t: jax.Array) -> jax.Array:
    logits = (h if head is None else head(h)).astype(jnp.float32)
    valid = t != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))

  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  sums = jax.lax.map(lambda ht: chunk_sum(*ht), (split(hidden), split(targets)))
  return jnp.sum(sums), jnp.sum(targets != IGNORE)


def _predicting(hidden: jax.Array, positions: jax.Array, head: Head) -> jax.Array:
  """log-probabilities `[B, K, ..., V]` of the tokens at `positions [B, K, ...]` (clamped)."""
  b = hidden.shape[0]
  flat = jnp.maximum(positions - 1, 0).reshape(b, -1)
  rows = jnp.take_along_axis(hidden, flat[..., None], axis=1)
  logits = (rows if head is None else head(rows)).astype(jnp.float32)
  return jax.nn.log_softmax(logits, axis=-1).reshape(*positions.shape, logits.shape[-1])


def index_log_probs(hidden: jax.Array, first_digit_pos: jax.Array, digit_ids: jax.Array,
                    head: Head = None) -> jax.Array:
  """log P(n) for the indices n = 1..10, `[B, K, 10]`.

  The second factor of P(1) and P(10) is read at the token after the first digit, so it is the
  one conditioned on "1" only where that token is "1": for the ground truth's own probability
  that is whenever it matters (`index_log_prob`); to score all ten indices in one forward pass
  (the evaluator's ranking) the answer is teacher-forced with its index written "1".

  Args:
    hidden: `[B, S, hidden]` final hidden states (logits `[B, S, V]` when `head` is None).
    first_digit_pos: `[B, K]` position of the first digit of each retrieval answer's index.
    digit_ids: `[10]` token ids of "0".."9".
  """
  logp_first = _predicting(hidden, first_digit_pos, head)[..., digit_ids[1:]]  # digits 1..9
  q1 = jax.nn.log_softmax(logp_first, axis=-1)  # restricted to the legal first digits
  logp_second = _predicting(hidden, first_digit_pos + 1, head)  # the token after the 1st digit
  p_digits = jnp.exp(jax.nn.logsumexp(logp_second[..., digit_ids], axis=-1))
  log_zero = logp_second[..., digit_ids[0]]
  log_end = jnp.log(jnp.clip(1.0 - p_digits, 1e-30))  # any non-digit token terminates
  norm = jnp.logaddexp(log_zero, log_end)
  one, ten = q1[..., :1] + (log_end - norm)[..., None], q1[..., :1] + (log_zero - norm)[..., None]
  return jnp.concatenate([one, q1[..., 1:], ten], axis=-1)


def index_log_prob(hidden: jax.Array, first_digit_pos: jax.Array, target: jax.Array,
                   digit_ids: jax.Array, head: Head = None) -> jax.Array:
  """log P(target index) over the 10 legal indices, `[B, K]` (`target` in 1..10)."""
  all_ten = index_log_probs(hidden, first_digit_pos, digit_ids, head)
  return jnp.take_along_axis(all_ten, (target - 1)[..., None], axis=-1)[..., 0]


def index_correct(hidden: jax.Array, first_digit_pos: jax.Array, target: jax.Array,
                  digit_ids: jax.Array, head: Head = None) -> jax.Array:
  """Whether greedy decoding restricted to the legal indices gives the target, `[B, K]` bool.

  A teacher-forced R@1: the first digit is the arg max over "1".."9"; after a "1", "10" wins when
  "0" is likelier than any terminator. The second step is only known when the ground truth's
  first digit is "1", which is exactly when it matters for being right.
  """
  first_logits = _predicting(hidden, first_digit_pos, head)[..., digit_ids[1:]]
  first = jnp.argmax(first_logits, axis=-1) + 1
  logp_second = _predicting(hidden, first_digit_pos + 1, head)
  p_digits = jnp.exp(jax.nn.logsumexp(logp_second[..., digit_ids], axis=-1))
  says_ten = jnp.exp(logp_second[..., digit_ids[0]]) > 1.0 - p_digits
  right_first = first == jnp.where(target == 10, 1, target)
  right_second = jnp.where(target == 10, says_ten, jnp.where(target == 1, ~says_ten, True))
  return right_first & right_second


def index_loss(hidden, first_digit_pos, target, digit_ids, valid, head: Head = None
               ) -> tuple[jax.Array, jax.Array]:
  """L_V summed over valid retrieval answers `[B, K]`, and their count."""
  nll = -index_log_prob(hidden, first_digit_pos, target, digit_ids, head)
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def soft_numbers(hidden: jax.Array, digit_pos: jax.Array, place: jax.Array,
                 digit_ids: jax.Array, head: Head = None) -> jax.Array:
  """Expected numbers `[B, K, 2]` from digit positions and place values `[B, K, 2, D]`
  (place value 0 marks padding)."""
  probs = jax.nn.softmax(_predicting(hidden, digit_pos, head)[..., digit_ids], axis=-1)
  expected = probs @ jnp.arange(10, dtype=jnp.float32)
  return jnp.sum(jnp.where(place != 0, expected * place, 0.0), axis=-1)


def span_loss(pred: jax.Array, target: jax.Array, kind: str = "iou") -> jax.Array:
  """`1 - IoU` (or GIoU / DIoU) of 1-D spans `[..., 2]` (start, end); reversed spans are ordered."""
  start, end = jnp.minimum(pred[..., 0], pred[..., 1]), jnp.maximum(pred[..., 0], pred[..., 1])
  gs, ge = target[..., 0], target[..., 1]
  inter = jnp.maximum(jnp.minimum(end, ge) - jnp.maximum(start, gs), 0.0)
  union = (end - start) + (ge - gs) - inter
  hull = jnp.maximum(end, ge) - jnp.minimum(start, gs)
  iou = inter / jnp.maximum(union, 1e-6)
  if kind == "iou":
    return 1.0 - iou
  if kind == "giou":
    return 1.0 - (iou - (hull - union) / jnp.maximum(hull, 1e-6))
  if kind == "diou":
    centre = ((start + end) - (gs + ge)) / 2.0
    return 1.0 - (iou - centre**2 / jnp.maximum(hull, 1e-6) ** 2)
  raise ValueError(f"unknown span loss {kind!r}; choose iou, giou or diou")
