"""The official 7B training step at scale, on paper: compiled ahead of time on abstract meshes.

The step of the `official` preset (EVA ViT-g 39 blocks, both Q-Formers, LLaMA-2-7B with LoRA r=32,
bf16 compute, f32 trainables, remat) is lowered and compiled through the trainer's own path
(`TrainableSplit.of`, `make_train_step`, `jit_train_step`: the config's sharding rules, donated
state) on fake CPU devices, with shapes only: the model is `nnx.eval_shape`d and every argument is a
`jax.ShapeDtypeStruct` carrying the sharding `step.place` would give it, so no weight is ever
allocated. Per plan (hardware, mesh, samples per micro-step) it reports:
- bytes per device from `compiled.memory_analysis()` of the full-depth step (XLA:CPU's buffer
  assignment, an estimate of what XLA:GPU/TPU would plan);
- FLOPs per step: XLA's cost analysis counts a scanned layer stack once, so the global count is
  extrapolated linearly per layer from unrolled one-device compiles at (ViT, LLaMA) depths
  (1, 1), (2, 1), (1, 2); beside it an analytic count (2N per token for the forward-only ViT, 4N
  for the frozen LLaMA with LoRA, 6N for the trained Q-Formers and projection, plus attention);
  how evenly the partitioned program splits the work comes from its own per-device count
  (which, like the one-device count of a scanned program, counts each layer stack once);
- the step time this implies at a stated MFU on 8x H100 and on TPU v5p-8;
- the peak bytes per device while the state is built (the jitted init straight into the
  shardings, compiled ahead of time) and restored, beside the whole model's bytes that one device
  held when the model was built there first.

One sample per micro-step as official: a retrieval turn's 10 candidates + 1 video (video table
11 per sample, 64 frames each), sequence bucket 4096.

  PYTHONPATH=. python scripts/plan_7b.py [--plans h100:1x8x1:1,h100:1x8x1:8,...] [--mfu 0.4]
  PYTHONPATH=. python scripts/plan_7b.py --preset paper --vision  # padded vs packed frames
"""

from __future__ import annotations

import os

# Fake devices for the abstract meshes: must be set before jax is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.data import batch as batch_lib
from ivcr_jax.data.batch import Layout
from ivcr_jax.models import eva_vit, trainable
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.models.vision_tower import VisionTower
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib

DIGITS = tuple(range(10))  # token ids only matter for shapes here


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  devices: int  # JAX devices (a v5p chip's two TensorCores are one megacore device)
  peak: float  # dense bf16 FLOP/s per device
  memory: float  # bytes of HBM per device


HARDWARE = {
    "h100": Hardware("8x H100 SXM", 8, 989e12, 80e9),
    "v5p": Hardware("TPU v5p-8", 4, 459e12, 95e9),
}
DEFAULT_PLANS = "h100:1x8x1:1,h100:1x8x1:8,h100:1x4x2:8,v5p:1x4x1:4"


@dataclasses.dataclass(frozen=True)
class Plan:
  hardware: Hardware
  mesh: tuple[int, int, int]
  batch: int  # samples per micro-step (global)

  @classmethod
  def parse(cls, text: str) -> Plan:
    hw, mesh, batch = text.split(":")
    shape = tuple(int(x) for x in mesh.split("x"))
    if math.prod(shape) > HARDWARE[hw].devices:
      raise ValueError(f"mesh {mesh} has more devices than {HARDWARE[hw].name}")
    return cls(HARDWARE[hw], shape, int(batch))


def plan_config(preset: str, *, mesh: Sequence[int], vit_depth: int | None = None,
                llm_depth: int | None = None, scan: bool = True) -> ml_collections.ConfigDict:
  """`preset` on `mesh`, optionally with fewer ViT blocks / LLaMA layers or unrolled stacks
  (and then the frame table in one chunk: its chunks are a loop XLA counts once too)."""
  cfg = get_config(preset).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = tuple(mesh)
    cfg.model.vit.scan_layers = cfg.model.llm.scan_layers = scan
    if not scan:
      cfg.model.video.frame_chunks = 1
    if vit_depth:
      cfg.model.vit.depth = vit_depth
    if llm_depth:
      cfg.model.llm.depth = llm_depth
  return cfg


