"""Per-video store building: resumable shard by shard, deterministic whatever the worker count,
and stores of other settings refused; the decode resize mode is part of the settings."""

import os
import shutil
import zlib

import numpy as np
import pytest

from ivcr_jax.data import frames, prepare, stores, toy_corpus

CFG = toy_corpus.ToyCorpusConfig(num_videos=12, seed=4, size=32)
SETTINGS = stores.FrameSettings(num_frames=6, size=32, sampling="rand", seed=1)
SHARD = 4  # 13 videos (one corrupt) -> 4 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(video root, every video of the toy corpus plus a corrupt one)."""
  root = tmp_path_factory.mktemp("corpus")
  corpus = toy_corpus.write_toy_corpus(str(root), CFG)
  (root / "videos" / "toy" / "bad.mp4").write_bytes(b"\x00not a video" * 50)
  videos = sorted([s.path for s in toy_corpus.make_video_specs(CFG)] + ["toy/bad.mp4"])
  return corpus.video_root, videos


def _build(out, corpus, settings=SETTINGS, **kwargs):
  root, videos = corpus
  kwargs = {"workers": 2, "shard_videos": SHARD, "progress": False, **kwargs}
  return stores.write_frame_store(str(out), videos, root, settings, **kwargs)


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
  return _build(tmp_path_factory.mktemp("clean"), corpus)


def _files(path: str) -> dict[str, bytes]:
  """Every file of a complete store, by name."""
  out = {}
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), "rb") as f:
      out[name] = f.read()
  return out


def _assert_same_store(a: str, b: str):
  files_a, files_b = _files(a), _files(b)
  assert files_a.keys() == files_b.keys()
  for name in files_a:
    if name != "dataset_info.json":  # holds the directory
      assert files_a[name] == files_b[name], name
  store_a, store_b = stores.FrameStore(a), stores.FrameStore(b)
  assert store_a.record_of == store_b.record_of
  for video in store_a.record_of:
    x, y = store_a[video], store_b[video]
    assert np.array_equal(x.frames, y.frames) and np.array_equal(x.indices, y.indices)


def test_clean_build(corpus, clean):
  _, videos = corpus
  assert clean.shards == 4 and clean.shards_reused == 0
  assert clean.videos == [v for v in videos if v != "toy/bad.mp4"]
  assert "cannot decode" in clean.failures["toy/bad.mp4"]
  assert sum(f.startswith("ivcr_frames-videos.array_record-") for f in os.listdir(clean.path)) == 4
  assert stores.BUILD_DIR not in os.listdir(clean.path)
  store = stores.FrameStore(clean.path)
  assert store.durations == clean.durations and store.settings == SETTINGS
  direct = frames.load_video(f"{corpus[0]}/toy/v0004.mp4", num_frames=6, size=32, mode="rand",
                             rng=np.random.default_rng([1, zlib.crc32(b"toy/v0004.mp4")]))
  assert np.array_equal(store["toy/v0004.mp4"].frames, direct.frames)


def test_same_bytes_with_one_or_three_workers(corpus, clean, tmp_path):
  for workers in (1, 3):
    again = _build(tmp_path / str(workers), corpus, workers=workers)
    _assert_same_store(again.path, clean.path)


