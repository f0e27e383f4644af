"""orbax checkpoints: a run's (trainable parameters, optimizer state and step, meta) and a full
model's (every parameter, for the initial weights that `python -m ivcr_jax.import_weights`
writes).

Every orbax call of the project is here, so that a later move to orbax's V1 API touches one
file. Frozen weights (ViT,
LLaMA base) are never saved: they are reloaded from their source. The parameters are an item of
their own, so evaluation and export restore them without the optimizer state. Restore takes
abstract targets (`jax.ShapeDtypeStruct` with shardings): a checkpoint restores straight into
the shardings of any mesh, on any number of processes. The data position is a number in the
meta (the trainer's `samples_seen`), so it does not depend on the number of processes either.

Faults. orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it when every
item is written, so a process killed mid-save leaves an unfinished directory that is never taken
for a checkpoint. A resuming run (`restore_latest`) removes those, ignores foreign entries, and
resumes from the newest checkpoint that reads back whole: a newer damaged one (missing or
truncated file) is named with the reason and moved to `damaged/`, so it neither blocks later
saves (orbax never saves a step at or below its latest) nor is lost. Every failure is a
`CheckpointError` whose message names the checkpoint; the entry points print it alone.

Several processes: every process calls `save`/`restore` (orbax's multi-process protocol: each
writes its shards, process 0 the metadata and the commit); process 0 alone moves or removes
directories, and the processes agree on which checkpoint they resume from.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from flax import nnx

from ivcr_jax import multihost, sharding
from ivcr_jax.models import trainable

DAMAGED = "damaged"  # where `restore_latest` moves the checkpoints it could not read
_UNFINISHED = ".orbax-checkpoint-tmp"  # orbax's suffix of a save still being written
# What a complete checkpoint holds besides its array data (orbax 0.12 with OCDBT).
_REQUIRED = ("_CHECKPOINT_METADATA", "params/_METADATA", "params/manifest.ocdbt",
             "optimizer/_METADATA", "optimizer/manifest.ocdbt", "meta/metadata")
_ARRAY_ITEMS = ("params", "optimizer")  # the items whose arrays live in an OCDBT database


class CheckpointError(RuntimeError):
  """A checkpoint does not fit the model (missing key, wrong shape, unreadable file: weights
  being imported or restored), could not be written, or none of a run's checkpoints can be
  read; the message names the checkpoint (or file) and what to do."""


class Checkpointer:
  """Async, keep-N, periodic checkpoints in `directory` (a run's `workdir/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "optimizer": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._writing: int | None = None  # the step of an async save that may still be running

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict, *, meta: dict | None = None, force: bool = False
           ) -> bool:
    """Saves the train state `{params, opt, step}` if `step` is due (or `force`); returns whether
    a save started. A failed write (this one's, or the previous async one's) raises
    `CheckpointError`."""
    self._wait()  # orbax would wait here too; waiting first tells whose write failed
    try:
      started = self._manager.save(step, force=force, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state["params"]),
          optimizer=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
          meta=ocp.args.JsonSave(meta or {})))
    except Exception as e:
      raise self._save_failed(step, e) from e
    self._writing = step if started else None
    return started

  def _wait(self) -> None:
    """Waits for the async save in progress; raises `CheckpointError` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._writing, e) from e
    finally:
      self._writing = None

  def _save_failed(self, step: int | None, e: Exception) -> CheckpointError:
    complete = [s for s in self._committed() if s != step]
    previous = (f"the last complete checkpoint is {os.path.join(self.directory, str(complete[-1]))}"
                if complete else "there is no complete checkpoint yet")
    return CheckpointError(
        f"checkpoint {step} could not be written to {self.directory}: {reason(e)}. Training "
        f"stopped; {previous}, and the same command resumes from it (free space first if the "
        "disk is full).")

  def restore_latest(self, abstract_state: dict) -> tuple[dict, dict, int] | None:
    """`restore` of the newest checkpoint that reads back whole, or None when there is none.

    Unfinished saves are removed and foreign entries ignored, each logged; newer checkpoints that
    fail to read are logged with the reason and moved to `damaged/`. Checkpoints that all fail
    raise `CheckpointError` naming each (nothing is moved: a run never silently starts again
    from step 0 over them).
    """
    self._tidy()
    failures: list[tuple[int, str]] = []
    for step in reversed(self._committed()):
      why = self._missing(step) or self._unreadable_data(step)
      restored = None
      if why is None:
        try:
          restored = self.restore(abstract_state, step=step)
        except CheckpointError as e:
          why = reason(e)
      if multihost.agree_max(f"checkpoint_ok/{step}", [why is not None])[0]:
        why = why or "another process could not read it"
      if why is None:
        self._set_aside(failures)
        return restored
      logging.warning("skipping the damaged checkpoint %s: %s",
                      os.path.join(self.directory, str(step)), why)
      failures.append((step, why))
    if failures:
      listing = "\n".join(f"  {os.path.join(self.directory, str(s))}: {why}"
                          for s, why in failures)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read:\n{listing}\nNothing was changed. "
          "Restore them from a copy, or move the directory away to train from step 0.")
    return None

  def _committed(self) -> list[int]:
    """Steps of the committed checkpoint directories (by name), ascending."""
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return []
    return sorted(int(n) for n in names
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def _missing(self, step: int) -> str | None:
    """Which file a complete checkpoint has and `step` lacks (None: none lacking)."""
    for name in _REQUIRED:
      path = os.path.join(self.directory, str(step), name)
      if not os.path.isfile(path):
        return f"{path} is missing"
    return None

  def _unreadable_data(self, step: int) -> str | None:
    """Which array data file of `step` is missing or shorter than its index says (None: none).

    Found from the OCDBT index alone, before orbax reads the checkpoint: orbax's read of a
    damaged checkpoint raises at the first bad array while the others are still in flight, and
    those then fail loudly on its closed event loop. (A file damaged within its length is still
    caught by the read itself.)
    """
    for item in _ARRAY_ITEMS:
      why = ocdbt_damage(os.path.join(self.directory, str(step), item))
      if why:
        return why
    return None

  def _tidy(self) -> None:
    """Logs what in the directory is not a checkpoint; removes unfinished saves (process 0)."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if name.isdigit() or name == DAMAGED:
        continue
      if _UNFINISHED in name:
        logging.warning("removing %s: an unfinished save (its process stopped while writing it)",
                        path)
        if multihost.is_main():
          shutil.rmtree(path, ignore_errors=True)
      else:
        logging.warning("ignoring %s: not a checkpoint of this run", path)
    multihost.barrier(f"checkpoints_tidy:{self.directory}")

  def _set_aside(self, failures: list[tuple[int, str]]) -> None:
    """Moves the damaged checkpoints newer than the one restored to `damaged/` (process 0)."""
    if not failures:
      return
    if multihost.is_main():
      os.makedirs(os.path.join(self.directory, DAMAGED), exist_ok=True)
      for step, _ in failures:
        target = os.path.join(self.directory, DAMAGED, str(step))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(self.directory, DAMAGED, f"{step}.{n}"), n + 1
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("moved the damaged checkpoint %d to %s", step, target)
    multihost.barrier(f"checkpoints_set_aside:{self.directory}")
    self._manager.reload()

  def restore(self, abstract_state: dict, *, step: int | None = None
              ) -> tuple[dict, dict, int]:
    """Restores `(state, meta, step)` (latest when `step` is None) into the shardings of
    `abstract_state` (`{params, opt, step}`)."""
    step = self._step(step)
    restored = self._read(step, params=ocp.args.StandardRestore(abstract_state["params"]),
                          optimizer=ocp.args.StandardRestore({"opt": abstract_state["opt"],
                                                              "step": abstract_state["step"]}),
                          meta=ocp.args.JsonRestore())
    state = {"params": restored["params"], **restored["optimizer"]}
    return state, dict(restored["meta"] or {}), step

  def restore_params(self, abstract_params: Any, *, step: int | None = None
                     ) -> tuple[Any, int]:
    """The trainable parameters of a checkpoint alone (no optimizer state is read)."""
    step = self._step(step)
    return self._read(step, params=ocp.args.StandardRestore(abstract_params))["params"], step

  def restore_meta(self, *, step: int | None = None) -> dict:
    """The JSON meta of a checkpoint alone."""
    return dict(self._read(self._step(step), meta=ocp.args.JsonRestore())["meta"] or {})

  def _read(self, step: int, **items) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} cannot be "
                            f"read: {reason(e)}") from e

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return step

  def close(self) -> None:
    """Waits for the last save (raising `CheckpointError` if it failed) and closes."""
    try:
      self._wait()
    finally:
      self._manager.close()


