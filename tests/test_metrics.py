"""Evaluation metrics: IoU edge cases, BLEU-4 against nltk, aggregation and plots."""

import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from ivcr_jax.evaluation import metrics, plots
from ivcr_jax.evaluation.metrics import TurnResult


@pytest.mark.parametrize("pred,gt,want", [
    ((10, 20), (10, 20), 1.0),
    ((10, 20), (15, 25), 5 / 15),
    ((20, 10), (15, 25), 5 / 15),  # reversed prediction is ordered
    ((0, 5), (10, 20), 0.0),
    ((12, 12), (10, 20), 0.0),  # zero-length prediction inside the GT
    ((3, 3), (3, 3), 0.0),  # degenerate: no division by zero
    (None, (10, 20), 0.0),
])
def test_iou(pred, gt, want):
  assert metrics.iou(pred, gt) == pytest.approx(want)


CASES = [
    ("The video 3 matches your description of a red circle.",
     "I think video 3 matches the red circle you described."),
    ("The moment happens at 12.5s-20.0s when the square moves left.",
     "It happens at 12.5s-20.0s, when the blue square moves to the left."),
    ("Sure, happy to help.", "Hello there."),
    ("你好，视频 5 是红色的圆。", "视频 5 里有红色的圆。"),
    ("a b c d e f g", "a b c d e f g"),
]


def test_corpus_bleu4_matches_nltk_method1():
  refs = [metrics.bleu_tokens(r) for r, _ in CASES]
  hyps = [metrics.bleu_tokens(h) for _, h in CASES]
  want = corpus_bleu([[r] for r in refs], hyps, smoothing_function=SmoothingFunction().method1)
  assert metrics.corpus_bleu4(refs, hyps) == pytest.approx(want, rel=1e-9)
  for ref, hyp in zip(refs, hyps, strict=True):  # sentence level too (short corpora)
    single = corpus_bleu([[ref]], [hyp], smoothing_function=SmoothingFunction().method1)
    assert metrics.corpus_bleu4([ref], [hyp]) == pytest.approx(single, rel=1e-9)
  assert metrics.bleu_tokens("视频 12.5s") == ["视", "频", "12.5", "s"]


def _results():
  return [
      TurnResult("d1", 1, "video", "video 3", "video 3", gt_index=3, pred_index=3),
      TurnResult("d1", 2, "moment", "1s-5s", "2s-5s", gt_span=(1, 5), pred_span=(2, 5)),
      TurnResult("d2", 1, "video", "video 2", "no idea", gt_index=2, pred_index=None,
                 gt_in_candidates=False),
      TurnResult("d2", 2, "moment", "1s-5s", "none", gt_span=(1, 5), pred_span=None),
      TurnResult("d3", 1, "chat", "hello", "hello"),
  ]


def test_retriever_r1_is_the_candidate_lists_own_top1():
  results = [TurnResult("a", 1, "video", "video 1", "video 2", gt_index=1, pred_index=2),
             TurnResult("b", 1, "video", "video 4", "video 4", gt_index=4, pred_index=4),
             TurnResult("c", 1, "video", "video 1", "video 1", gt_index=1, pred_index=1)]
  out = metrics.compute(results)
  assert out["retriever_r@1"] == pytest.approx(2 / 3) and out["r@1"] == pytest.approx(2 / 3)


def test_compute_reports_counts_and_per_turn(tmp_path):
  out = metrics.compute(_results())
  assert out["r@1"] == 0.5 and out["retriever_r@10"] == 0.5
  assert "r@10" not in out  # the paper's name only with the official denominators
  assert "ranking_r@1" not in out  # no index scores, no ranking
  assert out["r@1_iou0.7"] == 0.5 and out["r@1_iou0.3"] == 0.5
  assert out["miou"] == pytest.approx(0.75 / 2)
  assert out["counts"]["video_unparsed"] == 1 and out["counts"]["moment_unparsed"] == 1
  assert out["counts"]["all_turns"] == 5 and out["counts"]["chat_turns"] == 1
  rows = out["per_turn"]
  assert rows[0]["r@1"] == 0.5 and rows[0]["video_turns"] == 2
  assert rows[1]["r@1_iou0.5"] == 0.5 and rows[2]["video_turns"] == 0
  assert (rows[0]["video_unparsed"], rows[1]["moment_unparsed"]) == (1, 1)
  table = metrics.per_turn_markdown(rows)
  assert "| R@1 | 50.0 |" in table and "| unparsed video / moment | 1 / 0 | 0 / 1 |" in table
  assert out["warnings"] == []  # half unparsable is not "most"
  bars = plots.per_turn_bars(rows, str(tmp_path / "per_turn.png"), warnings=["all unparsed"])
  hist = plots.iou_histogram([0.75, 0.0], str(tmp_path / "iou.png"), unparsed=1)
  for path in (bars, hist):
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _scored(gt_index, scores, **kw):
  return TurnResult("d", 1, "video", f"video {gt_index}", "?", gt_index=gt_index,
                    index_scores=tuple(scores), **kw)


