"""The initial-weights chain (`ivcr_jax.convert.checkpoint_chain`) on fake official files.

The fake files are written with `torch.save` from key/shape lists typed in here from the
reference (§6.1-6.3, App. B), independently of the mapping tables under test.
"""

import numpy as np
import pytest
import torch
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import experiment, sharding
from ivcr_jax.convert import checkpoint_chain
from ivcr_jax.convert.mapping import Int8Linear
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data import toy_tokenizer
from ivcr_jax.training import checkpointing
from ivcr_jax.training.checkpointing import CheckpointError

TIMECHAT_FRAMES = 96  # TimeChat's frame positions; the official model has 64
EMPTY = dict(eva_vit="", instructblip="", llama="", timechat="", videollama="", ivcr="")


def official_spec(m) -> dict[str, tuple[int, ...]]:
  """Key -> shape of an official IVCR checkpoint's `model` entry at the dims of model config `m`
  (reference App. B; §6.2: trainable parameters only, buffers left out)."""
  d, llm = m.qformer.hidden, m.llm
  spec = {}

  def bert(prefix, q, encoder_width, text):
    p = f"{prefix}.bert."
    spec.update({p + "embeddings.LayerNorm.weight": (d,), p + "embeddings.LayerNorm.bias": (d,)})
    if text:
      spec[p + "embeddings.word_embeddings.weight"] = (q.vocab_size, d)
      spec[p + "embeddings.position_embeddings.weight"] = (q.max_position, d)
    for i in range(q.depth):
      layer = f"{p}encoder.layer.{i}."
      kinds = [("attention", d)]
      if i % q.cross_attention_freq == 0:
        kinds.append(("crossattention", encoder_width))
      for kind, width in kinds:
        a = f"{layer}{kind}."
        spec.update({a + "self.query.weight": (d, d), a + "self.key.weight": (d, width),
                     a + "self.value.weight": (d, width), a + "output.dense.weight": (d, d)})
        for name in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
          spec[f"{a}{name}.bias"] = (d,)
        spec[a + "output.LayerNorm.weight"] = (d,)
      for ffn in ("_query", "") if text else ("_query",):
        spec.update({f"{layer}intermediate{ffn}.dense.weight": (q.mlp_dim, d),
                     f"{layer}intermediate{ffn}.dense.bias": (q.mlp_dim,),
                     f"{layer}output{ffn}.dense.weight": (d, q.mlp_dim),
                     f"{layer}output{ffn}.dense.bias": (d,),
                     f"{layer}output{ffn}.LayerNorm.weight": (d,),
                     f"{layer}output{ffn}.LayerNorm.bias": (d,)})

  bert("Qformer", m.qformer, m.vit.width, True)
  bert("video_Qformer", m.video_qformer, d, False)
  spec.update({"query_tokens": (1, m.qformer.num_query_tokens, d),
               "video_query_tokens": (1, m.video_qformer.num_query_tokens, d),
               "video_frame_position_embedding.weight": (m.video.max_frame_pos, d),
               "llama_proj.weight": (llm.hidden, d), "llama_proj.bias": (llm.hidden,)})
  q_out, kv_out = llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
  sizes = {"q": (llm.hidden, q_out), "k": (llm.hidden, kv_out), "v": (llm.hidden, kv_out),
           "o": (q_out, llm.hidden)}
  for i in range(llm.depth):
    for proj, (fan_in, fan_out) in sizes.items():
      p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}_proj."
      spec[p + "lora_A.default.weight"] = (m.lora.rank, fan_in)
      spec[p + "lora_B.default.weight"] = (fan_out, m.lora.rank)
  return spec


def eva_spec(vit) -> dict[str, tuple[int, ...]]:
  """`eva_vit_g.pth`: the LAVIS ViT without prefix (reference §6.3 step 1, App. B)."""
  w, grid = vit.width, vit.image_size // vit.patch_size
  spec = {"cls_token": (1, 1, w), "pos_embed": (1, 1 + grid * grid, w),
          "patch_embed.proj.weight": (w, 3, vit.patch_size, vit.patch_size),
          "patch_embed.proj.bias": (w,)}
  for i in range(vit.depth):
    b = f"blocks.{i}."
    spec.update({b + "attn.qkv.weight": (3 * w, w), b + "attn.q_bias": (w,),
                 b + "attn.v_bias": (w,), b + "attn.proj.weight": (w, w),
                 b + "attn.proj.bias": (w,), b + "mlp.fc1.weight": (vit.mlp_dim, w),
                 b + "mlp.fc1.bias": (vit.mlp_dim,), b + "mlp.fc2.weight": (w, vit.mlp_dim),
                 b + "mlp.fc2.bias": (w,)})
    for norm in ("norm1", "norm2"):
      spec.update({f"{b}{norm}.weight": (w,), f"{b}{norm}.bias": (w,)})
  return spec


