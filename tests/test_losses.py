"""The differentiable L_V / L_C terms and the LM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ivcr_jax.training import losses

VOCAB = 40
DIGITS = jnp.arange(20, 30)  # token ids of "0".."9" in this synthetic vocabulary


def test_lm_loss_matches_torch_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 7, VOCAB)).astype(np.float32)
  labels = rng.integers(0, VOCAB, (2, 7))
  labels[:, :3] = losses.IGNORE
  labels[1, 5] = losses.IGNORE
  total, count = losses.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
  want = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, VOCAB),
                                           torch.tensor(labels[:, 1:]).reshape(-1))
  assert int(count) == 7
  np.testing.assert_allclose(float(total / count), float(want), rtol=1e-6)


def _full_logits_lm_loss(logits, labels):
  """L_M as it was computed before chunking: one float32 log_softmax over `[B, S, vocab]`."""
  targets = labels[:, 1:]
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  valid = targets != losses.IGNORE
  picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0))


@pytest.mark.parametrize("chunk", [3, 4, None])  # 3 does not divide the 13 positions
def test_logits_only_where_needed_equal_the_full_logits_path(chunk):
  """L_M chunk by chunk, and L_V/L_C from hidden states gathered at their positions, give the
  loss and gradients (hidden states and head) of logits computed everywhere."""
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, VOCAB)), jnp.float32)
  labels = rng.integers(0, VOCAB, (2, 13))
  labels[:, :4] = losses.IGNORE
  labels[0, 9:] = losses.IGNORE
  labels = jnp.asarray(labels)
  index = (jnp.array([[5], [7]]), jnp.array([[1], [10]]), jnp.ones((2, 1), bool))
  span = (jnp.array([[[[8, 9], [10, 11]]]] * 2), jnp.array([[[[1.0, 0.1], [1.0, 0.1]]]] * 2))

  def total(hidden, kernel, gathered):
    head = lambda h: h @ kernel
    if gathered:
      lm, _ = losses.lm_loss(hidden, labels, head, chunk)
      kw = dict(head=head)
    else:
      hidden = head(hidden)
      lm, kw = _full_logits_lm_loss(hidden, labels), {}
    lv, _ = losses.index_loss(hidden, *index[:2], DIGITS, index[2], **kw)
    soft = losses.soft_numbers(hidden, *span, DIGITS, **kw)
    lc = losses.span_loss(soft, jnp.array([[[3.0, 6.0]]] * 2), "giou").sum()
    return lm + lv + lc

  want, want_grads = jax.value_and_grad(total, argnums=(0, 1))(hidden, kernel, False)
  got, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)), static_argnums=2)(
      hidden, kernel, True)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_index_distribution_is_the_restricted_chain_and_sums_to_one():
  logits = jax.random.normal(jax.random.key(0), (1, 6, VOCAB)) * 2
  pos = jnp.array([[3]])  # first index digit at position 3: predicted by logits[2]
  logp = jnp.stack([losses.index_log_prob(logits, pos, jnp.array([[n]]), DIGITS)[0, 0]
                    for n in range(1, 11)])
  np.testing.assert_allclose(float(jnp.exp(logp).sum()), 1.0, rtol=1e-5)
  # Brute force for "3" and "10" from the raw distributions.
  p_first = jax.nn.softmax(logits[0, 2])[DIGITS[1:]]
  q1 = p_first / p_first.sum()
  p_next = jax.nn.softmax(logits[0, 3])
  p_end = 1.0 - p_next[DIGITS].sum()
  np.testing.assert_allclose(float(jnp.exp(logp[2])), float(q1[2]), rtol=1e-5)
  np.testing.assert_allclose(float(jnp.exp(logp[9])),
                             float(q1[0] * p_next[DIGITS[0]] / (p_next[DIGITS[0]] + p_end)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(jnp.exp(logp[0])),
                             float(q1[0] * p_end / (p_next[DIGITS[0]] + p_end)), rtol=1e-5)


def _span_logits(digits_start, digits_end, confidence):
  """Logits over a sequence spelling two numbers, each digit with `confidence` on the truth."""
  seq = len(digits_start) + len(digits_end) + 4
  logits = np.zeros((1, seq, VOCAB), np.float32)
  positions = []
  pos = 1
  for number in (digits_start, digits_end):
    ps = []
    for d in number:
      logits[0, pos - 1, int(DIGITS[d])] = confidence
      ps.append(pos)
      pos += 1
    positions.append(ps)
    pos += 1
  return jnp.asarray(logits), positions


@pytest.mark.parametrize("seed", range(6))
def test_index_correct_is_greedy_restricted_decoding(seed):
  logits = jax.random.normal(jax.random.key(seed), (1, 6, VOCAB)) * 3
  pos = jnp.array([[3]])
  first = int(jnp.argmax(logits[0, 2, DIGITS[1:]])) + 1
  p_next = jax.nn.softmax(logits[0, 3])
  ten = float(p_next[DIGITS[0]]) > 1.0 - float(p_next[DIGITS].sum())
  greedy = 10 if first == 1 and ten else first
  right = [bool(losses.index_correct(logits, pos, jnp.array([[n]]), DIGITS)[0, 0])
           for n in range(1, 11)]
  assert right == [n == greedy for n in range(1, 11)]


def test_span_loss_is_zero_when_digits_are_certain_and_right():
  # "12.5s-20.0s": digits 1,2,5 with place values 10,1,0.1; 2,0,0 likewise.
  logits, (ps, pe) = _span_logits([1, 2, 5], [2, 0, 0], confidence=60.0)
  digit_pos = jnp.array([[[ps, pe]]])
  place = jnp.array([[[[10, 1, 0.1], [10, 1, 0.1]]]])
  target = jnp.array([[[12.5, 20.0]]])
  value = losses.soft_numbers(logits, digit_pos, place, DIGITS)
  np.testing.assert_allclose(np.asarray(value), [[[12.5, 20.0]]], atol=1e-4)
  assert float(losses.span_loss(value, target)[0, 0]) < 1e-4


@pytest.mark.parametrize("kind", ["iou", "giou", "diou"])
def test_span_loss_falls_as_overlap_grows_and_has_gradients(kind):
  target = jnp.array([10.0, 20.0])
  values = [float(losses.span_loss(jnp.array([s, s + 10.0]), target, kind))
            for s in (30.0, 16.0, 13.0, 10.0)]
  assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(0.0, abs=1e-6)
  grad = jax.grad(lambda p: losses.span_loss(p, target, kind))(jnp.array([12.0, 25.0]))
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
  disjoint = jax.grad(lambda p: losses.span_loss(p, target, kind))(jnp.array([30.0, 40.0]))
  assert (float(jnp.abs(disjoint).sum()) > 0) == (kind != "iou")


def test_aux_losses_have_gradients_through_the_logits():
  logits = jax.random.normal(jax.random.key(1), (1, 12, VOCAB))

  def aux(logits):
    lv, _ = losses.index_loss(logits, jnp.array([[2]]), jnp.array([[7]]), DIGITS,
                              jnp.array([[True]]))
    soft = losses.soft_numbers(logits, jnp.array([[[[5, 6], [8, 9]]]]),
                               jnp.array([[[[1.0, 0.1], [1.0, 0.1]]]]), DIGITS)
    lc = losses.span_loss(soft, jnp.array([[[3.0, 6.0]]]), "giou")[0, 0]
    return 0.01 * lv + 0.01 * lc

  g = jax.grad(aux)(logits)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
