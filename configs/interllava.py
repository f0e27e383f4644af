"""The documented config path, `--config=configs/interllava.py[:PRESET]`.

The presets live in the package (`ivcr_jax/configs/interllava.py`) so that an installed copy has
them; this file re-exports them for a checkout.
"""

from ivcr_jax.configs.interllava import PRESETS, get_config

__all__ = ["PRESETS", "get_config"]
