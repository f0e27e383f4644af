"""How the train step's cost grows with the work, ours against the PyTorch peer (issue #18).

Each point of the sweep is one `scripts/bench_vs_torch.py` measurement (the same model, weights,
batch and loss on both sides, checked before timing; alternating steps in two fresh processes)
on a retrieval turn whose work is set by three knobs, one axis varied at a time:

  frames      frames per video, 8 -> 96 (10 candidates)
  candidates  videos in the turn's list, 1 -> 10 (64 frames each; the ground truth kept)
  sequence    the LLM sequence bucket the batch is padded to, 512 -> 4096 (one 32-frame video;
              both sides run the padded positions, masked, as the trainer's bucket does)

The toy corpus is built with 24-30 s videos at 4 frames/s (96-120 frames each), so every video
gives exactly the frames asked for, and the video table is sized to the turn (no padded videos).
It prints a table per axis, the log-log slope of s/step and of the peak RSS while stepping
(`bench_vs_torch`: from the first step on) against the knob for each framework (least squares
over the axis's points), and draws both as a PNG.

  PYTHONPATH=. python scripts/bench_scaling.py [--preset small|tiny] [--steps 3]
      [--axes frames,candidates,sequence] [--out DIR]

Points already in `DIR/scaling.json` are kept (a stopped sweep resumes where it was).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from scripts import bench_vs_torch as bvt

AXES = {  # axis -> (its values, the fixed knobs)
    "frames": ((8, 24, 48, 96), {"candidates": 10}),
    "candidates": ((1, 3, 10), {"frames": 64}),
    "sequence": ((512, 1024, 2048, 4096), {"candidates": 1, "frames": 32}),
}
LABELS = {"frames": "frames per video", "candidates": "candidate videos in the turn",
          "sequence": "sequence bucket (positions)"}
MAX_FRAMES = 96
# Long enough toy videos that every one has MAX_FRAMES frames to give.
TOY = {"data.toy_fps": 4.0, "data.toy_seconds": (24.0, 30.0)}


def point_overrides(axis: str, value: int) -> tuple[dict, int]:
  """(config overrides, candidates) of one point."""
  knobs = {**AXES[axis][1], axis: value}
  frames, k = knobs.get("frames", 64), knobs.get("candidates", 10)
  overrides = {**TOY, "model.video.max_frame_pos": MAX_FRAMES, "data.frames_retrieval": frames,
               "data.frames_moment": frames, "data.video_buckets": (k,)}
  if "sequence" in knobs:
    overrides["data.seq_buckets"] = (knobs["sequence"],)
  return overrides, k


def measure(preset: str, axis: str, value: int, steps: int, workdir: str) -> dict:
  """One point: both sides set up in fresh processes, parity checked, steps alternated."""
  overrides, k = point_overrides(axis, value)
  jax_w = bvt.Worker("jax", bvt.JaxSide)
  torch_w = bvt.Worker("torch", bvt.TorchSide, bvt._import_torch)
  try:
    jax_info, torch_info = bvt.set_up(jax_w, torch_w, {
        "preset": preset, "kinds": ("retrieval",), "workdir": workdir,
        "overrides": overrides, "candidates": k})
    diffs = bvt.check_parity(jax_info, torch_info)
    times = bvt.alternate([jax_w, torch_w], ["retrieval"], steps)["retrieval"]
    ends = {"jax": jax_w.ask("finish"), "torch": torch_w.ask("finish")}
  finally:
    jax_w.stop()
    torch_w.stop()
  kind = jax_info["kinds"]["retrieval"]
  limits = {side: (info["limit"] + ends[side]["limit"]) / 2
            for side, info in (("jax", jax_info), ("torch", torch_info))}
  return {"axis": axis, "value": value, "shape": kind["shape"], "flops": kind["flops"],
          "cpu": bvt.cpu_description(), "jax_limit": limits["jax"],
          "torch_limit": limits["torch"],
          "rel_diff": diffs["retrieval"], "jax_s": float(np.median(times["jax"])),
          "torch_s": float(np.median(times["torch"])), "jax_times": times["jax"],
          "torch_times": times["torch"], "load": os.getloadavg()[0],
          **{f"{side}_{what}": ends[side][what] for side in ends
             for what in ("rss_mib", "step_rss_mib")}}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
  """Least-squares slope of log(y) against log(x): the power of the knob the cost grows as."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(points: Sequence[dict]) -> dict[str, dict[str, float]]:
  """Per axis with >= 2 points: the slopes of s/step and of the peak RSS while stepping, each
  framework."""
  out = {}
  for axis in AXES:
    rows = sorted((p for p in points if p["axis"] == axis), key=lambda p: p["value"])
    if len(rows) < 2:
      continue
    xs = [p["value"] for p in rows]
    out[axis] = {f"{side}_{what}": slope(xs, [p[f"{side}_{what}"] for p in rows])
                 for side in ("jax", "torch") for what in ("s", "step_rss_mib")}
  return out


