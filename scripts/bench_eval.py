"""Evaluation throughput on this machine: answered turns/s and generated tokens/s of
`experiment.evaluate` for a briefly trained demo-like model, and the cost of parsing in both modes.

Trains the preset on a small toy corpus for `--steps` steps in a temporary directory
(`ivcr_jax.train.train`), then runs `experiment.evaluate` on the first `--dialogues` test dialogues
three times, in one process: cold (compilation included), warm (the embedding and generation
programs are module-level jits, reused), and warm with `official_parsing` and
`official_denominators`. Generation figures come from the evaluator's own counters (turns, new
tokens with EOS, seconds inside `answer`); "wall" is the whole `run` (restore, data, writing the
outputs). Finally each parser reads the generated answers `--parse_repeats` times.

  PYTHONPATH=. python scripts/bench_eval.py [--preset demo] [--steps 10] [--dialogues 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
from absl import flags

from configs.interllava import get_config
from ivcr_jax import experiment, train
from ivcr_jax.data import answers


def _config(args: argparse.Namespace):
  cfg = get_config(args.preset).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos = args.videos
    cfg.train.update(dict(num_steps=args.steps, log_every=args.steps, eval_every=0,
                          checkpoint_every=args.steps, warmup_steps=min(4, args.steps),
                          evaluate_after=False))
  return cfg


def _parse_rate(texts: list[str], official: bool, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    for t in texts:
      answers.predicted_span(t, official=official)
      answers.predicted_index(t, official=official)
  return repeats * len(texts) / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--videos", type=int, default=60)
  parser.add_argument("--dialogues", type=int, default=8)
  parser.add_argument("--parse_repeats", type=int, default=200)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  cfg = _config(args)
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    train.train(cfg, workdir)
    train_s = time.perf_counter() - start
    rows = []
    for name, official in (("cold", False), ("warm", False), ("warm, official", True)):
      start = time.perf_counter()
      out = experiment.evaluate(cfg, workdir, max_dialogues=args.dialogues,
                                official_parsing=official, official_denominators=official)
      rows.append((name, time.perf_counter() - start, out))
    with open(os.path.join(workdir, "eval", "test", "predictions.jsonl"), encoding="utf-8") as f:
      texts = [json.loads(line)["generated"] for line in f]
    rates = {mode: _parse_rate(texts, mode == "official", args.parse_repeats)
             for mode in ("improved", "official")}

  print(f"\n{args.preset} preset, {args.steps} training steps ({train_s:.1f} s incl. toy corpus), "
        f"{args.dialogues} test dialogues, batch {cfg.train.batch_size}, max_new_tokens "
        f"{cfg.generation.max_new_tokens}, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores")
  print("| run | wall s | turns | new tokens | generation s | turns/s | new tokens/s | R@1 | "
        "R@1 IoU0.5 | denominators (video/moment) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, wall, out in rows:
    g = out["generation"]
    d = out["denominators"]
    print(f"| {name} | {wall:.1f} | {g['turns']} | {g['new_tokens']} | {g['seconds']:.1f} | "
          f"{g['turns'] / g['seconds']:.2f} | {g['new_tokens'] / g['seconds']:.1f} | "
          f"{out['r@1']:.3f} | {out['r@1_iou0.5']:.3f} | {d['mode']} {d['video']}/{d['moment']} |")
  print(f"\nparsing {len(texts)} generated answers x{args.parse_repeats}: improved "
        f"{rates['improved']:,.0f} answers/s, official {rates['official']:,.0f} answers/s")


if __name__ == "__main__":
  main()
