"""Data-path benchmark on the toy corpus: store build times and bytes per video, frame throughput
of the frame store against decord (SPEC §5: the store should be >= 10x faster), and the grain
training pipeline's samples/s and frames/s with 0 and 2 worker processes, from frames and from a
feature store.

  python scripts/bench_pipeline.py --num_videos 200 --num_frames 16 --batches 40

Every figure is measured in this run, side by side (the official-size bytes per video are
computed from the shapes and labelled so).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import grain
import numpy as np
from absl import flags

from configs.interllava import get_config
from ivcr_jax import experiment
from ivcr_jax.data import feature_store, frames, pipeline, prepare, prompt, records, stores
from ivcr_jax.data import tokenizer as toks


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _bytes_per_video(path: str, videos: int) -> float:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / videos


def _throughput(ds: grain.IterDataset, layout: pipeline.Layout, batches: int
                ) -> tuple[float, float, float]:
  """(seconds to the first batch, samples/s, table frames/s) over `batches` batches after it."""
  per_video = layout.tokens_per_video(layout.frames)
  it = iter(ds)
  _, first = _timed(lambda: next(it))
  start = time.perf_counter()
  num_frames = 0
  for _ in range(batches):
    batch = next(it)
    rows = np.unique(batch["video_slot"][batch["video_slot"] >= 0] // per_video)
    num_frames += int(batch["num_frames"][rows].sum())
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return first, batches * layout.batch_size / seconds, num_frames / seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_videos", type=int, default=200)
  parser.add_argument("--num_frames", type=int, default=16, help="frames per video of the "
                      "uniform store compared with decord")
  parser.add_argument("--batches", type=int, default=40, help="batches timed per pipeline run")
  parser.add_argument("--workers", type=int, default=2, help="decode threads, and the worker "
                      "processes of the second pipeline run")
  parser.add_argument("--out", default="", help="work directory (default: a temporary one)")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  work = args.out or tempfile.mkdtemp(prefix="ivcr_bench_")

  # The stores a toy training run uses: every frame at the tiny ViT's size (it samples per epoch).
  config = get_config("tiny").copy_and_resolve_references()
  with config.unlocked():
    config.data.toy_num_videos = args.num_videos
  data, t_prep = _timed(lambda: experiment.open_data(config, work))
  report = prepare.read_report(data.store_dir)
  corpus_root = os.path.join(data.store_dir, "toy", "videos")
  dialogues = [d for split in report["splits"] for d in data.dialogues(split)]
  videos = sorted({v for d in dialogues for t in d.turns for v in t.videos})
  size = config.model.vit.image_size
  all_frames = sum(len(data.frame_store[v].indices) for v in videos)

  settings = stores.FrameSettings(num_frames=args.num_frames, size=size, sampling="uniform")
  written, t_store = _timed(lambda: stores.write_frame_store(
      os.path.join(work, "uniform"), videos, corpus_root, settings, workers=args.workers,
      progress=False))
  store = stores.FrameStore(written.path)

  def decode_all():
    return sum(len(frames.load_video(os.path.join(corpus_root, v), size=size,
                                     num_frames=args.num_frames).indices) for v in videos)

  def read_all():
    return sum(len(store[v].indices) for v in videos)

  n_decoded, t_decode = _timed(decode_all)
  n_read, t_read = _timed(read_all)
  assert n_decoded == n_read

  tok_dir, t_tok = _timed(lambda: toks.build_toy_tokenizer(os.path.join(work, "tokenizer2")))
  tok = toks.load_tokenizer(tok_dir)
  samples = records.make_samples(dialogues)
  times = np.arange(args.num_frames) / 3.0

  def encode_all():
    for s in samples:
      prompt.encode(s, tok, [times if t.kind == records.MOMENT else None for t in s.turns])

  _, t_encode = _timed(encode_all)

  layout = data.layout
  train = data.samples("train", "dialogue")
  encoder = data.encoder(config, training=True)
  runs = {}
  for workers in (0, args.workers):
    ds = pipeline.train_dataset(train, encoder, layout, seed=0)
    if workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    runs[f"frames, {workers} worker processes"] = _throughput(ds, layout, args.batches)

  model, t_model = _timed(lambda: experiment.build_model(config, data.tokenizer))
  built, t_features = _timed(lambda: feature_store.write_feature_store(
      work, data.frame_store, model.vision, dtype="float16", progress=False))
  features = feature_store.FeatureStore(built.path)
  feature_encoder = pipeline.SampleEncoder(
      config, data.tokenizer, data.frame_store, training=True, layout=layout,
      qformer_tokenizer=data.qformer_tokenizer, feature_store=features,
      vit_fingerprint=feature_store.vit_fingerprint(model.vision))
  runs["features, 0 worker processes"] = _throughput(
      pipeline.train_dataset(train, feature_encoder, layout, seed=0), layout, args.batches)

  print(f"toy corpus + stores (every frame, {size} px) + tokenizer: {args.num_videos} videos, "
        f"{len(dialogues)} dialogues in {t_prep:.2f} s ({report['seconds']} s of it the corpus "
        "and stores)")
  print(f"uniform frame store ({args.num_frames} frames): {len(videos)} videos in {t_store:.2f} s")
  print(f"decord decode: {n_decoded / t_decode:,.0f} frames/s; frame store read: "
        f"{n_read / t_read:,.0f} frames/s; ratio {t_decode / t_read:.1f}x")
  print(f"toy tokenizer build: {t_tok:.2f} s; prompt encoding: {len(samples) / t_encode:,.0f} "
        "dialogues/s")
  n_tokens, width = features.shape
  per_video = all_frames / len(videos)
  print("bytes per video on disk (ArrayRecord compresses; the toy's flat shapes compress far "
        "better than real video), raw in brackets:")
  print(f"  frame store, every frame (avg {per_video:.1f} x {size}x{size}x3 uint8): "
        f"{_bytes_per_video(report['frame_store'], len(videos)):,.0f} "
        f"[{per_video * size * size * 3:,.0f}]")
  print(f"  uniform {args.num_frames}-frame store: "
        f"{_bytes_per_video(written.path, len(videos)):,.0f} "
        f"[{args.num_frames * size * size * 3:,.0f}]")
  print(f"  feature store, every frame ({n_tokens}x{width} float16): "
        f"{_bytes_per_video(built.path, len(videos)):,.0f} "
        f"[{per_video * n_tokens * width * 2:,.0f}]")
  print("  computed for the official 64 frames at 224 px: frames 64x224x224x3 uint8 = "
        f"{64 * 224 * 224 * 3 / 1e6:.1f} MB, ViT-g features 64x257x1408 float16 = "
        f"{64 * 257 * 1408 * 2 / 1e6:.1f} MB")
  print(f"feature store build (tiny ViT): {t_features:.2f} s for {all_frames} frames "
        f"({all_frames / t_features:,.0f} frames/s); model build {t_model:.2f} s")
  print(f"grain pipeline, tiny layout (batch {layout.batch_size}, {layout.frames} frames per "
        f"video, {args.batches} batches after the first):")
  for name, (first, samples_s, frames_s) in runs.items():
    print(f"  {name}: first batch {first:.2f} s; {samples_s:,.1f} samples/s, "
          f"{frames_s:,.0f} table frames/s")
  print(f"work directory: {work}")


if __name__ == "__main__":
  main()
