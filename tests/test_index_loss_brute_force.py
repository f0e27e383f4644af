"""L_V equals the exact 10-way cross-entropy computed by brute force: every candidate index
string scored by its own forward pass of a tiny LLaMA, with the vocabulary restricted to what may
legally follow at each step (a first digit 1-9; after "1" a "0" or any non-digit; then only a
non-digit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.models.llama import Llama
from ivcr_jax.training import losses

DIGITS = np.arange(100, 110)  # token ids of "0".."9"
SPACE, END = 7, 50


def _sequence(prefix, n):
  return np.array([*prefix, SPACE, *[DIGITS[int(c)] for c in str(n)], END], np.int32)


def _brute_force_log_probs(model, prefix):
  """log P(n), n = 1..10, each from the forward pass of its own index string."""
  first = len(prefix) + 1  # position of the first digit
  scores = []
  for n in range(1, 11):
    probs = jax.nn.softmax(model(jnp.asarray(_sequence(prefix, n))[None])[0], axis=-1)
    p_first = probs[first - 1][DIGITS[1:]]
    score = p_first[int(str(n)[0]) - 1] / p_first.sum()
    if n in (1, 10):
      after = probs[first]  # the distribution of the token after "1"
      p_zero, p_end = after[DIGITS[0]], 1.0 - after[DIGITS].sum()
      score *= (p_zero if n == 10 else p_end) / (p_zero + p_end)
    scores.append(float(score))
  scores = np.asarray(scores)
  assert scores.sum() == pytest.approx(1.0, rel=1e-5)  # the legal strings exhaust the mass
  return np.log(scores)


def test_index_loss_equals_brute_force_over_candidate_strings(tiny_config):
  cfg = tiny_config.model
  model = Llama(cfg, lora=False, rngs=nnx.Rngs(0))
  # Sharpen the random model so that the digit distributions are far from uniform.
  model.lm_head.kernel.set_value(model.lm_head.kernel[...] * 20.0)
  prefix = np.random.default_rng(0).integers(3, 90, 12)
  want = _brute_force_log_probs(model, prefix)
  for gt in (1, 3, 7, 10):
    seq = _sequence(prefix, gt)  # teacher forcing on the ground-truth answer only
    logits = model(jnp.asarray(seq)[None])
    got = losses.index_log_prob(logits, jnp.array([[len(prefix) + 1]]), jnp.array([[gt]]),
                                jnp.asarray(DIGITS))
    np.testing.assert_allclose(float(got[0, 0]), want[gt - 1], rtol=1e-5, atol=1e-6)
  # The evaluator's ranking: one pass with the index written "1" scores all ten indices.
  logits = model(jnp.asarray(_sequence(prefix, 1))[None])
  ranked = losses.index_log_probs(logits, jnp.array([[len(prefix) + 1]]), jnp.asarray(DIGITS))
  np.testing.assert_allclose(np.asarray(ranked[0, 0]), want, rtol=1e-5, atol=1e-6)
  # Written "7", the second factor of 1 and 10 is conditioned on the wrong digit.
  logits = model(jnp.asarray(_sequence(prefix, 7))[None])
  wrong = losses.index_log_probs(logits, jnp.array([[len(prefix) + 1]]), jnp.asarray(DIGITS))
  assert not np.allclose(np.asarray(wrong[0, 0])[[0, 9]], want[[0, 9]], rtol=1e-3)
