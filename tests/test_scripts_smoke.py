"""The benchmark and probe scripts keep working: bench_train's runner times the trainer's step
on a real toy batch, plan_7b's abstract batch and compile match what the pipeline and the trainer
use (at the tiny preset, dropout off to halve the compile times), and probe_binding trains."""

import math
import os
import re

import numpy as np
import pytest

from ivcr_jax import experiment
from ivcr_jax.data import records
from scripts import bench_gpu_step, bench_train, plan_7b, probe_binding, probe_lookup


def _no_dropout(cfg):
  with cfg.unlocked():
    for section in (cfg.model.qformer, cfg.model.video_qformer):
      section.dropout = section.attention_dropout = 0.0
    cfg.model.lora.dropout = 0.0
  return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory, shared_toy_stores):
  """The benchmark's tiny config, its toy corpus, and the batch of a retrieval-turn sample."""
  config = _no_dropout(bench_train.bench_config("tiny", scan=False))
  with config.unlocked():
    config.data.stores = shared_toy_stores(config)
  data = experiment.open_data(config, str(tmp_path_factory.mktemp("bench")))
  dialogue = bench_train.find_dialogue(data.dialogues("train"),
                                       lambda kinds: kinds == ["retrieval", "moment"], "R>M")
  sample = records.make_samples([dialogue], "prefix")[0]
  return config, data, bench_train.batch_of(data.encoder(config, training=True), [sample])


def test_bench_train_step(toy):
  config, data, batch = toy
  runner = bench_train.Runner(config, data, repeats=1)
  m = runner.measure(batch)
  ran = int(runner.state["step"])
  assert ran in (1, 2)  # the timed step, after a warm-up step unless that one took > 2 s
  again = runner.measure(batch, repeats=3)
  # The compiled step is reused: three more steps on the threaded state, no second compile.
  assert int(runner.state["step"]) == ran + 3 and len(runner.cache) == 1
  assert (again.flops, again.compile_s) == (m.flops, m.compile_s)
  # A step of the tiny model takes a small part of its compile.
  assert 0 < m.seconds < m.compile_s and 0 < again.seconds < m.compile_s
  # XLA's count of the unrolled step and plan_7b's analytic count agree (no remat at tiny).
  analytic = plan_7b.analytic_flops(experiment.model_config(config, data.tokenizer),
                                    batch["input_ids"].shape[1],
                                    len(batch["frame_slot"]), len(batch["frames"]),
                                    data.layout.frames, data.layout.text_len)["total"]
  assert 0.8 < m.flops / analytic < 1.5


def test_plan_7b_compiles_abstract_step(toy):
  config, data, batch = toy
  seq, videos, frames = batch["input_ids"].shape[1], len(batch["frame_slot"]), len(batch["frames"])
  size = config.model.vit.image_size
  abstract = plan_7b.abstract_batch(data.layout, seq, videos, frames, (size, size, 3))
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}

  c = plan_7b.compile_step(_no_dropout(plan_7b.plan_config("tiny", mesh=(1, 2, 2))), 2, seq,
                           videos)
  assert c.flops > 0 and c.memory.temp_size_in_bytes > 0
  # FSDP over 2 devices: one device holds less than all the (f32) trainable parameters.
  assert 0 < c.state_bytes["params"] < 4 * c.params[0]


def _reports(out: str) -> list[dict[str, float]]:
  """The numbers of the probes' per-window lines ("step N ... loss L ... accuracy A ...")."""
  return [{"step": int(m[1]), "loss": float(m[2]), "accuracy": float(m[3])} for m in re.finditer(
      r"^step +(\d+) .*?loss ([\d.]+) .*?(?:accuracy|induction) ([\d.]+)", out, re.MULTILINE)]


