"""orbax checkpoints of a run: trainable parameters, optimizer state and step, meta (JSON).

One small module so that a later move to orbax's V1 API touches one file. Frozen weights (ViT,
LLaMA base) are never saved: they are reloaded from their source. The parameters are an item of
their own, so evaluation and export restore them without the optimizer state. Restore takes
abstract targets (`jax.ShapeDtypeStruct` with shardings): a checkpoint restores straight into
the shardings of any mesh, on any number of processes. The data position is a number in the
meta (the trainer's `samples_seen`), so it does not depend on the number of processes either.

Several processes: every process calls `save`/`restore` (orbax's multi-process protocol: each
writes its shards, process 0 the metadata and the commit).
"""

from __future__ import annotations

from typing import Any

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
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "optimizer": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

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
    a save started."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        optimizer=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
        meta=ocp.args.JsonSave(meta or {})))

  def restore(self, abstract_state: dict, *, step: int | None = None
              ) -> tuple[dict, dict, int]:
    """Restores `(state, meta, step)` (latest when `step` is None) into the shardings of
    `abstract_state` (`{params, opt, step}`)."""
    step = self._step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        optimizer=ocp.args.StandardRestore({"opt": abstract_state["opt"],
                                            "step": abstract_state["step"]}),
        meta=ocp.args.JsonRestore()))
    state = {"params": restored["params"], **restored["optimizer"]}
    return state, dict(restored["meta"] or {}), step

  def restore_params(self, abstract_params: Any, *, step: int | None = None
                     ) -> tuple[Any, int]:
    """The trainable parameters of a checkpoint alone (no optimizer state is read)."""
    step = self._step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"], step

  def restore_meta(self, *, step: int | None = None) -> dict:
    """The JSON meta of a checkpoint alone."""
    restored = self._manager.restore(self._step(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """`ShapeDtypeStruct` targets of `tree`, optionally with new shardings (restore elsewhere)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
