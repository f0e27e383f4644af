"""Do the differentiable aux losses help? The demo trained with and without L_V and L_C.

Trains `--config=configs/interllava.py:<preset>` once per seed with α = β = 0 (the official
dynamics: L_M alone) and once with the preset's α, β, each from an empty workdir with the real
`python -m ivcr_jax.train` command (so each run also generates and scores the test split), then
prints R@1, R@1 IoU 0.5 and mIoU as mean ± std over the seeds for both, and the per-seed rows.
`config.seed` is the seed: it draws the initial weights, dropout and the data order; the toy
corpus (and its stores) is the same for every run and built once.

The runs alternate between the two settings (seed 0 official, seed 0 aux, seed 1 official, ...)
so that a stopped ablation has paired results; rerunning the command skips finished runs.

    python -m scripts.ablate_aux_losses --root /tmp/ivcr_ablation            # 3 seeds, the demo
    python -m scripts.ablate_aux_losses --root /tmp/abl --seeds 0 1 -- --config.train.num_steps=50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METRICS = ("r@1", "r@1_iou0.5", "miou", "retriever_r@1")
SETTINGS = {"official (α = β = 0)": ["--config.train.alpha=0", "--config.train.beta=0"],
            "aux losses (preset's α, β)": []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="Arguments after `--` are passed to every training run.")
  p.add_argument("--root", required=True, help="directory of the runs (one workdir per run)")
  p.add_argument("--preset", default="demo")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("extra", nargs="*", help="config overrides for every run (after --)")
  return p.parse_args(argv)


def run_dir(root: str, setting: str, seed: int) -> str:
  return os.path.join(root, f"{'official' if SETTINGS[setting] else 'aux'}_seed{seed}")


def train(args: argparse.Namespace, setting: str, seed: int) -> dict:
  """One training run (skipped when its test metrics exist); returns its test metrics."""
  workdir = run_dir(args.root, setting, seed)
  metrics_file = os.path.join(workdir, "eval", "test", "metrics.json")
  if not os.path.exists(metrics_file):
    cmd = [sys.executable, "-m", "ivcr_jax.train",
           f"--config=configs/interllava.py:{args.preset}", f"--workdir={workdir}",
           f"--config.seed={seed}", "--config.train.evaluate_after=True",
           f"--config.data.stores={os.path.join(args.root, 'toy_data')}",
           *SETTINGS[setting], *args.extra]
    print(f"[{time.strftime('%H:%M:%S')}] {setting}, seed {seed}: {' '.join(cmd[1:])}",
          flush=True)
    start = time.perf_counter()
    with open(os.path.join(args.root, f"{os.path.basename(workdir)}.log"), "w") as log:
      done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
      raise SystemExit(f"the run in {workdir} failed (exit {done.returncode}); see its log "
                       f"{log.name}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
  with open(metrics_file, encoding="utf-8") as f:
    return json.load(f)


def table(results: dict[str, dict[int, dict]]) -> str:
  """Markdown: mean ± std per setting, then one row per run."""
  head = "| setting | runs | " + " | ".join(METRICS) + " |"
  lines = [head, "|---|---:|" + "---:|" * len(METRICS)]
  for setting, runs in results.items():
    cells = []
    for m in METRICS:
      values = np.array([r[m] for r in runs.values()])
      cells.append(f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}")
    lines.append(f"| {setting} | {len(runs)} | " + " | ".join(cells) + " |")
  lines += ["", "| setting | seed | " + " | ".join(METRICS) + " |",
            "|---|---:|" + "---:|" * len(METRICS)]
  for setting, runs in results.items():
    for seed, r in runs.items():
      lines.append(f"| {setting} | {seed} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[int, dict]]:
  args = parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  results: dict[str, dict[int, dict]] = {s: {} for s in SETTINGS}
  for seed in args.seeds:
    for setting in SETTINGS:
      results[setting][seed] = train(args, setting, seed)
  report = table(results)
  print(report)
  with open(os.path.join(args.root, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(report + "\n")
  return results


if __name__ == "__main__":
  main()