def test_an_interrupted_build_redoes_only_its_unfinished_shards(corpus, clean, tmp_path,
                                                                monkeypatch):
  root, videos = corpus
  real = frames.load_video
  decoded = []

  def load(path, **kwargs):
    decoded.append(os.path.relpath(path, root))
    if crash and path.endswith(videos[9]):  # shard 2 of 4
      raise RuntimeError("power cut")
    return real(path, **kwargs)

  monkeypatch.setattr(stores.frames_lib, "load_video", load)
  crash = True
  with pytest.raises(RuntimeError, match="power cut"):
    _build(tmp_path, corpus)
  target = tmp_path / stores.FRAME_STORE / stores.STORE_VERSION
  assert not (target / stores.INDEX_FILE).exists()
  shard_files = sorted(f for f in os.listdir(target) if "array_record" in f)
  assert [f[-14:] for f in shard_files] == ["00000-of-00004", "00001-of-00004"]
  built = {f: (target / f).stat().st_mtime_ns for f in shard_files}
  build = target / stores.BUILD_DIR
  assert {"shard-00000.json", "shard-00001.json"} <= set(os.listdir(build))
  (build / "shard-00001.json").write_text("{half a marker")  # shard 1 does not count as done

  crash, decoded[:] = False, []
  result = _build(tmp_path, corpus)
  assert result.shards_reused == 1
  assert sorted(decoded) == videos[SHARD:]  # shards 1-3 only
  assert (target / shard_files[0]).stat().st_mtime_ns == built[shard_files[0]]
  assert (target / shard_files[1]).stat().st_mtime_ns != built[shard_files[1]]
  assert result.failures == clean.failures and result.durations == clean.durations
  _assert_same_store(result.path, clean.path)
  assert not build.exists()


def test_a_complete_store_is_reused_and_other_settings_refused(corpus, clean, tmp_path,
                                                               monkeypatch):
  out = tmp_path / "copy"
  shutil.copytree(os.path.dirname(os.path.dirname(clean.path)), out)

  def no_decoding(path, **kwargs):
    raise AssertionError(f"decoded {path}")

  with monkeypatch.context() as m:
    m.setattr(stores.frames_lib, "load_video", no_decoding)
    again = _build(out, corpus)
  assert again.shards_reused == again.shards == 4 and again.videos == clean.videos
  cropped = stores.FrameSettings(num_frames=6, size=32, sampling="rand", seed=1,
                                 resize="shorter_side_crop")
  with pytest.raises(FileExistsError, match="complete ivcr_frames store built from other"):
    _build(out, corpus, cropped)
  with pytest.raises(FileExistsError):
    _build(out, corpus, shard_videos=5)
  rebuilt = _build(out, corpus, cropped, overwrite=True)
  assert rebuilt.shards_reused == 0
  assert stores.FrameStore(rebuilt.path).settings.resize == "shorter_side_crop"


def test_resize_mode_is_a_setting():
  assert stores.FrameSettings().resize == "squash"  # the official decode stays the default
  with pytest.raises(ValueError, match="resize must be one of"):
    stores.FrameSettings(resize="stretch")
  squash = prepare.recipe(annotations="a.json", video_root="v", toy=None,
                          frames=stores.FrameSettings(), options=prepare.DEFAULT_OPTIONS)
  crop = prepare.recipe(annotations="a.json", video_root="v", toy=None,
                        frames=stores.FrameSettings(resize="shorter_side_crop"),
                        options=prepare.DEFAULT_OPTIONS)
  assert squash["frames"]["resize"] == "squash" and crop != squash


def test_build_stores_resumes_after_a_crash(tmp_path, monkeypatch):
  toy = toy_corpus.ToyCorpusConfig(num_videos=12, size=32)
  every = stores.FrameSettings(size=32, sampling="all")
  real = frames.load_video
  count = []

  def load(path, **kwargs):
    count.append(path)
    if crash and len(count) == 6:
      raise KeyboardInterrupt
    return real(path, **kwargs)

  monkeypatch.setattr(stores.frames_lib, "load_video", load)
  crash = True
  with pytest.raises(KeyboardInterrupt):
    prepare.build_stores(str(tmp_path), toy=toy, frames=every, shard_videos=4, workers=1,
                         progress=False)
  assert prepare.read_report(str(tmp_path)) is None
  crash, count[:] = False, []
  report = prepare.build_stores(str(tmp_path), toy=toy, frames=every, shard_videos=4, workers=1,
                                progress=False)
  assert report["frame_shards"] == {"total": 3, "reused": 1} and len(count) == 8
  assert report["videos"] == {"needed": 12, "stored": 12, "failed": 0, "short": 0}
  with pytest.raises(FileExistsError, match="complete stores"):
    prepare.build_stores(str(tmp_path), toy=toy, frames=every, progress=False)