def random_state(spec: dict, seed: int) -> dict[str, torch.Tensor]:
  gen = torch.Generator().manual_seed(seed)
  return {k: torch.randn(s, generator=gen) * 0.1 for k, s in spec.items()}


def only(state: dict, prefixes: tuple[str, ...]) -> dict:
  return {k: v for k, v in state.items() if k.startswith(prefixes)}


def save(path, state, wrap=True):
  torch.save({"model": state, "epoch": 3} if wrap else state, path)
  return str(path)


def chain_config(tokenizer):
  """The tiny preset with the official 64 frame positions and the toy tokenizer's vocabulary."""
  config = get_config("tiny").copy_and_resolve_references()
  config.model.video.max_frame_pos = 64
  return config, experiment.model_config(config, tokenizer)


def base_vocab(m) -> int:
  """The toy tokenizer's vocabulary before the IVCR tokens: a LLaMA checkpoint's own."""
  return m.llm.vocab_size - len(tokenizer_lib.IVCR_TOKENS)


def llama_dir(path, m, seed=0):
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  llm = m.llm
  LlamaForCausalLM(LlamaConfig(
      vocab_size=base_vocab(m), hidden_size=llm.hidden, intermediate_size=llm.mlp_dim,
      num_hidden_layers=llm.depth, num_attention_heads=llm.heads,
      num_key_value_heads=llm.kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_eps,
      max_position_embeddings=llm.max_position)).save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenizer_lib.load_tokenizer(
      toy_tokenizer.build_toy_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
  """Fake official files in their layouts, with distinct random values per file."""
  tmp = tmp_path_factory.mktemp("weights")
  _, m = chain_config(tokenizer)
  spec = official_spec(m)
  buffers = {"Qformer.bert.embeddings.position_ids": torch.arange(m.qformer.max_position)[None],
             "video_Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}
  timechat = random_state({**spec, "video_frame_position_embedding.weight":
                           (TIMECHAT_FRAMES, m.qformer.hidden)}, 3)
  blip = {**only(random_state(spec, 2), ("Qformer.", "query_tokens")),
          **random_state({"ln_vision.weight": (m.vit.width,), "ln_vision.bias": (m.vit.width,),
                          "llm_proj.weight": (4096, m.qformer.hidden),
                          "Qformer.cls.predictions.bias": (m.qformer.vocab_size,)}, 5)}
  videollama = random_state({**spec, "llama_model.model.embed_tokens.weight": (9, 4)}, 4)
  int8 = {"llama_model.base_model.model.model.layers.0.self_attn.q_proj.SCB": torch.ones(3)}
  states = dict(eva_vit=random_state(eva_spec(m.vit), 1), instructblip=blip, timechat=timechat,
                videollama=videollama)
  paths = dict(
      eva_vit=save(tmp / "eva_vit_g.pth", states["eva_vit"], wrap=False),
      instructblip=save(tmp / "instruct_blip_vicuna7b_trimmed.pth",
                        {**blip, **only(buffers, ("Qformer",))}),
      llama=llama_dir(tmp / "llama", m),
      timechat=save(tmp / "timechat_7b.pth", {**timechat, **buffers, **int8}),
      videollama=save(tmp / "VL_LLaMA_2_7B_Finetuned.pth", {**videollama, **buffers}))
  return paths, states, spec


def flat(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def np_(t):
  return t.numpy()


def test_official_chain_order_resize_and_override(files, tokenizer, tmp_path):
  paths, s, _ = files
  config, m = chain_config(tokenizer)
  logs = []
  out = tmp_path / "init"
  model = checkpoint_chain.import_chain(m, {**EMPTY, **paths}, out, seed=0, log=logs.append)
  eva, blip, tc, vl = s["eva_vit"], s["instructblip"], s["timechat"], s["videollama"]
  vit, v, heads = model.vision.vit, model.vision, m.vit.heads
  width, hd = m.vit.width, m.vit.width // m.vit.heads
  # 1. ViT from eva_vit_g.pth (torch conv [out, in, kh, kw]; q/v biases around a zero k bias).
  np.testing.assert_array_equal(vit.patch_embed.kernel[...],
                                np_(eva["patch_embed.proj.weight"].permute(2, 3, 1, 0)))
  np.testing.assert_array_equal(vit.blocks.qkv_bias[...][1], np.stack([
      np_(eva["blocks.1.attn.q_bias"]), np.zeros(width, np.float32),
      np_(eva["blocks.1.attn.v_bias"])]).reshape(3, heads, hd))
  np.testing.assert_array_equal(vit.blocks.fc2.kernel[...][0],
                                np_(eva["blocks.0.mlp.fc2.weight"]).T)
  # 2. ln_vision from InstructBLIP (TimeChat has none); its Q-Former is overridden by TimeChat's.
  np.testing.assert_array_equal(vit.ln_vision.scale[...], np_(blip["ln_vision.weight"]))
  # 4. TimeChat: Q-Former, query tokens, projection, LoRA; 96 frame rows -> 64 (nearest).
  np.testing.assert_array_equal(v.qformer.embeddings.word.embedding[...],
                                np_(tc["Qformer.bert.embeddings.word_embeddings.weight"]))
  key = tc["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
  np.testing.assert_array_equal(v.qformer.layers[0].cross_attention.key.kernel[...],
                                np_(key).T.reshape(width, m.qformer.heads, -1))
  np.testing.assert_array_equal(v.query_tokens[...], np_(tc["query_tokens"]))
  rows = np.floor(np.arange(64) * TIMECHAT_FRAMES / 64).astype(int)
  np.testing.assert_array_equal(v.frame_position_embedding.embedding[...],
                                np_(tc["video_frame_position_embedding.weight"])[rows])
  np.testing.assert_array_equal(v.projection.kernel[...], np_(tc["llama_proj.weight"]).T)
  np.testing.assert_array_equal(v.video_query_tokens[...], np_(tc["video_query_tokens"]))
  lora = "llama_model.base_model.model.model.layers.1.self_attn."
  attn = model.llm.layers.self_attn
  np.testing.assert_array_equal(attn.v_proj.lora_a[...][1],
                                np_(tc[lora + "v_proj.lora_A.default.weight"]).T)
  np.testing.assert_array_equal(attn.o_proj.lora_a[...][1], np_(
      tc[lora + "o_proj.lora_A.default.weight"]).T.reshape(m.llm.heads, m.llm.head_dim, -1))
  np.testing.assert_array_equal(attn.q_proj.lora_b[...][1], np_(
      tc[lora + "q_proj.lora_B.default.weight"]).T.reshape(-1, m.llm.heads, m.llm.head_dim))
  # 5. Video-LLaMA overrides only the video Q-Former.
  fc1 = vl["video_Qformer.bert.encoder.layer.1.intermediate_query.dense.weight"]
  np.testing.assert_array_equal(v.video_qformer.layers[1].mlp_query.fc1.kernel[...], np_(fc1).T)
  # 3. LLaMA with the vocabulary grown by mean rows.
  from safetensors.numpy import load_file

  hf = load_file(f"{paths['llama']}/model.safetensors")["model.embed_tokens.weight"]
  emb = np.asarray(model.llm.embed_tokens.embedding[...])
  np.testing.assert_array_equal(emb[:base_vocab(m)], hf)
  np.testing.assert_allclose(emb[base_vocab(m):], np.repeat(hf.mean(0, keepdims=True), 5, 0),
                             atol=1e-7)
  text = "\n".join(logs)
  assert "initialised 0 parameters" in text
  assert ("timechat: loaded qformer, video_qformer, query_tokens, video_query_tokens, "
          "frame_position_embedding, projection, lora; skipped 3 keys") in text
  assert "Qformer.bert.embeddings.position_ids" in text and ".SCB" in text  # skipped, named
  assert "videollama: loaded video_qformer; skipped" in text
  assert "ivcr: skipped (weights.ivcr is empty)" in text

  # The checkpoint restores through experiment.build_model, abstract-first.
  config.weights.init_checkpoint = str(out)
  restored = flat(experiment.build_model(config, tokenizer))
  expected = flat(model)
  assert restored.keys() == expected.keys()
  for p, value in expected.items():
    np.testing.assert_array_equal(restored[p], value, err_msg=str(p))
  assert checkpointing.read_model_meta(out)["log"] == logs[:-1]


def test_ivcr_checkpoint_replaces_timechat_and_videollama(files, tokenizer, tmp_path):
  paths, s, spec = files
  _, m = chain_config(tokenizer)
  ivcr = random_state(spec, 9)
  weights = {**EMPTY, **paths, "ivcr": save(tmp_path / "ivcr.pth", ivcr)}
  logs = []
  model = checkpoint_chain.build_initial_model(m, weights, seed=0, log=logs.append)
  v = model.vision
  np.testing.assert_array_equal(v.frame_position_embedding.embedding[...],
                                np_(ivcr["video_frame_position_embedding.weight"]))
  fc1 = ivcr["video_Qformer.bert.encoder.layer.1.intermediate_query.dense.weight"]
  np.testing.assert_array_equal(v.video_qformer.layers[1].mlp_query.fc1.kernel[...], np_(fc1).T)
  np.testing.assert_array_equal(v.qformer.embeddings.position.embedding[...],
                                np_(ivcr["Qformer.bert.embeddings.position_embeddings.weight"]))
  text = "\n".join(logs)
  assert "timechat: skipped (replaced by the IVCR checkpoint" in text
  assert "videollama: skipped (replaced by the IVCR checkpoint" in text


def official_dump(m, seed=11) -> tuple[dict, object]:
  """What `torch.save(model.state_dict())` of the official IVCR holds, at the dims of `m`: the
  LLaMA (vocabulary already grown) as `get_peft_model` names it under `llama_model.`, the ViT
  under `visual_encoder.`, `ln_vision`, the trainable parts and the buffers (§6.1). Returns the
  state dict and the PEFT model (eval mode) it came from."""
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  llm = m.llm
  base = LlamaForCausalLM(LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.mlp_dim,
      num_hidden_layers=llm.depth, num_attention_heads=llm.heads,
      num_key_value_heads=llm.kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_eps,
      max_position_embeddings=llm.max_position, attn_implementation="eager"))
  peft_model = get_peft_model(base, LoraConfig(
      r=m.lora.rank, lora_alpha=m.lora.alpha, target_modules=list(m.lora.targets),
      init_lora_weights=False)).eval()
  llama = {f"llama_model.{k}": v.detach().clone() for k, v in peft_model.state_dict().items()}
  spec = official_spec(m)
  assert {k for k in spec if "lora_" in k} <= llama.keys()  # the reference's names are PEFT's
  state = {**random_state({k: s for k, s in spec.items() if "lora_" not in k}, seed),
           **{f"visual_encoder.{k}": v for k, v in random_state(eva_spec(m.vit), seed + 1).items()},
           **random_state({"ln_vision.weight": (m.vit.width,), "ln_vision.bias": (m.vit.width,),
                           "Qformer.cls.predictions.bias": (m.qformer.vocab_size,)}, seed + 2),
           "Qformer.bert.embeddings.position_ids": torch.arange(m.qformer.max_position)[None],
           **llama}
  return state, peft_model


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """LLM.int8 row-wise quantisation as bitsandbytes stores it: int8 rows and their absmax."""
  scb = weight.abs().amax(dim=1)
  return torch.round(weight * (127 / scb[:, None])).to(torch.int8), scb


def test_full_official_state_dict_dump_in_one_step(tokenizer, tmp_path):
  import jax.numpy as jnp

  _, m = chain_config(tokenizer)
  state, peft_model = official_dump(m)
  base = "llama_model.base_model.model.model.layers.1."
  assert base + "self_attn.q_proj.base_layer.weight" in state  # PEFT >= 0.7 names
  path = save(tmp_path / "ivcr_full.pth", state, wrap=False)
  logs = []
  model = checkpoint_chain.build_initial_model(m, {**EMPTY, "ivcr": path}, seed=0,
                                               log=logs.append)
  text = "\n".join(logs)
  assert "initialised 0 parameters" in text  # the dump alone supplies every parameter
  assert "ivcr: loaded visual_encoder, ln_vision, qformer" in text and ", llama;" in text
  llm, attn = model.llm, model.llm.layers.self_attn
  np.testing.assert_array_equal(
      attn.k_proj.kernel[...][1],
      np_(state[base + "self_attn.k_proj.base_layer.weight"]).T.reshape(m.llm.hidden, -1,
                                                                         m.llm.head_dim))
  np.testing.assert_array_equal(llm.layers.mlp.down_proj.kernel[...][1],
                                np_(state[base + "mlp.down_proj.weight"]).T)
  np.testing.assert_array_equal(llm.embed_tokens.embedding[...],
                                np_(state["llama_model.base_model.model.model.embed_tokens.weight"]))
  np.testing.assert_array_equal(model.vision.vit.blocks.fc2.kernel[...][0],
                                np_(state["visual_encoder.blocks.0.mlp.fc2.weight"]).T)
  np.testing.assert_array_equal(model.vision.vit.ln_vision.scale[...],
                                np_(state["ln_vision.weight"]))
  ids = np.random.default_rng(0).integers(0, m.llm.vocab_size, (2, 23))
  with torch.no_grad():
    ref = peft_model(torch.as_tensor(ids)).logits.numpy()
  ours = np.asarray(llm(jnp.asarray(ids)), np.float32)
  np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())

  # Before PEFT 0.7 the wrapped projections kept their plain `.weight` name.
  old = {k.replace(".base_layer.weight", ".weight"): v for k, v in state.items()}
  old_model = checkpoint_chain.build_initial_model(
      m, {**EMPTY, "ivcr": save(tmp_path / "ivcr_old_peft.pth", old, wrap=False)}, seed=0)
  np.testing.assert_array_equal(old_model.llm.layers.self_attn.k_proj.kernel[...],
                                attn.k_proj.kernel[...])

  # The official 8-bit LLaMA: int8 rows with their SCB statistics are dequantised.
  int8 = dict(state)
  q_key = base + "self_attn.q_proj.base_layer.weight"
  gate_key = base + "mlp.gate_proj.weight"
  for key in (q_key, gate_key):
    int8[key], int8[key.removesuffix("weight") + "SCB"] = int8_rows(state[key])
    int8[key.removesuffix("weight") + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
  q8 = checkpoint_chain.build_initial_model(
      m, {**EMPTY, "ivcr": save(tmp_path / "ivcr_int8.pth", int8, wrap=False)}, seed=0)
  for key, kernel in ((q_key, q8.llm.layers.self_attn.q_proj.kernel[...][1]),
                      (gate_key, q8.llm.layers.mlp.gate_proj.kernel[...][1])):
    weight, scb = int8_rows(state[key])
    dense = np_(weight.float() * scb[:, None] / 127)
    np.testing.assert_allclose(np.asarray(kernel).reshape(-1, dense.shape[0]), dense.T, rtol=1e-6)
    assert np.abs(dense - np_(state[key])).max() > 0  # the values really went through int8
  back, scb = Int8Linear(1).to_torch(np.asarray(q8.llm.layers.mlp.gate_proj.kernel[...][1]))
  np.testing.assert_array_equal(back, np_(int8[gate_key]))  # export quantises to the same rows
  np.testing.assert_allclose(scb, np_(int8[base + "mlp.gate_proj.SCB"]), rtol=1e-6)

  # A dump whose LLaMA is incomplete names the missing key.
  cut = {k: v for k, v in state.items() if k != gate_key}
  with pytest.raises(CheckpointError, match=r"ivcr_cut\.pth \(ivcr\): missing keys: "
                                            + gate_key.replace(".", r"\.")):
    checkpoint_chain.build_initial_model(
        m, {**EMPTY, "ivcr": save(tmp_path / "ivcr_cut.pth", cut, wrap=False)}, seed=0)


def test_hf_directories_for_the_vit_and_instructblip(files, tokenizer, tmp_path):
  from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
  )

  paths, s, _ = files
  _, m = chain_config(tokenizer)
  vit, q = m.vit, m.qformer
  hf = InstructBlipForConditionalGeneration(InstructBlipConfig(
      vision_config=InstructBlipVisionConfig(
          hidden_size=vit.width, intermediate_size=vit.mlp_dim, num_hidden_layers=vit.depth,
          num_attention_heads=vit.heads, image_size=vit.image_size, patch_size=vit.patch_size),
      qformer_config=InstructBlipQFormerConfig(
          vocab_size=q.vocab_size, hidden_size=q.hidden, num_hidden_layers=q.depth,
          num_attention_heads=q.heads, intermediate_size=q.mlp_dim,
          max_position_embeddings=q.max_position, encoder_hidden_size=vit.width),
      text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2),
      num_query_tokens=q.num_query_tokens))
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0, 0.1)
  hf.save_pretrained(tmp_path / "instructblip")
  hf.vision_model.save_pretrained(tmp_path / "vision")
  weights = {**EMPTY, "eva_vit": str(tmp_path / "vision"),
             "instructblip": str(tmp_path / "instructblip"), "llama": paths["llama"],
             "timechat": paths["timechat"]}
  logs = []
  model = checkpoint_chain.build_initial_model(m, weights, seed=0, log=logs.append)
  sd = {k: np_(t.detach()) for k, t in hf.state_dict().items()}
  vision = model.vision
  np.testing.assert_array_equal(vision.vit.blocks.fc1.kernel[...][1],
                                sd["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(vision.vit.ln_vision.bias[...],
                                sd["vision_model.post_layernorm.bias"])
  text = "\n".join(logs)
  assert "eva_vit: loaded visual_encoder, ln_vision" in text
  assert "instructblip: loaded visual_encoder, ln_vision, qformer, query_tokens" in text
  assert "language_model." in text  # InstructBLIP's own LLM is skipped by name


def test_absent_steps_are_skipped_and_initialised(files, tokenizer):
  paths, s, _ = files
  _, m = chain_config(tokenizer)
  logs = []
  model = checkpoint_chain.build_initial_model(
      m, {**EMPTY, "llama": paths["llama"], "timechat": paths["timechat"]}, seed=0,
      log=logs.append)
  text = "\n".join(logs)
  for step in ("eva_vit", "instructblip", "videollama", "ivcr"):
    assert f"{step}: skipped (weights.{step} is empty)" in text
  n_vit = len(nnx.to_flat_state(nnx.state(model.vision.vit)))
  assert f"initialised {n_vit} parameters" in text
  assert all(np.isfinite(a).all() for a in flat(model.vision.vit).values())
  np.testing.assert_array_equal(model.vision.query_tokens[...],
                                np_(s["timechat"]["query_tokens"]))


def test_bad_files_fail_naming_the_file_or_key(files, tokenizer, tmp_path):
  paths, s, spec = files
  _, m = chain_config(tokenizer)
  tc = s["timechat"]

  def chain(**weights):
    return checkpoint_chain.build_initial_model(m, {**EMPTY, **weights}, seed=0, log=print)

  good = open(paths["timechat"], "rb").read()
  (tmp_path / "truncated.pth").write_bytes(good[:len(good) // 2])
  with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot read the checkpoint"):
    chain(timechat=str(tmp_path / "truncated.pth"))
  wrong = {**tc, "video_query_tokens": torch.zeros(1, 5, m.qformer.hidden)}
  with pytest.raises(CheckpointError, match=r"wrong\.pth \(timechat\): key 'video_query_tokens' "
                                            r"has shape \(1, 5, 64\), expected \(1, 8, 64\)"):
    chain(llama=paths["llama"], timechat=save(tmp_path / "wrong.pth", wrong))
  missing = {k: v for k, v in tc.items() if k != "llama_proj.bias"}
  with pytest.raises(CheckpointError,
                     match=r"missing\.pth \(timechat\): missing keys: llama_proj\.bias"):
    chain(llama=paths["llama"], timechat=save(tmp_path / "missing.pth", missing))
  extra = {**tc, "video_Qformer.bert.encoder.layer.2.attention.self.query.weight": torch.ones(1)}
  with pytest.raises(CheckpointError, match=r"extra\.pth \(timechat\): unexpected keys: "
                                            r"video_Qformer\.bert\.encoder\.layer\.2"):
    chain(timechat=save(tmp_path / "extra.pth", extra))
  with pytest.raises(CheckpointError, match=r"flat\.pth: cannot read.*no 'model' entry"):
    chain(timechat=save(tmp_path / "flat.pth", tc, wrap=False))
  with pytest.raises(FileNotFoundError, match=r"weights\.videollama = .*nowhere\.pth"):
    chain(videollama=str(tmp_path / "nowhere.pth"))
  # A checkpoint imported for other dimensions names the parameters that differ.
  model = checkpoint_chain.build_initial_model(
      m, {**EMPTY, "llama": paths["llama"], "timechat": paths["timechat"],
          "eva_vit": paths["eva_vit"], "instructblip": paths["instructblip"]}, seed=0)
  checkpointing.save_model(model, tmp_path / "init", {})
  other = m.copy_and_resolve_references()
  other.video.max_frame_pos = 32
  from ivcr_jax.models.interllava import InterLLaVA

  with pytest.raises(CheckpointError, match=r"frame_position_embedding/embedding: stored "
                                            r"\(64, 64\), model \(32, 64\)"):
    checkpointing.restore_model(tmp_path / "init",
                                          lambda: InterLLaVA(other, rngs=nnx.Rngs(0)),
                                          sharding.make_mesh(get_config("tiny").mesh),
                                          get_config("tiny").mesh.rules)
