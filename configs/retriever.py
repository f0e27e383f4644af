"""The documented config path, `--config=configs/retriever.py[:PRESET]`.

The presets live in the package (`ivcr_jax/configs/retriever.py`) so that an installed copy has
them; this file re-exports them for a checkout.
"""

from ivcr_jax.configs.retriever import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
