"""`python -m ivcr_jax.pretrain_llm`: the toy LLM's pretraining run and its Hugging Face export."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.toy_llm import get_config
from ivcr_jax.convert.sources import file_sha256
from ivcr_jax.data import tokenizer as toks
from ivcr_jax.data import toy_tokenizer
from ivcr_jax.jsonfile import read_json
from ivcr_jax.training import text_pretraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return toks.load_tokenizer(toy_tokenizer.build_toy_tokenizer(str(tmp_path_factory.mktemp("t"))))


def _config(**train):
  config = get_config("tiny").unlock()
  config.train.update(train)
  return config.lock()


def test_an_interrupted_run_resumes_to_the_same_weights_and_the_loss_falls(tmp_path, tokenizer):
  whole, _ = text_pretraining.pretrain(_config(), str(tmp_path / "whole"), tokenizer)
  first, stopped = text_pretraining.pretrain(_config(stop_after=6), str(tmp_path / "split"),
                                             tokenizer)
  assert stopped["step"] == 6
  resumed, result = text_pretraining.pretrain(_config(), str(tmp_path / "split"), tokenizer)
  assert result["step"] == 12
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = read_json(str(tmp_path / "split" / "train_history.json"))
  assert [r["step"] for r in rows] == [4, 6, 8, 12]
  assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # from ~ln(906) = 6.8
  assert {"heldout_index_acc", "heldout_index_acc_first", "heldout_index_acc_follow",
          "heldout_span_acc"} <= set(rows[-1])
  assert not any(k.endswith(("/hits", "/count")) for k in rows[-1])


def test_the_curricula_are_logged_and_the_gap_measured_where_training_reads_it(tmp_path,
                                                                             tokenizer):
  config = _config(num_steps=8, log_every=4, eval_every=4, checkpoint_every=8).unlock()
  config.world.update(dict(follow_ups="words", answer_gap_from=4, answer_gap_every=2,
                           events_every=4))
  config = config.lock()
  train_at = text_pretraining.batches(config, tokenizer)
  heldout_at = text_pretraining.batches(config, tokenizer, text_pretraining.HELDOUT_STREAM)
  length = lambda batch: int((batch["ids"] != tokenizer.eos_token_id).sum())
  assert length(heldout_at(0, gap_of=0)) < length(heldout_at(0))  # held out: whole by default
  assert length(train_at(0)) == length(train_at(0, gap_of=0)) < length(train_at(0, gap_of=99))
  text_pretraining.pretrain(config, str(tmp_path), tokenizer)
  rows = read_json(str(tmp_path / "train_history.json"))
  assert [(r["step"], r["answer_gap"], r["most_events"]) for r in rows] == [(4, 0, 1),
                                                                             (8, 2, 2)]
  assert {"heldout_gap_index_acc", "heldout_gap_index_acc_follow"} <= set(rows[-1])


def test_the_lookup_probe_adds_its_loss_and_its_gradient_reaches_the_llm(tokenizer):
  config = _config()
  graphdef, llm = nnx.split(text_pretraining.build_model(config, len(tokenizer)))
  params = {"llm": llm, "probe": text_pretraining.init_probe(config)}
  batch = text_pretraining.batches(config, tokenizer)(0)
  assert batch["lookup_weight"].sum() > 0
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "cut_rows"}

  def objective(p, weight):
    return text_pretraining._metrics(nnx.merge(graphdef, p["llm"]), p["probe"], batch, weight)

  (plain, plain_metrics), plain_grads = jax.value_and_grad(objective, has_aux=True)(params, 0.0)
  (total, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, 1.0)
  assert "lookup_loss" not in plain_metrics
  assert float(plain) == pytest.approx(float(metrics["loss"]), rel=1e-6)
  assert float(total) == pytest.approx(float(metrics["loss"] + metrics["lookup_loss"]), rel=1e-6)
  assert 0.3 < float(metrics["lookup_loss"]) < 2.0 and 0 <= float(metrics["lookup_acc"]) <= 1
  count = lambda kind: float(metrics[f"lookup_acc_{kind}/count"])
  assert count("block") > 0 and count("question") > 0
  assert count("block") + count("question") == float(batch["lookup_weight"].sum())
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(plain_grads["probe"]))
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
           zip(jax.tree.leaves(grads["llm"]), jax.tree.leaves(plain_grads["llm"]), strict=True)]
  assert max(moved) > 1e-4  # the probe's loss trains the LLaMA, not the probe alone


def test_the_question_loss_adds_the_questions_tokens_to_the_objective(tokenizer):
  config = _config(question_weight=0.5)
  model = text_pretraining.build_model(config, len(tokenizer))
  probe = text_pretraining.init_probe(config)
  batch = text_pretraining.batches(config, tokenizer)(0)
  plain = text_pretraining.batches(_config(), tokenizer)(0)
  assert batch["is_question"].sum() > 0 and not plain["is_question"].any()
  np.testing.assert_array_equal(batch["weight"], plain["weight"])  # the same answer slots
  events = text_pretraining.batches(_config(question_weight=0.5, question_tokens="events"),
                                    tokenizer)(0)  # the named events' words, not the template
  assert 0 < events["is_question"].sum() < batch["is_question"].sum()
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "cut_rows"}
  total, metrics = text_pretraining._metrics(model, probe, batch, 0.0, 0.5)
  assert float(total) == pytest.approx(
      float(metrics["loss"] + 0.5 * metrics["question_loss"]), rel=1e-6)
  assert 5.0 < float(metrics["question_loss"]) < 9.0  # untrained: about ln(vocab) = 6.8
  _, answers_only = text_pretraining._metrics(model, probe, batch, 0.0, 0.0)
  assert "question_loss" not in answers_only
  assert float(answers_only["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)


def test_group_accuracies_pool_hits_over_the_window_and_skip_absent_groups():
  rows = [{"loss": 1.0, "index_acc_follow2/hits": 1.0, "index_acc_follow2/count": 4.0,
           "index_acc_first1/hits": 0.0, "index_acc_first1/count": 0.0},
          {"loss": 3.0, "index_acc_follow2/hits": 3.0, "index_acc_follow2/count": 4.0,
           "index_acc_first1/hits": 0.0, "index_acc_first1/count": 0.0}]
  assert text_pretraining._pool(rows) == {"loss": 2.0, "index_acc_follow2": 0.5}


def test_the_export_is_a_llama_that_transformers_scores_as_the_run_did(tmp_path, tokenizer):
  torch = pytest.importorskip("torch")
  from transformers import LlamaForCausalLM

  def pretrain(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "ivcr_jax.pretrain_llm", "--config=configs/toy_llm.py:tiny",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  workdir = tmp_path / "run"
  proc = pretrain(workdir)
  report = read_json(str(workdir / "hf" / "pretrain_llm.json"))
  assert (workdir / "pretrain_curves.png").stat().st_size > 10_000
  digest = report["model_safetensors_sha256"]
  assert json.loads(proc.stdout)["model_safetensors_sha256"] == digest
  assert file_sha256(str(workdir / "hf" / "model.safetensors")) == digest
  # A workdir holding only the finished run's checkpoints (no history) exports the same bytes.
  shutil.copytree(workdir / "checkpoints", tmp_path / "copy" / "checkpoints")
  pretrain(tmp_path / "copy")
  assert file_sha256(str(tmp_path / "copy" / "hf" / "model.safetensors")) == digest
  model = LlamaForCausalLM.from_pretrained(str(workdir / "hf"), torch_dtype=torch.float32).eval()
  assert model.config.vocab_size == len(tokenizer)
  batch = text_pretraining.batches(_config(), tokenizer, text_pretraining.HELDOUT_STREAM)(0)
  with torch.no_grad():
    logits = model(torch.from_numpy(batch["ids"]).long()).logits.numpy()
  picked = np.take_along_axis(logits, batch["position"][..., None], 1)
  logp = picked - np.log(np.exp(picked - picked.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - picked.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["label"][..., None], -1)[..., 0]
  loss = float((nll * batch["weight"]).sum() / batch["weight"].sum())
  assert loss == pytest.approx(report["heldout_loss"], rel=1e-4)