def ocdbt_damage(root: str) -> str | None:
  """What is wrong with the files of the OCDBT database in directory `root` (None: nothing
  that its index shows): its index unreadable, or a data file missing or shorter than the bytes
  the index refers to. Only the index is read (the latest version's B-tree), never a value."""
  needed: dict[str, int] = {}  # data file -> the end of the furthest byte range the index uses
  try:
    store = ts.KvStore.open(f"file://{root}/").result()
    latest = ts.ocdbt.dump(store).result()["versions"][-1]  # what a read sees
    pending = [latest["root"]["location"]] if "location" in latest["root"] else []  # or empty
    while pending:
      node = pending.pop()
      _note_range(root, node, needed)
      for entry in ts.ocdbt.dump(store, node).result()["entries"]:
        if "location" in entry:  # an interior node's child
          pending.append(entry["location"])
        elif "indirect_value" in entry:  # a leaf's value stored in a data file
          _note_range(root, entry["indirect_value"], needed)
  except Exception as e:
    return f"the index of {root} cannot be read: {reason(e)}"
  for path, end in sorted(needed.items()):
    if not os.path.isfile(path):
      return f"{path} is missing"
    if os.path.getsize(path) < end:
      return f"{path} is truncated: {os.path.getsize(path)} bytes of {end}"
  return None


