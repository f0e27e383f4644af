"""KV-cache generation (`ivcr_jax.models.generation`) against `transformers` `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.interllava import get_config
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models import generation, llama
from ivcr_jax.models.generation import Sampling

VOCAB = 96


@pytest.fixture(scope="module")
def pair():
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rms_norm_eps=1e-5, attn_implementation="eager",
                       rope_parameters={"rope_type": "linear", "factor": 2.0,
                                        "rope_theta": 10000.0})
  hf = LlamaForCausalLM(config).eval()
  hf.generation_config.update(eos_token_id=None, pad_token_id=0, top_k=None)
  cfg = get_config("tiny").model.copy_and_resolve_references()
  cfg.llm.update(llama_hf.llm_config_from_hf(config.to_dict()))
  model = nnx.eval_shape(lambda: llama.Llama(cfg, lora=False, rngs=nnx.Rngs(0)))
  llama_hf.assign_params(model, llama_hf.llama_rules(2), DictSource(hf.state_dict()))
  return hf, model


def left_padded(lengths, seed=0):
  rng = np.random.default_rng(seed)
  n = max(lengths)
  ids = np.zeros((len(lengths), n), np.int64)
  mask = np.zeros_like(ids)
  for b, k in enumerate(lengths):
    ids[b, n - k:], mask[b, n - k:] = rng.integers(3, VOCAB, k), 1
  return ids, mask


def right_padded(ids, mask):
  out, out_mask = np.zeros_like(ids), np.zeros_like(mask)
  for b in range(len(ids)):
    row = ids[b][mask[b].astype(bool)]
    out[b, :len(row)], out_mask[b, :len(row)] = row, 1
  return out, out_mask


def test_greedy_equals_transformers_generate(pair):
  hf, model = pair
  ids, mask = left_padded([12, 7, 3])
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      max_new_tokens=32, do_sample=False)[:, ids.shape[1]:].numpy()
  out = generation.generate(model, ids, attention_mask=mask, sampling=Sampling(32))
  np.testing.assert_array_equal(out.tokens, ref)
  np.testing.assert_array_equal(out.lengths, [32] * 3)

  # Right padding and each row alone give the same tokens.
  right_ids, right_mask = right_padded(ids, mask)
  right = generation.generate(model, right_ids, attention_mask=right_mask, sampling=Sampling(32))
  np.testing.assert_array_equal(right.tokens, ref)
  alone = generation.generate(model, ids[2:, -3:], sampling=Sampling(32))
  np.testing.assert_array_equal(alone.tokens[0], ref[2])


def test_inputs_embeds_equal_ids(pair):
  _, model = pair
  ids, mask = left_padded([9, 5], seed=1)
  from_ids = generation.generate(model, ids, attention_mask=mask, sampling=Sampling(16))
  embeds = model.embed(jnp.asarray(ids))
  from_embeds = generation.generate(model, inputs_embeds=embeds, attention_mask=mask,
                                    sampling=Sampling(16))
  np.testing.assert_array_equal(from_embeds.tokens, from_ids.tokens)


def test_eos_stops_each_row_and_pads(pair):
  _, model = pair
  ids, mask = left_padded([8, 6], seed=2)
  free = np.asarray(generation.generate(model, ids, attention_mask=mask,
                                        sampling=Sampling(20)).tokens)
  eos = int(free[0, 4])
  first = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in free]
  out = generation.generate(model, ids, attention_mask=mask, sampling=Sampling(20),
                            eos_token_id=[eos, VOCAB + 1], pad_token_id=1)
  for b, stop in enumerate(first):
    n = 20 if stop is None else stop + 1
    assert int(out.lengths[b]) == n
    np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
    assert (np.asarray(out.tokens[b, n:]) == 1).all()


def test_sampling_is_seeded_and_honours_top_p(pair):
  _, model = pair
  ids, mask = left_padded([6, 4], seed=3)

  def sampled(**kw):
    sampling = Sampling(max_new_tokens=24, do_sample=True, temperature=1.5, **kw)
    return generation.generate(model, ids, attention_mask=mask, sampling=sampling).tokens

  a = sampled(seed=1)
  np.testing.assert_array_equal(a, sampled(seed=1))
  assert (np.asarray(a) != np.asarray(sampled(seed=2))).any()
  greedy = generation.generate(model, ids, attention_mask=mask, sampling=Sampling(24)).tokens
  assert (np.asarray(a) != np.asarray(greedy)).any()
  nucleus = sampled(seed=1, top_p=1e-6)
  np.testing.assert_array_equal(nucleus, greedy)


def test_top_p_mask_equals_transformers_warper():
  from transformers.generation.logits_process import TopPLogitsWarper

  logits = np.random.default_rng(4).normal(size=(3, 50)).astype(np.float32) * 3
  for top_p in (0.3, 0.8, 0.95):
    ref = TopPLogitsWarper(top_p)(None, torch.as_tensor(logits)).numpy()
    ours = np.asarray(generation.top_p_mask(jnp.asarray(logits), top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_array_equal(ours[kept], logits[kept])


def test_one_compilation_per_bucket(pair):
  _, model = pair
  assert generation.bucket_length(5) == 16 and generation.bucket_length(16) == 16
  assert generation.bucket_length(17) == 32 and generation.bucket_length(9000) == 12288
  ids = np.random.default_rng(5).integers(3, VOCAB, (2, 14))
  generation.generate(model, ids[:, :5], sampling=Sampling(8))
  before = generation._generate._cache_size()
  for n in (6, 11, 14):
    generation.generate(model, ids[:, :n], sampling=Sampling(8))
  assert generation._generate._cache_size() == before


def test_generation_with_lora_equals_merged():
  cfg = get_config("tiny").model
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(6)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jnp.asarray(rng.normal(0, 0.5, var.shape), var.dtype))
  ids = rng.integers(0, cfg.llm.vocab_size, (1, 7))
  with_adapters = generation.generate(model, ids, sampling=Sampling(12)).tokens
  llama.merge_lora(model)
  np.testing.assert_array_equal(generation.generate(model, ids, sampling=Sampling(12)).tokens,
                                with_adapters)
  assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) == []
