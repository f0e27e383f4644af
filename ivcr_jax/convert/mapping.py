"""Checkpoint key-mapping tables: one table per format drives both import and export.

A table is a list of `Rule`s. Each rule ties one parameter of our model (a path in the NNX state,
with an optional layer index into a layer-stacked parameter) to one or more tensors of the
foreign checkpoint, through an invertible `Transform`. Import reads tensors one at a time from a
`TensorSource` (memory-mapped where the format allows) and checks every shape; export runs the
same rules backwards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert.sources import TensorSource
from ivcr_jax.models.llama import LoRADense
from ivcr_jax.training.checkpointing import CheckpointError, some

Path = tuple[str | int, ...]


# Non-persistent buffers that old torch checkpoints still carry; recomputed by the models.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# How the converters report progress (`logging.info`, `print`, a list's `append`).
Log = Callable[[str], None]


class Transform:
  """Invertible conversion between torch tensors and one JAX parameter.

  `to_jax(tensors, shape)` gets the source tensors in rule order and the target shape;
  `to_torch(array)` returns the tensors in rule order; `source_shapes(shape)` says which shapes
  the source tensors must have (None: checked by `to_jax` itself).
  """

  def source_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...] | None]:
    return [shape]

  def to_jax(self, tensors: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return tensors[0].reshape(shape)

  def to_torch(self, array: np.ndarray) -> list[np.ndarray]:
    return [array]


IDENTITY = Transform()


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
  """torch keeps the parameter flat (e.g. a bias `[H*Dh]` stored by us as `[H, Dh]`)."""

  def source_shapes(self, shape):
    return [(math.prod(shape),)]

  def to_torch(self, array):
    return [array.reshape(-1)]


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """torch Linear weight `[out, in]` <-> kernel `[*in_dims, *out_dims]` (first `n_in` dims in)."""

  n_in: int = 1

  def source_shapes(self, shape):
    return [(math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))]

  def to_jax(self, tensors, shape):
    return tensors[0].T.reshape(shape)

  def to_torch(self, array):
    return [array.reshape(math.prod(array.shape[:self.n_in]), -1).T]


@dataclasses.dataclass(frozen=True)
class Int8Linear(Transform):
  """A bitsandbytes LLM.int8 Linear as `state_dict` saves it (the official 8-bit LLaMA): int8
  `weight` `[out, in]` in row format and `SCB` `[out]`, each row's absolute maximum, so that
  weight = int8 * SCB / 127 <-> kernel `[*in_dims, *out_dims]`."""

  n_in: int = 1

  def source_shapes(self, shape):
    out_features = math.prod(shape[self.n_in:])
    return [(out_features, math.prod(shape[:self.n_in])), (out_features,)]

  def to_jax(self, tensors, shape):
    weight, scb = tensors
    if weight.dtype != np.int8:
      raise CheckpointError(f"an int8 weight with SCB statistics has dtype {weight.dtype}")
    dense = weight.astype(np.float32) * (scb.astype(np.float32)[:, None] / 127.0)
    return dense.T.reshape(shape)

  def to_torch(self, array):
    dense = array.reshape(math.prod(array.shape[:self.n_in]), -1).T.astype(np.float32)
    scb = np.abs(dense).max(axis=1)
    scale = np.where(scb > 0, 127.0 / np.maximum(scb, 1e-30), 0.0)[:, None]
    return [np.round(dense * scale).astype(np.int8), scb]


@dataclasses.dataclass(frozen=True)
class Conv2d(Transform):
  """torch conv weight `[out, in, kh, kw]` <-> our patch kernel `[kh, kw, in, out]`."""

  def source_shapes(self, shape):
    kh, kw, cin, cout = shape
    return [(cout, cin, kh, kw)]

  def to_jax(self, tensors, shape):
    return tensors[0].transpose(2, 3, 1, 0).reshape(shape)

  def to_torch(self, array):
    return [array.transpose(3, 2, 0, 1)]


@dataclasses.dataclass(frozen=True)
class Concat(Transform):
  """Several torch tensors stacked along a new leading axis; a None source is an implicit zero
  tensor (e.g. the k slice of EVA's q/v-only bias) that is dropped again on export."""

  present: tuple[bool, ...]

  def source_shapes(self, shape):
    return [(math.prod(shape[1:]),) for p in self.present if p]

  def to_jax(self, tensors, shape):
    it = iter(tensors)
    parts = [next(it).reshape(shape[1:]) if p else np.zeros(shape[1:], tensors[0].dtype)
             for p in self.present]
    return np.stack(parts)

  def to_torch(self, array):
    return [array[i].reshape(-1) for i, p in enumerate(self.present) if p]


@dataclasses.dataclass(frozen=True)
class Rule:
  """`sources` (torch keys, in transform order) <-> the parameter at `target`.

  `layer` is the index into the leading axis of a layer-stacked target (None: not stacked).
  """

  sources: tuple[str, ...]
  target: Path
  transform: Transform = IDENTITY
  layer: int | None = None


def rule(source: str | Sequence[str], target: str, transform: Transform = IDENTITY,
         layer: int | None = None) -> Rule:
  """Convenience constructor: `target` is '/'-separated (empty components are dropped, so a
  table can be rooted at a submodule with target prefix ""); digit components are list indices."""
  sources = (source,) if isinstance(source, str) else tuple(source)
  path = tuple(int(p) if p.isdigit() else p for p in target.split("/") if p)
  return Rule(sources, path, transform, layer)


def import_params(rules: Sequence[Rule], source: TensorSource, shapes: Mapping[Path, tuple],
                  dtypes: Mapping[Path, np.dtype], *, log: Log | None = None,
                  ) -> tuple[dict[Path, np.ndarray], list[str]]:
  """Reads every rule's tensors from `source` and builds the target parameters.

  Args:
    rules: the format's table for the model's dimensions.
    source: where tensors come from (read one at a time).
    shapes, dtypes: the shape and dtype of every target parameter (full stacked shape).
  Returns:
    `(params, unused_keys)`: target path -> array, and the source keys no rule read.
  Raises:
    CheckpointError naming every missing key, or the first key with a wrong shape.
  """
  available = set(source.keys())
  missing = sorted({k for r in rules for k in r.sources if k not in available})
  if missing:
    raise CheckpointError(f"{source.name}: missing keys: {some(missing)}")
  out: dict[Path, np.ndarray] = {}
  for r in rules:
    if r.target not in shapes:
      raise CheckpointError(
          f"rule for {r.sources} targets unknown parameter {'/'.join(map(str, r.target))}")
    full = tuple(shapes[r.target])
    shape = full[1:] if r.layer is not None else full
    tensors = [source.get(k) for k in r.sources]
    for key, tensor, expected in zip(r.sources, tensors, r.transform.source_shapes(shape),
                                     strict=True):
      if expected is not None and tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{source.name}: key {key!r} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected)} for {'/'.join(map(str, r.target))}")
    value = r.transform.to_jax(tensors, shape).astype(dtypes[r.target], copy=False)
    if r.layer is None:
      out[r.target] = value
    else:
      if r.target not in out:
        out[r.target] = np.zeros(full, dtypes[r.target])
      out[r.target][r.layer] = value
  if log:
    log(f"{source.name}: loaded {len(out)} parameters from {sum(len(r.sources) for r in rules)} "
        f"tensors")
  return out, sorted(available - {k for r in rules for k in r.sources})


