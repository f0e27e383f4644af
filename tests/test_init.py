"""Fan-in initialisation for models trained from scratch (`model.fan_in_init`)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import interllava
from ivcr_jax.data import pipeline
from ivcr_jax.models.interllava import InterLLaVA


def _model(parts):
  cfg = interllava.get_config("tiny")
  with cfg.unlocked():
    cfg.model.fan_in_init = parts
  return cfg, InterLLaVA(cfg.model, rngs=nnx.Rngs(0))


def _video_share(cfg, model) -> float:
  """Share of the video tokens' variance that depends on the video (not on the token slot)."""
  rng = np.random.default_rng(0)
  v, t = 6, 8
  tokens = 1 + (cfg.model.vit.image_size // cfg.model.vit.patch_size) ** 2
  feats = jnp.asarray(rng.normal(size=(v * t, tokens, cfg.model.vit.width)), jnp.float32)
  out, _ = model.vision(feats, jnp.asarray(pipeline.frame_slots([t] * v, v, t)))
  out = np.asarray(out, np.float64)
  between = ((out - out.mean(0, keepdims=True)) ** 2).mean()
  return between / ((out - out.mean((0, 1), keepdims=True)) ** 2).mean()


def test_fan_in_parts_get_fan_in_std_and_the_rest_keeps_0_02():
  _, model = _model(("vision",))
  fc1 = model.vision.qformer.layers[0].mlp_query.fc1
  want = 1.0 / math.sqrt(math.prod(fc1.in_shape))
  assert float(jnp.std(fc1.kernel[...])) == pytest.approx(want, rel=0.1)
  lm_head = model.llm.lm_head.kernel[...]
  assert float(jnp.std(lm_head)) == pytest.approx(0.02, rel=0.1)


def test_a_fan_in_llm_gets_unit_token_embeddings_and_the_vision_keeps_its_tables():
  """The LLM's token embeddings are redrawn at std 1 with its kernels (else the token's identity
  is ~2% of the residual stream after one fan-in block); the vision tower's embedding tables
  keep the official 0.02 either way."""
  _, model = _model(("vision", "llm"))
  assert float(jnp.std(model.llm.embed_tokens.embedding[...])) == pytest.approx(1.0, rel=0.1)
  frame_pos = model.vision.frame_position_embedding.embedding[...]
  assert float(jnp.std(frame_pos)) == pytest.approx(0.02, rel=0.2)
  _, official = _model(("vision",))
  assert float(jnp.std(official.llm.embed_tokens.embedding[...])) == pytest.approx(0.02, rel=0.1)


def test_fan_in_lets_the_video_reach_the_video_tokens_at_init():
  # With std 0.02 the post-LN Q-Formers pass almost nothing of the frames through.
  official = _video_share(*_model(()))
  fan_in = _video_share(*_model(("vision",)))
  assert official < 0.01 and fan_in > 0.05, (official, fan_in)


def test_unknown_part_is_refused():
  with pytest.raises(ValueError, match="fan_in_init"):
    _model(("vit",))
