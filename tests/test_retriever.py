"""The phase-1 retriever: model, metrics, training with exact resume, the top-k cache store and
the LLM pipeline reading its candidate lists (official test filter)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.interllava import get_config as llm_config
from configs.retriever import get_config
from ivcr_jax import experiment
from ivcr_jax.data import topk_store
from ivcr_jax.data.records import MOMENT, RETRIEVAL, Dialogue, Turn
from ivcr_jax.models.retriever import XPoolRetriever, contrastive_loss
from ivcr_jax.retriever import ranking, topk, training
from ivcr_jax.training.event_file import read_scalars

TOY_VIDEOS = 16


def _config(**train):
  c = get_config("tiny").copy_and_resolve_references()
  with c.unlocked():
    c.data.toy_num_videos = TOY_VIDEOS
    c.train.update(train)
  return c


def test_loss_matches_brute_force_with_repeated_videos():
  logits = jax.random.normal(jax.random.key(0), (4, 4))
  video = np.array([0, 1, 0, 2])
  same = video[:, None] == video[None, :]
  want = []
  for lg in (np.asarray(logits), np.asarray(logits).T):
    for i in range(4):
      pos = np.log(np.exp(lg[i][same[i]]).sum())
      want.append(np.log(np.exp(lg[i]).sum()) - pos)
  got = contrastive_loss(logits, jnp.asarray(same))
  np.testing.assert_allclose(got, 0.5 * (np.mean(want[:4]) + np.mean(want[4:])), rtol=1e-5)


@pytest.mark.parametrize("mode", ["pixels", "features"])
def test_pooling_is_text_conditioned_and_ignores_masked_frames(mode):
  cfg = get_config("tiny").model.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.input = mode
  model = XPoolRetriever(cfg, vocab_size=50, feature_dim=24, rngs=nnx.Rngs(0))
  shape = (3, 4, 16, 16, 3) if mode == "pixels" else (3, 4, 24)
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 255, shape, dtype=np.uint8) if mode == "pixels"
       else rng.normal(size=shape).astype(np.float32))
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
  ids = jnp.asarray(rng.integers(0, 50, (2, 6)), jnp.int32)
  text = model.encode_text(ids, jnp.ones((2, 6), bool))
  frames = model.encode_frames(jnp.asarray(x), jnp.asarray(mask))
  pooled = model.pool(text, frames, jnp.asarray(mask))
  assert pooled.shape == (2, 3, cfg.width)
  assert not np.allclose(pooled[0], pooled[1], atol=1e-4)  # each text sees its own video view
  x2 = x.copy()
  x2[0, 3] = x2[2, 2:] = 0  # padding frames changed
  s1 = model.similarity(text, frames, jnp.asarray(mask))
  s2 = model.similarity(text, model.encode_frames(jnp.asarray(x2), jnp.asarray(mask)),
                        jnp.asarray(mask))
  np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_rank_metrics():
  m = ranking.rank_metrics([1, 3, 7, 12, 1])
  assert m == {"r@1": 0.4, "r@5": 0.6, "r@10": 0.8, "median_rank": 3.0, "mean_rank": 4.8,
               "queries": 5}
  with pytest.raises(ValueError, match="no queries"):
    ranking.rank_metrics([])


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_toy_stores):
  """A tiny retriever trained on a 16-video toy corpus, plus the same run stopped and resumed."""
  root = tmp_path_factory.mktemp("retriever")
  config = _config()
  with config.unlocked():
    config.data.stores = shared_toy_stores(config)
  store_dir, tok_dir = experiment.store_dirs(config.data, config.frame_size, str(root / "a"))
  with config.unlocked():
    config.data.stores = store_dir
  result = training.train(config, str(root / "a"), store_dir, tok_dir)
  resumed = _config(stop_after=20)
  with resumed.unlocked():
    resumed.data.stores = store_dir
  first = training.train(resumed, str(root / "b"), store_dir, tok_dir)
  with resumed.unlocked():
    resumed.train.stop_after = 0
  second = training.train(resumed, str(root / "b"), store_dir, tok_dir)
  return dict(config=config, root=root, store_dir=store_dir, tok_dir=tok_dir, result=result,
              first=first, second=second)


def _trained(run, name="a", step=None):
  data = training.open_stores(run["config"], run["store_dir"], run["tok_dir"])
  return training.restore(run["config"], str(run["root"] / name), data, step=step)


def test_training_writes_checkpoints_events_history_and_evaluation(run):
  root = run["root"] / "a"
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["20", "40"]
  history = json.loads((root / "train_history.json").read_text())
  assert [h["step"] for h in history] == [10, 20, 30, 40]
  assert history[-1]["loss"] < history[0]["loss"], history
  tags = {tag for _, tag, _ in read_scalars(str(next((root / "tensorboard").iterdir())))}
  assert {"loss", "lr", "val_r@1", "val_median_rank"} <= tags
  saved = json.loads((root / "eval" / "val.json").read_text())
  assert saved == json.loads(json.dumps(run["result"]))
  for who in ("retriever", "annotation_candidates"):
    assert set(saved[who]) >= {"r@1", "r@5", "r@10", "queries"}
  assert saved["retriever"]["queries"] == saved["annotation_candidates"]["queries"] > 0
  assert 1 <= saved["retriever"]["median_rank"] <= TOY_VIDEOS


def test_resume_is_exact(run):
  assert run["first"] == {"step": 20, "stopped_after": 20}
  assert run["second"] == run["result"]
  a, b = _trained(run, "a"), _trained(run, "b")
  assert a.fingerprint == b.fingerprint
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a.model), nnx.state(b.model))


def test_topk_cache_is_fingerprinted_and_refused_for_other_retrievers(run, tmp_path):
  trained = _trained(run)
  out = str(tmp_path / "cache")
  meta = topk.build_cache(run["config"], trained, out, ["train", "val", "test"],
                          retriever_dir=str(run["root"] / "a"))
  assert meta["retriever"]["fingerprint"] == trained.fingerprint and meta["k"] == 10
  store = topk_store.TopKStore(out)
  dialogues = trained.data.dialogues("val")
  records = store.lists("val")
  assert [r["index"] for r in records] == [d.index for d in dialogues]
  ranker = trained.ranker(run["config"])
  d, rec = dialogues[0], records[0]
  assert d.turns[0].kind == RETRIEVAL
  want, scores = ranker.top_k([d.turns[0].question], ranker.index(trained.data.bank.videos), 10)
  assert rec["turns"][0]["videos"] == want[0]
  np.testing.assert_allclose(rec["turns"][0]["scores"], scores[0], atol=1e-5)
  # The same retriever again: kept; another checkpoint: refused unless overwrite.
  assert topk.build_cache(run["config"], trained, out, ["train", "val", "test"],
                          retriever_dir="x") == meta
  older = _trained(run, step=20)
  with pytest.raises(FileExistsError, match="another retriever"):
    topk.build_cache(run["config"], older, out, ["train", "val", "test"], retriever_dir="x")
  # Other corpus or other dialogues: refused when read.
  corpus = topk_store.corpus_fingerprint(trained.data.bank.videos)
  with pytest.raises(topk_store.TopKMismatch, match="another video corpus"):
    store.with_candidates(dialogues, "val", "0" * 64, 10)
  edited = [dataclasses.replace(d, turns=(dataclasses.replace(d.turns[0], question="other"),
                                          *d.turns[1:]))] + dialogues[1:]
  with pytest.raises(topk_store.TopKMismatch, match="other val dialogues"):
    store.with_candidates(edited, "val", corpus, 10)


def test_llm_pipeline_reads_candidates_from_the_cache(run, tmp_path):
  out = str(tmp_path / "cache")
  topk.build_cache(run["config"], _trained(run), out, ["train", "val", "test"],
                   retriever_dir="x")
  cfg = llm_config("tiny").copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos = TOY_VIDEOS
    cfg.data.stores = run["store_dir"]
    cfg.data.candidates = out
  data = experiment.open_data(cfg, str(tmp_path))
  lists = {r["index"]: r for r in topk_store.TopKStore(out).lists("train")}
  replaced = data.dialogues("train")
  assert replaced
  for d in replaced:
    for t, rec in zip(d.turns, lists[d.index]["turns"], strict=False):
      if t.kind == RETRIEVAL:
        assert t.candidates == tuple(rec["videos"])
        assert t.candidates[t.video_index - 1] == t.video_id
        assert f"video {t.video_index}" in t.answer
  encoder = data.encoder(cfg, training=False)
  sample = data.samples("train", "dialogue")[0]
  assert encoder(sample)["videos"][0][0] == sample.turns[0].videos[0]


def _turn(kind, video, cands, index, answer, text_id):
  return Turn(kind, f"q{text_id}", answer, text_id, video, tuple(cands),
              (1.0, 2.0) if kind == MOMENT else None, index)


def test_official_filter_and_answer_rewrite(tmp_path):
  old = [f"v{i}" for i in range(10)]
  d_ok = Dialogue(0, "test", 2, (
      _turn(RETRIEVAL, "v3", old, 4, "You want a video. The video 4 matches.", 1),
      _turn(MOMENT, "v3", old, 4, "In video 4, it happens at 1.0s-2.0s.", 2)))
  d_first_miss = Dialogue(1, "test", 1, (
      _turn(RETRIEVAL, "v5", old, 6, "The video 6 matches.", 3),))
  d_later_miss = Dialogue(2, "test", 5, (
      _turn(RETRIEVAL, "v1", old, 2, "The video 2 matches.", 4),
      _turn(RETRIEVAL, "v2", old, 3, "The video 3 matches.", 5)))
  d_moment_first = Dialogue(3, "test", 3, (
      _turn(MOMENT, "v1", old, 1, "In video 1, at 1.0s-2.0s.", 6),))
  d_type7 = Dialogue(4, "test", 7, (
      _turn(RETRIEVAL, "v7", old, 8, "The video 8 matches.", 7),
      _turn(RETRIEVAL, "v1", old, 2, "The video 2 matches.", 8)))
  new = ["v3", "v1"] + [f"w{i}" for i in range(8)]
  no_v3 = [f"w{i}" for i in range(10)]
  lists = [
      [(new, np.ones(10)), (new, np.ones(10))],
      [(no_v3, np.ones(10))],
      [(new, np.ones(10)), (no_v3, np.ones(10))],
      [(new, np.ones(10))],  # the moment's video is 2nd of the list, not the top-1: dropped
      [(no_v3, np.ones(10)), (new, np.ones(10))],
  ]
  dialogues = [d_ok, d_first_miss, d_later_miss, d_moment_first, d_type7]
  topk_store.write_topk_store(str(tmp_path), {"test": (dialogues, lists)}, k=10,
                              retriever={"fingerprint": "r"}, corpus="c")
  applied = topk_store.TopKStore(str(tmp_path)).with_candidates(dialogues, "test", "c", 10)
  by_index = {d.index: d for d in applied.dialogues}
  assert sorted(by_index) == [0, 2, 4]
  r, m = by_index[0].turns
  assert (r.video_index, r.answer) == (1, "You want a video. The video 1 matches.")
  assert r.candidates == tuple(new)
  assert (m.video_index, m.answer) == (1, "In video 1, it happens at 1.0s-2.0s.")
  assert [t.text_id for t in by_index[2].turns] == [4]
  assert by_index[2].turns[0].answer == "The video 2 matches."
  assert [t.text_id for t in by_index[4].turns] == [8]  # type 7: the failing turn alone goes
  assert applied.counts == {"retrieval_misses": 3, "moment_misses": 1, "turns_dropped": 4,
                            "dialogues_dropped": 2, "dialogues_kept": 3}
