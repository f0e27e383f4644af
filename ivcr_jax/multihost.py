"""Several processes, one program: start-up, who writes files, and small agreements between hosts.

Multi-host JAX runs the same command on every host (TPU pod workers, SLURM tasks, local
processes). `initialize` connects them through the coordinator (explicit arguments, the `JAX_*`
variables, or JAX's detection of SLURM, TPU pods and Open MPI). On CPU the processes talk through
gloo collectives, as the tests and `python -m ivcr_jax.launch` do on one machine.

Host-side agreements (`agree_max`) go through the coordinator's key-value store, not device
collectives: they never queue behind a running train step.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import flags, logging

# The variables `python -m ivcr_jax.launch` sets (JAX reads the coordinator address itself).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _cluster_detected(env: os._Environ | dict) -> bool:
  """SLURM with several tasks, a multi-worker TPU slice, or Open MPI with several ranks."""
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 100,
               env: os._Environ | dict | None = None) -> bool:
  """Connects this process to the others when the run has several; returns whether it did.

  Arguments win over `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; with
  none of them JAX's cluster detection (SLURM, TPU, Open MPI) fills them in. A process that
  stops sending heartbeats for `heartbeat_timeout_s` makes every other process exit with the
  coordinator's "another task died" error instead of hanging in a collective.
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and not _cluster_detected(env):
    return False
  if num_processes == 1:
    return False
  if explicit and None in (coordinator_address, num_processes, process_id):
    missing = [name for name, v in (("coordinator address", coordinator_address),
                                    ("number of processes", num_processes),
                                    ("process id", process_id)) if v is None]
    raise ValueError(f"a multi-process run needs the coordinator address, the number of "
                     f"processes and this process's id; missing: {', '.join(missing)} (flags "
                     f"--coordinator_address/--num_processes/--process_id or the variables "
                     f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
  # CPU devices of several processes need a collectives backend (it does not touch GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("process %d of %d connected (%d local of %d devices)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def define_flags() -> Callable[[], bool]:
  """Defines an entry point's --coordinator_address, --num_processes, --process_id and
  --heartbeat_timeout; returns the function that initializes from them (call it in `main`)."""
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "Several processes: host:port of process 0's coordinator "
      f"(default ${ENV_COORDINATOR}; SLURM, TPU pods and Open MPI are detected).")
  count = flags.DEFINE_integer("num_processes", None,
                               f"Several processes: how many (default ${ENV_NUM_PROCESSES}).")
  pid = flags.DEFINE_integer(
      "process_id", None, f"Several processes: this one's id, 0..N-1 (default ${ENV_PROCESS_ID}).")
  heartbeat = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Several processes: seconds without a heartbeat after which a "
      "process counts as dead and the others stop with an error instead of waiting.")
  return lambda: initialize(coordinator.value, count.value, pid.value,
                            heartbeat_timeout_s=heartbeat.value)


def is_main() -> bool:
  """Process 0 writes the files that describe a run (config, history, events, evaluation)."""
  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # the coordinator's key-value store (orbax uses it too)

  return distributed.global_state.client


def agree_max(tag: str, values: Sequence[int], *, timeout_s: int = 600) -> tuple[int, ...]:
  """The element-wise maximum of `values` over all processes (identity on one process).

  `tag` must be the same on every process for the same agreement and never reused in a run.
  """
  values = tuple(int(v) for v in values)
  if jax.process_count() == 1:
    return values
  client = _client()
  pid = jax.process_index()
  client.key_value_set(f"ivcr_jax/{tag}/{pid}", ",".join(map(str, values)))
  best = list(values)
  for p in range(jax.process_count()):
    got = client.blocking_key_value_get(f"ivcr_jax/{tag}/{p}", timeout_s * 1000)
    best = [max(a, int(b)) for a, b in zip(best, got.split(","), strict=True)]
  return tuple(best)


def forget(tag: str) -> None:
  """Deletes this process's value of agreement `tag` (once every process has read it)."""
  if jax.process_count() > 1:
    _client().key_value_delete(f"ivcr_jax/{tag}/{jax.process_index()}")


def host_array(x: jax.Array) -> np.ndarray:
  """The whole value of `x` on this host, also when its shards live on other processes."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_barriers = itertools.count()


def barrier(name: str, *, timeout_s: int = 600) -> None:
  """Waits until every process reaches `name` (no-op on one process). Processes pass their
  barriers in the same order, which numbers them, so a name may recur."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"ivcr_jax/{name}/{next(_barriers)}", timeout_s * 1000)
