"""Train-step benchmark: step time, samples/s and achieved FLOP/s of the real jitted train step,
dialogue vs prefix mode, and frames vs the feature store, at the `tiny` and `small` presets.

Everything is measured side by side in one run on this machine. The step is the trainer's
(`TrainableSplit.of`, `place`, `make_train_step`, `jit_train_step`: shardings and a donated state),
fed with batches that the pipeline's `assemble` builds from the toy corpus (random initial weights;
AdamW every step, `grad_accum=1`). FLOPs per step come from XLA's cost analysis of the compiled step
with every layer unrolled (`model.{vit,llm}.scan_layers=False`), because XLA counts a scanned loop
body once; the default scanned step is timed beside it, with its (under)count.
Achieved FLOP/s are a fraction of this CPU's float32 matmul limit measured in the same run.

Sequence and video-table buckets are the benchmark's own (printed), fitted to the toy corpus's
1-, 10- and 20-video samples so that padding does not blur the comparisons.

  PYTHONPATH=. python scripts/bench_train.py [--quick] [--long] [--workdir DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from configs.interllava import get_config
from ivcr_jax import experiment, sharding
from ivcr_jax.data import feature_store, pipeline, records
from ivcr_jax.data.batch import Layout
from ivcr_jax.data.records import MOMENT, RETRIEVAL, Dialogue
from ivcr_jax.data.tokenizer import digits_of
from ivcr_jax.models.vision_tower import frame_encoder
from ivcr_jax.training import optimizer
from ivcr_jax.training import step as step_lib

SEQ_BUCKETS = (512, 1024, 2048, 4096)
VIDEO_BUCKETS = (1, 10, 20, 40)
TOY_VIDEOS = 16
# SPEC §5: the official PyTorch code at the `small` config on this machine type, batch 1, fp32,
# forward + backward + AdamW (measured there, not in this run).
OFFICIAL_S = {"retrieval turn": 27.15, "moment turn": 2.43}
NOMINAL_LIMIT = 160e9  # SPEC §5: this CPU's float32 matmul FLOP/s when it is not shared


@functools.cache
def _matmul_operand(n: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)


_square = jax.jit(lambda x: x @ x)


def matmul_limit(repeats: int = 3, n: int = 2048) -> float:
  """FLOP/s of a float32 `n^3` matmul (best of `repeats`): the practical peak of this CPU right
  now. The machine may be shared, so each step row is set against the limit measured beside it."""
  a = _matmul_operand(n)
  jax.block_until_ready(_square(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(_square(a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


def bench_config(preset: str, *, scan: bool, batch_size: int = 1,
                 buckets: tuple[Sequence[int], Sequence[int]] | None = (SEQ_BUCKETS,
                                                                         VIDEO_BUCKETS),
                 frames: int | None = None) -> ml_collections.ConfigDict:
  """`preset` on one device with random initial weights, the toy corpus, and the benchmark's
  shapes."""
  cfg = get_config(preset).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.weights.init_checkpoint = ""
    cfg.data.toy_num_videos = TOY_VIDEOS
    cfg.model.vit.scan_layers = cfg.model.llm.scan_layers = scan
    cfg.train.batch_size = batch_size
    cfg.train.grad_accum = 1
    cfg.mesh.shape = (1, 1, 1)  # one device: XLA's count is then the whole step's
    if buckets:
      cfg.data.seq_buckets, cfg.data.video_buckets = map(tuple, buckets)
    if frames:
      cfg.data.frames_retrieval = cfg.data.frames_moment = frames
  return cfg


@dataclasses.dataclass
class Measured:
  seconds: float  # median step time
  flops: float  # XLA cost analysis of the compiled step
  compile_s: float


class Runner:
  """One model placed as the trainer places it, with a compiled step per batch shape."""

  def __init__(self, config: ml_collections.ConfigDict, data: experiment.Data, repeats: int):
    self.config, self.data, self.repeats = config, data, repeats
    self.model = experiment.build_model(config, data.tokenizer)
    self.split = step_lib.TrainableSplit.of(self.model, config.model.trainable)
    self.tx = optimizer.make_optimizer(config.train)
    self.mesh = sharding.make_mesh(config.mesh)
    self.loss_cfg = step_lib.LossConfig.from_config(config.train,
                                                    digits_of(data.tokenizer))
    self.state = self.frozen = None
    self.key = jax.random.key(config.seed)
    self.cache: dict[tuple, list] = {}  # shapes -> [compiled, flops, compile s, has run]

  def encoder(self, layout: Layout, features: str = "") -> pipeline.SampleEncoder:
    config = self.config
    if features:
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.data.features = features
    data = dataclasses.replace(self.data, layout=layout)
    return data.encoder(config, training=True, model=self.model)

  def placed(self) -> tuple[dict, object]:
    """The train state and frozen weights on the mesh, placed on first use (after the feature
    store is written: `place` releases the split)."""
    if self.state is None:
      self.state, self.frozen = step_lib.place(self.split, self.tx, self.mesh,
                                               self.config.mesh.rules)
    return self.state, self.frozen

  def cost(self, batch: dict) -> tuple[float, float]:
    """(XLA FLOPs, compile seconds) of the step on `batch`'s shapes (compiled here if new)."""
    return self._compiled(batch)[1:3]

  def step(self, batch: dict) -> float:
    """Seconds of one step on `batch` (compiled beforehand if new: not in the time)."""
    return self._run(self._compiled(batch)[0], batch)

  def _compiled(self, batch: dict) -> tuple[object, float, float, bool]:
    """(compiled step, its XLA FLOPs, compile seconds, whether it has run) for `batch`'s
    shapes, compiled ahead of its first run."""
    self.placed()
    key = tuple(sorted((k, np.shape(v), np.asarray(v).dtype.str) for k, v in batch.items()))
    if key not in self.cache:
      rules = self.config.mesh.rules
      fn = step_lib.jit_train_step(step_lib.make_train_step(self.split, self.tx, self.loss_cfg),
                                   self.state, self.mesh, rules)
      start = time.perf_counter()
      compiled = fn.lower(self.state, self.frozen, batch, self.key).compile()
      self.cache[key] = [compiled, float(compiled.cost_analysis()["flops"]),
                         time.perf_counter() - start, False]
    entry = self.cache[key]
    ran = entry[3]
    entry[3] = True
    return entry[0], entry[1], entry[2], ran

  def _run(self, compiled, batch: dict) -> float:
    start = time.perf_counter()
    self.state, metrics = compiled(self.state, self.frozen, batch, self.key)
    jax.block_until_ready((self.state, metrics))
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
    return time.perf_counter() - start

  def measure(self, batch: dict, repeats: int | None = None) -> Measured:
    """Median of `repeats` step times on `batch` (the state is donated and threaded through).

    A shape's first step is a warm-up, discarded unless it is long (> 2 s: first-run
    allocations are then noise, and a `small` step takes tens of seconds)."""
    compiled, flops, compile_s, ran = self._compiled(batch)
    times = []
    if not ran:
      first = self._run(compiled, batch)
      if first > 2.0:
        times.append(first)
    while len(times) < (repeats or self.repeats):
      times.append(self._run(compiled, batch))
    return Measured(statistics.median(times), flops, compile_s)


