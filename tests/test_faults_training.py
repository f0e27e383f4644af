"""Faults of a real training run: `python -m ivcr_jax.train` (tiny preset, 6 steps, a checkpoint
after every step) killed with SIGKILL between steps, inside an async checkpoint write and during
validation, then started again with the same command; damaged checkpoints; a NaN batch; a full
disk while saving.

Every run is compared with one uninterrupted run of the same command (`reference`): per-step
losses (the whole `train_history.json`) and every parameter and optimizer leaf of checkpoints,
exactly. The faults are injected by `tests/inject_faults.py`, which runs the train module
unchanged with one piece wrapped; a pause there writes a marker file, and the test kills the
process once the marker is there, so each kill lands where it is meant to.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
SETTINGS = {  # --config.<key>=<value> of every run
    "train.num_steps": STEPS, "train.batch_size": 1, "train.checkpoint_every": 1,
    "train.keep_checkpoints": STEPS, "train.log_every": 1, "train.eval_every": 3,
    "mesh.shape": "(1,1,1)", "data.toy_num_videos": 16, "data.max_turns": 2,
    "data.frames_retrieval": 4, "data.frames_moment": 4, "model.video.window": 4,
    "model.video.stride": 4, "data.seq_buckets": "(512,)", "data.video_buckets": "(22,)"}
TIMEOUT = 300
TIMING = ("steps_per_s",)  # history fields that are measurements, not results


@pytest.fixture(scope="module")
def space(tmp_path_factory):
  """A directory with the toy stores and compilation cache the runs share."""
  return tmp_path_factory.mktemp("faults")


def _flags(space, workdir) -> list[str]:
  settings = {**SETTINGS, "data.stores": space / "stores"}
  return (["--config=configs/interllava.py:tiny", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in settings.items()])


def _env(space) -> dict:
  """One CPU device (not the test process's eight) and a compilation cache shared by the runs,
  so only the reference compiles; XLA's backend optimisation is off, which makes that compile
  about twice as fast (every run executes the same programs, so the comparisons are unchanged)."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(space / "xla_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_backend_optimization_level=0")


def _train(space, workdir) -> str:
  """Runs the command to its end; returns its output (stdout + stderr)."""
  done = subprocess.run([sys.executable, "-m", "ivcr_jax.train", *_flags(space, workdir)],
                        cwd=REPO, env=_env(space), capture_output=True, text=True,
                        timeout=TIMEOUT)
  out = done.stdout + done.stderr
  assert done.returncode == 0, f"exit {done.returncode}:\n{out[-6000:]}"
  return out


def _faulty(space, workdir, fault) -> subprocess.Popen:
  """The command with `fault` (see tests/inject_faults.py) injected, started."""
  marker = workdir.parent / f"{workdir.name}.{fault}.paused"
  log = open(workdir.parent / f"{workdir.name}.{fault}.log", "w+", encoding="utf-8")
  proc = subprocess.Popen([sys.executable, "-m", "tests.inject_faults", fault, str(marker), "--",
                           *_flags(space, workdir)], cwd=REPO, env=_env(space), stdout=log,
                          stderr=subprocess.STDOUT)
  proc.marker, proc.log = marker, log
  return proc


def _output(proc) -> str:
  """What the process wrote (its log file stays beside the workdir)."""
  proc.log.seek(0)
  out = proc.log.read()
  proc.log.close()
  return out


def _kill_when_paused(proc) -> None:
  """SIGKILL as soon as the injected pause is reached (its marker file is written)."""
  deadline = time.monotonic() + TIMEOUT
  while not proc.marker.exists():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f"the run never reached its pause (exit {proc.returncode}):\n"
                  f"{_output(proc)[-6000:]}")
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL


def _history(workdir) -> list[dict]:
  with open(workdir / "train_history.json", encoding="utf-8") as f:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in json.load(f)]


def _checkpoints(workdir) -> list[int]:
  """Committed checkpoints, by directory name."""
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _leaves(workdir, step) -> list[np.ndarray]:
  """Every parameter and optimizer leaf of checkpoint `step`, read into this process."""
  out = []
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for item in ("params", "optimizer"):
    path = workdir / "checkpoints" / str(step) / item
    checkpointer = ocp.StandardCheckpointer()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    out += [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]
  return out


def _assert_same_state(workdir, reference, step):
  got, want = _leaves(workdir, step), _leaves(reference, step)
  assert len(got) == len(want) > 100
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)


def _assert_same_run(workdir, reference):
  """The whole history (every step's losses and validations) and the final state, exactly."""
  assert _history(workdir) == _history(reference)
  _assert_same_state(workdir, reference, STEPS)


