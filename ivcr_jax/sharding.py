"""Sharding as data: meshes from the config and logical-axis rules mapped onto them.

Every parameter carries logical axis names (`out_sharding` metadata, see
`ivcr_jax.models.layers`). `config.mesh.rules` maps each name to a mesh axis; this module turns a
model state into a tree of `NamedSharding`s. Meshes use Auto axis types (classic GSPMD-style
propagation inside `jax.jit`).

Activations are pinned the same way: models call `constrain(x, ("batch", ...))` on their main
activations, which is a sharding constraint while an `activation_sharding(mesh, rules)` context
is active (the training step sets it) and a no-op otherwise (one device, generation, tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `mesh_cfg.shape` over `mesh_cfg.axes`; one -1 takes the remaining devices, and a
  fully given shape smaller than the device count uses the first devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_cfg.shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not fill mesh shape {tuple(shape)}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) < len(devices):
    devices = devices[:math.prod(shape)]
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"{len(devices)} available")
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(mesh_cfg.axes), axis_types=(AxisType.Auto,) * len(shape))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """PartitionSpec for one array: each logical name goes to its rule's mesh axes, unless those
  axes are already used by an earlier dimension or do not divide the dimension (replicated)."""
  table = {name: target for name, target in rules}
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape, strict=True):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    mesh_axes = (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def logical_axes(state: nnx.State) -> nnx.State:
  """The logical axis names of every variable in `state` (None-filled when unannotated)."""

  def axes_of(var):
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * var[...].ndim

  return jax.tree.map(axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """A `NamedSharding` per variable of `state` (an `nnx.State` of Variables or abstract values)."""

  def sharding_of(var):
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules
                 ) -> tuple[nnx.GraphDef, Callable[[], nnx.State]]:
  """The graph of `make()`'s module and a jitted init of its state straight into the shardings
  of `rules` (`out_shardings`), built from shapes only (`scripts/plan_7b.py` compiles it ahead
  of time to plan the init's memory)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.split(make())[1],
                           out_shardings=state_shardings(abstract, mesh, rules))


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
  """The module `make()` builds, each variable initialised straight in its sharding: no array
  of the model ever lives whole on one device unless the rules replicate it."""
  graphdef, init = sharded_init(make, mesh, rules)
  return nnx.merge(graphdef, init())


def data_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a batch array: leading dim over the `batch` rule's mesh axes (replicated when
  they do not divide it)."""
  axes = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "ivcr_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `constrain` pin activations on `mesh` by `rules` while tracing inside the block.

  Without it, GSPMD propagation from the (sharded) inputs and parameters was found to leave the
  activations of several samples per step unsharded (each device computing the whole batch).
  """
  token = _ACTIVATIONS.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding of its logical `axes` (missing trailing axes: None) under
  `activation_sharding`; unchanged outside it, on one device, or when no named dimension can be
  sharded (a fully replicated constraint would only take the partitioner's freedom away)."""
  context = _ACTIVATIONS.get()
  if context is None:
    return x
  mesh, rules = context
  if mesh.size == 1:
    return x
  axes = tuple(axes) + (None,) * (x.ndim - len(axes))
  spec = logical_to_spec(axes, x.shape, mesh, rules)
  if all(s is None for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def local(fn: Callable, args: Sequence[jax.Array], in_axes: Sequence[Sequence[str | None]],
          out_axes: Sequence[str | None]) -> jax.Array:
  """`fn(*args)` run per device on its shards (`jax.shard_map`) under `activation_sharding`,
  each argument split by its logical `in_axes` (missing trailing axes: None), the result by
  `out_axes`; a plain call otherwise. For kernels the partitioner cannot split (Pallas calls)."""
  context = _ACTIVATIONS.get()
  if context is None or context[0].size == 1:
    return fn(*args)
  mesh, rules = context
  spec = lambda axes, x: logical_to_spec(tuple(axes) + (None,) * (x.ndim - len(axes)), x.shape,
                                         mesh, rules)
  out = jax.eval_shape(fn, *args)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a, x) for a, x in zip(
      in_axes, args, strict=True)), out_specs=spec(out_axes, out), check_vma=False)(*args)
