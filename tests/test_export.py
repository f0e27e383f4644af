"""Export (`ivcr_jax.convert.export`): every part loads in PyTorch and equals the JAX model."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import experiment
from ivcr_jax.convert import checkpoint_chain, export, llama_hf
from ivcr_jax.convert.mapping import assign_params
from ivcr_jax.convert.sources import SafetensorsSource, TorchFileSource
from ivcr_jax.convert.vision import qformer_rules, vit_rules
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.data import toy_tokenizer
from ivcr_jax.data.pipeline import frame_slots
from ivcr_jax.models.eva_vit import CLIP_MEAN, CLIP_STD
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.models.llama import Llama
from ivcr_jax.training import checkpointing, optimizer
from ivcr_jax.training import step as step_lib
from ivcr_jax.training.checkpointing import Checkpointer
from tests.test_weights_chain import official_spec

ATOL = 1e-4
STEP = 7


def random_model(m, seed):
  """InterLLaVA with every parameter random (biases and LayerNorms too), built abstractly."""
  model = nnx.eval_shape(lambda: InterLLaVA(m, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = rng.normal(0, 0.1, var.shape) + (1.0 if path[-1] == "scale" else 0.0)
    var.set_value(jnp.asarray(value, var.dtype))
  return model


def flat(module):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run: initial weights (random, as an init checkpoint), a training checkpoint of
  other random trainable values at step 7, exported with `experiment.export`."""
  tmp = tmp_path_factory.mktemp("export")
  workdir = tmp / "run"
  tokenizer = tokenizer_lib.load_tokenizer(toy_tokenizer.build_toy_tokenizer(
      str(workdir / "toy_data" / "tokenizer")))
  config = get_config("tiny").copy_and_resolve_references()
  config.weights.init_checkpoint = str(tmp / "init")
  m = experiment.model_config(config, tokenizer)
  checkpointing.save_model(random_model(m, 0), config.weights.init_checkpoint, {})
  split = step_lib.TrainableSplit.of(random_model(m, 0), config.model.trainable)
  rng = np.random.default_rng(1)
  trained = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                         split.params)
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  tx = optimizer.make_optimizer(config.train)
  ckpt.save(STEP, {"params": trained, "opt": tx.init(trained), "step": jnp.int32(STEP)},
            force=True)
  ckpt.close()
  out = tmp / "out"
  logs = []
  step = experiment.export(config, str(workdir), str(out), log=logs.append)
  model = split.merge(trained, split.frozen)  # what the export must hold
  return SimpleNamespace(config=config, m=m, tokenizer=tokenizer, model=model, out=out,
                         step=step, logs=logs)


def hf(cls, path):
  model, info = cls.from_pretrained(path, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  return model.eval()


def close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= ATOL, f"max abs error {err:.2e}"


def test_export_writes_every_part(run):
  assert run.step == STEP
  names = {p.name for p in run.out.iterdir()}
  assert names == {"llm", "llm_base", "llm_lora", "vision", "qformer", "video_qformer",
                   "projector.safetensors", "interllava_config.json", "ivcr_official.pth",
                   "README.md"}
  assert any(f"restored step {STEP}" in line for line in run.logs)
  meta = json.loads((run.out / "interllava_config.json").read_text())
  assert meta["step"] == STEP and meta["preset"] == "tiny"
  assert meta["eps"]["ln_vision"] == 1e-5 and meta["eps"]["vit_layer_norm"] == 1e-6
  base = run.m.llm.vocab_size - len(tokenizer_lib.IVCR_TOKENS)
  assert meta["prompt"]["ivcr_tokens"] == {t: base + i for i, t in
                                           enumerate(tokenizer_lib.IVCR_TOKENS)}
  assert meta["video"] == {"window": 8, "stride": 8, "max_frame_positions": 16,
                           "attend_qformer_text": True, "num_query_tokens": 8,
                           "num_video_query_tokens": 8}
  vision = json.loads((run.out / "vision" / "config.json").read_text())
  assert vision["layer_norm_eps"] == 1e-6  # HF has one eps: the card says to set 1e-5
  card = (run.out / "README.md").read_text()
  assert "post_layernorm.eps = 1e-05" in card and "step 7" in card
  code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
  compile(code, "README.md", "exec")


def test_round_trip_every_format(run):
  """import(export(params)) == params: every parameter comes back from one of the parts."""
  m, out, want = run.m, run.out, flat(run.model)
  target = random_model(m, 5)
  vision = target.vision
  assert not assign_params(vision, vit_rules(m.vit, "hf"),
                           SafetensorsSource(out / "vision" / "model.safetensors"), strict=False)
  assert not assign_params(vision, qformer_rules(m.qformer, "hf", "", "qformer", text_input=True),
                           SafetensorsSource(out / "qformer" / "model.safetensors"), strict=False)
  unused = assign_params(vision, qformer_rules(m.video_qformer, "hf", "", "video_qformer",
                                               text_input=False),
                         SafetensorsSource(out / "video_qformer" / "model.safetensors"),
                         strict=False)
  assert unused and all(re.search(r"word_embeddings|position_embeddings|\.intermediate\.|"
                                  r"\.output\.(dense|LayerNorm)", k) for k in unused)
  assert not assign_params(target, checkpoint_chain.official_rules(m, export.PROJECTOR_GROUPS),
                           SafetensorsSource(out / "projector.safetensors"))
  llama_hf.load_hf_weights(target.llm, out / "llm_base")
  llama_hf.load_peft_adapter(target.llm, out / "llm_lora")
  got = flat(target)
  assert got.keys() == want.keys()
  for p, value in want.items():
    np.testing.assert_array_equal(got[p], value, err_msg=str(p))

  # The merged LLM holds W + (alpha/r) B A.
  merged = nnx.eval_shape(lambda: Llama(m, lora=False, rngs=nnx.Rngs(0)))
  llama_hf.load_hf_weights(merged, out / "llm")
  np.testing.assert_allclose(merged.layers.self_attn.o_proj.kernel[...],
                             run.model.llm.layers.self_attn.o_proj.merged_kernel(), atol=1e-6)

  # The official-layout checkpoint: App. B's names and shapes exactly, and the values back.
  source = TorchFileSource(out / "ivcr_official.pth", key="model")
  assert {k: source.shape(k) for k in source.keys()} == official_spec(m)
  target = random_model(m, 6)
  assert not assign_params(target, checkpoint_chain.official_rules(m), source)
  got = flat(target)
  trainable = nnx.state(run.model, step_lib.trainable_lib.trainable_filter(m.trainable))
  for p, _ in nnx.to_flat_state(trainable):
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))