def test_probe_binding_examples_and_training(capsys):
  """Every example binds its query to the right block, and 40 steps learn the output format:
  the index token's loss falls from log(64) (the whole vocabulary) to about log(10) (a guess
  among the legal indices); the returned accuracy is the last window's."""
  args = probe_binding.parse_args(["--batch", "4"])
  batch = probe_binding.Batches(args)()
  ids, attributes = np.asarray(batch["ids"]), np.asarray(batch["attributes"])
  pb, colours = probe_binding, probe_binding.COLOURS
  for i in range(4):
    last = int(batch["last"][i])
    assert ids[i, last] == pb.VIDEO_WORD and not ids[i, last + 1:].any()
    colour = ids[i, ids[i] >= pb.COLOUR_WORD][0] - pb.COLOUR_WORD
    shape = ids[i, (ids[i] >= pb.SHAPE_WORD) & (ids[i] < pb.MOTION_WORD)][0] - pb.SHAPE_WORD
    # The target's block: the video tokens after "<VID> target </VID> <VIDEO>".
    start = np.flatnonzero(ids[i] == int(batch["target"][i]))[0] + 3
    block = attributes[i, start:start + args.video_tokens]
    assert (block[:, colour] == 1).all() and (block[:, colours + shape] == 1).all()
    # The query's colour and shape pair is the target's only.
    assert (attributes[i, :, colour] * attributes[i, :, colours + shape]).sum() == \
        args.video_tokens
    assert attributes[i].sum() == 3 * args.candidates * args.video_tokens

  accuracy = probe_binding.main(["--steps", "40", "--report_every", "20", "--batch", "8"])
  rows = _reports(capsys.readouterr().out)
  assert [r["step"] for r in rows] == [20, 40]
  assert accuracy == pytest.approx(rows[-1]["accuracy"], abs=5e-4)
  assert accuracy * 160 == pytest.approx(round(accuracy * 160))  # right answers of 160
  assert rows[-1]["loss"] < 3.0 < np.log(probe_binding.VOCAB), rows


def test_probe_lookup_asks_about_the_listed_events_and_trains(capsys):
  """Each question's index is the block holding its event, look-alike lists share all but one
  attribute with an earlier event, and a short run learns the answer's format (its loss falls
  from ~log(vocab) towards log(10))."""
  argv = ["--attrs", "8,3,5", "--lookalike", "1", "--blocks", "6", "--questions", "5"]
  args = probe_lookup.parse_args(argv)
  lists = probe_lookup.Lists(args, seed=0)
  batch = {k: np.asarray(v) for k, v in lists(3).items()}
  pl = probe_lookup
  for ids, answer, question in zip(batch["ids"], batch["answer"], batch["question"], strict=True):
    blocks = {int(ids[i + 1]): tuple(ids[i + 3:i + 6]) for i in np.flatnonzero(ids == pl.VID)}
    assert sorted(blocks) == [pl.INDEX + k for k in range(6)]
    events = list(blocks.values())
    assert all(min(sum(x != y for x, y in zip(e, f, strict=True)) for f in events[:k]) == 1
               for k, e in enumerate(events) if k)  # each a look-alike of an earlier one
    asked = np.flatnonzero(answer)
    assert len(asked) == 5 and np.flatnonzero(question).size == 10  # 2 attributes predicted
    for t in asked:
      assert blocks[int(ids[t + 1])] == tuple(ids[t - 2:t + 1])
  probe_lookup.main([*argv, "--steps", "30", "--report_every", "15", "--batch", "8",
                     "--depth", "2"])
  rows = _reports(capsys.readouterr().out)
  assert [r["step"] for r in rows] == [15, 30]
  assert rows[-1]["loss"] < 3.0 < np.log(lists.vocab), rows


@pytest.mark.parametrize("block_event", ["token", "sum"])
def test_probe_lookup_blocks_can_show_each_event_in_one_position(block_event):
  """--block_event token / sum: one position per block, holding the combination of the
  attribute words the questions ask with (its token, or the words' ids to sum)."""
  pl = probe_lookup
  args = pl.parse_args(["--attrs", "8,3,5", "--lookalike", "0.5", "--blocks", "6",
                        "--questions", "5", "--block_event", block_event])
  lists = pl.Lists(args, seed=1)
  batch = {k: np.asarray(v) for k, v in lists(4).items()}
  assert batch["ids"].shape[1] == lists.length
  assert lists.vocab == pl.EVENT + 16 + (120 if block_event == "token" else 0)
  assert ("added" in batch) == (block_event == "sum")
  for row, (ids, answer) in enumerate(zip(batch["ids"], batch["answer"], strict=True)):
    starts = np.flatnonzero(ids == pl.VID)
    assert all(ids[i + 4] == pl.END_VIDEO for i in starts)
    if block_event == "token":
      shown = {int(ids[i + 1]): int(ids[i + 3]) for i in starts}
    else:
      shown = {int(ids[i + 1]): (int(ids[i + 3]), *batch["added"][row, i + 3]) for i in starts}
      assert (batch["added"][row] >= 0).sum() == 2 * 6  # two more words per block, no others
    for t in np.flatnonzero(answer):
      words = ids[t - 2:t + 1]
      want = (lists.combos + np.ravel_multi_index(tuple(words - pl.EVENT - lists.offsets),
                                                   lists.sizes)
              if block_event == "token" else tuple(int(w) for w in words))
      assert shown[int(ids[t + 1])] == want
  if block_event == "sum":  # and it trains through the summed embeddings
    assert math.isfinite(probe_lookup.main(["--attrs", "8,3,5", "--blocks", "4", "--questions",
                                            "3", "--block_event", "sum", "--steps", "4",
                                            "--report_every", "2", "--batch", "4", "--depth",
                                            "1"]))


