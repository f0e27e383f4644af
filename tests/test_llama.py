"""LLaMA + LoRA parity with `transformers` `LlamaForCausalLM` and `peft` (float32, CPU), and the
attention implementations every stack shares."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models import layers, llama, trainable

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


def _policies(jaxpr):
  """The `jax.checkpoint` policies in `jaxpr` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if "policy" in eqn.params:
      yield eqn.params["policy"]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _policies(sub)


def test_unrolled_layers_and_remat_policies_match_scan():
  """Unrolled layers and every remat policy give the scanned, remat-free outputs and input
  gradients, and each policy reaches `jax.checkpoint`."""
  hf = torch_llama("gqa")
  cfg = model_config(hf)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 96, (1, 13)))
  embeds = from_torch(hf, cfg).embed(ids)
  grad_of = lambda m: jax.grad(lambda e: jnp.sum(m(inputs_embeds=e) ** 2) / 1e3)
  ref_model = from_torch(hf, cfg)
  ref, ref_grad = ref_model(ids), grad_of(ref_model)(embeds)
  for scan, policy in ((False, "full"), (True, "minimal"), (True, "offload")):
    cfg.llm.update(scan_layers=scan, remat_policy=policy)
    model = from_torch(hf, cfg)
    np.testing.assert_allclose(model(ids), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(grad_of(model)(embeds), ref_grad, atol=1e-6, rtol=1e-5)
    jaxpr = jax.make_jaxpr(lambda e, model=model: model(inputs_embeds=e))(embeds).jaxpr
    assert layers.remat_policy(policy) in _policies(jaxpr), policy
  with pytest.raises(ValueError, match="choose one of"):
    layers.remat_policy("some")


def _reference_attention(q, k, v, visible):
  """Plain attention with a dense `[B, Lq, S]` mask and kv heads repeated (HF `repeat_kv`)."""
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(visible[:, None], logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


def _attention_case(kind):
  """(q, k, v, mask, dense visibility, rows to compare) for one way of masking. Rows without a
  visible key (padding) are only required to be finite: their outputs are never read."""
  rng = np.random.default_rng(4)
  b, heads, kv, d = 2, 4, 2, 8
  lq = s = 12
  if kind == "cross":  # a Q-Former: 5 queries over 9 keys, padding keys masked, a row without
    b, lq, s, kv = 3, 5, 9, heads  # any valid key (an empty window: sees every key)
  q = jnp.asarray(rng.normal(size=(b, lq, heads, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32) for _ in range(2))
  causal = np.tril(np.ones((lq, s), bool))[None]
  if kind == "causal_lengths":  # right-padded training rows
    lengths = np.array([12, 7])
    valid = np.arange(s)[None] < lengths[:, None]
    mask = layers.Mask(causal=True, key_valid=jnp.asarray(valid), key_lengths=jnp.asarray(lengths))
    return q, k, v, mask, causal & valid[:, None], valid
  if kind == "segments":  # two packed sequences per row, then padding
    seg = np.array([[0] * 5 + [1] * 7, [0] * 8 + [1] * 2 + [2] * 2])
    valid = np.array([[True] * 12, [True] * 10 + [False] * 2])
    mask = layers.Mask(causal=True, key_valid=jnp.asarray(valid), segment_ids=jnp.asarray(seg))
    return q, k, v, mask, causal & valid[:, None] & (seg[:, :, None] == seg[:, None]), valid
  valid = np.array([[True] * 9, [True] * 4 + [False] * 5, [False] * 9])
  return (q, k, v, layers.Mask(key_valid=jnp.asarray(valid)), np.repeat(valid[:, None], lq, 1),
          np.repeat(valid.any(-1, keepdims=True), lq, 1))


@pytest.mark.parametrize("kind", ["causal_lengths", "segments", "cross"])
def test_attention_implementations_equal_the_reference(kind):
  """Every implementation of `layers.attention` on the masks the stacks use, forward and
  gradients on the real query rows: `xla`; the cuDNN path's arguments to
  `jax.nn.dot_product_attention` (is_causal, sequence lengths or a dense mask), run by its XLA
  backend on CPU; and the splash kernel in Pallas interpret mode, also under a 2-device mesh
  (per-device `shard_map`)."""
  q, k, v, mask, visible, rows = _attention_case(kind)
  want = _reference_attention(*map(np.asarray, (q, k, v)), visible)
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape) * rows[..., None, None],
                          jnp.float32)
  runs = {"xla": lambda *a: layers.attention(*a, mask),
          "cudnn_arguments": lambda *a: layers.fused_attention(*a, mask, implementation="xla"),
          "tpu_splash": lambda *a: layers.attention(*a, mask, impl="tpu_splash")}
  grads = {}
  for name, fn in runs.items():
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5, err_msg=name)
    assert np.isfinite(np.asarray(out)).all(), name  # padding rows too
    grads[name] = vjp(cotangent)
  for name, g in grads.items():
    for a, b in zip(g, grads["xla"], strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)
  if kind == "causal_lengths":
    mesh_cfg = get_config("tiny").mesh.copy_and_resolve_references()
    mesh_cfg.shape = (1, 2, 1)
    sharded = jax.jit(lambda *a: layers.attention(*a, mask, impl="tpu_splash"))  # a new trace
    with sharding.activation_sharding(sharding.make_mesh(mesh_cfg), mesh_cfg.rules):
      hlo = sharded.lower(q, k, v).as_text()
      out = sharded(q, k, v)
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5)


