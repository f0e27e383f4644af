"""Data-path benchmark at 224 px on real-size videos (SPEC §5: the input pipeline must deliver
>= 10x the frames/s of decoding the same frames with decord, and never be the bottleneck).

  python -m scripts.bench_pipeline [--seconds 40] [--batches 10]

Synthetic H.264 videos of three kinds (1280x720 and 640x360 at 30 fps, and 398x224 at 3 fps, the
format the official `compress_video_data.py` makes), a toy corpus's dialogues pointed at them, the
`small` benchmark config (64 frames per video at 224 px, batch 1 as official). Printed side by
side, all measured in this run: decord decoding the 64 sampled frames of each video (squash and
shorter-side + centre crop), the frame store's build and read, bytes per video on disk, and the
grain training pipeline's samples/s and frames/s with 0 and 2 worker processes, without and with
the random resized crop, and from a feature store of the small ViT.
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
from ivcr_jax.data import (
  feature_store,
  frames,
  pipeline,
  prepare,
  records,
  stores,
  toy_corpus,
  toy_tokenizer,
)
from ivcr_jax.data import tokenizer as toks
from ivcr_jax.data.batch import Layout
from ivcr_jax.models.vision_tower import frame_encoder

KINDS = ((720, 1280, 30.0), (360, 640, 30.0), (224, 398, 3.0))  # height, width, fps


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_video(path: str, height: int, width: int, fps: float, seconds: float, seed: int) -> None:
  """A camera pan over a smooth random texture with three moving discs, H.264 at crf 23 (typical
  web video: motion the codec can predict, not noise)."""
  import imageio_ffmpeg

  rng = np.random.default_rng(seed)
  n = int(seconds * fps)
  pan = max(1, int(round(60 / fps)))  # pixels per frame: ~60 px/s whatever the frame rate
  big = (height + pan * n // 3 + 1, width + pan * n + 1)
  small = rng.integers(0, 256, (1, big[0] // 6 + 2, big[1] // 6 + 2, 3), np.uint8)
  texture = frames.resized_crop(small, (0, 0, *small.shape[1:3]), big)[0]
  yy, xx = np.mgrid[-40:41, -40:41]
  disc = yy**2 + xx**2 <= 40**2
  colours = rng.integers(0, 256, (3, 3), np.uint8)
  speeds = rng.uniform(-4, 4, (3, 2)) * 30 / fps
  writer = imageio_ffmpeg.write_frames(
      path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
      macro_block_size=2, ffmpeg_log_level="error",
      output_params=["-crf", "23", "-preset", "veryfast"])
  writer.send(None)
  for t in range(n):
    frame = texture[pan * t // 3:pan * t // 3 + height, pan * t:pan * t + width].copy()
    for colour, speed in zip(colours, speeds, strict=True):
      cy = int(41 + (speed[0] * t) % (height - 82))
      cx = int(41 + (speed[1] * t) % (width - 82))
      frame[cy - 40:cy + 41, cx - 40:cx + 41][disc] = colour
    writer.send(frame)
  writer.close()


def _throughput(ds: grain.IterDataset, layout: Layout, batches: int
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
    num_frames += int((batch["frame_slot"][rows] >= 0).sum())
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return first, batches * layout.batch_size / seconds, num_frames / seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=40.0, help="length of each video")
  parser.add_argument("--batches", type=int, default=10, help="batches timed per pipeline run")
  parser.add_argument("--workers", type=int, default=2, help="decode threads of the store build, "
                      "and the worker processes of the pipeline runs that have them")
  parser.add_argument("--no_features", action="store_true", help="skip the feature-store run")
  parser.add_argument("--out", default="", help="work directory (default: a temporary one)")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  work = args.out or tempfile.mkdtemp(prefix="ivcr_bench_")
  config = get_config("small").copy_and_resolve_references()
  size, num_frames = config.model.vit.image_size, config.data.frames_retrieval

  # Real-size videos, and the 12 videos of a toy corpus (its dialogues) hard-linked to them in
  # turn (the video root refuses symlinks that leave it).
  video_root = os.path.join(work, "videos")
  real = os.path.join(video_root, "real")
  os.makedirs(real, exist_ok=True)
  kinds = {}
  start = time.perf_counter()
  for k, (height, width, fps) in enumerate(KINDS):
    path = os.path.join(real, f"{width}x{height}_{fps:g}fps.mp4")
    if not os.path.exists(path):
      write_video(path, height, width, fps, args.seconds, seed=k)
    kinds[path] = (height, width, fps)
  t_generate = time.perf_counter() - start
  toy = toy_corpus.write_toy_corpus(os.path.join(work, "toy"),
                                    toy_corpus.ToyCorpusConfig(num_videos=12, size=32))
  paths = list(kinds)
  for i, spec in enumerate(toy_corpus.make_video_specs(toy_corpus.ToyCorpusConfig(
      num_videos=12, size=32))):
    link = os.path.join(video_root, spec.path)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.exists(link):
      os.link(paths[i % len(paths)], link)

  # decord directly: the 64 frames a store keeps, one video at a time, as a data loader would.
  direct = {}
  for path in paths:
    for resize in frames.RESIZE_MODES:
      v, seconds = _timed(lambda p=path, r=resize: frames.load_video(
          p, num_frames=num_frames, size=size, resize=r))
      direct[path, resize] = (len(v.indices), seconds, v.num_video_frames)
  decord_fps = (sum(direct[p, "squash"][0] for p in paths)
                / sum(direct[p, "squash"][1] for p in paths))

  settings = stores.FrameSettings(num_frames=num_frames, size=size, sampling="uniform")
  summary, t_build = _timed(lambda: prepare.build_stores(
      os.path.join(work, "stores"), annotations=toy.annotations, video_root=video_root,
      frames=settings, workers=args.workers, progress=False, overwrite=True))
  store = stores.FrameStore(summary["frame_store"])
  videos = list(store.record_of)
  stored_frames, t_read = _timed(lambda: sum(len(store[v].indices) for v in videos))

  tok = toks.load_tokenizer(toy_tokenizer.build_toy_tokenizer(os.path.join(work, "tokenizer")))
  layout = Layout.from_config(config)
  dialogue_store = stores.DialogueStore(summary["dialogue_store"], "train")
  train = records.make_samples([dialogue_store[i] for i in range(len(dialogue_store))])

  def encoder(crop: bool, **kwargs) -> pipeline.SampleEncoder:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.data.random_resized_crop = crop
    return pipeline.SampleEncoder(cfg, tok, store, training=True, layout=layout,
                                  qformer_tokenizer=tok, **kwargs)

  runs = {}
  for crop in (False, True):
    for workers in (0, args.workers):
      ds = pipeline.train_dataset(train, encoder(crop), layout, seed=0)
      if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
      name = f"frames{' + random resized crop' if crop else ''}, {workers} worker processes"
      runs[name] = _throughput(ds, layout, args.batches)

  features = None
  if not args.no_features:
    with config.unlocked():
      config.model.llm.vocab_size = len(tok)
      config.weights.init_checkpoint = ""  # random weights: the same work
    model = experiment.build_model(config, tok)
    built, t_features = _timed(lambda: feature_store.write_feature_store(
        os.path.join(work, "features"), store,
        frame_encoder(model.vision, feature_store.storage_dtype("float16")),
        model_cfg=model.vision.cfg, fingerprint=feature_store.vit_fingerprint(model.vision),
        progress=False, overwrite=True))
    features = feature_store.FeatureStore(built.path)
    fingerprint = built.fingerprint
    runs["features (small ViT, float16), 0 worker processes"] = _throughput(
        pipeline.train_dataset(train, encoder(False, feature_store=features,
                                              vit_fingerprint=fingerprint), layout, seed=0),
        layout, args.batches)

  print(f"videos ({args.seconds:g} s each, H.264 crf 23; written in {t_generate:.0f} s); decord "
        f"decoding {num_frames} uniform frames at {size} px, one video at a time:")
  for path, (height, width, fps) in kinds.items():
    n, t_squash, vlen = direct[path, "squash"]
    _, t_crop, _ = direct[path, "shorter_side_crop"]
    rate = os.path.getsize(path) * 8 / args.seconds / 1e6
    print(f"  {width}x{height} @ {fps:g} fps ({vlen} frames, {rate:.2f} Mbit/s): squash "
          f"{n / t_squash:,.1f} frames/s, shorter side + centre crop "
          f"{n / t_crop:,.1f} frames/s")
  print(f"  all kinds: {decord_fps:,.1f} frames/s")
  print(f"frame store build ({len(videos)} videos, {args.workers} decode threads, shards of "
        f"{stores.SHARD_VIDEOS}): {t_build:.1f} s; read: {stored_frames / t_read:,.0f} frames/s "
        f"= {stored_frames / t_read / decord_fps:,.0f}x decord")
  raw = num_frames * size * size * 3
  mp4 = np.mean([os.path.getsize(p) for p in paths])
  print("bytes per video on disk:")
  print(f"  source mp4 (mean of the kinds): {mp4:,.0f}")
  print(f"  frame store ({num_frames} x {size}x{size}x3 uint8, ArrayRecord + zstd): "
        f"{_dir_bytes(summary['frame_store']) / len(videos):,.0f} [raw {raw:,}]")
  if features is not None:
    n_tokens, width = features.shape
    print(f"  feature store ({num_frames} x {n_tokens}x{width} float16, small ViT; ViT-g would "
          f"be {num_frames * 257 * 1408 * 2:,}): {_dir_bytes(built.path) / len(videos):,.0f} "
          f"[raw {num_frames * n_tokens * width * 2:,}]; built in {t_features:.1f} s")
  print(f"grain training pipeline, small config (batch {layout.batch_size}, {layout.frames} "
        f"frames per video at {size} px, dialogue mode, {len(train)} samples; {args.batches} "
        "batches after the first):")
  for name, (first, samples_s, frames_s) in runs.items():
    print(f"  {name}: first batch {first:.2f} s; {samples_s:,.2f} samples/s, {frames_s:,.0f} "
          f"table frames/s = {frames_s / decord_fps:,.1f}x decord")
  print(f"work directory: {work}")


if __name__ == "__main__":
  main()