def test_model_ranking_from_index_scores():
  logp = lambda order: [-float(order.index(n)) for n in range(1, 11)]  # order[0] is the best
  results = [
      _scored(3, logp([3, 1, 2, 4, 5, 6, 7, 8, 9, 10])),  # rank 1
      _scored(7, logp([1, 2, 7, 3, 4, 5, 6, 8, 9, 10])),  # rank 3
      _scored(10, logp([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])),  # rank 10
      _scored(2, [0.0] * 10),  # all tied: ties count against the ground truth, rank 10
      TurnResult("e", 1, "video", "video 1", "video 1", gt_index=1, pred_index=1),  # unscored
  ]
  assert [metrics.model_rank(r) for r in results] == [1, 3, 10, 10, None]
  out = metrics.compute(results)
  assert out["ranking_r@1"] == pytest.approx(1 / 5) and out["ranking_r@3"] == pytest.approx(2 / 5)
  assert out["ranking_r@5"] == pytest.approx(2 / 5)
  assert out["ranking_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 10) / 5)
  assert out["counts"]["ranked_turns"] == 4
  assert out["r@1"] == pytest.approx(1 / 5)  # the generated answers: only the unscored turn


def test_most_answers_unparsable_is_said_loudly():
  results = [TurnResult(f"d{i}", 1, "video", "video 2", "The second one.", gt_index=2)
             for i in range(3)]
  results += [TurnResult("m", 2, "moment", "1s-5s", "at 1s-5s", gt_span=(1, 5),
                         pred_span=(1, 5))]
  out = metrics.compute(results)
  assert len(out["warnings"]) == 1 and out["warnings"][0].startswith(
      "3 of 3 video-retrieval answers name no candidate")
  lines = metrics.summary(out).splitlines()
  assert lines[0].startswith("r@1 0.000, retriever_r@1 0.000, retriever_r@10 1.000")
  assert lines[1].startswith("WARNING: 3 of 3 video-retrieval answers")


def test_first_video_and_moment_turns_count():
  """The official script never scores its first VR and first VMR sample (B11); we do."""
  results = [
      TurnResult("d1", 1, "video", "video 3", "video 3", gt_index=3, pred_index=3),
      TurnResult("d1", 2, "moment", "1s-5s", "1s-5s", gt_span=(1, 5), pred_span=(1, 5)),
  ]
  out = metrics.compute(results)
  assert out["r@1"] == 1.0 and out["counts"]["r@1_hits"] == 1
  assert out["r@1_iou0.7"] == 1.0 and out["counts"]["iou0.7_hits"] == 1
  assert out["denominators"] == {"mode": "evaluated", "video": 1, "moment": 1}
  official = metrics.compute(results, denominators=metrics.Denominators(1, 1, {1: (1, 0),
                                                                               2: (0, 1)}))
  assert official["r@1"] == 1.0 and official["r@1_iou0.7"] == 1.0


def _gpt(gt_se, value="answer"):
  return {"from": "gpt", "value": value, "gt_se": gt_se}


HUMAN = {"from": "human", "value": "question", "text_id": 0}
RECORDS = [
    {"split": "test", "type": [2], "conversations": [HUMAN, _gpt([-1, -1]), HUMAN, _gpt([1, 5])]},
    {"split": "test", "type": [7], "conversations": [HUMAN, _gpt([-1, -1]), HUMAN,
                                                     _gpt([2.5, 4.0])]},
    {"split": "test", "type": [0], "conversations": [HUMAN, _gpt([-1, -1])]},  # excluded
    {"split": "train", "type": [1], "conversations": [HUMAN, _gpt([-1, -1])]},  # other split
    {"split": "test", "type": [5], "conversations": [HUMAN, _gpt([-1, -1]), HUMAN, _gpt(None),
                                                     HUMAN, _gpt([-1, -1])]},
    "not a record",
]


def test_official_denominators_count_every_gpt_turn_of_the_split():
  den = metrics.official_denominators(RECORDS, "test", source="ann.json")
  assert (den.video, den.moment, den.chat, den.source) == (4, 2, 1, "ann.json")
  assert den.unscored == 1  # the type-[7] dialogue: its turns are counted above
  assert dict(den.per_turn) == {1: (3, 0), 2: (0, 2), 3: (1, 0)}
  assert metrics.official_denominators(RECORDS, "train").video == 1


def test_official_denominators_count_unevaluated_turns_as_misses():
  den = metrics.official_denominators(RECORDS, "test", source="ann.json")
  results = _results()[:4]  # 2 video turns (1 hit), 2 moment turns (1 with IoU 0.75) at turns 1-2
  out = metrics.compute(results, denominators=den)
  assert out["r@1"] == pytest.approx(1 / 4) and out["r@10"] == pytest.approx(1 / 4)
  assert out["retriever_r@10"] == out["r@10"]
  assert out["r@1_iou0.7"] == pytest.approx(1 / 2) and out["miou"] == pytest.approx(0.75 / 2)
  assert out["counts"]["video_turns"] == 2 and out["counts"]["r@1_hits"] == 1
  assert out["denominators"] == {"mode": "official", "video": 4, "moment": 2,
                                 "chat_excluded": 1, "source": "ann.json",
                                 "type7_dialogues_unscored": 1}
  rows = out["per_turn"]
  assert (rows[0]["video_turns"], rows[0]["moment_turns"]) == (3, 0)
  assert (rows[0]["video_evaluated"], rows[0]["moment_evaluated"]) == (2, 0)
  assert rows[0]["r@1"] == pytest.approx(1 / 3) and rows[1]["r@1_iou0.5"] == 0.5
  assert (rows[2]["video_turns"], rows[2]["video_evaluated"], rows[2]["r@1"]) == (1, 0, 0.0)
  assert "| video / moment turns | 3 / 0 | 0 / 2 | 1 / 0 |" in metrics.per_turn_markdown(rows)
  evaluated = metrics.compute(results)
  assert evaluated["r@1"] == 0.5 and evaluated["denominators"]["video"] == 2


def test_official_denominators_below_the_evaluated_turns_are_refused():
  with pytest.raises(ValueError, match="below the evaluated turns"):
    metrics.compute(_results(), denominators=metrics.Denominators(1, 5, {1: (2, 0), 2: (0, 2)}))
  with pytest.raises(ValueError, match="at turn 2"):
    metrics.compute(_results(), denominators=metrics.Denominators(5, 5, {1: (2, 0), 2: (0, 1)}))
