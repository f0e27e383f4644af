"""Config presets, command-line overrides and import hygiene."""

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import interllava


@pytest.mark.parametrize("preset", interllava.PRESETS)
def test_presets_build_locked_configs(preset):
  cfg = interllava.get_config(preset)
  assert cfg.preset == preset and cfg.is_locked
  with pytest.raises(AttributeError):
    cfg.model.not_a_field = 1
  assert cfg.model.qformer.hidden == cfg.model.video_qformer.hidden  # one shared reference


def test_official_and_paper_settings():
  official, paper = interllava.get_config(None), interllava.get_config("paper")
  assert official.preset == "official"
  assert (official.model.vit.depth, official.model.vit.width, official.model.vit.mlp_dim) == (
      39, 1408, 6144)
  assert official.model.qformer.cross_attention_freq == 2
  assert official.model.video_qformer.cross_attention_freq == 1
  assert (official.model.video.window, official.model.video.stride) == (32, 32)
  assert official.train.weight_decay == 0.05 and paper.train.weight_decay == 1e-6
  assert (paper.data.frames_retrieval, paper.data.frames_moment) == (12, 96)
  # A moment-only sample (1 video) or a retrieval-only turn (10) is not padded to 11 videos.
  assert official.data.video_buckets[:3] == paper.data.video_buckets[:3] == (1, 10, 11)
  small = interllava.get_config("small").model
  assert (small.vit.width, small.vit.depth, small.vit.mlp_dim, small.llm.mlp_dim) == (
      256, 4, 1117, 688)
  with pytest.raises(ValueError, match="unknown preset"):
    interllava.get_config("huge")


def test_command_line_overrides_are_type_checked():
  argv = ["prog", "--config=configs/interllava.py:tiny", "--config.model.vit.depth=3",
          "--config.model.qformer.hidden=32"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", lock_config=True, flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.preset == "tiny" and fv.config.model.vit.depth == 3
  assert fv.config.model.video_qformer.hidden == 32  # the shared reference follows
  argv = ["prog", "--config=configs/interllava.py:tiny", "--config.model.vit.depht=3"]
  bad = flags.FlagValues()
  config_flags.DEFINE_config_file("config", lock_config=True, flag_values=bad, sys_argv=argv)
  with pytest.raises((flags.Error, AttributeError), match="depht"):
    bad(argv)


def test_import_ivcr_jax_pulls_in_neither_torch_nor_tensorflow():
  code = ("import sys, ivcr_jax, ivcr_jax.models.vision_tower, ivcr_jax.convert.vision, "
          "ivcr_jax.sharding; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