def print_tables(preset: str, points: Sequence[dict], fits: dict) -> None:
  for axis in AXES:
    rows = sorted((p for p in points if p["axis"] == axis), key=lambda p: p["value"])
    if not rows:
      continue
    fixed = ", ".join(f"{k} {v}" for k, v in AXES[axis][1].items())
    print(f"\n### {preset}: {LABELS[axis]} ({fixed})\n")
    print("| " + axis + " | batch | ours s/step | torch s/step | torch / ours | GFLOP/step | "
          "peak RSS stepping, ours / torch MiB | peak RSS of the process, ours / torch MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for p in rows:
      print(f"| {p['value']} | {p['shape']} | {p['jax_s']:.3f} | {p['torch_s']:.3f} | "
            f"{p['torch_s'] / p['jax_s']:.2f} | {p['flops'] / 1e9:.1f} | "
            f"{p['jax_step_rss_mib']:.0f} / {p['torch_step_rss_mib']:.0f} | "
            f"{p['jax_rss_mib']:.0f} / {p['torch_rss_mib']:.0f} |")
  print("\nlog-log slopes (cost ~ knob^slope):\n")
  print("| axis | ours s/step | torch s/step | ours peak RSS stepping | torch peak RSS stepping |")
  print("|---|---:|---:|---:|---:|")
  for axis, f in fits.items():
    print(f"| {axis} | {f['jax_s']:.2f} | {f['torch_s']:.2f} | {f['jax_step_rss_mib']:.2f} | "
          f"{f['torch_step_rss_mib']:.2f} |")


def plot(points: Sequence[dict], fits: dict, path: str) -> None:
  """Two rows (s/step, peak RSS) by one column per axis, log-log, both frameworks."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  axes_done = [a for a in AXES if a in fits]
  fig, grid = plt.subplots(2, len(axes_done), figsize=(4.2 * len(axes_done), 7), squeeze=False)
  for col, axis in enumerate(axes_done):
    rows = sorted((p for p in points if p["axis"] == axis), key=lambda p: p["value"])
    xs = [p["value"] for p in rows]
    for row, (what, unit) in enumerate((("s", "s/step"),
                                        ("step_rss_mib", "peak RSS while stepping (MiB)"))):
      ax = grid[row][col]
      for side, name, style in (("jax", "ivcr_jax", "o-"), ("torch", "PyTorch", "s--")):
        ax.plot(xs, [p[f"{side}_{what}"] for p in rows], style,
                label=f"{name} (slope {fits[axis][f'{side}_{what}']:.2f})")
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xticks(xs, [str(x) for x in xs])
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
      ax.set_xlabel(LABELS[axis])
      ax.set_ylabel(unit)
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle("Train step (forward + backward + AdamW, float32) as the work grows")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="small", choices=("small", "tiny"))
  parser.add_argument("--steps", type=int, default=3, help="timed steps per point and side")
  parser.add_argument("--axes", default=",".join(AXES), help="comma-separated, of " +
                      ", ".join(AXES))
  parser.add_argument("--values", default="", help="only these values on every axis asked "
                      "for (comma-separated; default: each axis's own)")
  parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ivcr_bench_scaling"),
                      help="results JSON, PNG and the toy corpus (kept: a sweep resumes)")
  args = parser.parse_args(argv)
  axes = [a.strip() for a in args.axes.split(",") if a.strip()]
  unknown = sorted(set(axes) - set(AXES))
  if unknown:
    parser.error(f"unknown axes {unknown}; choose from {list(AXES)}")
  only = {int(v) for v in args.values.split(",") if v.strip()}
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, "scaling.json")
  points = []
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved["preset"] == args.preset and saved["steps"] == args.steps:
      points = saved["points"]
  todo = [(a, v) for a in axes for v in AXES[a][0] if not only or v in only]
  print(f"{args.preset}: {len(todo)} points, {args.steps} timed steps each; "
        f"{bvt.cpu_description()}; loads {os.getloadavg()}", flush=True)
  for i, (axis, value) in enumerate(todo, 1):
    if any(p["axis"] == axis and p["value"] == value for p in points):
      print(f"[{i}/{len(todo)}] {axis} = {value}: kept from {results_path}", flush=True)
      continue
    start = time.perf_counter()
    print(f"[{i}/{len(todo)}] {axis} = {value}", flush=True)
    points.append(measure(args.preset, axis, value, args.steps, args.out))
    p = points[-1]
    print(f"[{i}/{len(todo)}] {axis} = {value}: ours {p['jax_s']:.3f} s, torch "
          f"{p['torch_s']:.3f} s, {time.perf_counter() - start:.0f} s for the point", flush=True)
    with open(results_path, "w", encoding="utf-8") as f:
      json.dump({"preset": args.preset, "steps": args.steps, "points": points}, f, indent=1)
  fits = slopes(points)
  print_tables(args.preset, points, fits)
  png = os.path.join(args.out, "scaling.png")
  if fits:
    plot(points, fits, png)
    print(f"\nplot: {png}")
  result = {"preset": args.preset, "points": points, "slopes": fits}
  print("result: " + json.dumps({"slopes": fits, "points": len(points),
                                  "finite": all(math.isfinite(p["jax_s"]) for p in points)}),
        flush=True)
  return result


if __name__ == "__main__":
  main()
