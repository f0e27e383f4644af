"""Data-path benchmark on the toy corpus: build times, and frame throughput of the frame store
against decoding the same frames with decord (SPEC §5: the store should be >= 10x faster).

  python scripts/bench_pipeline.py --num_videos 200 --num_frames 16 --size 32

Every figure is measured in this run, side by side.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from ivcr_jax.data import frames, prompt, records, stores, toy_corpus
from ivcr_jax.data import tokenizer as toks


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_videos", type=int, default=200)
  parser.add_argument("--num_frames", type=int, default=16)
  parser.add_argument("--size", type=int, default=32, help="decode size (multiple of 32)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", default="", help="work directory (default: a temporary one)")
  args = parser.parse_args()
  work = args.out or tempfile.mkdtemp(prefix="ivcr_bench_")

  cfg = toy_corpus.ToyCorpusConfig(num_videos=args.num_videos)
  corpus, t_corpus = _timed(lambda: toy_corpus.write_toy_corpus(
      os.path.join(work, "toy"), cfg, workers=args.workers))
  dialogues, _ = records.read_annotations(corpus.annotations)
  videos = sorted({v for d in dialogues for t in d.turns for v in t.videos})
  settings = stores.FrameSettings(num_frames=args.num_frames, size=args.size, sampling="uniform")
  written, t_store = _timed(lambda: stores.write_frame_store(
      os.path.join(work, "stores"), videos, corpus.video_root, settings, workers=args.workers,
      progress=False))
  store = stores.FrameStore(written.path)

  def decode_all():
    return sum(len(frames.load_video(os.path.join(corpus.video_root, v), size=args.size,
                                     num_frames=args.num_frames).indices) for v in videos)

  def read_all():
    return sum(len(store[v].indices) for v in videos)

  n_decoded, t_decode = _timed(decode_all)
  n_read, t_read = _timed(read_all)
  assert n_decoded == n_read

  tok_dir, t_tok = _timed(lambda: toks.build_toy_tokenizer(os.path.join(work, "tokenizer")))
  tok = toks.load_tokenizer(tok_dir)
  samples = records.make_samples(dialogues)
  times = [np.arange(args.num_frames) / cfg.fps] * 16

  def encode_all():
    for s in samples:
      prompt.encode(s, tok, [times[0] if t.kind == records.MOMENT else None for t in s.turns])

  _, t_encode = _timed(encode_all)

  print(f"toy corpus: {args.num_videos} videos, {len(dialogues)} dialogues in {t_corpus:.2f} s")
  print(f"frame store: {len(videos)} videos in {t_store:.2f} s")
  print(f"decord decode: {n_decoded / t_decode:,.0f} frames/s; frame store read: "
        f"{n_read / t_read:,.0f} frames/s; ratio {t_decode / t_read:.1f}x")
  print(f"toy tokenizer build: {t_tok:.2f} s; prompt encoding: {len(samples) / t_encode:,.0f} "
        f"dialogues/s")
  print(f"work directory: {work}")


if __name__ == "__main__":
  main()