def test_long_causal_attention_runs_in_query_chunks():
  """Causal self-attention longer than `CAUSAL_QUERY_CHUNK` is computed chunk by chunk over the
  keys each chunk sees (fewer logits), and equals the reference, forward and gradients."""
  rng = np.random.default_rng(6)
  b, length, heads, kv, d = 2, 2 * layers.CAUSAL_QUERY_CHUNK + 44, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, length, heads, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, length, kv, d)), jnp.float32) for _ in range(2))
  lengths = np.array([length, 170])
  valid = np.arange(length)[None] < lengths[:, None]
  mask = layers.Mask(causal=True, key_valid=jnp.asarray(valid), key_lengths=jnp.asarray(lengths))
  visible = np.tril(np.ones((length, length), bool))[None] & valid[:, None]
  want = _reference_attention(*map(np.asarray, (q, k, v)), visible)
  chunked = jax.jit(lambda *a: layers.attention(*a, mask))
  whole = jax.jit(lambda *a: layers._xla_attention(*a, mask, 0.0, None))
  out, vjp = jax.vjp(chunked, q, k, v)
  np.testing.assert_allclose(np.asarray(out)[valid], want[valid], atol=2e-5)
  cotangent = jnp.asarray(rng.normal(size=q.shape) * valid[..., None, None], jnp.float32)
  for a, b_ in zip(vjp(cotangent), jax.vjp(whole, q, k, v)[1](cotangent), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5)
  logits = lambda fn: sum(int(np.prod(e.outvars[0].aval.shape)) for e in
                          jax.make_jaxpr(fn)(q, k, v).jaxpr.eqns[0].params["jaxpr"].eqns
                          if e.primitive.name == "exp")
  assert logits(chunked) < 0.7 * logits(whole)


