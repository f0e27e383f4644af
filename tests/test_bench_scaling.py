"""scripts/bench_scaling.py: the slopes it states, the candidate lists it cuts, and a two-point
sweep at `tiny` whose batches really grow with the knob."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from ivcr_jax.data.records import RETRIEVAL, Dialogue, Turn
from scripts import bench_scaling, bench_vs_torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_slopes_recover_the_power_the_cost_grows_as() -> None:
  points = [{"axis": "frames", "value": x, "jax_s": 0.5 * x**1.5, "torch_s": 3 * x,
             "jax_step_rss_mib": 100.0, "torch_step_rss_mib": 10 * x**0.25}
            for x in (8, 24, 96)]
  fits = bench_scaling.slopes(points + [{"axis": "sequence", "value": 512}])  # one point: none
  assert set(fits) == {"frames"}
  assert fits["frames"]["jax_s"] == pytest.approx(1.5)
  assert fits["frames"]["torch_s"] == pytest.approx(1.0)
  assert fits["frames"]["jax_step_rss_mib"] == pytest.approx(0.0, abs=1e-9)
  assert fits["frames"]["torch_step_rss_mib"] == pytest.approx(0.25)


@pytest.mark.parametrize("rank", [2, 7])
def test_a_cut_candidate_list_keeps_the_ground_truth(rank: int) -> None:
  candidates = tuple(f"v{i}" for i in range(10))
  turn = Turn(kind=RETRIEVAL, question="q", answer="a", text_id=1,
              video_id=candidates[rank - 1], candidates=candidates, gt_span=None,
              video_index=rank)
  dialogue = Dialogue(index=0, split="train", type=1, turns=(turn, dataclasses.replace(turn)))
  cut = bench_vs_torch.first_candidates(dialogue, 3).turns[0]
  assert len(cut.candidates) == 3 and cut.video_id in cut.candidates
  assert cut.candidates[cut.video_index - 1] == cut.video_id
  assert cut.candidates[:2] == candidates[:2]
  assert bench_vs_torch.first_candidates(dialogue, 10) is dialogue


def test_point_overrides_size_the_video_table_and_the_bucket() -> None:
  overrides, k = bench_scaling.point_overrides("sequence", 2048)
  assert k == 1 and overrides["data.seq_buckets"] == (2048,)
  assert overrides["data.frames_retrieval"] == 32 and overrides["data.video_buckets"] == (1,)
  overrides, k = bench_scaling.point_overrides("frames", 96)
  assert k == 10 and "data.seq_buckets" not in overrides
  assert overrides["model.video.max_frame_pos"] >= 96 == overrides["data.frames_retrieval"]


# ~3 min on a loaded 2-core machine: two points, each two processes and two compiles.
def test_a_tiny_sweep_grows_the_batch_and_draws_the_plot(tmp_path: pathlib.Path) -> None:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  run = subprocess.run([sys.executable, "scripts/bench_scaling.py", "--preset", "tiny",
                        "--steps", "1", "--axes", "candidates", "--values", "1,3",
                        "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  saved = json.loads((tmp_path / "scaling.json").read_text())
  points = sorted(saved["points"], key=lambda p: p["value"])
  assert [p["value"] for p in points] == [1, 3]
  assert "V1x" in points[0]["shape"] and "V3x" in points[1]["shape"]
  assert points[1]["flops"] > 2 * points[0]["flops"]  # three videos' vision work, not one
  for p in points:
    assert p["rel_diff"] <= 1e-4
    assert p["jax_s"] > 0 and p["torch_s"] > 0
    assert 0 < p["jax_step_rss_mib"] <= p["jax_rss_mib"]
    assert 0 < p["torch_step_rss_mib"] <= p["torch_rss_mib"]
  result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("result: "))
                      .removeprefix("result: "))
  assert all(math.isfinite(v) for v in result["slopes"]["candidates"].values())
  assert (tmp_path / "scaling.png").stat().st_size > 10_000
  assert "| candidates | " in run.stdout
