"""PNG plots: an evaluation's per-turn bars and IoU histogram, a run's learning curves."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from ivcr_jax.evaluation.metrics import IOU_THRESHOLDS


def per_turn_bars(rows: Sequence[dict], path: str, warnings: Sequence[str] = ()) -> str:
  """Grouped bars of R@1 and R@1 at each IoU threshold for every turn index, beside grey bars of
  the unparsable answers' share (a zero score next to a full grey bar is a format failure), and
  `warnings` written on the figure."""
  keys = ["r@1", *[f"r@1_iou{t}" for t in IOU_THRESHOLDS]]
  labels = ["R@1", *[f"R@1 IoU={t}" for t in IOU_THRESHOLDS]]
  bars = [(label, [100 * r[key] for r in rows], {}) for key, label in zip(keys, labels,
                                                                         strict=True)]
  for kind in ("video", "moment"):
    bars.append((f"unparsed {kind} answers", [
        100 * r[f"{kind}_unparsed"] / r[f"{kind}_evaluated"] if r[f"{kind}_evaluated"] else 0.0
        for r in rows], {"color": "0.6" if kind == "video" else "0.35", "hatch": "//"}))
  width = 0.8 / len(bars)
  fig, ax = plt.subplots(figsize=(9, 4.5 if warnings else 4))
  turns = [r["turn"] for r in rows]
  for i, (label, values, style) in enumerate(bars):
    ax.bar([t + (i - (len(bars) - 1) / 2) * width for t in turns], values, width, label=label,
           **style)
  ax.set(xlabel="assistant turn", ylabel="% of turns", ylim=(0, 100), xticks=turns,
         title="Retrieval accuracy per turn")
  ax.legend(fontsize=7)
  if warnings:
    fig.text(0.01, 0.01, "\n".join(textwrap.fill(w, 120) for w in warnings), color="tab:red",
             fontsize=7, va="bottom")
    fig.subplots_adjust(bottom=0.3)
  return _save(fig, path, tight=not warnings)


def iou_histogram(ious: Sequence[float], path: str, unparsed: int = 0) -> str:
  """Histogram of moment-retrieval IoUs with the thresholds marked; `unparsed` of them (scored
  0) are named in the title."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(list(ious), bins=20, range=(0, 1), color="tab:blue", edgecolor="white")
  for t in IOU_THRESHOLDS:
    ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
  title = f"IoU of {len(ious)} moment turns"
  if unparsed:
    title += f"\n{unparsed} unparsable answers, counted as IoU 0"
  ax.set(xlabel="IoU", ylabel="moment turns")
  ax.set_title(title, color="tab:red" if unparsed > len(ious) / 2 else "black")
  return _save(fig, path)


def learning_curves(rows: Sequence[dict], keys: Sequence[str], path: str, *, title: str,
                    ylabel: str = "accuracy") -> str:
  """Each of `keys` against the step, over the logged rows (`train_history.json`) that have it;
  a key no row has is left out of the legend rather than drawn empty."""
  fig, ax = plt.subplots(figsize=(8, 4))
  for key in keys:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
  ax.set(xlabel="step", ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _save(fig, path: str, tight: bool = True) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if tight:
    fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