def find_dialogue(dialogues: Sequence[Dialogue], want, what: str) -> Dialogue:
  for d in dialogues:
    if want([t.kind for t in d.turns]):
      return d
  raise LookupError(f"the toy corpus has no {what} dialogue; raise TOY_VIDEOS")


def batch_of(encoder: pipeline.SampleEncoder, samples: Sequence[records.Sample]) -> dict:
  return pipeline.assemble([encoder(s) for s in samples], encoder.layout)


def shape_of(batch: dict) -> str:
  b, s = batch["input_ids"].shape
  v, t = batch["frame_slot"].shape
  return f"B{b} S{s} V{v}x{t}f F{len(batch['qformer_text_ids'])}"


@dataclasses.dataclass
class StepRow:
  preset: str
  sample: str
  shape: str
  layers: str
  m: Measured
  samples: int
  limit: float  # matmul limit measured just before and after (mean)
  official: float | None = None  # SPEC §5's official s/step for the same work


def step_rows(preset: str, runner: Runner, scanned: Runner | None, dialogues, *,
              moment: bool, preset_batch: dict | None) -> list[StepRow]:
  """The train step on single official samples, a retrieval turn (10 candidates) and a moment
  turn (1 video), and on `preset_batch` when given."""

  def row(name: str, r: Runner, batch: dict, layers: str, official: float | None) -> StepRow:
    before = matmul_limit()
    m = r.measure(batch)
    return StepRow(preset, name, shape_of(batch), layers, m, batch["input_ids"].shape[0],
                   (before + matmul_limit()) / 2, official)

  enc = runner.encoder(runner.data.layout)
  r_m = find_dialogue(dialogues, lambda k: k == [RETRIEVAL, MOMENT], "retrieval -> moment")
  cases = [("retrieval turn", [records.make_samples([r_m], "prefix")[0]])]
  if moment:
    one = find_dialogue(dialogues, lambda k: k == [MOMENT], "single moment turn")
    cases.append(("moment turn", records.make_samples([one], "prefix")))
  same_work = preset == "small" and runner.data.layout.frames == 64
  rows = []
  for name, samples in cases:
    official = OFFICIAL_S[name] if same_work else None
    rows.append(row(name, runner, batch_of(enc, samples), "unrolled", official))
    if scanned is not None and name == "retrieval turn":
      batch = batch_of(scanned.encoder(scanned.data.layout), samples)
      rows.append(row(name, scanned, batch, "scanned", official))
  if preset_batch is not None:
    rows.append(row("preset batch (dialogues)", runner, preset_batch, "unrolled", None))
  for r in rows:
    print(f"  {r.preset} {r.sample} {r.shape} {r.layers}: {r.m.seconds:.3f} s/step, "
          f"{r.m.flops / 1e9:.1f} GFLOP, {r.m.flops / r.m.seconds / r.limit:.0%} of the matmul "
          f"limit {r.limit / 1e9:.0f} GFLOP/s (compiled in {r.m.compile_s:.1f} s)", flush=True)
  return rows


