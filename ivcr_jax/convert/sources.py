"""Where checkpoint tensors come from: in-memory state dicts, safetensors files, torch files.

Every source hands out one tensor at a time so that converting a 7B checkpoint never holds two
full copies in memory.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping

import numpy as np


class TensorSource(abc.ABC):
  """Read-only access to named tensors, one at a time."""

  name: str = "checkpoint"

  @abc.abstractmethod
  def keys(self) -> Iterable[str]:
    """All tensor names."""

  @abc.abstractmethod
  def get(self, key: str) -> np.ndarray:
    """One tensor as a numpy array (a memory-mapped view where the format allows)."""


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