def abstract_batch(layout: Layout, seq: int, videos: int, frames: int,
                   item_shape: Sequence[int], field: str = "frames"
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of `pipeline.assemble`'s batch for one (sequence, video-table,
  frame-table) bucket triple (features as a float16 store's)."""
  spec = batch_lib.batch_spec(layout, seq=seq, videos=videos, frames=frames, field=field,
                              item_shape=item_shape, item_dtype=np.float16)
  return {key: jax.ShapeDtypeStruct(*shape_dtype) for key, shape_dtype in spec.items()}


def abstract_state(split: step_lib.TrainableSplit, tx, mesh: jax.sharding.Mesh, rules
                   ) -> tuple[dict, nnx.State]:
  """What `step.place` puts on `mesh` (train state and frozen weights), as sharded
  ShapeDtypeStructs with the shardings of `step.train_state_shardings`."""
  state_sh, frozen_sh = step_lib.train_state_shardings(split, tx, mesh, rules)
  sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  shapes = {"params": split.params, "opt": jax.eval_shape(tx.init, split.params),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state = jax.tree.map(sds, shapes, state_sh)
  leaves, treedef = jax.tree.flatten(split.frozen)
  frozen = treedef.unflatten([sds(x, sh) for x, sh in zip(leaves, jax.tree.leaves(frozen_sh),
                                                          strict=True)])
  return state, frozen


def per_device_bytes(tree) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Compiled:
  flops: float  # XLA cost analysis (per device of the partitioned program)
  memory: object  # CompiledMemoryStats
  state_bytes: dict  # per device: params, opt, frozen, batch
  seconds: float  # lower + compile
  params: tuple[int, int]  # trainable, frozen
  init_peak: float  # bytes per device of the jitted init straight into the shardings
  model_bytes: float  # the whole model (what one device held when it was built there first)


def init_memory(cfg: ml_collections.ConfigDict) -> tuple[float, float]:
  """(peak bytes per device of `sharding.sharded_init`, as `experiment.build_model` runs it,
  from its compiled buffer assignment; bytes of the whole model)."""
  make = lambda: InterLLaVA(cfg.model, rngs=nnx.Rngs(0))
  _, init = sharding.sharded_init(make, sharding.make_mesh(cfg.mesh), cfg.mesh.rules)
  mem = init.lower().compile().memory_analysis()
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.eval_shape(
      lambda: nnx.split(make())[1])))
  return float(mem.output_size_in_bytes + mem.temp_size_in_bytes), float(whole)


def compile_step(cfg: ml_collections.ConfigDict, batch: int, seq: int, videos_per_sample: int,
                 frames_per_sample: int | None = None) -> Compiled:
  """Lowers and compiles the trainer's jitted step for `cfg` on its mesh, shapes only
  (`frames_per_sample` frame-table rows; default: every video at full length)."""
  start = time.perf_counter()
  model = nnx.eval_shape(lambda: InterLLaVA(cfg.model, rngs=nnx.Rngs(0)))
  split = step_lib.TrainableSplit.of(model, cfg.model.trainable)
  tx = optimizer.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  state, frozen = abstract_state(split, tx, mesh, rules)
  layout = Layout.from_config(cfg, batch)
  size = cfg.model.vit.image_size
  frames = (frames_per_sample or videos_per_sample * layout.frames) * batch
  batch_sds = abstract_batch(layout, seq, videos_per_sample * batch, frames, (size, size, 3))
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(split, tx, step_lib.LossConfig.from_config(cfg.train, DIGITS)),
      state, mesh, rules)
  batch_sds = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for (k, v), sh in zip(
      batch_sds.items(), step_lib.batch_shardings(batch_sds, mesh, rules).values(), strict=True)}
  compiled = fn.lower(state, frozen, batch_sds, jax.eval_shape(jax.random.key, 0)).compile()
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  init_peak, model_bytes = init_memory(cfg)
  return Compiled(
      float(compiled.cost_analysis()["flops"]), compiled.memory_analysis(),
      {"params": per_device_bytes(state["params"]), "opt": per_device_bytes(state["opt"]),
       "frozen": per_device_bytes(frozen), "batch": per_device_bytes(batch_sds)},
      time.perf_counter() - start, (count(state["params"]), count(frozen)), init_peak,
      model_bytes)