def test_probe_text_retrieval_finds_every_index_and_trains(tmp_path, capsys):
  from ivcr_jax.data import tokenizer as tokenizer_lib
  from ivcr_jax.data import toy_tokenizer
  from scripts import probe_text_retrieval

  argv = ["--statements", "6", "--batch", "2", "--seq", "384", "--positions", "64",
          "--tokenizer_dir", str(tmp_path / "tok")]
  args = probe_text_retrieval.parse_args(argv)
  tokenizer = tokenizer_lib.load_tokenizer(toy_tokenizer.build_toy_tokenizer(args.tokenizer_dir))
  batch = probe_text_retrieval.Batches(args, tokenizer)()
  assert batch["is_index"].sum(1).tolist() == [6, 6]  # every "video k" of the answer
  digits = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
  assert set(np.asarray(batch["labels"])[np.asarray(batch["is_index"]) > 0].tolist()) <= digits
  accuracy = probe_text_retrieval.main(argv + ["--steps", "2", "--induction", "1",
                                               "--report_every", "1"])
  rows = _reports(capsys.readouterr().out)
  assert [r["step"] for r in rows] == [1, 2, 3]
  # The last window is one step of 2 rows x 6 index answers.
  assert accuracy == pytest.approx(rows[-1]["accuracy"], abs=5e-4)
  assert accuracy * 12 == pytest.approx(round(accuracy * 12))
  # An untrained model's mean loss per supervised token: about log(vocabulary), not a sum.
  assert all(abs(r["loss"] - np.log(len(tokenizer))) < 1.5 for r in rows), rows


def test_ablation_pairs_the_settings_and_aggregates_over_seeds(tmp_path, monkeypatch):
  """The ablation's command lines, skipping of finished runs and its mean ± std table (the
  training itself is the real command, tested elsewhere; here each run is faked by its metrics)."""
  import json
  import subprocess

  from scripts import ablate_aux_losses

  commands = []

  def fake_run(cmd, **_):
    commands.append(cmd)
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    seed = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--config.seed=")))
    official = "--config.train.alpha=0" in cmd
    os.makedirs(os.path.join(workdir, "eval", "test"))
    r1 = 0.2 + 0.1 * seed + (0.0 if official else 0.3)
    with open(os.path.join(workdir, "eval", "test", "metrics.json"), "w") as f:
      json.dump({"r@1": r1, "r@1_iou0.5": r1 / 2, "miou": r1 / 3, "retriever_r@1": 0.5}, f)
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(ablate_aux_losses.subprocess, "run", fake_run)
  argv = ["--root", str(tmp_path), "--seeds", "0", "1", "2", "--", "--config.train.num_steps=3"]
  results = ablate_aux_losses.main(argv)
  assert len(commands) == 6
  assert ["--config.train.alpha=0" in c for c in commands] == [True, False] * 3  # paired
  assert all("--config.train.num_steps=3" in c and "--config.train.evaluate_after=True" in c
             for c in commands)
  official, aux = results.values()
  assert [r["r@1"] for r in aux.values()] == pytest.approx([0.5, 0.6, 0.7])
  report = (tmp_path / "ablation.md").read_text()
  assert "| official (α = β = 0) | 3 | 0.300 ± 0.100 |" in report
  assert "| aux losses (preset's α, β) | 3 | 0.600 ± 0.100 |" in report
  ablate_aux_losses.main(argv)  # finished runs are not trained again
  assert len(commands) == 6


def test_plan_7b_vision_flops_follow_the_frame_table():
  """The packed frame table is what the vision branch computes on: a quarter of the frames,
  well under half the FLOPs (the windows of the video table stay)."""
  padded, packed = plan_7b.vision_flops("tiny", 2, 32), plan_7b.vision_flops("tiny", 2, 8)
  assert packed > 0 and padded / packed > 2.5


def test_bench_gpu_step_runs_and_skips_what_this_backend_lacks(capsys):
  rows = bench_gpu_step.main(["--preset", "tiny", "--impls", "xla,cudnn", "--seq", "256",
                              "--videos", "2", "--steps", "1"])
  assert [r["impl"] for r in rows] == ["xla"] and rows[0]["finite"] and rows[0]["tokens/s"] > 0
  assert "cudnn: skipped" in capsys.readouterr().out  # float32 tiny model: no cuDNN kernel


