"""Bad data, tested for real: videos that lie to `python -m data_prep.build_stores` (too short, a
variable frame rate, an edit list that makes the container's duration disagree with its frames,
empty and non-video `.mp4` files, a symlink out of the video root), and damaged stores (a
truncated ArrayRecord shard, a corrupted settings file) under `python -m ivcr_jax.train` and the
store readers. Every message names the file and, for a store, the command that rebuilds it.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ivcr_jax.data import frames, prepare, stores, toy_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = 8


def _ffmpeg(*args):
  import imageio_ffmpeg

  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)],
                 check=True)


def _clip(path, n):
  """An honest n-frame constant-rate clip (one key frame: H.264's default GOP is longer)."""
  rng = np.random.default_rng(n)
  toy_corpus.write_mp4(str(path), rng.integers(0, 255, (n, 32, 32, 3), np.uint8), FPS)


LIARS = {  # file under the video root -> what data_prep must say about it
    "short.mp4": "has 3 frames, fewer than the 8 requested: all of them are stored",
    "vfr.mp4": "variable frame rate: frame 12 is shown at 1.500 s",
    "edit_list.mp4": "shows the first of its 48 frames at -2.000 s, not 0 (an edit list",
    "empty.mp4": "is empty (0 bytes)",
    "text.mp4": "cannot decode video",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A toy corpus whose annotations also point at the videos that lie: each liar replaces a
  wrong candidate of a copy of one retrieval record; `outside.mp4` is a link out of the root."""
  root = tmp_path_factory.mktemp("liars")
  corpus = toy_corpus.write_toy_corpus(str(root / "toy"),
                                       toy_corpus.ToyCorpusConfig(num_videos=12, size=32))
  videos = root / "toy" / "videos" / "liars"
  videos.mkdir()
  _clip(videos / "short.mp4", 3)
  _clip(root / "cfr.mp4", 24)  # frames 12.. shown 6x slower: 24 frames over 9.9 s
  _ffmpeg("-i", root / "cfr.mp4", "-vf", "setpts='if(lt(N,12),N,12+(N-12)*6)/(8*TB)'",
          "-fps_mode", "vfr", videos / "vfr.mp4")
  _clip(root / "long.mp4", 48)  # cut at 2 s without re-encoding: an edit list hides 16 frames
  _ffmpeg("-ss", 2, "-i", root / "long.mp4", "-c", "copy", videos / "edit_list.mp4")
  (videos / "empty.mp4").write_bytes(b"")
  (videos / "text.mp4").write_text("not a video\n" * 100)
  _clip(root / "elsewhere.mp4", 24)
  os.symlink(root / "elsewhere.mp4", videos / "outside.mp4")
  with open(corpus.annotations, encoding="utf-8") as f:
    records = json.load(f)
  template = next(r for r in records if r["type"] == [1])
  answer = template["conversations"][1]
  wrong = next(i for i, v in enumerate(answer["candidate_videos"]) if v != answer["video_id"])
  for n, name in enumerate([*LIARS, "outside.mp4"]):
    record = json.loads(json.dumps(template))
    record["conversations"][0]["text_id"] = 10_000 + n
    record["conversations"][1]["candidate_videos"][wrong] = f"liars/{name}"
    records.append(record)
  annotations = root / "annotations.json"
  annotations.write_text(json.dumps(records))
  return str(annotations), corpus.video_root, len(records)


ARGS = ["--size", "32", "--num_frames", "8", "--sampling", "uniform", "--shard_videos", "4",
        "--workers", "1"]


def test_videos_that_lie_are_named_counted_and_skipped(corpus, tmp_path, monkeypatch):
  annotations, root, n = corpus
  out = tmp_path / "stores"
  done = subprocess.run([sys.executable, "-m", "data_prep.build_stores", "--annotations",
                         annotations, "--video_root", root, "--out", str(out), *ARGS],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  lines = done.stdout.splitlines()
  for name, why in LIARS.items():
    said = "kept" if name == "short.mp4" else "skipped"
    assert any(x.startswith(f"video {said}: ") and f"{root}/liars/{name}" in x and why in x
               for x in lines), (name, done.stdout)
  assert any("liars/outside.mp4" in x and "resolves outside the video root" in x for x in lines)
  assert lines[-1].startswith(
      f"videos: 13 stored (1 with fewer frames than requested), 4 failed; {n} records: {n - 5} "
      "kept, 5 skipped; skipped: missing_video 4, unsafe_path 1")
  report = prepare.read_report(str(out))
  store = stores.FrameStore(report["frame_store"])
  assert store["liars/short.mp4"].frames.shape == (3, 32, 32, 3)

  # The same build, interrupted after 6 videos (a shard and a half), resumes to the same stores.
  real, calls = frames.load_video, []

  def load(path, **kwargs):
    calls.append(path)
    if len(calls) == 7:
      raise KeyboardInterrupt
    return real(path, **kwargs)

  monkeypatch.setattr(stores.frames_lib, "load_video", load)
  again = tmp_path / "again"
  build = dict(annotations=annotations, video_root=root, progress=False, workers=1,
               shard_videos=4, frames=stores.FrameSettings(num_frames=8, size=32))
  with pytest.raises(KeyboardInterrupt):
    prepare.build_stores(str(again), **build)
  resumed = prepare.build_stores(str(again), **build)
  assert resumed["frame_shards"] == {"total": 5, "reused": 1}
  for key in ("videos", "records", "video_failures", "short_videos", "messages"):
    assert resumed[key] == report[key], key


# ------------------------------------------------------------------------------------------
# Damaged stores


def _build_toy_stores(tiny_config, out):
  """The toy stores the tiny preset trains on (12 videos) at `out`, built (when absent) as
  `python -m ivcr_jax.train` builds them."""
  from ivcr_jax import experiment

  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos, cfg.data.stores = 12, str(out)
  experiment.store_dirs(cfg.data, cfg.model.vit.image_size, str(out.parent))


@pytest.fixture(scope="module")
def toy_stores(tmp_path_factory, tiny_config):
  out = tmp_path_factory.mktemp("toy_stores") / "stores"
  _build_toy_stores(tiny_config, out)
  return out


def _damaged_copy(toy_stores, tmp_path):
  out = tmp_path / "stores"
  shutil.copytree(toy_stores, out)
  return out


def _frame_shard(out):
  return (out / stores.FRAME_STORE / stores.STORE_VERSION
          / f"{stores.FRAME_STORE}-videos.array_record-00000-of-00001")


def _train_fails(out, workdir) -> str:
  done = subprocess.run([sys.executable, "-m", "ivcr_jax.train",
                         "--config=configs/interllava.py:tiny", f"--workdir={workdir}",
                         f"--config.data.stores={out}", "--config.data.toy_num_videos=12"],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 1, done.stderr[-4000:]
  assert "Traceback" not in done.stderr
  return done.stderr.rstrip().splitlines()[-1]


def _rebuild(out) -> str:
  return f"rebuild the stores with python -m data_prep.build_stores --out {out} --overwrite"


def test_train_names_a_truncated_frame_shard_and_the_rebuild(toy_stores, tmp_path):
  out = _damaged_copy(toy_stores, tmp_path)
  shard = _frame_shard(out)
  os.truncate(shard, shard.stat().st_size // 2)
  message = _train_fails(out, tmp_path / "run")
  assert message.startswith(f"StoreError: the shard {shard} is damaged (truncated?): ")
  assert message.endswith(
      f"; {_rebuild(out)} and the arguments of their first build (their recipe is in "
      f"{out}/prep_report.json; the toy presets' training command rebuilds its toy stores once "
      "that file is deleted)")


def test_train_names_a_corrupted_settings_file(toy_stores, tmp_path):
  out = _damaged_copy(toy_stores, tmp_path)
  info = out / stores.DIALOGUE_STORE / stores.STORE_VERSION / "dataset_info.json"
  info.write_text(info.read_text()[:100])
  message = _train_fails(out, tmp_path / "run")
  assert message.startswith(f"StoreError: {info} is damaged (JSONDecodeError: ") and (
      _rebuild(out) in message)


def test_store_readers_name_damaged_files(toy_stores, tmp_path, tiny_config):
  out = _damaged_copy(toy_stores, tmp_path)
  frame_dir = out / stores.FRAME_STORE / stores.STORE_VERSION
  index = frame_dir / stores.INDEX_FILE
  index.write_text("{")
  with pytest.raises(stores.StoreError, match=f"^{index} is damaged .*{_rebuild(out)}"):
    stores.FrameStore(str(frame_dir))
  shutil.copy(toy_stores / stores.FRAME_STORE / stores.STORE_VERSION / stores.INDEX_FILE, index)
  shard = _frame_shard(out)
  shard.unlink()
  with pytest.raises(stores.StoreError, match=f"^the shard {shard} is missing; {_rebuild(out)}"):
    stores.FrameStore(str(frame_dir))

  dialogue_dir = out / stores.DIALOGUE_STORE / stores.STORE_VERSION
  shard = dialogue_dir / f"{stores.DIALOGUE_STORE}-train.array_record-00000-of-00001"
  os.truncate(shard, shard.stat().st_size - 10)
  with pytest.raises(stores.StoreError, match=f"^the shard {shard} is damaged \\(truncated\\?\\): "
                     f".*; {_rebuild(out)}"):
    stores.DialogueStore(str(dialogue_dir), "val")  # any split: the store is checked whole

  report = out / prepare.REPORT_FILE
  report.write_text("[1, 2")
  with pytest.raises(stores.StoreError, match=f"^{report} is damaged"):
    prepare.read_report(str(out))
  with pytest.raises(stores.StoreError, match="once that file is deleted"):
    _build_toy_stores(tiny_config, out)
  report.unlink()  # as the message says: the toy stores are built again
  _build_toy_stores(tiny_config, out)
  assert prepare.read_report(str(out))["frame_shards"] == {"total": 1, "reused": 0}
  assert len(stores.FrameStore(str(frame_dir))) == 12
  pristine = toy_stores / stores.DIALOGUE_STORE / stores.STORE_VERSION
  rebuilt, before = (len(stores.DialogueStore(str(d), "train")) for d in (dialogue_dir, pristine))
  assert rebuilt == before > 0  # the same dialogues as before the damage


def test_feature_and_topk_stores_name_damaged_files(toy_stores, tmp_path):
  import dataclasses

  from ivcr_jax.data import feature_store, topk_store

  # A feature store of made-up features (what fills it does not matter to opening it).
  frame_store = stores.FrameStore(str(toy_stores / stores.FRAME_STORE / stores.STORE_VERSION))
  plan = {"vit_fingerprint": "-", "dtype": "float32", "shape": [2, 4],
          "frame_settings": dataclasses.asdict(frame_store.settings)}

  def produce(videos):
    for video in videos:
      vf = frame_store[video]
      yield {"video": video, "features": np.zeros((len(vf.indices), 2, 4), np.float32),
             "frame_indices": vf.indices, "fps": vf.fps,
             "num_video_frames": vf.num_video_frames}, {}

  built = stores.write_video_store(str(tmp_path), feature_store.FEATURE_STORE,
                                   feature_store._features_spec(2, 4, "float32"), plan,
                                   sorted(frame_store.record_of), produce)
  assert len(feature_store.FeatureStore(built.path)) == 12
  shard = next(p for p in os.listdir(built.path) if ".array_record-" in p)
  shard = os.path.join(built.path, shard)
  os.truncate(shard, os.path.getsize(shard) // 2)
  with pytest.raises(stores.StoreError, match=f"^the shard {shard} is damaged .* rebuild the "
                     "feature store with python -m data_prep.build_feature_store --overwrite"):
    feature_store.FeatureStore(built.path)

  dialogues = [stores.DialogueStore(str(toy_stores / stores.DIALOGUE_STORE
                                        / stores.STORE_VERSION), "val")[0]]
  lists = [[(t.candidates, [1.0] * len(t.candidates)) for t in d.turns] for d in dialogues]
  cache = str(tmp_path / "topk")
  topk_store.write_topk_store(cache, {"val": (dialogues, lists)}, k=10,
                              retriever={"fingerprint": "x"}, corpus="y")
  split = os.path.join(cache, "val.array_record")
  os.truncate(split, os.path.getsize(split) - 10)
  with pytest.raises(stores.StoreError, match=f"^the shard {split} is damaged .* "
                     f"{topk_store.REBUILD}"):
    topk_store.TopKStore(cache)
  meta = os.path.join(cache, topk_store.META_FILE)
  with open(meta, "w", encoding="utf-8") as f:
    f.write('{"format": ')
  with pytest.raises(stores.StoreError, match=f"^{meta} is damaged"):
    topk_store.TopKStore(cache)
