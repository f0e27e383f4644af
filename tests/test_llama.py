"""LLaMA + LoRA parity with `transformers` `LlamaForCausalLM` and `peft` (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.interllava import get_config
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models import llama, trainable

CONFIGS = {
    # MHA with linear RoPE scaling; GQA with a head_dim that is not hidden / heads.
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def torch_llama(kind: str, seed: int = 0):
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       rms_norm_eps=1e-5, max_position_embeddings=1024,
                       attn_implementation="eager", **CONFIGS[kind])
  model = LlamaForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norm scales, so a missing scale would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


def model_config(hf_model, **lora):
  cfg = get_config("tiny").model.copy_and_resolve_references()
  cfg.llm.update(llama_hf.llm_config_from_hf(hf_model.config.to_dict()))
  cfg.lora.update(lora)
  return cfg


def from_torch(hf_model, cfg, *, lora: bool = False) -> llama.Llama:
  """Our model holding the torch model's base weights (adapters, if any, at their init)."""
  make = lambda: llama.Llama(cfg, lora=lora, rngs=nnx.Rngs(0))
  model = make() if lora else nnx.eval_shape(make)
  llama_hf.assign_params(model, llama_hf.llama_rules(cfg.llm.depth),
                         DictSource(hf_model.state_dict()))
  return model


def torch_logits(hf_model, ids, mask=None, positions=None):
  t = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    return hf_model(t(ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()


def assert_close(ours, ref, valid=None):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if valid is not None:
    ours, ref = ours[valid], ref[valid]
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err <= 1e-5, f"max abs error {err:.2e} of the logit scale"


def padded(ids, lengths, left: bool):
  """Rows of `ids` cut to `lengths`, padded (with token 0) on the left or right."""
  out = np.zeros_like(ids)
  mask = np.zeros(ids.shape, np.int64)
  for b, n in enumerate(lengths):
    sl = slice(ids.shape[1] - n, None) if left else slice(0, n)
    out[b, sl], mask[b, sl] = ids[b, :n], 1
  return out, mask


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
  hf = torch_llama(request.param)
  cfg = model_config(hf)
  return hf, cfg, from_torch(hf, cfg)


@pytest.mark.parametrize("length", [9, 520])
def test_logits_match_hf(pair, length):
  hf, _, model = pair
  ids = np.random.default_rng(length).integers(0, 96, (2, length))
  assert_close(model(jnp.asarray(ids)), torch_logits(hf, ids))

  # Padding on either side with the same mask and positions as torch, compared on real tokens;
  # and each padded row equals the unpadded prompt (positions count real tokens only).
  lengths = [length, length - 4]
  alone = np.asarray(model(jnp.asarray(ids[1:, :length - 4])))[0]
  for left in (False, True):
    x, mask = padded(ids, lengths, left)
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    ours = np.asarray(model(jnp.asarray(x), attention_mask=jnp.asarray(mask),
                            position_ids=jnp.asarray(pos)))
    assert_close(ours, torch_logits(hf, x, mask, pos), valid=mask.astype(bool))
    assert_close(ours[1][mask[1].astype(bool)], alone)


def test_inputs_embeds_and_hidden(pair):
  hf, _, model = pair
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 11)))
  logits, hidden = model(ids), model.hidden_states(ids)
  np.testing.assert_array_equal(model(inputs_embeds=model.embed(ids)), logits)
  with torch.no_grad():
    ref = hf.model(torch.as_tensor(np.array(ids))).last_hidden_state.numpy()
  assert_close(hidden, ref)
  with pytest.raises(ValueError, match="exactly one"):
    model(ids, inputs_embeds=model.embed(ids))


def test_packed_segments_equal_separate_sequences(pair):
  _, _, model = pair
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, 96, 7), rng.integers(0, 96, 5)
  packed = np.concatenate([a, b])[None]
  segments = np.array([[0] * 7 + [1] * 5])
  positions = np.array([list(range(7)) + list(range(5))])
  out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segments),
                         position_ids=jnp.asarray(positions)))[0]
  assert_close(out[:7], np.asarray(model(jnp.asarray(a[None])))[0])
  assert_close(out[7:], np.asarray(model(jnp.asarray(b[None])))[0])


def test_unrolled_layers_and_remat_match_scan():
  hf = torch_llama("gqa")
  cfg = model_config(hf)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 96, (1, 13)))
  ref = from_torch(hf, cfg)(ids)
  cfg.llm.update(scan_layers=False, remat=True)
  model = from_torch(hf, cfg)
  np.testing.assert_allclose(model(ids), ref, atol=1e-6, rtol=0)
  grad = jax.grad(lambda m: m(ids).sum())(model)
  assert np.isfinite(np.asarray(grad.layers.mlp.up_proj.kernel[...])).all()