@dataclasses.dataclass
class ModeRow:
  preset: str
  dialogue: str
  mode: str
  source: str
  samples: int
  tokens: int  # real (attention-mask) tokens
  padded: int  # tokens after bucketing
  videos: int  # video-table rows encoded (padded)
  flops: float
  seconds: float


def mode_rows(preset: str, runner: Runner, features: str, dialogues: Sequence[Dialogue],
              repeats: int) -> list[ModeRow]:
  """Each dialogue trained once per (sample mode, frames/features), summed over its samples:
  tokens, FLOPs and step seconds (median of `repeats` per sample)."""
  layout = runner.data.layout
  encoders = {"frames": runner.encoder(layout), "features": runner.encoder(layout, features)}
  rows = []
  for dialogue in dialogues:
    name = ">".join(t.kind[0].upper() for t in dialogue.turns)
    for source, enc in encoders.items():
      for mode in ("prefix", "dialogue"):
        samples = records.make_samples([dialogue], mode)
        batches = [batch_of(enc, [s]) for s in samples]
        measured = [runner.measure(b, repeats) for b in batches]
        r = ModeRow(preset, name, mode, source, len(samples),
                    sum(int(b["attention_mask"].sum()) for b in batches),
                    sum(b["input_ids"].size for b in batches),
                    sum(len(b["frame_slot"]) for b in batches),
                    sum(m.flops for m in measured), sum(m.seconds for m in measured))
        rows.append(r)
        print(f"  {preset} {name} {mode}/{source}: {r.samples} samples, {r.tokens} tokens, "
              f"{r.flops / 1e9:.1f} GFLOP, {r.seconds:.2f} s", flush=True)
  return rows


def run_preset(preset: str, args: argparse.Namespace
               ) -> tuple[list[StepRow], list[ModeRow], dict]:
  work = os.path.join(args.workdir, preset)
  frames = args.small_frames if preset == "small" else None
  config = bench_config(preset, scan=False, frames=frames)
  data = experiment.open_data(config, work)
  train = data.dialogues("train")
  runner = Runner(config, data, args.repeats)
  start = time.perf_counter()
  vision = runner.model.vision
  store = feature_store.write_feature_store(
      os.path.join(work, "features"), data.frame_store,
      frame_encoder(vision, feature_store.storage_dtype("float16")), model_cfg=vision.cfg,
      fingerprint=feature_store.vit_fingerprint(vision), progress=False, overwrite=True)
  info = {"feature_store_s": time.perf_counter() - start, "layout": data.layout}
  print(f"{preset}: stores in {work}; feature store of {len(store.videos)} videos written in "
        f"{info['feature_store_s']:.1f} s", flush=True)
  scanned = None if args.quick else Runner(bench_config(preset, scan=True, frames=frames), data,
                                           args.repeats)
  preset_batch = None
  if preset == "tiny" and not args.quick:  # tiny as the trainer runs it: its batch and buckets
    layout = Layout.from_config(bench_config("tiny", scan=False, buckets=None,
                                                      batch_size=get_config("tiny").train.batch_size))
    preset_batch = batch_of(runner.encoder(layout),
                            records.make_samples(train, "dialogue")[:layout.batch_size])
  steps = step_rows(preset, runner, scanned, train, moment=not args.quick,
                    preset_batch=preset_batch)
  info["params"] = (sum(x.size for x in jax.tree.leaves(runner.state["params"])),
                    sum(x.size for x in jax.tree.leaves(runner.frozen)))
  chosen = [find_dialogue(train, lambda k: k == [RETRIEVAL, MOMENT], "retrieval -> moment")]
  if args.long:
    chosen.append(find_dialogue(train, lambda k: len(k) >= 4 and MOMENT in k, "long"))
  # A `small` step takes tens of seconds: one timed step per sample there.
  repeats = 1 if preset == "small" else args.repeats
  return steps, mode_rows(preset, runner, store.path, chosen, repeats), info