def test_long_sequences_are_cut_into_a_bounded_number_of_chunks():
  """Up to `CAUSAL_CHUNKS` chunks of at least `CAUSAL_QUERY_CHUNK` queries: 4,096 tokens in 8
  chunks of 512, 1,024 in chunks of 128 (the sizes measured fastest on XLA:CPU)."""
  assert layers.causal_query_chunk(1024) == layers.CAUSAL_QUERY_CHUNK == 128
  assert layers.causal_query_chunk(4096) == 512 and layers.causal_query_chunk(4097) == 513
  for length in (129, 1000, 2048, 4096, 4100, 32768):
    size = layers.causal_query_chunk(length)
    assert size >= layers.CAUSAL_QUERY_CHUNK and -(-length // size) <= layers.CAUSAL_CHUNKS


def test_attention_implementation_choice():
  """`auto` per backend; dropout and KV-cache decoding on xla; cuDNN refuses float32."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  pick = layers.resolve_attention
  assert [pick("auto", bf16, backend=b) for b in ("tpu", "gpu", "cpu")] == [
      "tpu_splash", "cudnn", "xla"]
  assert pick("auto", f32, backend="gpu") == "xla"
  assert pick("cudnn", bf16, dropout=True, backend="gpu") == "xla"
  assert pick("tpu_splash", bf16, decoding=True, backend="tpu") == "xla"
  assert pick("tpu_splash", f32, backend="cpu") == "tpu_splash"  # interpret mode
  with pytest.raises(ValueError, match="bfloat16/float16"):
    pick("cudnn", f32, backend="gpu")
  with pytest.raises(ValueError, match="choose one of"):
    pick("splash", bf16)


def test_xla_attention_keeps_no_mask_per_head():
  """Over a scanned 2-layer stack, forward and backward, the xla path stores no boolean
  query-by-key array: the mask is an additive bias built from iotas and per-key vectors (a
  `jnp.where` on the logits kept its per-head predicate for the gradient)."""
  q, k, v, mask, _, _ = _attention_case("segments")

  def stack(q, k, v, valid, seg):
    m = mask._replace(key_valid=valid, segment_ids=seg)
    out, _ = jax.lax.scan(lambda x, _: (layers.attention(x, k, v, m), None), q, None, length=2)
    return out.sum()

  args = (q, k, v, mask.key_valid, mask.segment_ids)
  hlo = jax.jit(jax.grad(stack)).lower(*args).compile().as_text().split("ENTRY")[1]
  stored = [line for line in hlo.splitlines() if "= pred[" in line.split("{")[0]
            and line.split("{")[0].count(",") >= 2]
  assert not stored, stored


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


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_masks_are_uniform_independent_and_shard_alike(rate):
  """`layers.dropout` draws its masks from a counter hash (cheaper than threefry on XLA:CPU): the
  keep rate, the scaling, independence across keys, sub-keys and neighbouring elements, balanced
  bits, and the same mask whether the array is on one device or split over eight."""
  n = 1 << 20
  x = jnp.full((n // 512, 512), 3.0)
  key = jax.random.key(7)
  out = np.asarray(layers.dropout(x, rate, key))
  keep = out != 0
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(keep.mean() - (1 - rate)) < 5 * sigma
  np.testing.assert_allclose(out[keep], 3.0 / (1 - rate), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(layers.dropout(x, rate, key)), out)  # deterministic

  both = (1 - rate) ** 2
  others = [jax.random.key(8), layers.sub_key(key, 0), layers.sub_key(key, 1)]
  for other in others:
    keep2 = np.asarray(layers.dropout(x, rate, other)) != 0
    assert not np.array_equal(keep, keep2)
    assert abs((keep & keep2).mean() - both) < 5 * np.sqrt(both * (1 - both) / n)
  flat = keep.reshape(-1)
  for lag in (1, 512):  # the next element, the next row
    assert abs((flat[:-lag] & flat[lag:]).mean() - both) < 5 * np.sqrt(both * (1 - both) / n)

  bits = np.asarray(layers.hashed_bits(key, (n,)))
  ones = np.unpackbits(bits.view(np.uint8)).reshape(n, 32).mean(0)
  assert np.all(np.abs(ones - 0.5) < 5 * np.sqrt(0.25 / n)), ones

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.jit(lambda x: layers.dropout(x, rate, key), in_shardings=split,
                    out_shardings=split)(jax.device_put(x, split))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), out)