def _note_range(root: str, location: str, needed: dict[str, int]) -> None:
  """Records in `needed` the file and end of an OCDBT byte range,
  `<kind>:<base>:<path>:<offset>:<length>` with the paths relative to the database `root`."""
  head, offset, length = location.rsplit(":", 2)
  _, base, path = head.split(":", 2)
  file = os.path.normpath(os.path.join(root, unquote(base), unquote(path)))
  needed[file] = max(needed.get(file, 0), int(offset) + int(length))


def reason(e: BaseException) -> str:
  """The first line of the innermost cause of `e`: what actually went wrong (orbax wraps
  TensorStore's errors, whose own first line names the file)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """`ShapeDtypeStruct` targets of `tree`, optionally with new shardings (restore elsewhere)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def restore_trained(model: nnx.Module, trainable_groups: Sequence[str], checkpoint_dir: str,
                    step: int | None = None) -> int:
  """Writes the trainable parameters of a run's checkpoint (latest, or `step`) into `model`,
  restored straight into the shardings its parameters have (no optimizer state is read);
  returns the step. Frozen weights are not in run checkpoints: `model` must already hold them
  (its initial weights)."""
  _, params, _ = trainable.split_trainable(model, trainable_groups)
  checkpointer = Checkpointer(checkpoint_dir)
  try:
    restored, step = checkpointer.restore_params(abstract_like(nnx.to_pure_dict(params)),
                                                 step=step)
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return step


# ------------------------------------------------------------------- full-model checkpoints

_MODEL_META = "meta"


def _model_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      params=ocp.StandardCheckpointHandler(), **{_MODEL_META: ocp.JsonCheckpointHandler()}))


def save_model(model: nnx.Module, path: str | os.PathLike, meta: Mapping, *,
               overwrite: bool = False) -> None:
  """Writes every parameter of `model` (frozen and trainable) and `meta` (JSON) to `path`."""
  path = os.path.abspath(os.fspath(path))
  params = nnx.to_pure_dict(nnx.state(model))
  _model_checkpointer().save(path, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), **{_MODEL_META: ocp.args.JsonSave(dict(meta))}),
      force=overwrite)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def restore_model(path: str | os.PathLike, make: Callable[[], nnx.Module],
                  mesh: jax.sharding.Mesh, rules) -> nnx.Module:
  """The module `make()` would build, with its parameters restored from `path` straight into
  their shardings on `mesh` by `rules` (built abstractly first: the random weights never exist,
  and no parameter lives whole on one device unless the rules replicate it).

  Raises:
    CheckpointError naming the parameters whose shapes differ or that are missing/extra (e.g. a
    checkpoint imported for another preset or tokenizer).
  """
  path = os.path.abspath(os.fspath(path))
  graphdef, state = nnx.split(nnx.eval_shape(make))
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        nnx.to_pure_dict(state), shardings)
  checkpointer = _model_checkpointer()
  stored = _flat(checkpointer.metadata(path).item_metadata["params"].tree)
  wanted = _flat(target)
  problems = [f"{k}: stored {tuple(stored[k].shape)}, model {tuple(v.shape)}"
              for k, v in wanted.items() if k in stored and tuple(stored[k].shape) != v.shape]
  problems += [f"{k}: not in the checkpoint" for k in wanted if k not in stored]
  problems += [f"{k}: not in the model" for k in stored if k not in wanted]
  if problems:
    raise CheckpointError(f"{path} does not fit the model config:\n  "
                          + some(problems, sep="\n  "))
  restored = checkpointer.restore(path, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target)))["params"]
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def read_model_meta(path: str | os.PathLike) -> dict:
  """The JSON metadata `save_model` stored (for initial weights: the chain's log, the config)."""
  return dict(_model_checkpointer().restore(
      os.path.abspath(os.fspath(path)),
      args=ocp.args.Composite(**{_MODEL_META: ocp.args.JsonRestore()}))[_MODEL_META])


def some(names: Sequence[str], *, limit: int = 20, sep: str = ", ") -> str:
  """The first `limit` of `names` joined, with how many there are when some are left out: what
  every "missing keys: ..." message shows."""
  shown = sep.join(names[:limit])
  return shown + (f"{sep}... ({len(names)} in all)" if len(names) > limit else "")
