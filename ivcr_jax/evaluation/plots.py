"""PNG plots of an evaluation: per-turn bars and the IoU histogram."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from ivcr_jax.evaluation.metrics import IOU_THRESHOLDS


def per_turn_bars(rows: Sequence[dict], path: str) -> str:
  """Grouped bars of R@1 and R@1 at each IoU threshold for every turn index."""
  keys = ["r@1", *[f"r@1_iou{t}" for t in IOU_THRESHOLDS]]
  labels = ["R@1", *[f"R@1 IoU={t}" for t in IOU_THRESHOLDS]]
  width = 0.8 / len(keys)
  fig, ax = plt.subplots(figsize=(8, 4))
  turns = [r["turn"] for r in rows]
  for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
    ax.bar([t + (i - (len(keys) - 1) / 2) * width for t in turns],
           [100 * r[key] for r in rows], width, label=label)
  ax.set(xlabel="assistant turn", ylabel="%", ylim=(0, 100), xticks=turns,
         title="Retrieval accuracy per turn")
  ax.legend(fontsize=8)
  return _save(fig, path)


def iou_histogram(ious: Sequence[float], path: str) -> str:
  """Histogram of moment-retrieval IoUs with the thresholds marked."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(list(ious), bins=20, range=(0, 1), color="tab:blue", edgecolor="white")
  for t in IOU_THRESHOLDS:
    ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
  ax.set(xlabel="IoU", ylabel="moment turns", title=f"IoU of {len(ious)} moment turns")
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
