"""Record validation: every kind of bad input is named, counted and skipped; sample modes."""

import copy
import logging
import os

import pytest

from ivcr_jax.data import records

CANDS = [f"ds/v{i}.mp4" for i in range(10)]


def retrieval(rank=3, text_id=1, answer=None):
  return [
      {"from": "human", "value": " Find the video with a red circle. ", "text_id": text_id},
      {"from": "gpt", "value": answer or f"I understand you want to find a video. The video "
       f"{rank} matches your description.", "video_id": CANDS[rank - 1],
       "candidate_videos": list(CANDS), "gt_se": [-1, -1]}]


def moment(rank=3, span=(2.0, 5.5), text_id=2, answer=None):
  return [
      {"from": "human", "value": "When does it appear?", "text_id": text_id},
      {"from": "gpt", "value": answer or f"In video {rank}, it appears at {span[0]}s-{span[1]}s.",
       "video_id": CANDS[rank - 1], "candidate_videos": list(CANDS), "gt_se": list(span)}]


def chat(text_id=3):
  return [{"from": "human", "value": "Thanks!", "text_id": text_id},
          {"from": "gpt", "value": "You are welcome.", "video_id": None, "gt_se": None}]


def record(*turns, split="train", rtype=2):
  return {"split": split, "type": [rtype], "conversations": [c for t in turns for c in t]}


GOOD = record(retrieval(), moment(), chat())
DURATIONS = {c: 10.0 for c in CANDS}


def test_good_record_parses():
  [d], report = records.read_annotations([GOOD], durations=DURATIONS)
  assert report.kept == 1 and not report.skipped
  kinds = [t.kind for t in d.turns]
  assert kinds == [records.RETRIEVAL, records.MOMENT, records.CHAT]
  r, m, c = d.turns
  assert r.question == "Find the video with a red circle." and r.video_index == 3
  assert r.videos == tuple(CANDS)
  assert m.gt_span == (2.0, 5.5) and m.video_index == 3 and m.videos == (CANDS[2],)
  assert c.videos == () and c.video_id is None
  assert d.name == "record 0 (text_id 1)"


def _mutate(fn):
  rec = copy.deepcopy(GOOD)
  fn(rec)
  return rec


def _set(path, value):
  def fn(rec):
    obj = rec
    for key in path[:-1]:
      obj = obj[key]
    obj[path[-1]] = value
  return fn


def _delete(path):
  def fn(rec):
    obj = rec
    for key in path[:-1]:
      obj = obj[key]
    del obj[path[-1]]
  return fn