def test_fused_attention_layout_matches_plain():
  """The `cudnn` path's call of `jax.nn.dot_product_attention`, run with the XLA backend."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
  mask = llama.make_mask(jnp.arange(6), jnp.asarray([[1] * 6, [0, 0] + [1] * 4], bool))
  plain = llama.dot_product_attention(q, k, v, mask)
  fused = llama.fused_attention(q, k, v, mask, implementation="xla")
  np.testing.assert_allclose(fused[0], plain[0], atol=1e-5)
  np.testing.assert_allclose(fused[1, 2:], plain[1, 2:], atol=1e-5)
  assert np.isfinite(np.asarray(fused)).all()  # padding queries see no key: still finite
  with pytest.raises(ValueError, match="not available"):
    llama.dot_product_attention(q, k, v, mask, impl="splash")


def peft_pair(targets=("q_proj", "k_proj", "v_proj", "o_proj")):
  """A PEFT-wrapped torch model with random non-zero B, and our model holding the same adapters."""
  from peft import LoraConfig, get_peft_model

  hf = torch_llama("gqa")
  cfg = model_config(hf, rank=4, alpha=12.0, dropout=0.1, targets=targets)
  model = from_torch(hf, cfg, lora=True)
  peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1,
                                             target_modules=list(targets)))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  peft_model.eval()
  state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
  llama_hf.assign_params(model, llama_hf.lora_rules(cfg.llm.depth, targets), DictSource(state))
  return peft_model, model


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("o_proj", "gate_proj", "down_proj")])
def test_lora_matches_peft_and_merges(targets):
  peft_model, model = peft_pair(targets)
  ids = np.random.default_rng(5).integers(0, 96, (2, 17))
  with torch.no_grad():
    ref = peft_model(torch.as_tensor(ids)).logits.numpy()
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
      base_logits = base(torch.as_tensor(ids)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(ids)))
  assert_close(ours, ref)
  assert np.abs(ref - base_logits).max() > 1e-2  # the adapters change the output
  # Dropout on the adapter input only in training, reproducibly per key.
  key = jax.random.key(0)
  train = np.asarray(model(jnp.asarray(ids), dropout_key=key))
  assert np.abs(train - ours).max() > 1e-4
  np.testing.assert_array_equal(train, model(jnp.asarray(ids), dropout_key=key))
  llama.merge_lora(model)
  assert not nnx.state(model, nnx.LoRAParam)
  assert_close(model(jnp.asarray(ids)), ref)


def test_lora_init_and_trainable_selection():
  cfg = get_config("tiny").model
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  plain = nnx.eval_shape(lambda: llama.Llama(cfg, lora=False, rngs=nnx.Rngs(0)))
  assert not nnx.state(plain, nnx.LoRAParam)
  q = model.layers.self_attn.q_proj
  bound = 1 / np.sqrt(cfg.llm.hidden)
  a = np.asarray(q.lora_a[...])
  assert a.shape == (cfg.llm.depth, cfg.llm.hidden, cfg.lora.rank)
  assert 0.5 * bound < np.abs(a).max() <= bound  # PEFT's kaiming-uniform bound
  assert not np.asarray(q.lora_b[...]).any()  # B = 0: the adapter starts as a no-op
  assert q.lora_scale == cfg.lora.alpha / cfg.lora.rank
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
  _, train, frozen = trainable.split_trainable(model, ("lora",))
  names = {p[-1] for p, _ in nnx.to_flat_state(train)}
  assert names == {"lora_a", "lora_b"}
  assert len(list(nnx.to_flat_state(train))) == 2 * len(cfg.lora.targets)
  assert all(p[-1] not in names for p, _ in nnx.to_flat_state(frozen))


def test_grow_vocab_rows_are_the_mean():
  hf = torch_llama("mha")
  model = from_torch(hf, model_config(hf))
  emb, head = np.asarray(model.embed_tokens.embedding[...]), np.asarray(model.lm_head.kernel[...])
  ids = jnp.asarray([[3, 7, 11]])
  before = np.asarray(model(ids))
  llama.grow_vocab(model)
  n = len(llama.IVCR_TOKENS)
  new_emb, new_head = np.asarray(model.embed_tokens.embedding[...]), np.asarray(
      model.lm_head.kernel[...])
  assert new_emb.shape == (96 + n, 64) and new_head.shape == (64, 96 + n)
  np.testing.assert_array_equal(new_emb[:96], emb)
  np.testing.assert_allclose(new_emb[96:], np.repeat(emb.mean(0, keepdims=True), n, 0), atol=1e-7)
  np.testing.assert_allclose(new_head[:, 96:], np.repeat(head.mean(1, keepdims=True), n, 1),
                             atol=1e-7)
  after = np.asarray(model(ids))
  assert after.shape == (1, 3, 96 + n) and model.cfg.vocab_size == 96 + n
  np.testing.assert_allclose(after[..., :96], before, atol=1e-6)
  assert model.embed_tokens.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
