"""ivcr_jax: InterLLaVA (IVCR-200K) in JAX/Flax NNX.

Importing the package sets one XLA:CPU flag before JAX starts its backends (it has no effect on
GPU/TPU, and none once a backend has started): `--xla_cpu_experimental_ynn_fusion_type=` turns off
jaxlib 0.10's YNNPACK dot fusions, so XLA:CPU runs dots through Eigen. Measured on the 2-core
benchmark machine (float32): the `small` ViT forward 11.5 -> 6.1 s, the retrieval train step
20 -> 14 s, batched 257x64 attention matmuls 31 -> 55-68 GFLOP/s (README, "Speed against
PyTorch"). The maths is the same; float32 results differ in rounding only. A user who names the
flag in `XLA_FLAGS` keeps their own value; `IVCR_JAX_XLA_DEFAULTS=0` leaves `XLA_FLAGS` alone.
"""

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def _apply_xla_defaults() -> None:
  if os.environ.get("IVCR_JAX_XLA_DEFAULTS", "1") == "0":
    return
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


_apply_xla_defaults()