def export_params(rules: Sequence[Rule], params: Mapping[Path, np.ndarray]
                  ) -> Iterable[tuple[str, np.ndarray]]:
  """Yields `(torch_key, tensor)` for every rule, one tensor at a time (streaming writers)."""
  for r in rules:
    value = np.asarray(params[r.target])
    if r.layer is not None:
      value = value[r.layer]
    yield from zip(r.sources, r.transform.to_torch(value), strict=True)


def assign_params(model: nnx.Module, rules: Sequence[Rule], source: TensorSource, *,
                  shardings: nnx.State | None = None, strict: bool = True,
                  log: Log | None = None) -> list[str]:
  """Sets the rules' target variables of `model` (concrete or `nnx.eval_shape`d) in place; the
  one import path of every format. Returns the checkpoint's keys that no rule read.

  One tensor at a time: read it, transform it on the host, put it on the device(s) with the
  target's sharding (into its layer of a stacked parameter), drop the host copy.

  Raises:
    CheckpointError naming missing keys, a key with a wrong shape, or (when `strict`) keys of
    the checkpoint that no rule reads.
  """
  available = set(source.keys())
  wanted = {k for r in rules for k in r.sources}
  missing = sorted(wanted - available)
  if missing:
    raise CheckpointError(f"{source.name}: missing keys: {some(missing)}")
  unused = sorted(k for k in available - wanted if not k.endswith(IGNORED_SUFFIXES))
  if strict and unused:
    raise CheckpointError(f"{source.name}: unexpected keys: {some(unused)}")
  variables = dict(nnx.to_flat_state(nnx.state(model)))
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  groups: dict[Path, list[Rule]] = {}
  for r in rules:
    if r.target not in variables:
      raise CheckpointError(f"rule for {r.sources} targets unknown parameter "
                            f"{'/'.join(map(str, r.target))}")
    groups.setdefault(r.target, []).append(r)
  for target, group in groups.items():
    var = variables[target]
    shape, dtype = tuple(var.shape), np.dtype(var.get_value().dtype)
    where = flat_shardings.get(target)
    if group[0].layer is None:
      arrays, _ = import_params(group, source, {target: shape}, {target: dtype})
      var.set_value(jax.device_put(arrays.pop(target), where))
      continue
    # Layer-stacked: filled on device one layer at a time (buffer donated), so the host never
    # holds more than one layer's tensor.
    stacked = jnp.zeros(shape, dtype, device=where)
    for r in group:
      arrays, _ = import_params([dataclasses.replace(r, layer=None)], source,
                                {target: shape[1:]}, {target: dtype})
      stacked = _set_layer(stacked, arrays.pop(target), r.layer)
    var.set_value(stacked)
  if log:
    log(f"{source.name}: set {len(groups)} parameters from {len(wanted)} tensors")
  return unused