def test_vision_and_qformers_equal_the_jax_model(run):
  from transformers import InstructBlipQFormerModel, InstructBlipVisionModel

  v, m = run.model.vision, run.m
  torch_vit = hf(InstructBlipVisionModel, run.out / "vision")
  torch_vit.post_layernorm.eps = 1e-5
  gen = torch.Generator().manual_seed(0)
  pixels = torch.randn(3, 3, m.vit.image_size, m.vit.image_size, generator=gen)
  with torch.no_grad():
    image = torch_vit(pixel_values=pixels).last_hidden_state
  close(v.vit(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))), image)

  torch_q = hf(InstructBlipQFormerModel, run.out / "qformer")
  ids = torch.randint(3, 500, (3, 6), generator=gen)
  mask = torch.ones(3, 6, dtype=torch.long)
  mask[1, 4:] = 0
  queries = torch.from_numpy(np.array(v.query_tokens[...])).expand(3, -1, -1)
  with torch.no_grad():
    want = torch_q(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 8, dtype=torch.long),
                                                           mask], 1),
                   query_embeds=queries, encoder_hidden_states=image).last_hidden_state
  close(v.qformer(jnp.asarray(queries.numpy()), jnp.asarray(image.numpy()),
                  text_ids=jnp.asarray(ids.numpy()), text_mask=jnp.asarray(mask.numpy() > 0)),
        want)

  torch_vq = hf(InstructBlipQFormerModel, run.out / "video_qformer")
  frames = torch.randn(2, 24, m.qformer.hidden, generator=gen)
  enc_mask = torch.ones(2, 24, dtype=torch.long)
  enc_mask[1, 13:] = 0
  vq = torch.from_numpy(np.array(v.video_query_tokens[...])).expand(2, -1, -1)
  with torch.no_grad():
    want = torch_vq(input_ids=None, query_embeds=vq, encoder_hidden_states=frames,
                    encoder_attention_mask=enc_mask).last_hidden_state
  close(v.video_qformer(jnp.asarray(vq.numpy()), jnp.asarray(frames.numpy()),
                        encoder_mask=jnp.asarray(enc_mask.numpy() > 0)), want)


def test_llm_merged_and_peft_equal_the_jax_model(run):
  from peft import PeftModel
  from transformers import AutoTokenizer, LlamaForCausalLM

  ids = np.random.default_rng(0).integers(0, run.m.llm.vocab_size, (2, 23))
  want = np.asarray(run.model.llm(jnp.asarray(ids)))
  merged = hf(LlamaForCausalLM, run.out / "llm")
  with torch.no_grad():
    close(merged(torch.as_tensor(ids)).logits, want)
    peft = PeftModel.from_pretrained(hf(LlamaForCausalLM, run.out / "llm_base"),
                                     run.out / "llm_lora").eval()
    close(peft(torch.as_tensor(ids)).logits, want)
  tok = AutoTokenizer.from_pretrained(run.out / "llm")
  assert tok.convert_tokens_to_ids("<VIDEOTOKEN>") == run.m.llm.vocab_size - 1
  assert tok.pad_token == tok.eos_token


