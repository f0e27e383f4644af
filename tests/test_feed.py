"""The shares of several processes become one global batch: padding to the agreed shapes and
each share's `video_slot` and `frame_slot` pointing at its own rows of the global video and
frame tables; on one process both tables are padded so that they are split over the devices,
not replicated."""

import numpy as np

from configs.interllava import get_config
from ivcr_jax import sharding
from ivcr_jax.data.batch import Layout
from ivcr_jax.data.pipeline import IGNORE, frame_slots, pad_batch
from ivcr_jax.training.feed import Feed


def _share(layout, videos: int, seq: int, seed: int) -> dict:
  """One process's rows: row i splices video i % videos; video j has 2 + j frames, each marked
  (share seed, video, frame)."""
  per_video = layout.tokens_per_video(layout.frames)
  b = layout.batch_size
  slot = np.full((b, seq), -1, np.int32)
  for i in range(b):
    slot[i, 2:2 + per_video] = (i % videos) * per_video + np.arange(per_video)
  counts = [2 + j for j in range(videos)]
  frames = np.zeros((sum(counts), 2, 2, 3), np.uint8)
  frames[:, 0, 0, 0] = seed
  frames[:, 0, 0, 1] = np.repeat(np.arange(videos), counts)
  frames[:, 0, 0, 2] = np.concatenate([np.arange(n) for n in counts])
  return {"input_ids": np.ones((b, seq), np.int32), "labels": np.ones((b, seq), np.int32),
          "video_slot": slot, "attention_mask": np.ones((b, seq), bool),
          "position_ids": np.tile(np.arange(seq, dtype=np.int32), (b, 1)),
          "frames": frames, "frame_slot": frame_slots(counts, videos, layout.frames),
          "qformer_text_ids": np.ones((len(frames), 3), np.int32),
          "qformer_text_mask": np.ones((len(frames), 3), bool),
          "index_pos": np.zeros((b, 2), np.int32)}


def test_shares_splice_their_own_videos_from_the_global_table():
  layout = Layout.from_config(get_config("tiny"), batch_size=8, process_count=2)
  per_video = layout.tokens_per_video(layout.frames)
  shares = [_share(layout, 3, 40, seed=10), _share(layout, 2, 56, seed=20)]
  seq, videos, frames = 64, 4, 12  # what the processes agree on (each padded to it)
  pad = lambda share, k, offsets=True: pad_batch(
      share, layout, seq_len=seq, videos=videos, frames=frames,
      first_video_row=k * videos * offsets, first_frame_row=k * frames * offsets)
  padded = [pad(s, k) for k, s in enumerate(shares)]
  glob = {key: np.concatenate([p[key] for p in padded]) for key in padded[0]}
  assert glob["input_ids"].shape == (8, seq) and glob["frame_slot"].shape[0] == 2 * videos
  assert glob["frames"].shape[0] == len(glob["qformer_text_ids"]) == 2 * frames
  for share, p in zip(shares, padded, strict=True):
    s, v, f = share["input_ids"].shape[1], len(share["frame_slot"]), len(share["frames"])
    assert (p["labels"][:, s:] == IGNORE).all() and not p["attention_mask"][:, s:].any()
    assert (p["frame_slot"][v:] == -1).all()  # padding videos have no frames
    assert not p["frames"][f:].any() and not p["qformer_text_mask"][f:].any()

  def spliced_frames(glob, row):
    slot = glob["video_slot"][row]
    videos_used = np.unique(slot[slot >= 0] // per_video)
    frame_rows = glob["frame_slot"][videos_used]
    return glob["frames"][frame_rows[frame_rows >= 0], 0, 0]

  for row in range(8):
    k, local = divmod(row, 4)
    marks = spliced_frames(glob, row)
    # Every spliced position reads its own share's (seed) video, all of that video's frames.
    video = local % (3, 2)[k]
    np.testing.assert_array_equal(marks, [((10, 20)[k], video, t) for t in range(2 + video)])
  # Without the offsets, process 1's rows would read process 0's videos and frames.
  wrong = {key: np.concatenate([padded[0][key], pad(shares[1], 1, False)[key]])
           for key in padded[0]}
  assert (spliced_frames(wrong, 4)[:, 0] == 10).all()


def test_one_process_feed_splits_every_video_table_over_the_devices():
  """Tables of 3 and then 5 videos (9 and 20 frames) on a (1, 4, 1) mesh: the video tables are
  padded to 4 and 8 rows, the frame tables to 12 and 20, and each is split over the 4 devices
  (a size 4 does not divide would be replicated), the sequences keep their shapes and values,
  and the padding videos and frames are empty."""
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
  for share, batch, videos, frames in zip(shares, batches, (4, 8), (12, 20), strict=True):
    for key, rows in (("frame_slot", videos), ("frames", frames), ("qformer_text_ids", frames)):
      table = batch[key]
      assert table.shape[0] == rows and table.sharding.spec[0] is not None, table.sharding
      assert len({s.device for s in table.addressable_shards}) == 4
      assert all(s.data.shape[0] == rows // 4 for s in table.addressable_shards)
    v, f = len(share["frame_slot"]), len(share["frames"])
    np.testing.assert_array_equal(np.asarray(batch["frames"])[:f], share["frames"])
    np.testing.assert_array_equal(np.asarray(batch["frame_slot"])[:v], share["frame_slot"])
    assert (np.asarray(batch["frame_slot"])[v:] == -1).all()
    np.testing.assert_array_equal(np.asarray(batch["video_slot"]), share["video_slot"])
