"""orbax checkpoints of a run: trainable state, optimizer state, step, data-iterator state, meta.

One small module so that a later move to orbax's V1 API touches one file. Frozen weights (ViT,
LLaMA base) are never saved: they are reloaded from their source. Restore takes abstract targets
(`jax.ShapeDtypeStruct` with shardings), so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async, keep-N, periodic checkpoints in `directory` (a run's `workdir/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           meta: dict | None = None, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:  # snapshot now: an async save may run after the loop moved on
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, *, step: int | None = None,
              data_iterator: Any = None) -> tuple[Any, dict, int]:
    """Restores `(state, meta, step)` (latest when `step` is None) onto the shardings of
    `abstract_state`; `data_iterator` is set to its saved position in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], dict(restored["meta"] or {}), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class _IteratorSnapshot:
  """The position of a data iterator at save time. grain's handler writes `get_state()` bytes
  of non-dataset iterators verbatim, which for a dataset iterator's dict is its JSON."""

  def __init__(self, state: Any):
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """`ShapeDtypeStruct` targets of `tree`, optionally with new shardings (restore elsewhere)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