def torch_video_tokens(parts, pixels, text_ids, text_mask, window, stride):
  """The official video branch for one video, from the exported parts (cf. README.md)."""
  vision, qformer, video_qformer, glue = parts
  t = pixels.shape[0]
  image = vision(pixel_values=pixels).last_hidden_state
  queries = glue["query_tokens"].expand(t, -1, -1)
  mask = torch.cat([torch.ones(t, queries.shape[1], dtype=text_mask.dtype), text_mask], 1)
  hidden = qformer(input_ids=text_ids, attention_mask=mask, query_embeds=queries,
                   encoder_hidden_states=image).last_hidden_state  # unsliced: [T, Q + L, D]
  hidden = hidden + glue["video_frame_position_embedding.weight"][:t, None]
  out = []
  for start in range(0, t, stride):
    clip = hidden[start:start + window].reshape(1, -1, hidden.shape[-1])
    h = video_qformer(input_ids=None, query_embeds=glue["video_query_tokens"],
                      encoder_hidden_states=clip).last_hidden_state[0]
    out.append(h @ glue["llama_proj.weight"].T + glue["llama_proj.bias"])
  return torch.cat(out)


def test_pytorch_assembly_reproduces_interllava_logits(run):
  from safetensors.torch import load_file
  from transformers import InstructBlipQFormerModel, InstructBlipVisionModel, LlamaForCausalLM

  m, out = run.m, run.out
  rng = np.random.default_rng(3)
  v_count, frames, text_len, seq = 2, m.video.max_frame_pos, 6, 48
  num_frames = np.array([frames, 11], np.int32)
  video = rng.integers(0, 256, (v_count, frames, m.vit.image_size, m.vit.image_size, 3),
                       dtype=np.uint8)
  text_ids = rng.integers(3, 900, (v_count, frames, text_len)).astype(np.int32)
  lengths = rng.integers(2, text_len + 1, (v_count, frames))
  lengths[0, 3] = text_len  # video 0's longest text fills L; video 1's valid frames are shorter
  lengths[1, :11] = np.minimum(lengths[1, :11], 4)
  text_mask = np.arange(text_len)[None, None] < lengths[..., None]
  per_video = m.video_qformer.num_query_tokens * (frames // m.video.stride)
  slot = -np.ones((1, seq), np.int32)
  slot[0, 4:4 + per_video] = np.arange(per_video)
  slot[0, 26:26 + per_video] = per_video + np.arange(per_video)
  ids = rng.integers(3, m.llm.vocab_size, (1, seq)).astype(np.int32)
  pack = lambda x: np.concatenate([x[i, :n] for i, n in enumerate(num_frames)])
  batch = {"frames": pack(video), "frame_slot": frame_slots(num_frames, v_count, frames),
           "qformer_text_ids": pack(text_ids), "qformer_text_mask": pack(text_mask),
           "input_ids": ids, "video_slot": slot, "attention_mask": np.ones((1, seq), bool)}
  want = nnx.jit(lambda model, b: model(b))(run.model, jax.tree.map(jnp.asarray, batch))

  vision = InstructBlipVisionModel.from_pretrained(out / "vision").eval()
  vision.post_layernorm.eps = 1e-5
  parts = (vision, InstructBlipQFormerModel.from_pretrained(out / "qformer").eval(),
           InstructBlipQFormerModel.from_pretrained(out / "video_qformer").eval(),
           load_file(out / "projector.safetensors"))
  llm = LlamaForCausalLM.from_pretrained(out / "llm").eval()
  pixels = (torch.from_numpy(video).float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(
      CLIP_STD)
  with torch.no_grad():
    embeds = llm.get_input_embeddings()(torch.from_numpy(ids).long())
    for i in range(v_count):
      n = int(num_frames[i])
      longest = int(lengths[i, :n].max())  # the official code pads each video's texts alone
      tokens = torch_video_tokens(
          parts, pixels[i, :n].permute(0, 3, 1, 2), torch.from_numpy(text_ids[i, :n, :longest]),
          torch.from_numpy(text_mask[i, :n, :longest]).long(), m.video.window, m.video.stride)
      embeds[0, torch.from_numpy(slot[0] // per_video == i) & torch.from_numpy(slot[0] >= 0)] = \
          tokens
    got = llm(inputs_embeds=embeds, attention_mask=torch.ones(1, seq, dtype=torch.long)).logits
  close(got, want)


def test_official_checkpoint_needs_torch(run, monkeypatch, tmp_path):
  monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None)
  messages = []
  assert not export.write_official_checkpoint(run.model, str(tmp_path / "x.pth"),
                                              messages.append)
  assert "torch is not installed: skipped" in messages[0]
  assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("module", ["ivcr_jax.export_hf", "ivcr_jax.import_weights"])
def test_entry_points_do_not_import_torch(module):
  code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=".")
