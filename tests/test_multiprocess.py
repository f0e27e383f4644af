"""Training across processes, with real processes: `python -m ivcr_jax.train` started as 2 x 4 and
4 x 2 fake CPU devices on a loopback coordinator (gloo collectives) trains exactly as 1 process x 8
devices on the same global mesh; checkpoints move between process counts; a killed process stops
the others within the heartbeat timeout and the same command resumes.

The runs use the tiny preset with 4 frames per video, two sequence buckets and several video-table
buckets, so consecutive batches have different shapes; the Q-Former dropout is off because its
masks follow the layout of the video table, which differs by design between process counts
(LoRA dropout stays on: it follows token positions, which do not).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.interllava import get_config
from ivcr_jax import launch

STEPS = 3
SETTINGS = {  # --config.<key>=<value> of every run
    "train.num_steps": STEPS, "train.checkpoint_every": 1, "train.keep_checkpoints": 5,
    "train.log_every": 1, "train.eval_every": 0, "train.batch_size": 8,
    "data.toy_num_videos": 120,  # enough for 3 batches of 8 and one of validation
    "mesh.shape": "(1,8,1)",  # batch over 8 devices: 4 rows per process on 2, 2 on 4
    "data.frames_retrieval": 4, "data.frames_moment": 4, "model.video.window": 4,
    "model.video.stride": 4,
    # Buckets close to the toy batches' sizes, so that the batch shapes change from step to step
    # (asserted in the four-process test) and the processes must agree on them.
    "data.seq_buckets": "(512,640,768)", "data.video_buckets": "(88,132,176)",
    "model.qformer.dropout": 0, "model.qformer.attention_dropout": 0,
    "model.video_qformer.dropout": 0, "model.video_qformer.attention_dropout": 0}


def _args(space, **overrides) -> list[str]:
  settings = {**SETTINGS, "data.stores": space / "stores",
              **{k.replace("__", "."): v for k, v in overrides.items()}}
  return (["--config=configs/interllava.py:tiny", "--heartbeat_timeout=10"]
          + [f"--config.{k}={v}" for k, v in settings.items()])


TIMEOUT = 900


@pytest.fixture(scope="module")
def space(tmp_path_factory, shared_toy_stores):
  """The toy stores every run reads (`stores`, built once in this process, not by a training
  process of their own) and a compilation cache shared by the runs, so a restarted command does
  not recompile."""
  root = tmp_path_factory.mktemp("multiprocess")
  config = get_config("tiny").copy_and_resolve_references()
  with config.unlocked():
    config.data.toy_num_videos = SETTINGS["data.toy_num_videos"]
  os.symlink(shared_toy_stores(config), root / "stores")
  return root


def _env(root) -> dict:
  """XLA's backend optimisation is off, which about halves the compiles (every run executes the
  same programs, so the comparisons are unchanged); the device count is the launcher's."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_backend_optimization_level=0")


def _workdir(space, name, *, like=None, keep_steps=None):
  """A fresh run directory, or a copy of run `like` whose checkpoints after `keep_steps` are
  removed (a run stopped there)."""
  out = space / name
  if like is None:
    out.mkdir()
    return out
  shutil.copytree(space / like, out, ignore=shutil.ignore_patterns("tensorboard"))
  for step in os.listdir(out / "checkpoints"):
    if step.isdigit() and int(step) > keep_steps:
      shutil.rmtree(out / "checkpoints" / step)
  os.remove(out / "train_history.json")
  return out


def _run(space, workdir, processes, **overrides):
  """The same command on `processes` processes (`python -m ivcr_jax.launch`), 8 devices in all."""
  cmd = [sys.executable, "-m", "ivcr_jax.launch", f"--num_processes={processes}",
         f"--devices_per_process={8 // processes}", "--grace=30", "--",
         sys.executable, "-m", "ivcr_jax.train", *_args(space, **overrides),
         f"--workdir={workdir}"]
  done = subprocess.run(cmd, capture_output=True, text=True, env=_env(space), timeout=TIMEOUT)
  out = done.stdout + done.stderr
  if done.returncode:
    first = out.find("Traceback")
    pytest.fail(f"exit {done.returncode}; first traceback:\n{out[first:first + 3000]}\n...\n"
                f"{out[-3000:]}")
  assert "building the toy corpus" not in out  # the shared stores fit the runs' settings
  return done