@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: jax.Array, layer: int) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)


class HostParams(Mapping):
  """Path -> host array of a module's variables (the input of `export_params`), fetched on
  access with one cached: an export walks a table target by target, so it holds one tensor at a
  time. `merge_lora`: LoRA kernels come merged (`W + scale * A B`); `dtype`: cast on the host."""

  def __init__(self, module: nnx.Module, *, merge_lora: bool = False,
               dtype: np.dtype | None = None):
    self.module, self.merge_lora, self.dtype = module, merge_lora, dtype
    self.variables = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    self._cached: tuple[Path, np.ndarray] | None = None

  def _value(self, path: Path) -> jax.Array:
    if self.merge_lora and path[-1] == "kernel":
      owner = self.module
      for part in path[:-1]:
        owner = owner[part] if isinstance(part, int) else getattr(owner, part)
      if isinstance(owner, LoRADense):
        return owner.merged_kernel()
    return self.variables[path].get_value()

  def __getitem__(self, path: Path) -> np.ndarray:
    if self._cached is None or self._cached[0] != path:
      self._cached = None  # release the previous tensor before fetching the next one
      value = np.asarray(jax.device_get(self._value(path)))
      self._cached = (path, value if self.dtype is None else value.astype(self.dtype))
    return self._cached[1]

  def __iter__(self):
    return iter(self.variables)

  def __len__(self):
    return len(self.variables)
