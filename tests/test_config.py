"""Config presets, command-line overrides and import hygiene."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import interllava
from ivcr_jax import configs


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


def test_compilation_cache_is_on_for_the_accelerator_presets(tmp_path):
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  from ivcr_jax import experiment

  assert all(interllava.get_config(p).jax_compilation_cache_dir for p in ("official", "paper"))
  assert not any(interllava.get_config(p).jax_compilation_cache_dir
                 for p in ("small", "tiny", "demo"))
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    config = interllava.get_config("tiny")
    assert experiment.use_compilation_cache(config) == ""
    assert jax.config.jax_compilation_cache_dir == before[0]  # off: untouched
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    for i, name in enumerate(("first", "second")):  # the second replaces an open cache
      with config.unlocked():
        config.jax_compilation_cache_dir = str(tmp_path / name)
      assert experiment.use_compilation_cache(config) == str(tmp_path / name)
      jax.jit(lambda x, i=i: x * 3 + i)(1)
      assert list((tmp_path / name).iterdir())  # the program was written there
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


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


def _parsed_config(argv):
  fv = flags.FlagValues()
  holder = configs.define_config_flag("config", "config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return holder.value


def test_config_flag_finds_the_packaged_configs_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  cfg = _parsed_config(["prog", "--config=configs/interllava.py:tiny", "--config.seed=7"])
  assert cfg.preset == "tiny" and cfg.seed == 7
  assert _parsed_config(["prog"]).preset == "official"  # the default needs no repository root
  packaged = os.path.join(configs.PACKAGE_DIR, "interllava.py")
  assert configs.resolve("configs/interllava.py:demo") == f"{packaged}:demo"
  assert configs.resolve("configs/retriever.py") == os.path.join(configs.PACKAGE_DIR,
                                                                 "retriever.py")
  fv = flags.FlagValues()
  retriever = configs.define_config_flag("config", "config", flag_values=fv, sys_argv=["prog"],
                                         default="retriever.py:tiny")
  fv(["prog"])
  assert retriever.value.preset == "tiny" and retriever.value.topk == 10  # the retriever's
  assert configs.resolve("elsewhere/interllava.py") == "elsewhere/interllava.py"  # not ours
  assert configs.resolve("configs/nothing.py") == "configs/nothing.py"
  with pytest.raises(IOError, match="nothing.py"):  # a missing file still fails, naming it
    _ = _parsed_config(["prog", "--config=configs/nothing.py"]).seed
  # A configs/ directory where the command runs is read first.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "interllava.py").write_text(
      "from ivcr_jax.configs.interllava import get_config as base\n\n"
      "def get_config(arg=None):\n  c = base(arg)\n  c.unlock()\n  c.seed = 123\n  return c\n")
  assert _parsed_config(["prog", "--config=configs/interllava.py:tiny"]).seed == 123


def test_an_installed_copy_runs_its_configs_outside_the_checkout(tmp_path):
  """`pip install` (not editable) into a bare directory, then the entry points' config flag
  from another directory: the presets come from the installed package."""
  import shutil

  repo = pathlib.Path(__file__).parent.parent
  src = tmp_path / "src"
  shutil.copytree(repo / "ivcr_jax", src / "ivcr_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.py", "pyproject.toml"):
    shutil.copy(repo / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--target", str(tmp_path / "site"), str(src)],
                 check=True, capture_output=True)
  shutil.rmtree(src)
  code = ("import sys\nfrom absl import flags\nfrom ivcr_jax import configs\n"
          "holder = configs.define_config_flag('config', 'config')\nflags.FLAGS(sys.argv)\n"
          "print(configs.__file__, holder.value.preset, holder.value.train.num_steps)\n")
  run = lambda *args: subprocess.run(
      [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
      check=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.split()
  where, preset, steps = run("--config=configs/interllava.py:demo",
                             "--config.train.num_steps=5")
  assert where.startswith(str(tmp_path / "site")) and (preset, steps) == ("demo", "5")
  assert run()[1] == "official"


def test_import_ivcr_jax_pulls_in_neither_torch_nor_tensorflow():
  code = ("import sys, ivcr_jax, ivcr_jax.models.vision_tower, ivcr_jax.convert.vision, "
          "ivcr_jax.sharding; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
OTHER = "--xla_cpu_enable_fast_math=false"  # a real flag: XLA stops on unknown ones


@pytest.mark.parametrize("env, want", [
    ({}, YNN_OFF),
    ({"XLA_FLAGS": f"{YNN_OFF}dot {OTHER}"}, f"{YNN_OFF}dot {OTHER}"),
    ({"XLA_FLAGS": OTHER, "IVCR_JAX_XLA_DEFAULTS": "0"}, OTHER),
])
def test_importing_the_package_sets_the_cpu_xla_flags_unless_the_user_did(env, want):
  """The package turns XLA:CPU's YNNPACK fusions off (README "Speed against PyTorch"), before any
  backend starts, and reaches the backend: no compiled program then holds a YNN fusion."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "IVCR_JAX_XLA_DEFAULTS")}
  code = ("import os, ivcr_jax, jax, jax.numpy as jnp\n"
          "print(os.environ.get('XLA_FLAGS', ''))\n"
          "x = jnp.ones((64, 64))\n"
          "print('ynn' in jax.jit(lambda a: a @ a).lower(x).compile().as_text())\n")
  out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                       text=True, check=True, cwd=pathlib.Path(__file__).parent.parent)
  flags_seen, ynn_compiled = out.stdout.split("\n")[:2]
  assert flags_seen == want
  assert ynn_compiled == str(want != YNN_OFF)
