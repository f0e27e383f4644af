"""Where checkpoint tensors come from: in-memory state dicts, safetensors files, torch files.

Every source hands out one tensor at a time so that converting a 7B checkpoint never holds two
full copies in memory.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterable, Mapping

import numpy as np

from ivcr_jax.jsonfile import read_json


class TensorSource(abc.ABC):
  """Read-only access to named tensors, one at a time."""

  name: str = "checkpoint"

  @abc.abstractmethod
  def keys(self) -> Iterable[str]:
    """All tensor names."""

  @abc.abstractmethod
  def get(self, key: str) -> np.ndarray:
    """One tensor as a numpy array (a memory-mapped view where the format allows)."""

  def shape(self, key: str) -> tuple[int, ...]:
    """One tensor's shape; formats that can tell it without reading the data override this."""
    return tuple(self.get(key).shape)


class DictSource(TensorSource):
  """Tensors already in memory (numpy arrays or torch tensors, converted on access)."""

  def __init__(self, tensors: Mapping[str, object], name: str = "state dict", prefix: str = ""):
    self.tensors = tensors
    self.name = name
    self.prefix = prefix

  def keys(self):
    n = len(self.prefix)
    return [k[n:] for k in self.tensors if k.startswith(self.prefix)]

  def get(self, key):
    return to_numpy(self.tensors[self.prefix + key])

  def shape(self, key):
    return tuple(np.shape(self.tensors[self.prefix + key]))


class SafetensorsSource(TensorSource):
  """A `.safetensors` file, or a sharded checkpoint through its `*.safetensors.index.json`.

  Every `get` memory-maps the file with `safe_open`, copies out one tensor and unmaps it again,
  so the pages read do not stay resident for the rest of the conversion. bf16 tensors come back
  as `ml_dtypes.bfloat16` arrays.
  """

  def __init__(self, path: str | os.PathLike):
    from safetensors import safe_open

    self.name = os.fspath(path)
    self.files = _shard_map(self.name)
    if self.files is None:
      with safe_open(self.name, framework="numpy") as f:
        self.files = dict.fromkeys(f.keys(), self.name)

  def keys(self):
    return list(self.files)

  def get(self, key):
    from safetensors import safe_open

    with safe_open(self.files[key], framework="numpy") as f:
      return f.get_tensor(key)

  def shape(self, key):
    from safetensors import safe_open

    with safe_open(self.files[key], framework="numpy") as f:
      return tuple(f.get_slice(key).get_shape())


class TorchFileSource(TensorSource):
  """A torch `state_dict` file (`pytorch_model.bin`, `.pt`) or a sharded one through its
  `*.bin.index.json`, loaded with `mmap=True` so tensors are only read when asked for.

  Needs torch (imported here only); bf16 tensors come back widened to float32. `key` names the
  entry of a saved dict that holds the state dict (LAVIS / IVCR checkpoints: "model"); with
  `bare`, a file without that entry whose values are all tensors is the state dict itself
  (`torch.save(model.state_dict())`).
  """

  def __init__(self, path: str | os.PathLike, key: str | None = None, bare: bool = False):
    self.name = os.fspath(path)
    self.key = key
    self.bare = bare
    self.files = _shard_map(self.name)
    self._loaded: dict[str, Mapping[str, object]] = {}
    if self.files is None:
      self.files = dict.fromkeys(self._load(self.name), self.name)

  def _load(self, file: str) -> Mapping[str, object]:
    if file not in self._loaded:
      import torch  # torch checkpoints need torch to unpickle

      loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
      is_state_dict = isinstance(loaded, Mapping) and all(
          hasattr(v, "shape") for v in loaded.values())
      if self.key is not None and not (self.bare and is_state_dict):
        if not isinstance(loaded, Mapping) or self.key not in loaded:
          found = list(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
          raise KeyError(f"{file} has no {self.key!r} entry (found {found})")
        loaded = loaded[self.key]
      self._loaded[file] = loaded
    return self._loaded[file]

  def keys(self):
    return list(self.files)

  def get(self, key):
    return to_numpy(self._load(self.files[key])[key])

  def shape(self, key):
    return tuple(self._load(self.files[key])[key].shape)


def directory_source(directory: str | os.PathLike, stem: str = "model") -> TensorSource:
  """The weights of a Hugging Face model directory: `{stem}.safetensors[.index.json]`, else
  `pytorch_{stem}.bin[.index.json]` (e.g. stem `adapter_model` for a PEFT adapter)."""
  directory = os.fspath(directory)
  candidates = [(f"{stem}.safetensors.index.json", SafetensorsSource),
                (f"{stem}.safetensors", SafetensorsSource),
                (f"pytorch_{stem}.bin.index.json", TorchFileSource),
                (f"pytorch_{stem}.bin", TorchFileSource),
                (f"{stem}.bin", TorchFileSource)]
  for name, kind in candidates:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return kind(path)
  raise FileNotFoundError(f"no {stem} weights in {directory} (looked for "
                          f"{', '.join(name for name, _ in candidates)})")


def _shard_map(path: str) -> dict[str, str] | None:
  """Key -> shard file of a sharded checkpoint's index (None when `path` is not an index)."""
  if not path.endswith(".index.json"):
    return None
  weight_map = read_json(path)["weight_map"]
  base = os.path.dirname(path)
  return {key: os.path.join(base, file) for key, file in weight_map.items()}


def to_numpy(tensor: object) -> np.ndarray:
  """numpy view of a numpy array or a CPU torch tensor (bf16 widened to float32)."""
  if isinstance(tensor, np.ndarray):
    return tensor
  if type(tensor).__module__.startswith("torch"):
    import torch  # only reached when the caller already holds torch tensors

    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    return tensor.detach().cpu().numpy()
  return np.asarray(tensor)


def file_sha256(path: str | os.PathLike) -> str:
  """sha256 of a file's bytes, read in 1 MiB chunks (weights shipped or rebuilt are checked
  against it)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
