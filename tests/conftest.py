"""Test set-up: 8 fake CPU devices for sharding tests, parsed absl flags for grain workers."""

import os

# Must happen before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import pytest
from absl import flags

flags.FLAGS.is_parsed() or flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny_config():
  from configs.interllava import get_config

  return get_config("tiny")
