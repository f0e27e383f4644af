"""Hugging Face LLaMA / PEFT import and export (`ivcr_jax.convert.llama_hf`)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import DictSource, SafetensorsSource, TorchFileSource
from ivcr_jax.data.tokenizer import IVCR_TOKENS
from ivcr_jax.models import llama
from ivcr_jax.training.checkpointing import CheckpointError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def torch_llama(seed: int = 0, **overrides):
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            attn_implementation="eager")
  return LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).eval()


def model_config(path_or_dict, vocab_size=None):
  cfg = get_config("tiny").model.copy_and_resolve_references()
  cfg.llm.update(llama_hf.llm_config_from_hf(path_or_dict))
  cfg.lora.update(rank=4, alpha=8.0, targets=TARGETS)
  if vocab_size:
    cfg.llm.vocab_size = vocab_size
  return cfg


def logits_torch(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def assert_close(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err <= 1e-5, f"max abs error {err:.2e} of the logit scale"


def randomize_lora(model, seed=0):
  """Random non-zero adapters (B starts at zero), so exports are not trivially the base."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jnp.asarray(rng.normal(0, 0.2, var.shape), var.dtype))


def flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


IDS = np.random.default_rng(0).integers(0, 96, (2, 19))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  model = torch_llama()
  model.save_pretrained(path)
  return str(path), logits_torch(model, IDS)


def test_config_from_hf_both_formats(hf_dir):
  path, _ = hf_dir
  llm = llama_hf.llm_config_from_hf(path)
  assert llm == dict(vocab_size=96, hidden=64, depth=2, heads=4, kv_heads=2, head_dim=16,
                     mlp_dim=112, rms_eps=1e-5, rope_theta=10000.0, rope_scaling_factor=2.0,
                     max_position=2048)
  legacy = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "intermediate_size": 11008, "vocab_size": 32000, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096}
  official = get_config("official").model.llm
  got = llama_hf.llm_config_from_hf(legacy)
  assert {k: official[k] for k in got if k != "vocab_size"} == {
      k: v for k, v in got.items() if k != "vocab_size"}
  with pytest.raises(CheckpointError, match="rope type 'llama3'"):
    llama_hf.llm_config_from_hf({**legacy, "rope_scaling": {"rope_type": "llama3"}})
  with pytest.raises(CheckpointError, match="tie_word_embeddings"):
    llama_hf.llm_config_from_hf({**legacy, "tie_word_embeddings": True})