BAD = {
    "not an object": ([1, 2], "wrong_type"),
    "missing split": (_mutate(_delete(["split"])), "missing_field"),
    "type not a list": (_mutate(_set(["type"], 2)), "wrong_type"),
    "type two entries": (_mutate(_set(["type"], [1, 2])), "wrong_type"),
    "type bool": (_mutate(_set(["type"], [True])), "wrong_type"),
    "type zero": (_mutate(_set(["type"], [0])), "type0"),
    "odd conversation": (_mutate(lambda r: r["conversations"].pop()), "bad_conversation"),
    "empty conversation": (_mutate(_set(["conversations"], [])), "bad_conversation"),
    "roles swapped": (_mutate(_set(["conversations", 0, "from"], "gpt")), "bad_conversation"),
    "missing text_id": (_mutate(_delete(["conversations", 2, "text_id"])), "missing_field"),
    "text_id float": (_mutate(_set(["conversations", 0, "text_id"], 1.5)), "wrong_type"),
    "question not str": (_mutate(_set(["conversations", 0, "value"], 3)), "wrong_type"),
    "empty answer": (_mutate(_set(["conversations", 1, "value"], "  ")), "missing_field"),
    "missing gt_se": (_mutate(_delete(["conversations", 1, "gt_se"])), "missing_field"),
    "gt_se string": (_mutate(_set(["conversations", 1, "gt_se"], "-1,-1")), "wrong_type"),
    "gt_se three": (_mutate(_set(["conversations", 3, "gt_se"], [1, 2, 3])), "wrong_type"),
    "gt_se nan": (_mutate(_set(["conversations", 3, "gt_se"], [float("nan"), 2])), "wrong_type"),
    "missing video_id": (_mutate(_delete(["conversations", 1, "video_id"])), "missing_field"),
    "missing candidates": (_mutate(_delete(["conversations", 1, "candidate_videos"])),
                           "missing_field"),
    "nine candidates": (_mutate(_set(["conversations", 1, "candidate_videos"], CANDS[:9])),
                        "bad_candidates"),
    "duplicate candidates": (_mutate(_set(["conversations", 1, "candidate_videos"],
                                          CANDS[:9] + CANDS[:1])), "bad_candidates"),
    "candidate not str": (_mutate(_set(["conversations", 1, "candidate_videos", 4], 7)),
                          "wrong_type"),
    "gt absent": (_mutate(_set(["conversations", 1, "video_id"], "ds/other.mp4")),
                  "gt_not_in_candidates"),
    "no video N": (_mutate(_set(["conversations", 1, "value"], "It is the third one.")),
                   "no_video_index"),
    "wrong video N": (_mutate(_set(["conversations", 1, "value"], "Sure. The video 4 matches.")),
                      "index_mismatch"),
    "no span": (_mutate(_set(["conversations", 3, "value"], "In video 3, early on.")), "no_span"),
    "span differs": (_mutate(_set(["conversations", 3, "gt_se"], [2.0, 9.0])), "span_mismatch"),
    "reversed gt_se": (_mutate(_set(["conversations", 3, "gt_se"], [5.5, 2.0])), "bad_span"),
    "negative gt_se": (_mutate(_set(["conversations", 3, "gt_se"], [-2.0, 5.5])), "bad_span"),
    "reversed answer span": (_mutate(_set(["conversations", 3, "value"],
                                          "In video 3 at 5.5s-2.0s.")), "bad_span"),
    "span outside video": (record(retrieval(), moment(span=(8.0, 12.0))), "span_outside_video"),
    "unknown duration": (_mutate(_set(["conversations", 3, "video_id"], "ds/other.mp4")),
                         "missing_video"),
    "absolute path": (_mutate(_set(["conversations", 3, "video_id"], "/etc/passwd")),
                      "unsafe_path"),
    "parent path": (_mutate(_set(["conversations", 1, "candidate_videos", 0], "../../x.mp4")),
                    "unsafe_path"),
    "sneaky parent path": (_mutate(_set(["conversations", 3, "video_id"], "ds/../../x.mp4")),
                           "unsafe_path"),
    "empty path": (_mutate(_set(["conversations", 3, "video_id"], "")), "unsafe_path"),
    "chat with video": (_mutate(_set(["conversations", 5, "video_id"], CANDS[0])), "wrong_type"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_record_is_named_counted_and_skipped(name, caplog):
  bad, reason = BAD[name]
  good2 = copy.deepcopy(GOOD)
  good2["conversations"][0]["text_id"] = 77
  with caplog.at_level(logging.WARNING, logger="ivcr_jax.data.records"):
    dialogues, report = records.read_annotations([GOOD, bad, good2], durations=DURATIONS)
  assert [d.index for d in dialogues] == [0, 2]
  assert report.skipped == {reason: 1}, report.messages
  [message] = [m for m in report.messages if m.startswith("skipped")]
  assert "record 1" in message
  if isinstance(bad, dict) and isinstance(bad.get("conversations"), list) and \
      bad["conversations"] and "text_id" in bad["conversations"][0]:
    assert f"text_id {bad['conversations'][0]['text_id']!r}" in message
  assert "record 1" in caplog.text
  assert f"{reason} 1" in report.summary() and "3 records: 2 kept, 1 skipped" in report.summary()


def test_the_message_names_the_turn():
  bad = record(retrieval(text_id=11), moment(text_id=12, answer="In video 3, early on."))
  _, report = records.read_annotations([bad])
  assert "record 0 (text_id 11) turn 2 (text_id 12)" in report.messages[0]


def test_top_level_must_be_a_list():
  with pytest.raises(ValueError, match="list of records"):
    records.read_annotations({"split": "train"})


def test_paths_against_a_real_video_root(tmp_path):
  root = tmp_path / "videos"
  (root / "ds").mkdir(parents=True)
  for c in CANDS:
    (root / c).write_bytes(b"x")
  outside = tmp_path / "secret.mp4"
  outside.write_bytes(b"x")
  os.symlink(outside, root / "ds" / "link.mp4")
  linked = _mutate(_set(["conversations", 3, "video_id"], "ds/link.mp4"))
  missing = copy.deepcopy(GOOD)
  missing["conversations"][1]["candidate_videos"][5] = "ds/gone.mp4"
  kept, report = records.read_annotations([GOOD, linked, missing], video_root=str(root),
                                          check_files=True)
  assert [d.index for d in kept] == [0]
  assert report.skipped == {"unsafe_path": 1, "missing_video": 1}
  # Without check_files a missing file is not an error, an escaping link still is.
  _, report = records.read_annotations([linked, missing], video_root=str(root))
  assert report.skipped == {"unsafe_path": 1}


def test_over_long_dialogues():
  long = record(*[retrieval(text_id=i) for i in range(9)])
  opts = records.RecordOptions(max_turns=7)
  [d], report = records.read_annotations([long], opts)
  assert len(d.turns) == 7 and report.notes == {"truncated": 1}
  assert "record 0 (text_id 0): 9 turns truncated to 7" in report.messages
  kept, report = records.read_annotations([long, GOOD], records.RecordOptions(
      max_turns=7, long_dialogues="skip"))
  assert [k.index for k in kept] == [1] and report.skipped == {"too_long": 1}


def test_chat_turns_can_be_refused():
  _, report = records.read_annotations([GOOD], records.RecordOptions(allow_chat=False))
  assert report.skipped == {"chat_turn": 1}


def test_split_filter():
  kept, report = records.read_annotations(
      [GOOD, record(retrieval(), split="test")], records.RecordOptions(splits=("test",)))
  assert [d.split for d in kept] == ["test"] and report.other_split == 1


def test_moment_without_video_index_b20():
  bad = record(moment(answer="The moment is at 2.0s-5.5s."))
  [d], report = records.read_annotations([bad])
  assert d.turns[0].video_index == 3  # fixed: the rank among the turn's candidates
  assert not report.notes
  [d], report = records.read_annotations([bad], records.RecordOptions(
      moment_index_fallback="none"))
  assert d.turns[0].video_index is None and report.notes == {"moment_without_index": 1}


def test_options_validation():
  with pytest.raises(ValueError):
    records.RecordOptions(long_dialogues="cut")
  with pytest.raises(ValueError):
    records.RecordOptions(moment_index_fallback="zero")
  with pytest.raises(ValueError):
    records.RecordOptions(max_turns=0)


def test_options_from_config(tiny_config):
  d = tiny_config.data
  opts = records.RecordOptions.from_config(d, splits=["train"])
  assert (opts.max_turns, opts.num_candidates, opts.long_dialogues, opts.moment_index_fallback,
          opts.span_tolerance_s, opts.allow_chat, opts.splits) == (
      d.max_turns, d.num_candidates, d.long_dialogues, d.moment_index_fallback,
      d.span_tolerance_s, d.chat_turns, ("train",))


def test_sample_modes():
  (d3, d1), _ = records.read_annotations([GOOD, record(retrieval())])
  samples = records.make_samples([d3, d1])
  assert [(s.num_turns, s.supervised) for s in samples] == [(3, (0, 1, 2)), (1, (0,))]
  prefixes = records.make_samples([d3, d1], "prefix")
  assert [(s.num_turns, s.supervised) for s in prefixes] == [(1, (0,)), (2, (1,)), (3, (2,)),
                                                            (1, (0,))]
  assert prefixes[1].turns == d3.turns[:2]
  # Every turn is supervised exactly once in both modes.
  for mode in ("dialogue", "prefix"):
    supervised = [(s.dialogue.index, t) for s in records.make_samples([d3, d1], mode)
                  for t in s.supervised]
    assert sorted(supervised) == [(0, 0), (0, 1), (0, 2), (1, 0)]
  with pytest.raises(ValueError):
    records.make_samples([d3], "turn")


def test_undecodable_candidate_skips_the_dialogue():
  durations = {c: 10.0 for c in CANDS[:-1]}
  _, report = records.read_annotations([GOOD], durations=durations)
  assert report.skipped == {"missing_video": 1}
  assert CANDS[-1] in report.messages[0] and "record 0 (text_id 1) turn 1" in report.messages[0]
