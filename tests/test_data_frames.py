"""Frame sampling (official `uniform` and `rand` with its fallback) and decoding."""

import decord
import numpy as np
import pytest

from ivcr_jax.data import frames, toy_corpus

CFG = toy_corpus.ToyCorpusConfig(num_videos=12, seed=2, size=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return toy_corpus.write_toy_corpus(str(tmp_path_factory.mktemp("toy")), CFG)


def test_uniform_is_official():
  for vlen in range(1, 400, 7):
    for n in (12, 16, 64, 96):
      official = np.arange(0, vlen, vlen / min(n, vlen)).astype(int)
      got = frames.sample_indices(vlen, n, "uniform")
      assert got.tolist() == official.tolist() and got.dtype == np.int32


@pytest.mark.parametrize("vlen,n", [(200, 64), (128, 64), (90, 16), (33, 16)])
def test_rand_per_interval_never_picks_an_interval_end_b16(vlen, n):
  rng = np.random.default_rng(0)
  bounds = np.linspace(0, vlen, n + 1).astype(int)
  picks = np.stack([frames.sample_indices(vlen, n, "rand", rng) for _ in range(300)])
  assert (picks >= bounds[:-1]).all() and (picks <= bounds[1:] - 2).all()
  # Every allowed frame does get picked.
  for k in range(n):
    assert set(picks[:, k]) == set(range(bounds[k], bounds[k + 1] - 1))
  full = np.stack([frames.sample_indices(vlen, n, "rand_full", rng) for _ in range(300)])
  assert (full <= bounds[1:] - 1).all() and (full == bounds[1:] - 1).any()


@pytest.mark.parametrize("vlen,n", [(20, 16), (31, 16), (10, 16), (1, 64)])
def test_rand_falls_back_on_short_videos(vlen, n):
  """Official: some interval is empty when vlen < 2n, then a sorted random subset."""
  rng = np.random.default_rng(1)
  draws = [frames.sample_indices(vlen, n, "rand", rng) for _ in range(50)]
  for d in draws:
    assert len(d) == min(n, vlen) and len(set(d.tolist())) == len(d)
    assert (np.diff(d) > 0).all() and d.min() >= 0 and d.max() < vlen
  if vlen > n:
    assert len({tuple(d) for d in draws}) > 1  # random
  full = frames.sample_indices(vlen, n, "rand_full", rng)
  assert len(full) == min(n, vlen)


def test_sampling_errors():
  with pytest.raises(ValueError, match="sampling"):
    frames.sample_indices(10, 4, "middle")
  with pytest.raises(ValueError, match="random generator"):
    frames.sample_indices(10, 4, "rand")
  with pytest.raises(ValueError):
    frames.sample_indices(0, 4, "uniform")
  assert frames.sample_indices(7, 4, "all").tolist() == list(range(7))


def test_load_video(corpus):
  path = f"{corpus.video_root}/toy/v0001.mp4"
  spec = toy_corpus.make_video_specs(CFG)[1]
  v = frames.load_video(path, num_frames=16, size=32, mode="uniform")
  assert v.frames.shape == (16, 32, 32, 3) and v.frames.dtype == np.uint8
  assert v.indices.tolist() == frames.sample_indices(spec.num_frames, 16, "uniform").tolist()
  assert v.fps == pytest.approx(CFG.fps) and v.num_video_frames == spec.num_frames
  np.testing.assert_allclose(v.times, v.indices / CFG.fps)
  assert v.duration == pytest.approx(spec.duration)
  reader = decord.VideoReader(path, width=32, height=32)
  assert np.array_equal(v.frames, reader.get_batch(v.indices.tolist()).asnumpy())
  native = frames.load_video(path, num_frames=4, size=None)
  assert native.frames.shape == (4, 64, 64, 3)
  a = frames.load_video(path, num_frames=8, size=32, mode="rand", rng=np.random.default_rng(5))
  b = frames.load_video(path, num_frames=8, size=32, mode="rand", rng=np.random.default_rng(5))
  assert np.array_equal(a.indices, b.indices) and np.array_equal(a.frames, b.frames)


def test_bad_videos_raise_video_error_naming_the_file(tmp_path, corpus):
  with pytest.raises(ValueError, match="multiple of 32"):
    frames.load_video(f"{corpus.video_root}/toy/v0001.mp4", num_frames=4, size=48)
  missing = str(tmp_path / "missing.mp4")
  with pytest.raises(frames.VideoError, match="missing.mp4"):
    frames.load_video(missing, num_frames=4, size=32)
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  with pytest.raises(frames.VideoError, match="corrupt.mp4"):
    frames.load_video(str(corrupt), num_frames=4, size=32)
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  with pytest.raises(frames.VideoError, match="empty.mp4"):
    frames.load_video(str(empty), num_frames=4, size=32)
