"""The vision tower equals the PyTorch references (`transformers` InstructBLIP) in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
    Blip2VisionConfig,
    Blip2VisionModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
)

from ivcr_jax.convert import vision as vision_tables
from ivcr_jax.convert.mapping import assign_params
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models.eva_vit import EvaViT
from ivcr_jax.models.qformer import QFormer

ATOL = 1e-5


def randomize(module: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere (HF init leaves biases and q/v biases at zero, hiding bugs)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      p.copy_(1.0 + noise if "layernorm" in name.lower() or "layer_norm" in name else noise)


def vit_pair(tiny_config, seed=0, family="instructblip"):
  cfg = tiny_config.model.vit
  config_cls, model_cls = {"instructblip": (InstructBlipVisionConfig, InstructBlipVisionModel),
                           "blip2": (Blip2VisionConfig, Blip2VisionModel)}[family]
  hf_cfg = config_cls(
      hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
      qkv_bias=True, layer_norm_eps=cfg.ln_eps, hidden_act="gelu")
  torch_vit = model_cls(hf_cfg).eval()
  torch_vit.post_layernorm.eps = cfg.ln_vision_eps  # LAVIS ln_vision uses 1e-5
  randomize(torch_vit, seed)
  vit = EvaViT(cfg, rngs=nnx.Rngs(1))
  assign_params(vit, vision_tables.vit_rules(cfg, "hf", target=""),
            DictSource(torch_vit.state_dict()))
  return torch_vit, vit


@pytest.mark.parametrize("family", ["instructblip", "blip2"])
def test_vit_matches_hf_vision_model(tiny_config, family):
  torch_vit, vit = vit_pair(tiny_config, family=family)
  size = tiny_config.model.vit.image_size
  pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = torch_vit(pixel_values=pixels).last_hidden_state.numpy()
  got = np.asarray(vit(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def qformer_pair(cfg, *, encoder_width, text_input, seed, vocab=120):
  hf_cfg = InstructBlipQFormerConfig(
      vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
      max_position_embeddings=cfg.max_position if text_input else 32,
      cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=encoder_width,
      layer_norm_eps=cfg.ln_eps, hidden_act="gelu")
  torch_q = InstructBlipQFormerModel(hf_cfg).eval()
  randomize(torch_q, seed)
  with cfg.unlocked():
    cfg.vocab_size = vocab
  ours = QFormer(cfg, encoder_width=encoder_width, text_input=text_input, rngs=nnx.Rngs(0))
  rules = vision_tables.qformer_rules(cfg, "hf", "", "", text_input=text_input)
  unused = assign_params(ours, rules, DictSource(torch_q.state_dict()), strict=False)
  return torch_q, ours, unused


@pytest.mark.parametrize("with_text", [False, True])
def test_image_qformer_matches_hf(tiny_config, with_text):
  cfg = tiny_config.model.qformer.copy_and_resolve_references()
  enc_width = tiny_config.model.vit.width + 16  # a width different from the hidden size
  torch_q, ours, _ = qformer_pair(cfg, encoder_width=enc_width, text_input=True, seed=3)
  gen = torch.Generator().manual_seed(4)
  batch, nq = 3, cfg.num_query_tokens
  queries = torch.randn(batch, nq, cfg.hidden, generator=gen)
  image = torch.randn(batch, 17, enc_width, generator=gen)
  kwargs = dict(query_embeds=queries, encoder_hidden_states=image)
  jax_kwargs = {}
  if with_text:
    ids = torch.randint(3, 120, (batch, 7), generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padded text: masked as keys, but still output (the full 32+L is kept)
    mask[2, 6:] = 0
    ids[mask == 0] = 2
    kwargs.update(input_ids=ids, attention_mask=torch.cat(
        [torch.ones(batch, nq, dtype=torch.long), mask], 1))
    jax_kwargs = dict(text_ids=jnp.asarray(ids.numpy()), text_mask=jnp.asarray(mask.numpy() > 0))
  else:
    kwargs.update(input_ids=None)
  with torch.no_grad():
    want = torch_q(**kwargs).last_hidden_state.numpy()
  got = np.asarray(ours(jnp.asarray(queries.numpy()), jnp.asarray(image.numpy()), **jax_kwargs))
  assert got.shape == want.shape == (batch, nq + (7 if with_text else 0), cfg.hidden)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_video_qformer_matches_hf(tiny_config):
  """2 layers, cross-attention in every layer, no text: the video Q-Former, with a key mask."""
  cfg = tiny_config.model.video_qformer.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.max_position = 32
  hidden = cfg.hidden
  torch_q, ours, unused = qformer_pair(cfg, encoder_width=hidden, text_input=False, seed=5)
  assert any("word_embeddings" in k for k in unused)  # HF's unused text parts are not imported
  gen = torch.Generator().manual_seed(6)
  queries = torch.randn(2, cfg.num_query_tokens, hidden, generator=gen)
  frames = torch.randn(2, 24, hidden, generator=gen)
  enc_mask = torch.ones(2, 24, dtype=torch.long)
  enc_mask[1, 15:] = 0
  with torch.no_grad():
    want = torch_q(input_ids=None, query_embeds=queries, encoder_hidden_states=frames,
                   encoder_attention_mask=enc_mask).last_hidden_state.numpy()
  got = ours(jnp.asarray(queries.numpy()), jnp.asarray(frames.numpy()),
             encoder_mask=jnp.asarray(enc_mask.numpy() > 0))
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_pos_embed_resize_matches_torch_bicubic(tiny_config):
  torch_vit, _ = vit_pair(tiny_config)
  size = tiny_config.model.vit.image_size
  new_size = size + 2 * tiny_config.model.vit.patch_size  # 4x4 grid -> 6x6 grid
  grid = new_size // tiny_config.model.vit.patch_size
  emb = torch_vit.embeddings
  tokens = torch.zeros(1, 1 + grid * grid, tiny_config.model.vit.width)
  with torch.no_grad():
    want = emb.interpolate_pos_encoding(tokens, new_size, new_size).numpy()
  from ivcr_jax.models.eva_vit import resize_pos_embed

  got = resize_pos_embed(emb.position_embedding.detach().numpy(), grid)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_vit_bf16_compute_keeps_float32_params(tiny_config):
  _, vit = vit_pair(tiny_config)
  size = tiny_config.model.vit.image_size
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  want = vit(x)
  vit_bf16 = EvaViT(tiny_config.model.vit, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  nnx.update(vit_bf16, nnx.state(vit))
  got = vit_bf16(x)
  assert got.dtype == jnp.float32  # ln_vision runs in float32
  assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(vit_bf16)))
  assert 0 < float(jnp.abs(got - want).max()) < 0.15