@pytest.fixture(scope="module")
def reference(space):
  """The uninterrupted run (it also builds the toy stores and fills the compilation cache)."""
  workdir = space / "reference"
  _train(space, workdir)
  history = _history(workdir)
  assert [row["step"] for row in history] == list(range(1, STEPS + 1))
  assert [row["step"] for row in history if "val_loss_lm" in row] == [3, 6]
  assert _checkpoints(workdir) == list(range(1, STEPS + 1))
  return workdir


def _copy(reference, workdir, *, upto):
  """`workdir` as the reference run left it had it stopped after checkpoint `upto`."""
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("tensorboard"))
  for step in _checkpoints(workdir):
    if step > upto:
      shutil.rmtree(workdir / "checkpoints" / str(step))


def test_sigkill_anywhere_then_the_same_command_resumes_exactly(space, reference):
  """Three kills in a row on one run directory, each followed by the same command: the one that
  ends the run finishes with the reference's losses and state, bit for bit."""
  workdir = space / "killed"
  kills = []
  for fault in ("between_steps@4", "save@4", "validation@6"):
    proc = _faulty(space, workdir, fault)
    _kill_when_paused(proc)
    if fault == "save@4":  # killed inside the write of checkpoint 4: nothing committed
      partial = workdir / "checkpoints" / "4.orbax-checkpoint-tmp"
      assert any((partial / "params.orbax-checkpoint-tmp").rglob("manifest.ocdbt"))
      assert 4 not in _checkpoints(workdir)
    kills.append((fault, max(_checkpoints(workdir)), _output(proc)))
  out = _train(space, workdir)
  # Each run after a kill resumed from the newest complete checkpoint the kill left.
  assert kills[0][1] in (2, 3)  # checkpoint 3 may still have been in its async write
  assert kills[1][1] == 3  # the half-written checkpoint 4 does not count
  assert f"resumed from step {kills[0][1]} " in kills[1][2]
  assert f"resumed from step {kills[1][1]} " in kills[2][2]
  assert "4.orbax-checkpoint-tmp: an unfinished save" in kills[2][2]
  assert kills[2][1] in (4, 5)
  assert f"resumed from step {kills[2][1]} " in out
  _assert_same_run(workdir, reference)


def _damage_array(workdir, step, *, delete=False):
  """Truncates (or deletes) the largest array data file of checkpoint `step`'s parameters."""
  data = workdir / "checkpoints" / str(step) / "params" / "ocdbt.process_0" / "d"
  victim = max(data.iterdir(), key=lambda p: p.stat().st_size)
  if delete:
    victim.unlink()
  else:
    os.truncate(victim, victim.stat().st_size // 2)
  return victim


def _damage(workdir):
  """Checkpoint 6: an array file truncated; 5: an array file deleted; 4: its metadata file
  deleted; and a directory that is not a checkpoint."""
  ckpt = workdir / "checkpoints"
  _damage_array(workdir, 6)
  _damage_array(workdir, 5, delete=True)
  os.remove(ckpt / "4" / "_CHECKPOINT_METADATA")
  (ckpt / "old_run").mkdir()
  (ckpt / "old_run" / "notes.txt").write_text("not a checkpoint")


def test_damaged_checkpoints_are_skipped_and_named(space, reference):
  workdir = space / "damaged"
  _copy(reference, workdir, upto=STEPS)
  _damage(workdir)
  out = _train(space, workdir)
  ckpt = workdir / "checkpoints"
  data = re.escape(f"{ckpt}/") + r"{}/params/ocdbt\.process_0/d/[0-9a-f]+ is "  # an array file
  for step, why in ((6, data.format(6) + r"truncated: \d+ bytes of \d+$"),
                    (5, data.format(5) + "missing$"),
                    (4, re.escape(f"{ckpt / '4' / '_CHECKPOINT_METADATA'} is missing"))):
    line = next((x for x in out.splitlines()
                 if f"skipping the damaged checkpoint {ckpt / str(step)}: " in x), "")
    assert re.search(why, line), (step, out[-6000:])
    assert (ckpt / "damaged" / str(step)).is_dir()  # set aside, not deleted
  assert f"ignoring {ckpt / 'old_run'}: not a checkpoint" in out
  assert "resumed from step 3 " in out and "Traceback" not in out
  _assert_same_run(workdir, reference)  # checkpoints 4-6 written anew


def _abstract(workdir, step, item):
  """Restore targets (one device) of an item of checkpoint `step`, from its metadata."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ocp.StandardCheckpointer().metadata(
      workdir / "checkpoints" / str(step) / item).item_metadata.tree
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def test_the_index_check_walks_a_deep_b_tree(tmp_path, monkeypatch):
  """`ocdbt_damage`, the check before orbax reads a checkpoint, follows interior B-tree nodes to
  every value (an orbax checkpoint's tree is one leaf, so the run above cannot show this)."""
  import tensorstore as ts

  from ivcr_jax.training import checkpointing

  db = tmp_path / "db"
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{db}/", "config": {
      "max_decoded_node_bytes": 400, "max_inline_value_bytes": 8}}).result()
  with ts.Transaction() as txn:
    for i in range(200):
      store.with_transaction(txn)[f"k{i:04d}"] = b"x" * (50 + i)
  base = ts.KvStore.open(f"file://{db}/").result()
  assert ts.ocdbt.dump(base).result()["versions"][-1]["root_height"] >= 2
  noted = []
  note = checkpointing._note_range
  monkeypatch.setattr(checkpointing, "_note_range", lambda *a: (noted.append(a[1]), note(*a)))
  assert checkpointing.ocdbt_damage(str(db)) is None
  assert sum(x.startswith("value:") for x in noted) == 200  # every value, through every level


