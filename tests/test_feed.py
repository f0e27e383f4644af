"""The shares of several processes become one global batch: padding to the agreed shapes and
each share's `video_slot` pointing at its own rows of the global video table; on one process
the video table is padded so that it is split over the devices, not replicated."""

import numpy as np

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.data.pipeline import IGNORE, Layout, pad_batch
from ivcr_jax.training.feed import Feed


def _share(layout, videos: int, seq: int, seed: int) -> dict:
  """One process's rows: row i splices video i % videos; frames carry (share seed, video)."""
  per_video = layout.tokens_per_video(layout.frames)
  b = layout.batch_size
  slot = np.full((b, seq), -1, np.int32)
  for i in range(b):
    slot[i, 2:2 + per_video] = (i % videos) * per_video + np.arange(per_video)
  frames = np.zeros((videos, layout.frames, 2, 2, 3), np.uint8)
  frames[:, :, 0, 0, 0] = seed
  frames[:, :, 0, 0, 1] = np.arange(videos)[:, None]
  return {"input_ids": np.ones((b, seq), np.int32), "labels": np.ones((b, seq), np.int32),
          "video_slot": slot, "attention_mask": np.ones((b, seq), bool),
          "position_ids": np.tile(np.arange(seq, dtype=np.int32), (b, 1)),
          "frames": frames, "num_frames": np.full((videos,), layout.frames, np.int32),
          "qformer_text_ids": np.ones((videos, layout.frames, 3), np.int32),
          "qformer_text_mask": np.ones((videos, layout.frames, 3), bool),
          "index_pos": np.zeros((b, 2), np.int32)}


def test_shares_splice_their_own_videos_from_the_global_table():
  layout = Layout.from_config(get_config("tiny"), batch_size=8, process_count=2)
  per_video = layout.tokens_per_video(layout.frames)
  shares = [_share(layout, 3, 40, seed=10), _share(layout, 2, 56, seed=20)]
  seq, videos = 64, 4  # what the processes agree on (each padded to it)
  padded = [pad_batch(s, layout, seq_len=seq, videos=videos, first_video_row=k * videos)
            for k, s in enumerate(shares)]
  glob = {key: np.concatenate([p[key] for p in padded]) for key in padded[0]}
  assert glob["input_ids"].shape == (8, seq) and glob["frames"].shape[0] == 2 * videos
  for share, p in zip(shares, padded, strict=True):
    s = share["input_ids"].shape[1]
    assert (p["labels"][:, s:] == IGNORE).all() and not p["attention_mask"][:, s:].any()
    assert (p["num_frames"][len(share["num_frames"]):] == 1).all()  # empty padding videos
  for row in range(8):
    k, local = divmod(row, 4)
    slot = glob["video_slot"][row]
    used = slot[slot >= 0] // per_video
    # Every spliced position reads a video of its own share (seed) and the right one of it.
    assert (glob["frames"][used, 0, 0, 0, 0] == (10, 20)[k]).all()
    assert (glob["frames"][used, 0, 0, 0, 1] == local % (3, 2)[k]).all()
  # Without the offset, process 1's rows would read process 0's videos: the check above fails.
  wrong = pad_batch(shares[1], layout, seq_len=seq, videos=videos)
  assert (glob["frames"][wrong["video_slot"][0][wrong["video_slot"][0] >= 0] // per_video,
                         0, 0, 0, 0] == 10).all()


def test_one_process_feed_splits_every_video_table_over_the_devices():
  """Tables of 3 and then 5 videos on a (1, 4, 1) mesh: each is padded to 4 and 8 rows and split
  over the 4 devices (neither size divides 4, so without the padding both would be replicated),
  the sequences keep their shapes and values, and the padding videos are empty."""
  cfg = get_config("tiny")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 4, 1)
  layout = Layout.from_config(cfg, batch_size=4)
  mesh = sharding.make_mesh(cfg.mesh)
  shares = [_share(layout, 3, 40, seed=1), _share(layout, 5, 48, seed=2)]
  feed = Feed(iter(shares), layout, mesh, cfg.mesh.rules, name="test")
  try:
    batches = list(feed)
  finally:
    feed.close()
  for share, batch, rows in zip(shares, batches, (4, 8), strict=True):
    frames = batch["frames"]
    assert frames.shape[0] == rows and frames.sharding.spec[0] is not None, frames.sharding
    assert len({s.device for s in frames.addressable_shards}) == 4
    assert all(s.data.shape[0] == rows // 4 for s in frames.addressable_shards)
    v = share["frames"].shape[0]
    np.testing.assert_array_equal(np.asarray(frames)[:v], share["frames"])
    assert (np.asarray(batch["num_frames"])[v:] == 1).all()
    np.testing.assert_array_equal(np.asarray(batch["video_slot"]), share["video_slot"])
