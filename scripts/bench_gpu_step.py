"""The official-shaped training step on one accelerator: tokens/s and MFU per attention
implementation, in one short run (random weights, a synthetic batch of the pipeline's shapes).

The step is the trainer's (`TrainableSplit.of`, `place`, `make_train_step`, `jit_train_step`). MFU
counts model FLOPs as MaxText does and as `plan_7b.analytic_flops` does: the frozen ViT forward
once, the trained Q-Formers and projection three times, the frozen LLaMA with LoRA twice its forward
(~4N per token), attention score/value products three times; no remat recompute. Peak: dense bf16
FLOP/s of the device (`--peak`, or known from its kind).

  PYTHONPATH=. python scripts/bench_gpu_step.py [--impls xla,cudnn] [--llm_depth 32] ...

Lower `--llm_depth`/`--vit_depth`/`--videos` until the step fits one device (the printed shapes
say what ran). On CPU (the smoke test) only `xla` runs; `cudnn` needs a GPU and bf16.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.data.batch import Layout
from ivcr_jax.data.pipeline import frame_slots
from ivcr_jax.models import layers
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib
from scripts import plan_7b

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12}  # dense bf16 FLOP/s


def synthetic_batch(layout: Layout, seq: int, videos: int, frames_per_video: int,
                    item_shape: Sequence[int], vocab: int, seed: int = 0) -> dict:
  """A batch of `pipeline.assemble`'s shapes: each row splices its share of the videos (of
  `frames_per_video` frames each, packed) after a short prefix and supervises the rest."""
  rng = np.random.default_rng(seed)
  shapes = plan_7b.abstract_batch(layout, seq, videos, videos * frames_per_video, item_shape)
  b = layout.batch_size
  per_video = layout.tokens_per_video(frames_per_video)
  table_width = layout.tokens_per_video(layout.frames)
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  batch["frames"] = rng.integers(0, 256, shapes["frames"].shape, dtype=np.uint8)
  batch["frame_slot"] = frame_slots([frames_per_video] * videos, videos, layout.frames)
  batch["qformer_text_ids"] = rng.integers(3, 1000, shapes["qformer_text_ids"].shape)
  batch["qformer_text_mask"][:] = True
  batch["input_ids"] = rng.integers(3, vocab, (b, seq)).astype(np.int32)
  batch["video_slot"][:] = -1
  for row in range(b):
    start = 16
    for v in range(row, videos, b):
      batch["video_slot"][row, start:start + per_video] = v * table_width + np.arange(per_video)
      start += per_video
    batch["labels"][row] = np.where(np.arange(seq) > start, batch["input_ids"][row], -100)
  batch["attention_mask"][:] = True
  batch["position_ids"][:] = np.arange(seq)
  return batch


def run(preset: str, impl: str, *, seq: int, videos: int, frames: int, batch_size: int,
        steps: int, vit_depth: int | None, llm_depth: int | None, remat: str | None,
        peak: float) -> dict:
  """Times `steps` train steps (after one compile-and-warm-up step) with `impl` attention."""
  cfg = get_config(preset).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.model.attention_impl = impl
    cfg.model.vit.depth = vit_depth or cfg.model.vit.depth
    cfg.model.llm.depth = llm_depth or cfg.model.llm.depth
    cfg.model.llm.remat_policy = remat or cfg.model.llm.remat_policy
    cfg.train.update(batch_size=batch_size, grad_accum=1)
  layout = Layout.from_config(cfg, batch_size)
  frames = frames or layout.frames
  mesh = sharding.make_mesh(cfg.mesh)
  model = sharding.create_sharded(lambda: InterLLaVA(cfg.model, rngs=nnx.Rngs(0)), mesh,
                                  cfg.mesh.rules)
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
  tx = optimizer.make_optimizer(cfg.train)
  state, frozen = step_lib.place(split, tx, mesh, cfg.mesh.rules)
  loss_cfg = step_lib.LossConfig.from_config(cfg.train, tuple(range(10)))
  fn = step_lib.jit_train_step(step_lib.make_train_step(split, tx, loss_cfg), state, mesh,
                               cfg.mesh.rules)
  size = cfg.model.vit.image_size
  batch = jax.device_put(synthetic_batch(layout, seq, videos * batch_size, frames,
                                         (size, size, 3), cfg.model.llm.vocab_size))
  key = jax.random.key(0)
  start = time.perf_counter()
  state, metrics = fn(state, frozen, batch, key)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = fn(state, frozen, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  model_flops = batch_size * plan_7b.analytic_flops(
      cfg.model, seq, videos, frames * videos, layout.frames, layout.text_len)["total"]
  return {"impl": impl, "shape": f"B{batch_size} S{seq} {videos}x{frames} frames, ViT "
          f"{cfg.model.vit.depth} / LLaMA {cfg.model.llm.depth} layers, remat "
          f"{cfg.model.llm.remat_policy}", "s/step": seconds,
          "tokens/s": batch_size * seq / seconds, "model TFLOP": model_flops / 1e12,
          "MFU": model_flops / seconds / peak, "first step s": first,
          "finite": bool(metrics["finite"])}


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="official")
  parser.add_argument("--impls", default="xla,cudnn", help="attention implementations")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--videos", type=int, default=11, help="videos per sample")
  parser.add_argument("--frames", type=int, default=0, help="frames per video (0: the most)")
  parser.add_argument("--batch", type=int, default=1, help="samples per step")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--vit_depth", type=int, default=0)
  parser.add_argument("--llm_depth", type=int, default=0)
  parser.add_argument("--remat", default="", help="LLaMA remat policy (default: the preset's)")
  parser.add_argument("--peak", type=float, default=0.0, help="device FLOP/s (0: by kind)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  peak = args.peak or next((p for k, p in PEAK.items() if k in device.device_kind), math.nan)
  dtype = get_config(args.preset).model.dtype
  print(f"{device.device_kind} ({device.platform}), peak {peak / 1e12:.0f} TFLOP/s, jax "
        f"{jax.__version__}", flush=True)
  rows = []
  for impl in args.impls.split(","):
    try:
      layers.resolve_attention(impl, dtype)
    except ValueError as e:
      print(f"{impl}: skipped ({e})", flush=True)
      continue
    rows.append(run(args.preset, impl, seq=args.seq, videos=args.videos, frames=args.frames,
                    batch_size=args.batch, steps=args.steps, vit_depth=args.vit_depth or None,
                    llm_depth=args.llm_depth or None, remat=args.remat or None, peak=peak))
    print(rows[-1], flush=True)
  if rows:
    print("\n| attention | shape | s/step | tokens/s | model TFLOP/step | MFU | first step s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
      print(f"| {r['impl']} | {r['shape']} | {r['s/step']:.3f} | {r['tokens/s']:.0f} | "
            f"{r['model TFLOP']:.1f} | {r['MFU']:.1%} | {r['first step s']:.0f} |")
  return rows


if __name__ == "__main__":
  main()