def global_flops(preset: str, seq: int, videos: int, frames: int | None, log
                 ) -> dict[tuple[int, int] | str, float]:
  """XLA FLOPs of one sample's step on one device with unrolled layers at (ViT, LLaMA) depths
  (1, 1), (2, 1), (1, 2), and extrapolated linearly per layer to the preset's depths (XLA
  counts a scanned stack once), the frame table in one chunk; and under "counted once" the
  one-device count of what a partitioned program counts. On several devices the partitioner
  may split different depths differently, so only one-device counts are extrapolated."""
  flops = {}
  for depths in ((1, 1), (2, 1), (1, 2)):
    cfg = plan_config(preset, mesh=(1, 1, 1), vit_depth=depths[0], llm_depth=depths[1],
                      scan=False)
    c = compile_step(cfg, 1, seq, videos, frames)
    flops[depths] = c.flops
    log(f"  unrolled depths {depths}: {c.flops / 1e12:.3f} TFLOP (compiled in {c.seconds:.0f} s)")
  m = get_config(preset).model
  flops[m.vit.depth, m.llm.depth] = (flops[1, 1] + (m.vit.depth - 1) * (flops[2, 1] - flops[1, 1])
                                     + (m.llm.depth - 1) * (flops[1, 2] - flops[1, 1]))
  # What the partitioned programs count (each stack and the frame chunks' loop once), on one
  # device: the reference of the work balance.
  flops["counted once"] = flops[1, 1]
  if m.video.frame_chunks > 1:
    cfg = plan_config(preset, mesh=(1, 1, 1), vit_depth=1, llm_depth=1, scan=False)
    with cfg.unlocked():
      cfg.model.video.frame_chunks = m.video.frame_chunks
    flops["counted once"] = compile_step(cfg, 1, seq, videos, frames).flops
  return flops


