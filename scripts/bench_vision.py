"""Vision-tower throughput on this machine: frames/s and achieved FLOP/s.

Measures, side by side in one run:
- the frozen EVA ViT (+ ln_vision) forward, which dominates InterLLaVA's FLOPs;
- the whole video branch (ViT -> image Q-Former with timestamp text -> video Q-Former -> proj);
at the `tiny` config and at real ViT-g width (1408, 16 heads, MLP 6144, 224 px) with 2 blocks.
FLOPs come from XLA's cost analysis of the compiled function (layers unrolled, since XLA counts a
scanned loop body once); the fraction is against the matmul limit of this CPU measured in the
same run (a 2048^3 float32 matmul).

  python scripts/bench_vision.py [--frames 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.interllava import get_config
from ivcr_jax.data import pipeline
from ivcr_jax.models import eva_vit
from ivcr_jax.models.vision_tower import VisionTower


def timed(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_limit(repeats: int) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 2048)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * 2048**3 / timed(f, a, repeats=repeats)


def bench(name: str, cfg, frames: int, repeats: int, peak: float) -> None:
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.vit.scan_layers = False
  tower = VisionTower(cfg.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(tower)
  size = cfg.model.vit.image_size
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)  # one video's table
  text_len = 14
  ids = rng.integers(3, 1000, (frames, text_len)).astype(np.int32)
  mask = np.ones((frames, text_len), bool)
  slot = pipeline.frame_slots([frames], 1, frames)

  def vit_only(state, video):
    return nnx.merge(graphdef, state).encode_frames(video)

  def branch(state, video, slot, ids, mask):
    model = nnx.merge(graphdef, state)
    return model(model.encode_frames(video), slot, text_ids=ids, text_mask=mask)[0]

  for label, fn, args in (("ViT+ln_vision", vit_only, (state, video)),
                          ("video branch", branch, (state, video, slot, ids, mask))):
    compiled = jax.jit(fn).lower(*args).compile()
    flops = compiled.cost_analysis()["flops"]
    seconds = timed(compiled, *args, repeats=repeats)
    rate = flops / seconds
    print(f"{name:<22} {label:<14} {frames / seconds:9.1f} frames/s  "
          f"{flops / frames / 1e9:7.3f} GFLOP/frame  {rate / 1e9:6.1f} GFLOP/s  "
          f"{rate / peak:5.1%} of matmul limit")
  analytic = eva_vit.flops_per_image(cfg.model.vit)
  print(f"{name:<22} (analytic ViT matmul FLOPs: {analytic / 1e9:.3f} GFLOP/frame)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--frames", type=int, default=16, help="frames per call (one video)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  peak = matmul_limit(args.repeats)
  print(f"device: {jax.devices()[0].device_kind}; float32 matmul limit {peak / 1e9:.1f} GFLOP/s")

  tiny = get_config("tiny")
  bench("tiny", tiny, args.frames, args.repeats, peak)

  vitg = get_config("small").copy_and_resolve_references()
  with vitg.unlocked():
    vitg.model.vit.update(dict(width=1408, heads=16, mlp_dim=6144, depth=2, image_size=224,
                               patch_size=14))
  bench("ViT-g width, 2 blocks", vitg, args.frames, args.repeats, peak)


if __name__ == "__main__":
  main()
