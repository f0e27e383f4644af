"""Writes the synthetic IVCR-style toy corpus (mp4 videos + official-schema JSON).

  python -m data_prep.make_toy_corpus --out /tmp/toy --num_videos 300 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import time

from ivcr_jax.data.toy_corpus import ToyCorpusConfig, write_toy_corpus
from ivcr_jax.jsonfile import read_json


def main(argv: list[str] | None = None) -> None:
  defaults = ToyCorpusConfig()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num_videos", type=int, default=defaults.num_videos)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--size", type=int, default=defaults.size, help="frame side, multiple of 32")
  parser.add_argument("--fps", type=float, default=defaults.fps)
  parser.add_argument("--dialogues_per_video", type=int, default=defaults.dialogues_per_video)
  parser.add_argument("--chinese_fraction", type=float, default=defaults.chinese_fraction)
  parser.add_argument("--no_chat_turns", action="store_true",
                      help="only official turn kinds (no natural-dialogue turns)")
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args(argv)
  cfg = ToyCorpusConfig(num_videos=args.num_videos, seed=args.seed, size=args.size, fps=args.fps,
                        dialogues_per_video=args.dialogues_per_video,
                        chinese_fraction=args.chinese_fraction, chat_turns=not args.no_chat_turns)
  start = time.perf_counter()
  corpus = write_toy_corpus(args.out, cfg, workers=args.workers, progress=True)
  records = read_json(corpus.annotations)
  splits = collections.Counter(r["split"] for r in records)
  turns = sum(len(r["conversations"]) // 2 for r in records)
  print(f"{len(records)} dialogues ({dict(splits)}), {turns} turns, {cfg.num_videos} videos "
        f"in {time.perf_counter() - start:.1f} s -> {corpus.annotations}")


if __name__ == "__main__":
  main()