def _history(workdir) -> list[tuple[int, float]]:
  with open(workdir / "train_history.json", encoding="utf-8") as f:
    return [(h["step"], h["loss"]) for h in json.load(f)]


def _params(workdir, step) -> list[np.ndarray]:
  """The trainable parameters of checkpoint `step`, read into this (single) process."""
  path = workdir / "checkpoints" / str(step) / "params"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


def _assert_same_training(run, baseline, steps):
  """The losses of every step `run` logged within 1e-5 (relative) of the one-process run's, and
  the parameters after `steps` within 1e-5 (absolute); the XLA programs differ only in where the
  video table's rows live."""
  expected = dict(_history(baseline))
  got = _history(run)
  np.testing.assert_allclose([loss for _, loss in got], [expected[s] for s, _ in got], rtol=1e-5)
  for a, b in zip(_params(run, steps), _params(baseline, steps), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def baseline(space):
  workdir = _workdir(space, "one")
  _run(space, workdir, 1, train__eval_every=STEPS)
  assert [s for s, _ in _history(workdir)] == list(range(1, STEPS + 1))
  return workdir


def _shapes(done) -> set[tuple[int, ...]]:
  """(sequence, video-table, frame-table) shapes the run's batches had, from the trainer's log
  lines."""
  found = set()
  for line in done.stdout.splitlines() + done.stderr.splitlines():
    if "batch shape" in line:
      found.add(tuple(int(n) for n in line.rsplit("batch shape ", 1)[1].split()[0].split("x")))
  return found


def test_four_processes_train_like_one(space, baseline):
  workdir = _workdir(space, "four")
  done = _run(space, workdir, 4, train__eval_every=STEPS)
  _assert_same_training(workdir, baseline, STEPS)
  last = [json.loads((run / "train_history.json").read_text())[-1] for run in (workdir, baseline)]
  np.testing.assert_allclose(last[0]["val_loss_lm"], last[1]["val_loss_lm"], rtol=1e-5)
  # The buckets changed between batches, and the four processes agreed on each.
  assert len(_shapes(done)) >= 2, _shapes(done)


def test_a_killed_process_stops_the_others_and_the_command_resumes(space, baseline):
  """2 x 4: SIGKILL to process 1 once a checkpoint is complete; process 0 exits with the
  coordinator's error within the heartbeat timeout; the same command then finishes the run
  exactly as the one-process run (history kept across the restart)."""
  workdir = _workdir(space, "two")
  cmd = [sys.executable, "-m", "ivcr_jax.train", *_args(space), f"--workdir={workdir}"]
  port = launch.free_port()
  procs = [subprocess.Popen(cmd, env=launch.process_env(_env(space), i, 2, port, 4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "1").is_dir():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.2)
    assert not (workdir / "checkpoints" / str(STEPS)).exists()  # killed before it finished
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    survivor_s = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert procs[0].returncode != 0
  assert survivor_s < 60, survivor_s  # heartbeat timeout 10 s, not a hang
  assert "another task died" in out or "unhealthy" in out, out[-3000:]
  done = _run(space, workdir, 2)
  assert "resumed from step" in done.stdout + done.stderr
  assert [s for s, _ in _history(workdir)] == list(range(1, STEPS + 1))
  _assert_same_training(workdir, baseline, STEPS)


def test_checkpoints_move_between_process_counts(space, baseline):
  """A two-process checkpoint resumed by one process, and a one-process checkpoint by two."""
  two = space / "two"
  if not (two / "checkpoints" / str(STEPS)).is_dir():
    pytest.skip("needs the two-process run of the previous test")
  one_from_two = _workdir(space, "one_from_two", like="two", keep_steps=1)
  done = _run(space, one_from_two, 1)
  assert "saved by 2 process(es), resumed on 1" in done.stdout + done.stderr
  two_from_one = _workdir(space, "two_from_one", like="one", keep_steps=1)
  _run(space, two_from_one, 2)
  for run in (one_from_two, two_from_one):
    assert [s for s, _ in _history(run)] == [2, 3]
    _assert_same_training(run, baseline, STEPS)