def test_probe_lookup_answer_gap_puts_template_tokens_before_the_index():
  """--answer_gap G: G template tokens between a question's last attribute and k, the answer
  predicted from the last of them, the questions' 2nd and 3rd attributes still the question
  targets; a gap of 0 (the curriculum's start) gives the gapless rows, padded at the end."""
  pl = probe_lookup
  args = pl.parse_args(["--attrs", "8,3,5", "--blocks", "4", "--questions", "3",
                        "--answer_gap", "4"])
  lists = pl.Lists(args, seed=2)
  assert lists.vocab == lists.gap + 4 and lists.length == 1 + 4 * 7 + 3 * 9
  for gap in (4, 0):
    batch = {k: np.asarray(v) for k, v in lists(2, gap).items()}
    for ids, answer, question in zip(batch["ids"], batch["answer"], batch["question"],
                                     strict=True):
      blocks = {int(ids[i + 1]): tuple(ids[i + 3:i + 6]) for i in np.flatnonzero(ids == pl.VID)}
      asked = np.flatnonzero(answer)
      assert len(asked) == 3 and np.flatnonzero(question).size == 6
      for t in asked:
        assert list(ids[t - gap + 1:t + 1]) == [lists.gap + j for j in range(gap)]
        assert blocks[int(ids[t + 1])] == tuple(ids[t - gap - 2:t - gap + 1])
        assert question[t - gap - 2] == question[t - gap - 1] == 1 and question[t - gap] == 0
      if gap == 0:
        assert not ids[-3 * 4:].any()  # the rows' unused tail


def test_probe_lookup_gap_curriculum_grows_one_token_at_a_time():
  pl = probe_lookup
  ramp = pl.parse_args(["--answer_gap", "3", "--gap_from", "10", "--gap_every", "5"])
  assert [pl.train_gap(ramp, i) for i in (0, 9, 10, 14, 15, 20, 99)] == [0, 0, 1, 1, 2, 3, 3]
  at_once = pl.parse_args(["--answer_gap", "3", "--gap_from", "10"])
  assert [pl.train_gap(at_once, i) for i in (9, 10)] == [0, 3]
  assert pl.train_gap(pl.parse_args(["--answer_gap", "2"]), 0) == 2  # no curriculum


def test_probe_lookup_blocks_of_several_events_are_asked_by_all_of_them():
  """--events 1,3: blocks of one to three events (separated), each question naming every event
  of a block that no other block shows all of, the 2nd and 3rd attribute of each event the
  question targets."""
  pl = probe_lookup
  args = pl.parse_args(["--attrs", "8,3,5", "--lookalike", "0.5", "--events", "1,3",
                        "--blocks", "6", "--questions", "5"])
  lists = pl.Lists(args, seed=3)
  assert lists.vocab == lists.sep + 1
  batch = {k: np.asarray(v) for k, v in lists(8).items()}
  counts = set()
  for ids, answer, question in zip(batch["ids"], batch["answer"], batch["question"], strict=True):
    starts, ends = np.flatnonzero(ids == pl.VID), np.flatnonzero(ids == pl.END_VIDEO)
    blocks = {int(ids[s + 1]) - pl.INDEX: tuple(ids[s + 3:e]) for s, e in zip(starts, ends,
                                                                            strict=True)}
    as_sets = {k: {tuple(e) for e in np.split(np.asarray(b), np.flatnonzero(np.asarray(b)
                                                                             == lists.sep))}
               for k, b in blocks.items()}
    as_sets = {k: {e[1:] if e[0] == lists.sep else e for e in v} for k, v in as_sets.items()}
    assert all(len(e) == 3 for v in as_sets.values() for e in v)
    counts |= {len(v) for v in as_sets.values()}
    asked = np.flatnonzero(answer)
    assert len(asked) == 5
    for t in asked:
      k = int(ids[t + 1]) - pl.INDEX
      words = blocks[k]
      assert tuple(ids[t - len(words) + 1:t + 1]) == words  # the block's events, in order
      assert ids[t - len(words)] == pl.FIND
      assert not any(as_sets[k] <= s for j, s in as_sets.items() if j != k)
      marked = np.flatnonzero(question[t - len(words):t + 1]) + t - len(words)
      assert len(marked) == 2 * len(as_sets[k])
      assert all(pl.EVENT <= ids[m] and ids[m + 1] != lists.sep for m in marked)
  assert counts == {1, 2, 3}
  single = np.asarray(lists(4, most_events=1)["ids"])  # the curriculum's start
  assert not (single == lists.sep).any() and (single == pl.VID).sum() == 4 * 6
  ramp = pl.parse_args(["--events", "1,3", "--events_every", "100"])
  assert [pl.train_events(ramp, i) for i in (0, 99, 100, 250)] == [1, 1, 2, 3]
  assert pl.train_events(args, 5) is None
  with pytest.raises(ValueError, match="one event per block"):
    pl.Lists(pl.parse_args(["--attrs", "8,3,5", "--events", "1,3", "--block_event", "sum"]), 0)
