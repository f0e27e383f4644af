"""IVCR-200K annotation JSON + videos -> TFDS ArrayRecord frame store and dialogue store.

  python -m data_prep.build_stores --annotations IVCR-200K.json --video_root ivcr_compress \\
      --out /data/ivcr_stores --num_frames 64 --size 224 --sampling uniform
  python -m data_prep.build_stores --toy_videos 300 --out /tmp/ivcr_toy --size 32 --sampling all

A thin command over `ivcr_jax.data.prepare.build_stores`: bad records and undecodable videos are
reported by name, counted and left out; the full report goes to `<out>/prep_report.json`. If it
stops (crash, pre-emption, Ctrl-C), the same command again keeps the frame-store shards already
written and decodes only the rest.
"""

from __future__ import annotations

import argparse
import logging

from ivcr_jax.data import prepare, records, stores, toy_corpus
from ivcr_jax.data.frames import RESIZE_MODES, SAMPLERS


def main(argv: list[str] | None = None) -> dict:
  """Runs the command; returns the report it writes."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--annotations", help="IVCR-200K annotation JSON")
  parser.add_argument("--video_root", help="directory the annotation's video paths are under")
  parser.add_argument("--toy_videos", type=int, default=0,
                      help="instead: build a toy corpus of this many videos under <out>/toy")
  parser.add_argument("--toy_seed", type=int, default=0)
  parser.add_argument("--toy_size", type=int, default=toy_corpus.ToyCorpusConfig.size,
                      help="frame side of the toy mp4 files")
  parser.add_argument("--out", required=True)
  parser.add_argument("--overwrite", action="store_true", help="replace stores already in --out")
  parser.add_argument("--num_frames", type=int, default=64)
  parser.add_argument("--size", type=int, default=224, help="decode size (multiple of 32)")
  parser.add_argument("--sampling", choices=SAMPLERS, default="uniform")
  parser.add_argument("--resize", choices=RESIZE_MODES, default="squash",
                      help="squash to size x size (official), or the shorter side to size and "
                      "the centre crop (aspect ratio kept; train with the same data.resize_mode)")
  parser.add_argument("--seed", type=int, default=0, help="for rand sampling")
  parser.add_argument("--splits", default="", help="comma-separated splits to keep (all: '')")
  parser.add_argument("--max_turns", type=int, default=records.RecordOptions.max_turns)
  parser.add_argument("--long_dialogues", choices=("truncate", "skip"), default="truncate")
  parser.add_argument("--workers", type=int, default=2, help="videos decoded at a time")
  parser.add_argument("--shard_videos", type=int, default=stores.SHARD_VIDEOS,
                      help="videos per frame-store shard (what an interrupted build keeps)")
  parser.add_argument("--verbose", action="store_true", help="log every problem as it is found")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                      format="%(levelname)s %(message)s")
  if args.toy_videos:
    source = {"toy": toy_corpus.ToyCorpusConfig(num_videos=args.toy_videos, seed=args.toy_seed,
                                                 size=args.toy_size)}
  elif args.annotations and args.video_root:
    source = {"annotations": args.annotations, "video_root": args.video_root}
  else:
    parser.error("give --annotations and --video_root, or --toy_videos")
  try:
    summary = prepare.build_stores(
        args.out, **source,
        frames=stores.FrameSettings(num_frames=args.num_frames, size=args.size,
                                    sampling=args.sampling, seed=args.seed, resize=args.resize),
        options=records.RecordOptions(
            max_turns=args.max_turns, long_dialogues=args.long_dialogues,
            splits=tuple(s for s in args.splits.split(",") if s) or None),
        workers=args.workers, shard_videos=args.shard_videos, progress=True,
        overwrite=args.overwrite)
  except FileExistsError as e:
    parser.error(f"{e} (--overwrite)")
  for why in summary["video_failures"].values():
    print(f"video skipped: {why}")
  for note in summary["short_videos"].values():
    print(f"video kept: {note}")
  for message in summary["messages"]:
    print(message)
  shards = summary["frame_shards"]
  if shards["reused"]:
    print(f"resumed: {shards['reused']} of {shards['total']} frame-store shards were already done")
  videos = summary["videos"]
  short = f" ({videos['short']} with fewer frames than requested)" if videos["short"] else ""
  print(f"videos: {videos['stored']} stored{short}, {videos['failed']} failed; "
        f"{summary['summary']}; {summary['seconds']} s -> {args.out}")
  return summary


if __name__ == "__main__":
  main()