def print_tables(steps: list[StepRow], modes: list[ModeRow], infos: dict) -> None:
  print("\n### Train step (forward + backward + AdamW), float32\n")
  print("| preset | sample | batch | layers | compile s | s/step | samples/s | GFLOP/step "
        "| GFLOP/s | matmul limit GFLOP/s | of limit | s/step at 160 GFLOP/s limit | official "
        "s/step | speedup |")
  print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in steps:
    rate = r.m.flops / r.m.seconds
    projected = r.m.seconds * r.limit / NOMINAL_LIMIT
    ref = f"{r.official:.2f} | {r.official / projected:.2f}x" if r.official else "- | -"
    count = f"{r.m.flops / 1e9:.1f}" + (" (loop body once)" if r.layers == "scanned" else "")
    print(f"| {r.preset} | {r.sample} | {r.shape} | {r.layers} | {r.m.compile_s:.1f} | "
          f"{r.m.seconds:.3f} | {r.samples / r.m.seconds:.2f} | {count} | {rate / 1e9:.1f} | "
          f"{r.limit / 1e9:.1f} | {rate / r.limit:.0%} | {projected:.3f} | {ref} |")

  print("\n### One dialogue, trained once: prefix (official) vs dialogue mode, frames vs "
        "feature store\n")
  print("| preset | dialogue | mode | input | samples | tokens (padded) | video rows | GFLOP "
        "| s/dialogue | less compute | faster |")
  print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  base = {(r.preset, r.dialogue): r for r in modes if r.mode == "prefix" and r.source == "frames"}
  for r in modes:
    b = base[(r.preset, r.dialogue)]
    print(f"| {r.preset} | {r.dialogue} | {r.mode} | {r.source} | {r.samples} | {r.tokens} "
          f"({r.padded}) | {r.videos} | {r.flops / 1e9:.1f} | {r.seconds:.2f} | "
          f"{b.flops / r.flops:.2f}x | {b.seconds / r.seconds:.2f}x |")
  print()
  for preset, info in infos.items():
    lay = info["layout"]
    train, frozen = info["params"]
    print(f"{preset}: {train / 1e6:.2f}M trainable / {frozen / 1e6:.2f}M frozen parameters; "
          f"{lay.frames} frames per video; benchmark buckets seq {lay.seq_buckets}, video "
          f"table {lay.video_buckets}; feature store built in {info['feature_store_s']:.1f} s "
          "(once, not in the step times)")
  print("B batch, S sequence bucket, V video-table rows x frames; GFLOP from XLA's cost "
        "analysis of the compiled step (unrolled layers; the scanned row shows XLA counting the "
        "loop body once); R/M/C: retrieval/moment/chat turns; 'less compute' and 'faster' are "
        "against prefix mode from frames (the official scheme) on the same dialogue. Matmul "
        "limit: a float32 2048^3 matmul measured just before and after each row (the machine may "
        "be shared); 's/step at 160 GFLOP/s' scales the step time by that limit to the "
        "unshared machine's, on which SPEC §5 measured the official s/step (not re-measured "
        "here); speedup = official / projected.")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="~1 minute: tiny only, the retrieval-turn step and one dialogue; no "
                      "scanned-step, moment-turn or preset-batch rows")
  parser.add_argument("--presets", default="",
                      help="comma-separated presets (default: tiny,small; --quick: tiny)")
  parser.add_argument("--long", action="store_true",
                      help="also compare on a dialogue of >= 4 turns (several more compiles)")
  parser.add_argument("--small_frames", type=int, default=0,
                      help="frames per video at `small` (default: the preset's 64)")
  parser.add_argument("--repeats", type=int, default=2, help="timed steps per step-table row")
  parser.add_argument("--workdir", default="", help="toy corpus and stores (default: temporary)")
  args = parser.parse_args(argv)
  flags.FLAGS.is_parsed() or flags.FLAGS.mark_as_parsed()  # the data modules read absl flags
  tfds.disable_progress_bar()
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="ivcr_bench_train_")
  presets = args.presets.split(",") if args.presets else (["tiny"] if args.quick
                                                          else ["tiny", "small"])
  limit = matmul_limit()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
        f"float32 matmul limit now {limit / 1e9:.1f} GFLOP/s (2048^3)", flush=True)
  steps, modes, infos = [], [], {}
  for preset in presets:
    s, m, info = run_preset(preset, args)
    steps += s
    modes += m
    infos[preset] = info
  print_tables(steps, modes, infos)


if __name__ == "__main__":
  main()
