"""The documented config path, `--config=configs/toy_llm.py[:PRESET]` (see the packaged file)."""

from ivcr_jax.configs.toy_llm import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
