"""Generation-based evaluation end to end on a toy store, interactive history carry-over, and the
official parsing and denominator options."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import experiment
from ivcr_jax.data import pipeline, prepare
from ivcr_jax.data.records import MOMENT, RETRIEVAL, Sample
from ivcr_jax.data.tokenizer import digits_of
from ivcr_jax.evaluation import evaluator, metrics
from ivcr_jax.training import losses


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval_run")
  cfg = get_config("tiny").copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos = 30
    cfg.generation.max_new_tokens = 8
    cfg.train.batch_size = 2
  data = experiment.open_data(cfg, str(workdir))
  model = experiment.build_model(cfg, data.tokenizer)
  return cfg, data, model, workdir


def test_oracle_and_interactive_evaluation_write_every_output(toy_run):
  cfg, data, model, workdir = toy_run
  dialogues = data.dialogues("test")[:3]
  ev = evaluator.Evaluator(model, data.encoder(cfg, training=False), data.tokenizer,
                           cfg.generation, batch_size=2)
  for history in evaluator.HISTORY_MODES:
    preds = evaluator.evaluate_dialogues(ev, dialogues, history)
    assert len(preds) == sum(len(d.turns) for d in dialogues)
    out = evaluator.write_outputs(preds, str(workdir / history))
    for key in ("r@1", "retriever_r@10", "r@1_iou0.3", "r@1_iou0.5", "r@1_iou0.7", "miou",
                "bleu4", "counts", "per_turn", "warnings"):
      assert key in out
    lines = (workdir / history / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["prompt"].endswith("[/INST]") and first["turn"] == 1
    for name in ("per_turn.md", "per_turn.png", "iou_histogram.png", "metrics.json"):
      assert (workdir / history / name).exists()


def test_model_ranking_scores_every_retrieval_turn_in_one_pass(toy_run):
  cfg, data, model, _ = toy_run
  dialogues = data.dialogues("test")[:4]
  ev = evaluator.Evaluator(model, data.encoder(cfg, training=False), data.tokenizer,
                           cfg.generation, batch_size=2)
  preds = [evaluator.Prediction(evaluator._result(d, t, "no answer", True, False), "", None)
           for d in dialogues for t in range(len(d.turns))]
  ranked = evaluator.with_ranking(ev, dialogues, preds)
  video = [p.result for p in ranked if p.result.kind == "video"]
  assert video and all(p.result.index_scores is None for p in ranked if p.result.kind != "video")
  for r in video:  # a distribution over the 10 indices
    assert len(r.index_scores) == 10
    np.testing.assert_allclose(np.exp(r.index_scores).sum(), 1.0, rtol=1e-4)
  # Writing the index "1" leaves the ground truth's own L_V probability unchanged (gt 2..9).
  d, t = next((d, t) for d in dialogues for t, turn in enumerate(d.turns)
              if turn.kind == RETRIEVAL and 2 <= turn.video_index <= 9)
  enc = data.encoder(cfg, training=False)
  element = enc(Sample(d, t + 1, (t,)))
  batch = pipeline.assemble([element, element], enc.layout)
  digits = jnp.asarray(digits_of(data.tokenizer))
  teacher_forced = nnx.jit(lambda m, b: losses.index_log_prob(m(b), b["index_pos"],
                                                              b["index_target"], digits))
  want = teacher_forced(model, batch)
  got = next(r for r in video if r.dialogue_id == str(d.index) and r.turn == t + 1)
  np.testing.assert_allclose(got.index_scores[d.turns[t].video_index - 1], float(want[0, 0]),
                             rtol=1e-4, atol=1e-5)
  assert evaluator.ranking_sample(d, t).turns[t].answer.count("video 1") >= 1
  moment = next((d, t) for d in dialogues for t, turn in enumerate(d.turns)
                if turn.kind == MOMENT)
  with pytest.raises(ValueError, match="not a retrieval answer"):
    evaluator.ranking_sample(*moment)
  out = metrics.compute([p.result for p in ranked])
  assert out["counts"]["ranked_turns"] == len(video)
  # The ground truth's place among the 10 scores, best first.
  ranks = np.array([1 + np.flatnonzero(np.argsort(-np.asarray(r.index_scores), kind="stable")
                                       == r.gt_index - 1)[0] for r in video])
  assert out["ranking_mrr"] == pytest.approx(np.mean(1 / ranks))
  assert [out[f"ranking_r@{k}"] for k in (1, 3, 5)] == pytest.approx(
      [np.mean(ranks <= k) for k in (1, 3, 5)])


def test_generation_prompts_equal_training_prompts_up_to_the_answer(toy_run):
  cfg, data, _, _ = toy_run
  d = next(x for x in data.dialogues("test") if len(x.turns) >= 2)
  enc = data.encoder(cfg, training=False)
  train_text = enc(Sample(d, 2, (1,)))["encoded"].text
  gen_text = enc(Sample(d, 2, ()), generation=True)["encoded"].text
  assert gen_text.endswith(" [/INST]") and train_text.startswith(gen_text)


def test_interactive_history_follows_the_models_choice(toy_run):
  _, data, _, _ = toy_run
  d = next(x for x in data.dialogues("train") if len(x.turns) >= 2
           and x.turns[0].kind == RETRIEVAL and x.turns[1].kind == MOMENT)
  wrong = next(k for k in range(1, 11) if k != d.turns[0].video_index)
  moved = evaluator._carry_forward(d, 0, f"I think the video {wrong} matches.")
  assert moved.turns[0].answer == f"I think the video {wrong} matches."
  assert moved.turns[1].video_id == d.turns[0].candidates[wrong - 1]
  assert moved.turns[1].video_index == wrong
  kept = evaluator._carry_forward(d, 0, "I cannot tell.")  # unparsable: the video stays
  assert kept.turns[1].video_id == d.turns[1].video_id


def test_official_parsing_and_denominators_reach_metrics_json(toy_run):
  cfg, data, model, workdir = toy_run
  dialogues = data.dialogues("test")[:2]
  ev = evaluator.Evaluator(model, data.encoder(cfg, training=False), data.tokenizer,
                           cfg.generation, batch_size=2)
  preds = evaluator.evaluate_dialogues(ev, dialogues, "oracle", official_parsing=True)
  turns = sum(len(d.turns) for d in dialogues)
  assert ev.stats["turns"] == turns and ev.stats["new_tokens"] >= turns
  den = experiment.load_official_denominators(cfg, data.store_dir, "test")
  with open(prepare.read_report(data.store_dir)["annotations"], encoding="utf-8") as f:
    raw = [r for r in json.load(f) if r["split"] == "test"]
  gpt = [c for r in raw for c in r["conversations"] if c["from"] == "gpt"]
  assert den.video == sum(c["gt_se"] == [-1, -1] for c in gpt)
  assert den.moment == sum(c["gt_se"] not in (None, [-1, -1]) for c in gpt)
  assert den.chat == sum(c["gt_se"] is None for c in gpt)
  out = evaluator.write_outputs(preds, str(workdir / "official"), official_parsing=True,
                                denominators=den)
  saved = json.loads((workdir / "official" / "metrics.json").read_text())
  assert saved["parsing"] == "official" and out["parsing"] == "official"
  assert saved["denominators"]["mode"] == "official"
  assert (saved["denominators"]["video"], saved["denominators"]["moment"]) == (den.video,
                                                                               den.moment)
  assert saved["counts"]["video_turns"] + saved["counts"]["moment_turns"] <= den.video + den.moment


def test_official_denominators_do_not_answer_type7_dialogues(toy_run):
  _, data, _, _ = toy_run
  dialogues = data.dialogues("test")[:4]
  seven = dataclasses.replace(dialogues[1], type=7)
  mixed = [dialogues[0], seven, *dialogues[2:]]
  assert evaluator.scored_dialogues(mixed, official_denominators=False) == mixed
  kept = evaluator.scored_dialogues(mixed, official_denominators=True)
  assert kept == [dialogues[0], *dialogues[2:]]


def test_missing_annotations_for_official_denominators(toy_run, tmp_path):
  cfg, _, _, _ = toy_run
  with pytest.raises(experiment.MissingInputsError, match="official denominators"):
    experiment.load_official_denominators(cfg, str(tmp_path), "test")


def _moment_dialogue(data):
  d = next(x for x in data.dialogues("train") if len(x.turns) >= 2
           and x.turns[0].kind == RETRIEVAL and x.turns[1].kind == MOMENT)
  # An answer span that differs from gt_se within the readers' tolerance shows which is the GT.
  start, end = d.turns[1].gt_span
  answer = f"In video {d.turns[1].video_index}, it happens at {start + 0.5}s-{end}s."
  turns = (d.turns[0], dataclasses.replace(d.turns[1], answer=answer))
  return dataclasses.replace(d, turns=turns)


def test_turn_results_in_both_parsing_modes(toy_run):
  _, data, _, _ = toy_run
  d = _moment_dialogue(data)
  start, end = d.turns[1].gt_span
  text = "video 3 - 12.5s-20.0s"
  improved = evaluator._result(d, 1, text, True, official_parsing=False)
  official = evaluator._result(d, 1, text, True, official_parsing=True)
  assert improved.pred_span == (12.5, 20.0) and improved.gt_span == (start, end)
  assert official.pred_span == (3.0, 12.5) and official.gt_span == (start + 0.5, end)
  assert evaluator._result(d, 1, "no idea", True, True).pred_span is None  # official [[0, 0]]
  assert evaluator._result(d, 1, text, False, False).pred_span is None  # wrong video
  assert evaluator._result(d, 0, "Video3 matches", True, False).pred_index == 3
  assert evaluator._result(d, 0, "Video3 matches", True, True).pred_index is None
  assert evaluator._result(d, 0, "video 0 or video 2", True, True).pred_index is None
  assert evaluator._result(d, 0, "video 0 or video 2", True, False).pred_index == 2
  moved = evaluator._carry_forward(d, 0, "Video3 matches", official_parsing=False)
  assert moved.turns[1].video_id == d.turns[0].candidates[2]
  kept = evaluator._carry_forward(d, 0, "Video3 matches", official_parsing=True)
  assert kept.turns[1].video_id == d.turns[1].video_id