def test_import_safetensors_sharded_and_torch_files(hf_dir, tmp_path):
  path, ref = hf_dir
  cfg = model_config(path)
  model = llama_hf.load_hf_llama(path, cfg, lora=False)
  assert_close(model(jnp.asarray(IDS)), ref)
  in_place = llama.Llama(cfg, lora=False, rngs=nnx.Rngs(1))  # e.g. the `llm` of InterLLaVA
  llama_hf.load_hf_weights(in_place, path)
  assert_close(in_place(jnp.asarray(IDS)), ref)

  sharded = tmp_path / "sharded"
  torch_llama().save_pretrained(sharded, max_shard_size="100KB")
  assert (sharded / "model.safetensors.index.json").exists()
  assert len(SafetensorsSource(sharded / "model.safetensors.index.json").keys()) == 21
  assert_close(llama_hf.load_hf_llama(sharded, cfg, lora=False)(jnp.asarray(IDS)), ref)

  binary = tmp_path / "bin"
  binary.mkdir()
  torch.save(torch_llama().state_dict(), binary / "pytorch_model.bin")
  (binary / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  assert isinstance(TorchFileSource(binary / "pytorch_model.bin").get("lm_head.weight"),
                    np.ndarray)
  assert_close(llama_hf.load_hf_llama(binary, cfg, lora=False)(jnp.asarray(IDS)), ref)


def test_import_adds_mean_rows_and_initialises_lora_like_construction(hf_dir):
  path, ref = hf_dir
  n = len(IVCR_TOKENS)
  model = llama_hf.load_hf_llama(path, model_config(path, vocab_size=96 + n), seed=3)
  emb = np.asarray(model.embed_tokens.embedding[...])
  assert emb.shape == (96 + n, 64)
  np.testing.assert_allclose(emb[96:], np.repeat(emb[:96].mean(0, keepdims=True), n, 0),
                             atol=1e-7)
  assert_close(np.asarray(model(jnp.asarray(IDS)))[..., :96], ref)  # B = 0: adapters are no-ops
  eager = llama.Llama(model_config(path), rngs=nnx.Rngs(3))
  loaded = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  for p, var in nnx.to_flat_state(nnx.state(eager, nnx.LoRAParam)):
    np.testing.assert_array_equal(loaded[p].get_value(), var.get_value(), err_msg=str(p))


def test_import_refuses_a_vocabulary_of_another_tokenizer(hf_dir):
  """Only the IVCR tokens may be added as mean rows: a model vocabulary of another tokenizer
  (e.g. the config's Llama-2 32005 for a toy checkpoint) is an error, not 31,000 mean rows."""
  path, _ = hf_dir
  for vocab_size in (96 + len(IVCR_TOKENS) + 1, 95, 32005):
    with pytest.raises(CheckpointError, match="only the 5 IVCR tokens"):
      llama_hf.load_hf_llama(path, model_config(path, vocab_size=vocab_size))


def test_import_places_parameters_on_a_mesh(hf_dir):
  path, ref = hf_dir
  mesh = sharding.make_mesh(get_config("tiny").mesh)
  rules = (("embed", "fsdp"), ("vocab", "fsdp"), ("lora_rank", None))
  model = llama_hf.load_hf_llama(path, model_config(path), mesh=mesh, rules=rules)
  q = model.layers.self_attn.q_proj
  assert q.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
  assert q.lora_a[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert_close(jax.jit(lambda m, x: m(x))(model, jnp.asarray(IDS)), ref)


def test_export_merged_loads_in_transformers(hf_dir, tmp_path):
  from tokenizers import Tokenizer
  from tokenizers.models import WordLevel
  from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

  path, _ = hf_dir
  model = llama_hf.load_hf_llama(path, model_config(path))
  randomize_lora(model)
  ours = np.asarray(model(jnp.asarray(IDS)))
  vocab = {f"t{i}": i for i in range(96)}
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0")
  out = tmp_path / "merged"
  llama_hf.save_hf_llama(model, out, tokenizer=tokenizer, generation={"do_sample": False})
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == "float32" and "torch_dtype" not in config
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
  assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5
  assert_close(ours, logits_torch(LlamaForCausalLM.from_pretrained(out).eval(), IDS))

  # bf16 on disk, split into shards with an index.
  out16 = tmp_path / "bf16"
  llama_hf.save_hf_llama(model, out16, dtype="bfloat16", max_shard_bytes=40_000)
  assert (out16 / "model.safetensors.index.json").exists()
  hf16 = LlamaForCausalLM.from_pretrained(out16)
  assert hf16.dtype == torch.bfloat16
  q = np.asarray(model.layers.self_attn.q_proj.merged_kernel())[1]
  np.testing.assert_array_equal(
      hf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy(),
      q.reshape(64, -1).T.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert nnx.state(model, nnx.LoRAParam)  # merging for export leaves the model as it was


def test_export_peft_adapter_loads_in_peft(hf_dir, tmp_path):
  from peft import PeftModel
  from transformers import LlamaForCausalLM

  path, _ = hf_dir
  model = llama_hf.load_hf_llama(path, model_config(path))
  randomize_lora(model)
  out = tmp_path / "adapter"
  llama_hf.save_peft_adapter(model, out, base_model_name_or_path=path)
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == sorted(
      TARGETS)
  peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), out).eval()
  assert_close(model(jnp.asarray(IDS)), logits_torch(peft_model, IDS))

  # And back: a fresh model with the adapter loaded equals the exporting one.
  fresh = llama_hf.load_hf_llama(path, model_config(path), seed=7)
  llama_hf.load_peft_adapter(fresh, out)
  for p, value in flat_params(model).items():
    np.testing.assert_array_equal(flat_params(fresh)[p], value, err_msg=str(p))


def test_peft_saved_adapter_imports(hf_dir, tmp_path):
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaForCausalLM

  path, _ = hf_dir
  peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path),
                              LoraConfig(r=4, lora_alpha=6, target_modules=list(TARGETS)))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  peft_model.save_pretrained(tmp_path / "a")
  model = llama_hf.load_hf_llama(path, model_config(path))
  llama_hf.load_peft_adapter(model, tmp_path / "a")
  assert model.layers.self_attn.v_proj.lora_scale == 6 / 4  # alpha from adapter_config.json
  assert_close(model(jnp.asarray(IDS)), logits_torch(peft_model.eval(), IDS))

  other_cfg = model_config(path)
  other_cfg.lora.targets = ("q_proj",)
  other = llama_hf.load_hf_llama(path, other_cfg)
  with pytest.raises(CheckpointError, match="target_modules"):
    llama_hf.load_peft_adapter(other, tmp_path / "a")


def test_export_import_round_trip(hf_dir, tmp_path):
  path, _ = hf_dir
  cfg = model_config(path)
  model = llama_hf.load_hf_llama(path, cfg, lora=False)
  llama_hf.save_hf_llama(model, tmp_path / "x")
  again = llama_hf.load_hf_llama(tmp_path / "x", cfg, lora=False)
  ref = flat_params(model)
  got = flat_params(again)
  assert got.keys() == ref.keys()
  for p in ref:
    np.testing.assert_array_equal(got[p], ref[p], err_msg=str(p))


def test_checkpoint_errors_name_the_key(hf_dir, tmp_path):
  path, _ = hf_dir
  cfg = model_config(path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  config = open(os.path.join(path, "config.json")).read()

  def write(name, state):
    d = tmp_path / name
    d.mkdir()
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(config)
    return d

  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj"):
    llama_hf.load_hf_llama(write("missing", missing), cfg)
  bad = dict(tensors)
  bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*"
                                            r"\(16, 64\), expected \(32, 64\)"):
    llama_hf.load_hf_llama(write("shape", bad), cfg)
  extra = {**tensors, "model.layers.2.mlp.up_proj.weight": np.zeros((112, 64), np.float32)}
  with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.2\.mlp"):
    llama_hf.load_hf_llama(write("extra", extra), cfg)
  wrong = cfg.copy_and_resolve_references()
  wrong.llm.mlp_dim = 128
  with pytest.raises(CheckpointError, match="intermediate_size=112.*llm.mlp_dim=128"):
    llama_hf.load_hf_llama(path, wrong)
  wrong.llm.update(mlp_dim=112, vocab_size=90)
  with pytest.raises(CheckpointError, match="vocab_size=96.*llm.vocab_size=90"):
    llama_hf.load_hf_llama(path, wrong)
  model = nnx.eval_shape(lambda: llama.Llama(cfg, lora=False, rngs=nnx.Rngs(0)))
  with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
    llama_hf.assign_params(model, llama_hf.llama_rules(2),
                           DictSource({**tensors, "lm_head.weight": np.zeros((95, 64))}))
