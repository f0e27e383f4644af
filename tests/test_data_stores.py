"""data_prep -> TFDS ArrayRecord frame and dialogue stores, without TensorFlow; bad input."""

import copy
import json
import sys
import zlib

import numpy as np
import pytest

from data_prep import build_stores
from ivcr_jax.data import frames, prepare, records, stores, toy_corpus

CFG = toy_corpus.ToyCorpusConfig(num_videos=14, seed=7, size=64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A toy corpus plus a corrupt video and two records that need the decoded videos to fail."""
  root = tmp_path_factory.mktemp("prep")
  corpus = toy_corpus.write_toy_corpus(str(root / "toy"), CFG)
  (root / "toy" / "videos" / "toy" / "bad.mp4").write_bytes(b"\x00not a video" * 100)
  with open(corpus.annotations, encoding="utf-8") as f:
    anns = json.load(f)
  retrieval = next(r for r in anns if r["type"] == [1])
  needs_bad = copy.deepcopy(retrieval)  # the corrupt video as a distractor
  gpt = needs_bad["conversations"][1]
  gpt["candidate_videos"][-1 if gpt["candidate_videos"][-1] != gpt["video_id"] else 0] = \
      "toy/bad.mp4"
  moment = next(r for r in anns if r["type"] == [3])
  too_late = copy.deepcopy(moment)  # a span past the end of its video
  gpt = too_late["conversations"][1]
  gpt["gt_se"] = [40.0, 45.0]
  gpt["value"] = "In video 1, it happens at 40.0s-45.0s."
  annotations = root / "annotations.json"
  annotations.write_text(json.dumps(anns + [needs_bad, too_late], ensure_ascii=False),
                         encoding="utf-8")
  out = root / "stores"
  report = build_stores.main(["--annotations", str(annotations), "--video_root",
                              corpus.video_root, "--out", str(out), "--size", "32",
                              "--sampling", "rand", "--num_frames", "16", "--seed", "3"])
  return corpus, anns, report


def test_report_names_and_counts_the_bad_input(prepared):
  corpus, anns, report = prepared
  n = len(anns)
  assert report["videos"] == {"needed": CFG.num_videos + 1, "stored": CFG.num_videos,
                              "failed": 1, "short": 0}
  assert "bad.mp4" in report["video_failures"]["toy/bad.mp4"]
  assert report["records"]["skipped"] == {"missing_video": 1, "span_outside_video": 1}
  assert report["records"]["kept"] == n
  assert any(m.startswith(f"skipped record {n} ") and "toy/bad.mp4" in m
             for m in report["messages"])
  assert any(m.startswith(f"skipped record {n + 1} ") and "ends at 45.0s" in m
             for m in report["messages"])
  with open(f"{report['frame_store']}/../../prep_report.json", encoding="utf-8") as f:
    assert json.load(f)["records"] == report["records"]


def test_frame_store(prepared):
  corpus, _, report = prepared
  store = stores.FrameStore(report["frame_store"])
  assert len(store) == CFG.num_videos and "toy/bad.mp4" not in store
  with pytest.raises(KeyError, match="cannot decode"):
    store["toy/bad.mp4"]
  settings = store.settings
  assert (settings.sampling, settings.num_frames, settings.size) == ("rand", 16, 32)
  specs = {s.path: s for s in toy_corpus.make_video_specs(CFG)}
  for path in ("toy/v0000.mp4", "toy/v0013.mp4"):
    v = store[path]
    rng = np.random.default_rng([3, zlib.crc32(path.encode())])
    direct = frames.load_video(f"{corpus.video_root}/{path}", num_frames=16, size=32,
                               mode="rand", rng=rng)
    assert np.array_equal(v.frames, direct.frames) and np.array_equal(v.indices, direct.indices)
    assert v.fps == direct.fps and v.num_video_frames == specs[path].num_frames
    assert store.durations[path] == specs[path].duration


def test_dialogue_store_round_trip(prepared):
  corpus, anns, report = prepared
  durations = {s.path: s.duration for s in toy_corpus.make_video_specs(CFG)}
  expected, _ = records.read_annotations(anns, durations=durations)
  assert report["splits"] == {s: sum(d.split == s for d in expected) for s in
                              ("test", "train", "val")}
  got = []
  for split in report["splits"]:
    store = stores.DialogueStore(report["dialogue_store"], split)
    got += [store[i] for i in range(len(store))]
  assert sorted(got, key=lambda d: d.index) == expected  # exact, spans and ids included


def test_exact_floats_and_odd_values(tmp_path):
  turn = records.Turn(records.MOMENT, "q", "a", "id-7", "x/v.mp4", (), (4.7, 19.05), None)
  chat = records.Turn(records.CHAT, "q 你好", "a", 8, None, (), None, None)
  d = records.Dialogue(3, "test", 2, (turn, chat))
  path = stores.write_dialogue_store(str(tmp_path), [d])
  assert stores.DialogueStore(path, "test")[0] == d


def test_no_tensorflow(prepared):
  assert "tensorflow" not in sys.modules


def test_cli_needs_input(tmp_path):
  with pytest.raises(SystemExit):
    build_stores.main(["--out", str(tmp_path)])


def test_cli_builds_the_toy_corpus_and_its_stores(tmp_path):
  report = build_stores.main(["--toy_videos", "12", "--toy_size", "32", "--out", str(tmp_path),
                              "--size", "32", "--sampling", "all"])
  assert report["videos"] == {"needed": 12, "stored": 12, "failed": 0, "short": 0}
  assert report["records"]["kept"] == report["records"]["total"] == 24
  store = stores.FrameStore(report["frame_store"])
  spec = toy_corpus.make_video_specs(toy_corpus.ToyCorpusConfig(num_videos=12, size=32))[5]
  v = store[spec.path]
  assert v.frames.shape == (spec.num_frames, 32, 32, 3)  # "all": every frame
  assert v.indices.tolist() == list(range(spec.num_frames))


def test_library_refuses_to_overwrite_unless_asked(tmp_path):
  toy = toy_corpus.ToyCorpusConfig(num_videos=12, size=32)
  every = stores.FrameSettings(size=32, sampling="all")
  prepare.build_stores(str(tmp_path), toy=toy, frames=every, progress=False)
  with pytest.raises(FileExistsError, match="already holds"):
    prepare.build_stores(str(tmp_path), toy=toy, frames=every, progress=False)
  four = stores.FrameSettings(size=32, num_frames=4, sampling="uniform")
  report = prepare.build_stores(str(tmp_path), toy=toy, frames=four, progress=False,
                                overwrite=True)
  store = stores.FrameStore(report["frame_store"])
  assert store["toy/v0003.mp4"].frames.shape[0] == 4  # the new records, not TFDS's old ones
  assert prepare.read_report(str(tmp_path))["recipe"] == prepare.recipe(
      annotations=None, video_root=None, toy=toy, frames=four, options=records.RecordOptions())


def test_open_data_builds_toy_stores_once_per_recipe(tmp_path, tiny_config):
  from ivcr_jax import experiment

  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos, cfg.data.toy_size = 12, 32
  data = experiment.open_data(cfg, str(tmp_path))
  report = tmp_path / "toy_data" / prepare.REPORT_FILE
  built = report.stat().st_mtime_ns
  assert len(data.frame_store) == 12 and len(data.dialogues("train")) > 0
  experiment.open_data(cfg, str(tmp_path))
  assert report.stat().st_mtime_ns == built  # reused
  with cfg.unlocked():
    cfg.data.toy_num_videos = 13
  assert len(experiment.open_data(cfg, str(tmp_path)).frame_store) == 13  # rebuilt


def test_another_toy_seed_is_built_beside_the_training_corpus(tmp_path, tiny_config):
  """Evaluating on an unseen toy corpus must not overwrite the one the run trained on."""
  from ivcr_jax import experiment

  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos, cfg.data.toy_size = 12, 32
  trained = experiment.open_data(cfg, str(tmp_path))
  report = tmp_path / "toy_data" / prepare.REPORT_FILE
  built = report.stat().st_mtime_ns
  with cfg.unlocked():
    cfg.data.toy_seed = 5
  unseen = experiment.open_data(cfg, str(tmp_path))
  assert unseen.store_dir == str(tmp_path / "toy_data_seed5")
  assert report.stat().st_mtime_ns == built
  video = "toy/v0000.mp4"  # same name, other content
  assert not np.array_equal(unseen.frame_store[video].frames, trained.frame_store[video].frames)
  assert unseen.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
