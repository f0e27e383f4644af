"""Test set-up: 8 fake CPU devices for sharding tests, parsed absl flags for grain workers, and
one persistent compilation cache for the session and every process it starts."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# Many tests build the same tiny model and step again (in this process, in the `train`, `chat`
# and notebook processes they start): a program compiled once is read back after. Tests that
# need a cache of their own set these variables for their processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ivcr_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest
from absl import flags

flags.FLAGS.is_parsed() or flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny_config():
  from configs.interllava import get_config

  return get_config("tiny")


@pytest.fixture(scope="session")
def shared_toy_stores(tmp_path_factory):
  """`shared_toy_stores(config)`: a directory of toy stores (corpus, frame and dialogue stores,
  tokenizer) for the `data` section of `config`, built once per session per recipe and shared by
  the modules that ask for the same one. Set `data.stores` to it; tests only read it (a test that
  damages stores builds its own). The key is what `experiment.store_dirs` builds from: a config
  that differs in it gets other stores."""
  from ivcr_jax import experiment
  from ivcr_jax.data import prepare, records

  built = {}  # key -> (directory, modification time of its build report)
  report = lambda store_dir: os.stat(os.path.join(store_dir, prepare.REPORT_FILE)).st_mtime_ns

  def get(config, image_size: int | None = None) -> str:
    d = config.data
    assert not d.annotations and not d.tokenizer, "toy stores only"
    if image_size is None:  # the retriever's frame_size, the InterLLaVA ViT's image size
      image_size = config.frame_size if "frame_size" in config else config.model.vit.image_size
    key = (d.toy_num_videos, d.toy_seed, d.toy_size, d.toy_fps, tuple(d.toy_seconds),
           d.toy_retriever_noise, d.resize_mode, image_size, records.RecordOptions.from_config(d))
    if key not in built:
      data = d.copy_and_resolve_references()
      with data.unlocked():
        data.stores = str(tmp_path_factory.mktemp("shared_toy_stores") / "toy_data")
      store_dir = experiment.store_dirs(data, image_size, "")[0]
      built[key] = store_dir, report(store_dir)
    for store_dir, made in built.values():  # a config outside the key made a user rebuild them
      assert report(store_dir) == made, f"the shared toy stores {store_dir} were rebuilt"
    return built[key][0]

  return get
