"""Which parameters are trained, decided by the config's `model.trainable` groups.

Official (reference §1.7): both Q-Formers, the query tokens, the frame position embedding, the
projection and LoRA are trained; the ViT, `ln_vision` and the LLaMA base are frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx

# Each group is named by the path component that identifies its parameters in the model tree
# (`vit` includes `ln_vision`, which lives inside the ViT module).
GROUPS = ("vit", "qformer", "query_tokens", "frame_position_embedding", "video_qformer",
          "video_query_tokens", "projection", "llm", "lora")
# What the official recipe trains, and what an official IVCR checkpoint holds (§1.7, §6.2).
OFFICIAL = ("qformer", "query_tokens", "frame_position_embedding", "video_qformer",
            "video_query_tokens", "projection", "lora")


def _is_lora(path: tuple) -> bool:
  return any(isinstance(p, str) and p.startswith("lora_") for p in path)


def trainable_filter(groups: Sequence[str]) -> Callable[[tuple, object], bool]:
  """An `nnx` filter `(path, value) -> bool` selecting the parameters of `groups`.

  `llm` means the LLaMA base weights; `lora` the adapter weights (paths containing `lora_*`),
  so `("lora",)` trains the adapters of a frozen LLaMA.
  """
  unknown = set(groups) - set(GROUPS)
  if unknown:
    raise ValueError(f"unknown trainable groups {sorted(unknown)}; known: {sorted(GROUPS)}")
  wanted = set(groups)

  def is_trainable(path: tuple, value: object) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    if _is_lora(path):
      return "lora" in wanted
    return any(p in wanted for p in path if isinstance(p, str))

  return is_trainable


def split_trainable(model: nnx.Module, groups: Sequence[str]):
  """`(graphdef, trainable_state, frozen_state)` of `model`: the split the train step uses."""
  return nnx.split(model, trainable_filter(groups), ...)
