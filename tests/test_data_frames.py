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


def _pattern(height: int, width: int, num_frames: int) -> np.ndarray:
  """Smooth moving colour waves: a wrong scale or a one-pixel shift shows, codecs keep them."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  out = [np.stack([128 + 100 * np.sin(2 * np.pi * (xx + 2 * k) / 41),
                   128 + 100 * np.cos(2 * np.pi * (yy - k) / 37),
                   255 * (xx + yy) / (height + width)], -1) for k in range(num_frames)]
  return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def non_square(tmp_path_factory):
  """Landscape, portrait and 3:2 mp4 files (sides multiples of 16, as the writer wants)."""
  root = tmp_path_factory.mktemp("non_square")
  paths = {}
  for height, width in [(96, 160), (160, 96), (64, 96)]:
    paths[height, width] = str(root / f"v{height}x{width}.mp4")
    toy_corpus.write_mp4(paths[height, width], _pattern(height, width, 12), fps=10)
  return paths


@pytest.mark.parametrize("shape,size", [((96, 160), 64), ((160, 96), 64), ((64, 96), 32)])
def test_shorter_side_crop_equals_resize_then_centre_crop(non_square, shape, size):
  from PIL import Image

  path = non_square[shape]
  got = frames.load_video(path, num_frames=6, size=size, resize="shorter_side_crop")
  assert got.frames.shape == (6, size, size, 3) and got.frames.dtype == np.uint8
  # Reference: native frames, resized (PIL bicubic) to the shorter side, then the centre crop.
  native = decord.VideoReader(path).get_batch(got.indices.tolist()).asnumpy()
  height, width = frames.shorter_side_size(*shape, size)
  assert min(height, width) == size and abs(width / height - shape[1] / shape[0]) < 0.02
  resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                      for f in native]).astype(np.int64)
  top, left = round((height - size) / 2), round((width - size) / 2)
  errors = {(dy, dx): np.abs(got.frames - resized[:, top + dy:top + dy + size,
                                                  left + dx:left + dx + size]).mean()
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if 0 <= top + dy <= height - size and 0 <= left + dx <= width - size}
  assert errors[0, 0] < 4.5  # scaler kernels and chroma differ a little
  assert min(errors, key=errors.get) == (0, 0)  # the centre, not a pixel off
  # Squash (the default) is another picture: the whole frame, aspect ratio not kept.
  squash = frames.load_video(path, num_frames=6, size=size)
  assert np.array_equal(squash.frames, decord.VideoReader(path, width=size, height=size)
                        .get_batch(got.indices.tolist()).asnumpy())
  assert np.abs(squash.frames - resized[:, top:top + size, left:left + size]).mean() > 20


def test_decord_width_quirk_is_worked_around(non_square):
  """decord cannot resize this video to width 48 (shorter side 32 of 96x64); one pixel wider
  works and the crop is unchanged but for half a pixel."""
  path = non_square[64, 96]
  with pytest.raises(decord.DECORDError):
    decord.VideoReader(path, width=48, height=32).get_batch([0])
  assert frames.load_video(path, num_frames=2, size=32,
                           resize="shorter_side_crop").frames.shape == (2, 32, 32, 3)


def test_resize_errors(non_square):
  with pytest.raises(ValueError, match="resize must be one of"):
    frames.load_video(non_square[96, 160], num_frames=2, size=32, resize="stretch")


def test_random_resized_crop_box_follows_torchvision():
  rng = np.random.default_rng(0)
  boxes = np.array([frames.random_resized_crop_box(224, 224, (0.5, 1.0), (3 / 4, 4 / 3), rng)
                    for _ in range(2000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (
      left + w <= 224).all()
  area = h * w / 224**2
  # Uniform in the scale range, less the large non-square crops that do not fit (redrawn).
  assert area.min() > 0.49 and area.max() <= 1.0
  assert np.quantile(area, 0.05) < 0.53 and np.quantile(area, 0.95) > 0.9
  ratio = w / h
  assert ratio.min() > 0.74 and ratio.max() < 1.35
  assert ((ratio > 1.1).mean() > 0.2) and ((ratio < 0.9).mean() > 0.2)  # log-uniform both ways
  assert len({tuple(b) for b in boxes}) > 1000
  again = np.random.default_rng(0)
  assert frames.random_resized_crop_box(224, 224, (0.5, 1.0), (3 / 4, 4 / 3), again) == tuple(
      boxes[0])
  # No allowed crop (an area larger than the frame): the centre crop at the nearest ratio.
  assert frames.random_resized_crop_box(100, 300, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (
      0, 83, 100, 133)
  assert frames.random_resized_crop_box(64, 64, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 0, 64, 64)


@pytest.mark.parametrize("box,size", [((20, 30, 190, 170), (224, 224)), ((0, 0, 32, 32), (32, 32)),
                                      ((5, 3, 11, 29), (32, 48))])
def test_resized_crop_equals_torch_bicubic(box, size):
  """The official `RandomResizedCropVideo` resize: torch bicubic, align_corners=False, on floats."""
  torch = pytest.importorskip("torch")
  clip = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), np.uint8)
  got = frames.resized_crop(clip, box, size)
  assert got.shape == (3, *size, 3) and got.dtype == np.uint8
  top, left, h, w = box
  crop = torch.from_numpy(clip[:, top:top + h, left:left + w].astype(np.float32))
  want = torch.nn.functional.interpolate(crop.permute(0, 3, 1, 2), size=size, mode="bicubic",
                                         align_corners=False).permute(0, 2, 3, 1).numpy()
  want = np.clip(np.rint(want), 0, 255)
  assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
  if box[2:] == size:
    assert np.array_equal(got, clip[:, :32, :32])  # same size: the crop itself