def analytic_flops(model: ml_collections.ConfigDict, seq: int, videos: int, table_frames: int,
                   frames: int, text_len: int) -> dict[str, float]:
  """Model FLOPs of one sample's step (2 per multiply-add, no remat recompute), "6N-style": a
  matmul costs 1x its forward FLOPs when nothing needs its gradient (the frozen ViT), 2x when
  only one side does (the frozen LLaMA weights carry input gradients; the Q-Former's projections
  of the frozen ViT features carry weight gradients), 3x when both do (the trained Q-Formers,
  projection and LoRA, and every attention score/value product on a gradient path). Attention
  counts full score matrices, as the XLA attention computes them. The ViT and image Q-Former
  see the `table_frames` rows of the frame table, the video Q-Former `ceil(frames / stride)`
  windows per video of the table."""
  vit, q, vq, llm = model.vit, model.qformer, model.video_qformer, model.llm
  n_img = 1 + (vit.image_size // vit.patch_size) ** 2
  f = table_frames

  def bert_layer(tokens: int, queries: int, h: int, mlp: int, kv_tokens: int, kv_width: int,
                 cross: bool) -> tuple[float, float]:
    """(forward FLOPs on the trained path, of the cross-attention K/V projections)."""
    main = 2 * tokens * 4 * h * h + 4 * tokens * tokens * h + 2 * tokens * 2 * h * mlp
    if not cross:
      return main, 0.0
    main += 2 * queries * 2 * h * h + 4 * queries * kv_tokens * h
    return main, 2 * kv_tokens * 2 * kv_width * h

  image = [bert_layer(q.num_query_tokens + text_len, q.num_query_tokens, q.hidden, q.mlp_dim,
                      n_img, vit.width, i % q.cross_attention_freq == 0) for i in range(q.depth)]
  windows = math.ceil(frames / model.video.stride)
  window_tokens = model.video.window * (q.num_query_tokens + text_len)
  video = [bert_layer(vq.num_query_tokens, vq.num_query_tokens, vq.hidden, vq.mlp_dim,
                      window_tokens, q.hidden, i % vq.cross_attention_freq == 0)
           for i in range(vq.depth)]
  video_tokens = videos * windows * vq.num_query_tokens
  out = {"vit": f * eva_vit.flops_per_image(vit)}
  out["qformers+projection"] = (
      f * sum(3 * a + 2 * b for a, b in image)
      + 3 * videos * windows * sum(a + b for a, b in video)
      + 3 * 2 * video_tokens * q.hidden * llm.hidden)
  h, d, kv = llm.hidden, llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
  dense = llm.depth * 2 * seq * (h * (d + 2 * kv) + d * h + 3 * h * llm.mlp_dim)
  head = 2 * seq * h * llm.vocab_size
  attention = llm.depth * 4 * seq * seq * d
  lora = llm.depth * 2 * seq * model.lora.rank * (4 * h + 2 * d + 2 * kv) if model.lora.rank else 0
  out["llm"] = 2 * (dense + head) + 3 * (attention + lora)
  out["total"] = sum(out.values())
  return out


def vision_flops(preset: str, videos: int, frames: int) -> float:
  """XLA FLOPs of the vision branch of one training step (the frozen ViT forward, the Q-Formers
  and projection forward and backward) for a video table of `videos` and a frame table of
  `frames` rows, on one device; ViT blocks extrapolated from unrolled depths 1 and 2 (the
  Q-Former layers are a Python loop, counted in full)."""
  flops = {}
  for depth in (1, 2):
    cfg = plan_config(preset, mesh=(1, 1, 1), vit_depth=depth, scan=False)
    model = nnx.eval_shape(lambda cfg=cfg: VisionTower(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, train, frozen = trainable.split_trainable(model, cfg.model.trainable)
    size = cfg.model.vit.image_size
    batch = abstract_batch(Layout.from_config(cfg, 1), 8, videos, frames, (size, size, 3))

    def loss(train, frozen, batch, graphdef=graphdef):
      tower = nnx.merge(graphdef, train, frozen)
      tokens, valid = tower(tower.encode_frames(batch["frames"]), batch["frame_slot"],
                            text_ids=batch["qformer_text_ids"],
                            text_mask=batch["qformer_text_mask"])
      return jnp.sum(jnp.where(valid[..., None], tokens, 0).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss)).lower(train, frozen, batch).compile()
    flops[depth] = float(compiled.cost_analysis()["flops"])
  return flops[1] + (get_config(preset).model.vit.depth - 1) * (flops[2] - flops[1])


def frame_table_report(preset: str, log) -> None:
  """The vision FLOPs of each kind of turn with every video padded to the most frames (T, as
  before the packed frame table) and with the packed table (its frame bucket)."""
  cfg = get_config(preset)
  layout = Layout.from_config(cfg, 1)
  d, t = cfg.data, layout.frames
  cases = (("retrieval turn", 10, 10 * d.frames_retrieval),
           ("moment turn", 1, d.frames_moment),
           ("retrieval + moment", 11, 10 * d.frames_retrieval + d.frames_moment))
  print(f"\n### {preset}: vision FLOPs per sample (ViT + Q-Formers + projection, XLA cost "
        f"analysis), every video padded to {t} frames vs the packed frame table\n")
  print("| sample | videos | frames padded | TFLOP padded | frames packed (bucket) | TFLOP "
        "packed | padded / packed |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, videos, real in cases:
    packed = next(b for b in layout.frame_buckets if b >= real)
    before, after = vision_flops(preset, videos, videos * t), vision_flops(preset, videos, packed)
    log(f"  {name}: {before / 1e12:.2f} -> {after / 1e12:.2f} TFLOP")
    print(f"| {name} | {videos} | {videos * t} | {before / 1e12:.1f} | {real} ({packed}) | "
          f"{after / 1e12:.1f} | {before / after:.1f}x |")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="official")
  parser.add_argument("--plans", default=DEFAULT_PLANS,
                      help="hardware:DATAxFSDPxTENSOR:samples per micro-step, comma-separated")
  parser.add_argument("--seq", type=int, default=4096, help="sequence bucket")
  parser.add_argument("--videos", type=int, default=11, help="video-table rows per sample")
  parser.add_argument("--frames", type=int, default=0,
                      help="frame-table rows per sample (0: every video at full length)")
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--vision", action="store_true",
                      help="only the vision FLOPs per kind of turn, padded vs packed frames")
  args = parser.parse_args(argv)
  log = lambda text: print(text, flush=True)
  if args.vision:
    frame_table_report(args.preset, log)
    return
  plans = [Plan.parse(p) for p in args.plans.split(",")]
  cfg = get_config(args.preset)
  layout = Layout.from_config(cfg, 1)
  log(f"jax {jax.__version__}, {jax.device_count()} fake {jax.devices()[0].platform} devices; "
      f"preset {args.preset}: ViT depth {cfg.model.vit.depth}, LLaMA depth "
      f"{cfg.model.llm.depth}, {cfg.model.dtype} compute; per sample: sequence {args.seq}, "
      f"{args.videos} videos x {layout.frames} frames")

  frames = args.frames or args.videos * layout.frames
  log("global FLOPs per sample (one device):")
  flops = global_flops(args.preset, args.seq, args.videos, frames, log)
  depth = (cfg.model.vit.depth, cfg.model.llm.depth)
  total = flops[depth]
  model_flops = analytic_flops(cfg.model, args.seq, args.videos, frames, layout.frames,
                               layout.text_len)
  rows = []
  for plan in plans:
    c = compile_step(plan_config(args.preset, mesh=plan.mesh), plan.batch, args.seq,
                     args.videos, frames)
    log(f"  {plan.hardware.name}, mesh {plan.mesh}, {plan.batch} samples: compiled in "
        f"{c.seconds:.0f} s, {c.flops / 1e12:.2f} TFLOP per device (each stack counted once)")
    rows.append((plan, c))

  train, frozen = rows[0][1].params
  print(f"\n### {args.preset} training step, AOT-compiled on abstract meshes (shapes only)\n")
  print(f"{train / 1e6:.1f}M trainable (f32, AdamW moments) + {frozen / 1e9:.3f}B frozen "
        f"({cfg.model.frozen_param_dtype}) parameters, {cfg.model.dtype} compute, remat policy "
        f"Q-Formers/LLaMA {cfg.model.qformer.remat_policy}/{cfg.model.llm.remat_policy}, "
        f"frame chunks {cfg.model.video.frame_chunks}, attention {cfg.model.attention_impl}. "
        f"Per sample: sequence {args.seq}, video table "
        f"{args.videos} x {layout.frames} frames, frame table {frames}.\n")
  print(f"FLOPs per sample: XLA {total / 1e12:.1f} TFLOP, extrapolated per layer from "
        "one-device compiles with unrolled layers at (ViT, LLaMA) depths "
        + ", ".join(f"{k}: {v / 1e12:.2f}" for k, v in flops.items()
                    if k not in (depth, "counted once"))
        + f" TFLOP; analytic model FLOPs {model_flops['total'] / 1e12:.1f} TFLOP ("
        + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in model_flops.items() if k != "total")
        + f"); XLA / analytic = {total / model_flops['total']:.2f} (remat recompute, softmax, "
        "norms, optimizer).\n")
  print(f"| hardware | mesh (data, fsdp, tensor) | samples / micro-step | state GB/device "
        f"(params + opt + frozen + batch) | XLA args / out / temp GB | peak GB/device | fits "
        f"| TFLOP/step (XLA) | work balance | s/step at {args.mfu:.0%} MFU | samples/s | s/step"
        f" x balance | compile s |")
  print("|---|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for plan, c in rows:
    hw, n = plan.hardware, math.prod(plan.mesh)
    mem = c.memory
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    step_flops = plan.batch * total
    # Devices x one device's count over the one-device count, both with each layer stack and
    # the frame chunks' loop counted once: 1 when the work is split evenly, above 1 when
    # devices repeat work (the partitioner's choice; a batch the data axes cannot split).
    balance = c.flops * n / (plan.batch * flops["counted once"])
    t_mfu = plan.batch * model_flops["total"] / (args.mfu * n * hw.peak)
    state = c.state_bytes
    print(f"| {hw.name} | {plan.mesh} | {plan.batch} | {sum(state.values()) / 1e9:.1f} ("
          f"{state['params'] / 1e9:.2f} + {state['opt'] / 1e9:.2f} + {state['frozen'] / 1e9:.2f}"
          f" + {state['batch'] / 1e9:.2f}) | {mem.argument_size_in_bytes / 1e9:.1f} / "
          f"{mem.output_size_in_bytes / 1e9:.1f} / {mem.temp_size_in_bytes / 1e9:.1f} | "
          f"{peak_bytes / 1e9:.1f} | {'yes' if peak_bytes <= hw.memory else 'NO'} of "
          f"{hw.memory / 1e9:.0f} | {step_flops / 1e12:.0f} | {balance:.2f} | {t_mfu:.2f} | "
          f"{plan.batch / t_mfu:.2f} | {t_mfu * balance:.2f} | {c.seconds:.0f} |")
  print("\nBuilding and restoring the state (no step yet), GB per device:\n")
  print("| hardware | mesh | whole model: one device, built there first (before) | init "
        "straight into the shardings: peak (after) | restore of a training checkpoint: params "
        "+ opt + frozen |")
  print("|---|---|---:|---:|---:|")
  for plan, c in rows:
    state = c.state_bytes
    print(f"| {plan.hardware.name} | {plan.mesh} | {c.model_bytes / 1e9:.2f} | "
          f"{c.init_peak / 1e9:.2f} | "
          f"{(state['params'] + state['opt'] + state['frozen']) / 1e9:.2f} |")
  print("\ninit peak = outputs + temp of the jitted init's buffer assignment; orbax restores "
        "each shard onto its device, so a restore peaks at the state's own bytes per device.")
  print("\npeak = args + out - aliased (donated) + temp, from XLA:CPU's buffer assignment; "
        "MFU = analytic model FLOPs / (time x devices x peak), peak bf16 dense: "
        + ", ".join(f"{h.name} {h.peak / 1e12:.0f} TFLOP/s x {h.devices}"
                    for h in HARDWARE.values())
        + "; work balance: devices x one device's XLA count over the one-device count (each "
        "layer stack and the frame chunks' loop counted once): 1 = split "
        "evenly, > 1 = work repeated across devices, which stretches the step by that factor. "
        "XLA:CPU keeps many bf16 intermediates in f32, so its temp bytes overstate what "
        "XLA:GPU/TPU would plan.")


if __name__ == "__main__":
  main()
