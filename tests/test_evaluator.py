"""Generation-based evaluation end to end on a toy store, and interactive history carry-over."""

import json

import pytest

from configs.interllava import get_config
from ivcr_jax import experiment
from ivcr_jax.data.records import MOMENT, RETRIEVAL, Sample
from ivcr_jax.evaluation import evaluator


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
    for key in ("r@1", "r@10", "r@1_iou0.3", "r@1_iou0.5", "r@1_iou0.7", "miou", "bleu4",
                "counts", "per_turn"):
      assert key in out
    lines = (workdir / history / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["prompt"].endswith("[/INST]") and first["turn"] == 1
    for name in ("per_turn.md", "per_turn.png", "iou_histogram.png", "metrics.json"):
      assert (workdir / history / name).exists()


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