def test_no_readable_checkpoint_stops_naming_each(space, reference):
  """What the trainer does first (`Checkpointer.restore_latest`), in this process: when every
  checkpoint is damaged it raises, naming each, and changes nothing."""
  from ivcr_jax.training.checkpointing import Checkpointer, CheckpointError

  workdir = space / "all_damaged"
  _copy(reference, workdir, upto=2)
  state = {"params": _abstract(workdir, 2, "params"), **_abstract(workdir, 2, "optimizer")}
  ckpt = workdir / "checkpoints"
  os.remove(ckpt / "2" / "meta" / "metadata")
  shutil.rmtree(ckpt / "1" / "optimizer")
  checkpointer = Checkpointer(str(ckpt))
  with pytest.raises(CheckpointError) as raised:
    checkpointer.restore_latest(state)
  checkpointer.close()
  assert str(raised.value) == (
      f"no checkpoint in {ckpt} can be read:\n"
      f"  {ckpt / '2'}: {ckpt / '2' / 'meta' / 'metadata'} is missing\n"
      f"  {ckpt / '1'}: {ckpt / '1' / 'optimizer' / '_METADATA'} is missing\n"
      "Nothing was changed. Restore them from a copy, or move the directory away to train from "
      "step 0.")
  assert _checkpoints(workdir) == [1, 2]  # nothing moved


def _stopped_by(space, reference, name, fault) -> tuple:
  """A copy of the reference's first 3 checkpoints resumed with `fault` injected, which must stop
  the run with exit code 1; returns its workdir and output."""
  workdir = space / name
  _copy(reference, workdir, upto=3)
  proc = _faulty(space, workdir, fault)
  assert proc.wait(timeout=TIMEOUT) == 1
  return workdir, _output(proc)


def test_a_nan_batch_stops_naming_step_and_dialogues(space, reference):
  from ivcr_jax.data import records, stores

  workdir, out = _stopped_by(space, reference, "nan", "nan@5")
  assert "Traceback" not in out
  message = out[out.index("NonFiniteLossError: "):]
  # The batch of step 5 (batch size 1) is sample 4 of the training order (epoch 0's permutation).
  dialogue_store = stores.DialogueStore(
      str(space / "stores" / stores.DIALOGUE_STORE / stores.STORE_VERSION), "train")
  samples = records.make_samples([dialogue_store[i] for i in range(len(dialogue_store))],
                                 "dialogue")
  seed = 21  # the tiny preset's
  sample = samples[np.random.default_rng([seed, 0]).permutation(len(samples))[4]]
  assert message.startswith(
      f"NonFiniteLossError: non-finite loss or gradient at step 5 (loss nan, grad norm nan) on "
      f"the batch of samples 4..4: {sample.dialogue.name}. Stopped without saving: the last good "
      f"checkpoint is step 4 in {workdir / 'checkpoints'}"), message
  assert _checkpoints(workdir) == [1, 2, 3, 4]
  _assert_same_state(workdir, reference, 4)  # intact: the reference's own step 4


def test_disk_full_while_saving_stops_and_keeps_the_previous_checkpoint(space, reference):
  workdir, out = _stopped_by(space, reference, "full", "enospc@4")
  ckpt = workdir / "checkpoints"
  # orbax logs the failure of its write thread too; the run's own message is one line.
  assert [x for x in out.splitlines() if x.startswith("CheckpointError")] == [(
      f"CheckpointError: checkpoint 4 could not be written to {ckpt}: OSError: [Errno 28] No "
      f"space left on device: '{ckpt / '4.orbax-checkpoint-tmp' / 'meta.orbax-checkpoint-tmp'}"
      f"/metadata'. Training stopped; the last complete checkpoint is {ckpt / '3'}, and the "
      "same command resumes from it (free space first if the disk is full).")]
  assert _checkpoints(workdir) == [1, 2, 3]
  _assert_same_state(workdir, reference, 3)
