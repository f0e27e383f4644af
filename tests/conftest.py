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
