"""Mapping tables of the video branch: round trips, official layout, resizing, clear errors."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.convert import vision as tables
from ivcr_jax.convert.mapping import HostParams, assign_params, export_params
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models.vision_tower import VisionTower
from ivcr_jax.training.checkpointing import CheckpointError


def _exported(cfg, seed):
  tower = VisionTower(cfg.model, rngs=nnx.Rngs(seed))
  rules = tables.vision_tower_rules(cfg.model)
  return tower, rules, dict(export_params(rules, dict(HostParams(tower))))


def test_lavis_round_trip_is_exact_and_covers_every_parameter(tiny_config):
  tower, rules, state_dict = _exported(tiny_config, seed=0)
  fresh = VisionTower(tiny_config.model, rngs=nnx.Rngs(1))
  unused = assign_params(fresh, rules, DictSource(state_dict), strict=False)
  assert unused == []
  want, got = dict(HostParams(tower)), dict(HostParams(fresh))
  assert want.keys() == got.keys()  # every parameter has a rule
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_official_key_names_and_shapes(tiny_config):
  """App. B at tiny dims: torch layout [out, in], q/v-only bias, Q-Former text parts."""
  m = tiny_config.model
  _, _, sd = _exported(tiny_config, seed=0)
  w, hq, d_llm = m.vit.width, m.qformer.hidden, m.llm.hidden
  p = m.vit.patch_size
  assert sd["visual_encoder.patch_embed.proj.weight"].shape == (w, 3, p, p)
  assert sd["visual_encoder.blocks.0.attn.qkv.weight"].shape == (3 * w, w)
  assert sd["visual_encoder.blocks.1.attn.q_bias"].shape == (w,)
  assert "visual_encoder.blocks.0.attn.k_bias" not in sd
  assert sd["ln_vision.weight"].shape == (w,)
  assert sd["query_tokens"].shape == (1, m.qformer.num_query_tokens, hq)
  assert sd["Qformer.bert.embeddings.word_embeddings.weight"].shape == (m.qformer.vocab_size, hq)
  assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (hq, w)
  assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in sd  # freq 2
  assert sd["Qformer.bert.encoder.layer.1.output_query.dense.weight"].shape == (
      hq, m.qformer.mlp_dim)
  assert sd["video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape == (hq, hq)
  assert not any(k.startswith("video_Qformer.bert.embeddings.word") for k in sd)
  text_ffn = re.compile(r"video_Qformer.*layer\.\d+\.(intermediate|output)\.dense")
  assert not any(text_ffn.match(k) for k in sd)
  assert sd["video_frame_position_embedding.weight"].shape == (m.video.max_frame_pos, hq)
  assert sd["llama_proj.weight"].shape == (d_llm, hq)


def test_frame_position_embedding_96_to_64_nearest(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.video.max_frame_pos = 64
  tower, rules, sd = _exported(cfg, seed=0)
  timechat_rows = np.arange(96 * cfg.model.qformer.hidden, dtype=np.float32).reshape(96, -1)
  sd["video_frame_position_embedding.weight"] = timechat_rows
  assign_params(tower, rules, DictSource(sd), strict=False)
  got = np.asarray(tower.frame_position_embedding.embedding[...])
  assert got.shape == (64, cfg.model.qformer.hidden)
  np.testing.assert_array_equal(got, timechat_rows[[int(1.5 * i) for i in range(64)]])
  assert [int(r[0]) // cfg.model.qformer.hidden for r in got[:7]] == [0, 1, 3, 4, 6, 7, 9]


def test_hf_qkv_bias_round_trip(tiny_config):
  vit_cfg = tiny_config.model.vit
  tower = VisionTower(tiny_config.model, rngs=nnx.Rngs(0))
  rules = tables.vit_rules(vit_cfg, "hf")
  sd = dict(export_params(rules, dict(HostParams(tower))))
  assert sd["encoder.layers.0.self_attn.qkv.bias"].shape == (3 * vit_cfg.width,)
  assert sd["post_layernorm.weight"].shape == (vit_cfg.width,)
  fresh = VisionTower(tiny_config.model, rngs=nnx.Rngs(5))
  assign_params(fresh, rules, DictSource(sd), strict=False)
  np.testing.assert_array_equal(np.asarray(fresh.vit.blocks.qkv_bias[...]),
                                np.asarray(tower.vit.blocks.qkv_bias[...]))


def test_wrong_shape_names_the_key(tiny_config):
  tower, rules, sd = _exported(tiny_config, seed=0)
  key = "Qformer.bert.encoder.layer.1.attention.self.value.weight"
  sd[key] = sd[key][:, :-1]
  with pytest.raises(CheckpointError, match=re.escape(key)):
    assign_params(tower, rules, DictSource(sd), strict=False)


def test_missing_key_names_the_key(tiny_config):
  tower, rules, sd = _exported(tiny_config, seed=0)
  del sd["visual_encoder.blocks.1.attn.v_bias"]
  before = jax.tree.map(np.asarray, dict(HostParams(tower)))
  with pytest.raises(CheckpointError, match=re.escape("visual_encoder.blocks.1.attn.v_bias")):
    assign_params(tower, rules, DictSource(sd), strict=False)
  after = dict(HostParams(tower))
  assert all(np.array_equal(before[p], after[p]) for p in before)  # nothing half-loaded


def test_unknown_format_is_refused(tiny_config):
  with pytest.raises(ValueError, match="unknown format"):
    tables.vit_rules(tiny_config.model.vit, "timm")
