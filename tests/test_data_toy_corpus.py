"""The toy corpus: official schema, learnable content, real decodable videos, determinism."""

import collections
import dataclasses
import hashlib
import json
import os
import re

import decord
import numpy as np
import pytest

from data_prep import make_toy_corpus
from ivcr_jax.data import answers, records, toy_corpus

CFG = toy_corpus.ToyCorpusConfig(num_videos=40, seed=3, dialogues_per_video=3,
                                 chinese_fraction=0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return toy_corpus.write_toy_corpus(str(tmp_path_factory.mktemp("toy")), CFG)


@pytest.fixture(scope="module")
def data(corpus):
  with open(corpus.annotations, encoding="utf-8") as f:
    anns = json.load(f)
  with open(corpus.manifest, encoding="utf-8") as f:
    manifest = json.load(f)
  return anns, manifest


def _md5(path):
  with open(path, "rb") as f:
    return hashlib.md5(f.read()).hexdigest()


def test_official_schema(data):
  anns, manifest = data
  assert len(anns) == CFG.num_videos * CFG.dialogues_per_video
  text_ids = []
  for rec in anns:
    assert set(rec) == {"split", "type", "conversations"}
    assert rec["split"] in ("train", "val", "test")
    assert isinstance(rec["type"], list) and len(rec["type"]) == 1 and rec["type"][0] != 0
    convs = rec["conversations"]
    assert len(convs) % 2 == 0 and convs
    for human, gpt in zip(convs[::2], convs[1::2], strict=True):
      assert set(human) == {"from", "value", "text_id"} and human["from"] == "human"
      text_ids.append(human["text_id"])
      assert gpt["from"] == "gpt"
      if gpt["gt_se"] is None:  # chat turn (extension)
        assert gpt["video_id"] is None and "candidate_videos" not in gpt
        continue
      assert set(gpt) == {"from", "value", "video_id", "candidate_videos", "gt_se"}
      cands = gpt["candidate_videos"]
      assert len(cands) == 10 and len(set(cands)) == 10
      assert all(c in manifest["videos"] for c in cands)
      rank = cands.index(gpt["video_id"]) + 1
      assert answers.parse_video_index(gpt["value"]) == rank
      if gpt["gt_se"] == [-1, -1]:
        # The official `index_loss` reads the number from the answer's second sentence.
        second = gpt["value"].split(".")[1]
        assert re.search(rf"\bvideo {rank}\b", second)
      else:
        start, end = gpt["gt_se"]
        assert answers.parse_span(gpt["value"]) == (start, end)
        assert 0 <= start < end <= manifest["videos"][gpt["video_id"]]["duration"] + 0.05
  assert len(set(text_ids)) == len(text_ids)


def test_content_variety(data):
  anns, _ = data
  types = collections.Counter(r["type"][0] for r in anns)
  assert set(types) == {1, 2, 3, 4, 5, 6}
  assert {r["split"] for r in anns} == {"train", "val", "test"}
  questions = [c["value"] for r in anns for c in r["conversations"] if c["from"] == "human"]
  assert any(re.search(r"[\u4e00-\u9fff]", q) for q in questions)
  ranks = collections.Counter(
      c["candidate_videos"].index(c["video_id"]) + 1
      for r in anns for c in r["conversations"] if c.get("gt_se") == [-1, -1])
  assert ranks.most_common(1)[0][0] == 1  # a decent retriever: rank 1 is the most common
  assert len(ranks) >= 4 and ranks[1] < 0.7 * sum(ranks.values())
  # Moment-first dialogues have the ground truth at the retriever's top-1 (official test filter).
  for r in anns:
    first = r["conversations"][1]
    if r["type"] == [3]:
      assert first["candidate_videos"][0] == first["video_id"]
  assert max(len(r["conversations"]) // 2 for r in anns) > 7  # over-long dialogues exist


def test_retrieval_queries_have_one_answer(data):
  """No distractor shows every event the query describes."""
  anns, manifest = data
  events = {p: {(e["colour"], e["shape"], e["motion"]) for e in v["events"]}
            for p, v in manifest["videos"].items()}
  for r in anns:
    for c in r["conversations"]:
      if c["from"] == "gpt" and c["gt_se"] == [-1, -1]:
        for other in c["candidate_videos"]:
          if other != c["video_id"]:
            assert not events[c["video_id"]] <= events[other]


def test_videos_decode_and_show_the_events(corpus, data):
  _, manifest = data
  for path, info in list(manifest["videos"].items())[:6]:
    vr = decord.VideoReader(os.path.join(corpus.video_root, path))
    assert len(vr) == info["num_frames"]
    assert vr.get_avg_fps() == pytest.approx(CFG.fps)
    assert vr[0].shape == (CFG.size, CFG.size, 3)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy().astype(int)
    for e in info["events"]:
      colour = np.array(toy_corpus.COLOURS[e["colour"]])
      near = (np.abs(frames - colour).max(-1) <= 40).sum((1, 2))  # pixels of that colour
      mid = (e["start_frame"] + e["end_frame"] - 1) // 2
      assert near[mid] >= 40, (path, e)
      others = [o for o in info["events"] if o["colour"] == e["colour"]]
      quiet = [f for f in range(len(vr))
               if not any(o["start_frame"] <= f < o["end_frame"] for o in others)]
      assert all(near[f] <= 5 for f in quiet), (path, e)


def test_records_reader_accepts_the_corpus(corpus, data):
  anns, _ = data
  durations = {s.path: s.duration for s in toy_corpus.make_video_specs(CFG)}
  dialogues, report = records.read_annotations(
      corpus.annotations, video_root=corpus.video_root, check_files=True, durations=durations)
  long = sum(len(r["conversations"]) // 2 > 7 for r in anns)
  assert report.kept == len(anns) and not report.skipped
  assert report.notes == collections.Counter({"truncated": long})


def test_determinism(tmp_path, corpus):
  again = toy_corpus.write_toy_corpus(str(tmp_path / "again"), CFG)
  for name in ("annotations", "manifest"):
    assert _md5(getattr(again, name)) == _md5(getattr(corpus, name))
  for i in (0, 7, 39):
    rel = f"toy/v{i:04d}.mp4"
    assert _md5(os.path.join(again.video_root, rel)) == _md5(os.path.join(corpus.video_root, rel))
  other = dataclasses.replace(CFG, seed=4)
  assert toy_corpus.make_dialogues(toy_corpus.make_video_specs(other), other) != \
      toy_corpus.make_dialogues(toy_corpus.make_video_specs(CFG), CFG)


def test_rebuild_is_skipped_unless_the_config_changes(corpus):
  before = os.path.getmtime(corpus.annotations)
  toy_corpus.write_toy_corpus(corpus.root, CFG)
  assert os.path.getmtime(corpus.annotations) == before


def test_strictly_official_option_and_cli(tmp_path, capsys):
  make_toy_corpus.main(["--out", str(tmp_path), "--num_videos", "14", "--seed", "1",
                        "--no_chat_turns", "--size", "32"])
  assert "dialogues" in capsys.readouterr().out
  with open(tmp_path / "annotations.json", encoding="utf-8") as f:
    anns = json.load(f)
  gpts = [c for r in anns for c in r["conversations"] if c["from"] == "gpt"]
  assert gpts and all(isinstance(c["gt_se"], list) for c in gpts)
  vr = decord.VideoReader(str(tmp_path / "videos" / "toy" / "v0000.mp4"))
  assert vr[0].shape == (32, 32, 3)


@pytest.mark.parametrize("kwargs", [dict(size=48), dict(num_videos=5), dict(min_seconds=0)])
def test_config_validation(kwargs):
  with pytest.raises(ValueError):
    toy_corpus.ToyCorpusConfig(**kwargs)


def test_retriever_ranks_by_its_stated_score():
  """The vectorised retriever against the rule written out per video: distractors are the
  non-covering videos with the highest similarity + noise, ties to the lower index, one noise
  draw per eligible video in index order (so a corpus's bytes do not depend on the code path)."""
  cfg = toy_corpus.ToyCorpusConfig(num_videos=80, seed=5, retriever_noise=0.7)
  specs = toy_corpus.make_video_specs(cfg)
  maker = toy_corpus.DialogueMaker(specs, cfg)
  pairs = [{(e.colour, e.shape) for e in s.events} for s in specs]
  colours = [{e.colour for e in s.events} for s in specs]
  shapes = [{e.shape for e in s.events} for s in specs]
  for gt in range(0, 80, 7):
    rank = 1 + gt % cfg.num_candidates
    state = maker.rng.bit_generator.state
    paths, got_rank = maker.retrieve(gt, rank=rank)
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    scored = []
    for v, spec in enumerate(specs):
      if maker.event_sets[gt] <= maker.event_sets[v]:
        continue
      score = (2 * len(pairs[gt] & pairs[v]) + len(colours[gt] & colours[v])
               + len(shapes[gt] & shapes[v]) + 0.5 * (spec.background == specs[gt].background)
               + cfg.retriever_noise * rng.normal())
      scored.append((-score, v))
    distractors = [v for _, v in sorted(scored)[:cfg.num_candidates - 1]]
    expected = distractors[:rank - 1] + [gt] + distractors[rank - 1:]
    assert got_rank == rank
    assert paths == [specs[v].path for v in expected]
    assert maker.rng.bit_generator.state == rng.bit_generator.state
