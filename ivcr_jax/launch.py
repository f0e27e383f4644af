"""Start N processes of one command on this machine, as a multi-host cluster would.

  python -m ivcr_jax.launch --num_processes=2 [--devices_per_process=4] -- \
      python -m ivcr_jax.train --config=configs/interllava.py:tiny --workdir=/tmp/run

Each process gets a loopback coordinator (127.0.0.1 and a free port), `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID` and, on CPU, `--xla_force_host_platform_device_count` fake devices; their
output is prefixed with `[i]`. When one process fails, the others get `--grace` seconds to stop
by themselves (the coordinator's heartbeat timeout stops them) and are then killed; the exit code
is the first failure's. For trying multi-host behaviour locally and for the tests; on a real
cluster run the command itself on every host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from ivcr_jax import multihost


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int,
                devices_per_process: int) -> dict:
  """The environment of process `process_id` of a local run."""
  env = dict(base)
  env.update({multihost.ENV_COORDINATOR: f"127.0.0.1:{port}",
              multihost.ENV_NUM_PROCESSES: str(num_processes),
              multihost.ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1"})
  if devices_per_process:
    flags_ = [f for f in env.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags_ + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def _relay(stream, prefix: str) -> None:
  for line in iter(stream.readline, b""):
    sys.stdout.buffer.write(prefix.encode() + line)
    sys.stdout.buffer.flush()


def launch(command: list[str], num_processes: int, *, devices_per_process: int = 0,
           port: int = 0, grace_s: float = 60.0) -> int:
  """Runs `command` as processes 0..N-1 of one run; returns the first non-zero exit code."""
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    p = subprocess.Popen(command, env=process_env(os.environ, i, num_processes, port,
                                                  devices_per_process),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_relay, args=(p.stdout, f"[{i}] "), daemon=True).start()
    procs.append(p)
  failed_at = None
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      if failed_at is None:
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad:
          code, failed_at = bad[0], time.monotonic()
      elif time.monotonic() - failed_at > grace_s:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.2)
  except KeyboardInterrupt:
    for p in procs:
      p.kill()
    raise
  for p in procs:
    p.wait()
  return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> None:
  command = argv[1:]
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    raise app.UsageError("give the command after --, e.g. -- python -m ivcr_jax.train ...")
  f = flags.FLAGS
  sys.exit(launch(command, f.num_processes, devices_per_process=f.devices_per_process,
                  port=f.port, grace_s=f.grace))


if __name__ == "__main__":
  # Defined here only: the library functions above are imported by tests next to the entry
  # points, whose own --num_processes would clash.
  flags.DEFINE_integer("num_processes", 2, "How many processes to start.")
  flags.DEFINE_integer("devices_per_process", 0,
                       "Fake CPU devices per process (0: leave XLA_FLAGS alone).")
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
  flags.DEFINE_integer("grace", 60, "Seconds the others may take to stop after one process "
                       "failed, before they are killed.")
  app.run(main)
