"""The grain pipeline: splice plan, video table, determinism, resume, aux positions, shortening,
dialogue-vs-prefix equivalence under a model, feature-store mode, and bad inputs."""

import copy
import dataclasses

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from configs.interllava import get_config
from ivcr_jax import experiment
from ivcr_jax.data import feature_store, pipeline, records
from ivcr_jax.data.answers import parse_span
from ivcr_jax.data.records import MOMENT, RETRIEVAL
from ivcr_jax.data.tokenizer import digits_of
from ivcr_jax.models.interllava import splice
from ivcr_jax.models.vision_tower import frame_encoder
from ivcr_jax.training import losses

IGNORE = pipeline.IGNORE


@dataclasses.dataclass
class Env:
  config: object
  data: experiment.Data
  model: object
  samples: list  # training samples, dialogue mode
  forward: object  # jitted model(batch) -> logits


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A 12-video toy corpus with its stores and tokenizer (built once), and a tiny model."""
  config = get_config("tiny").copy_and_resolve_references()
  with config.unlocked():
    config.data.toy_num_videos = 12
    config.data.toy_size = 32
  data = experiment.open_data(config, str(tmp_path_factory.mktemp("pipeline")))
  with config.unlocked():
    config.model.llm.vocab_size = len(data.tokenizer)
  model = experiment.build_model(config, data.tokenizer)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
  return Env(config, data, model, data.samples("train", "dialogue"),
             lambda batch: np.asarray(forward(state, batch)))


def _encoder(env, layout=None, **kwargs):
  kwargs.setdefault("training", False)
  return pipeline.SampleEncoder(env.config, env.data.tokenizer, env.data.frame_store,
                                layout=layout or env.data.layout,
                                qformer_tokenizer=env.data.qformer_tokenizer, **kwargs)


def _dataset(env, seed):
  return pipeline.train_dataset(env.samples, _encoder(env, training=True), env.data.layout,
                                seed=seed)


def _shared_video_batch(env, encoder):
  """Four elements of which at least two show the same sampled video."""
  elements = [encoder(s) for s in env.samples[:4]]
  keys = [set(el["videos"]) for el in elements]
  assert any(a & b for i, a in enumerate(keys) for b in keys[i + 1:])
  return elements, pipeline.assemble(elements, env.data.layout)


def _expected_rows(env, elements, batch):
  """Each row re-expanded by hand from its EncodedSample; returns (ids, labels, slots, blocks)
  with blocks = [(start, length, table row)] of the video placeholders."""
  layout = env.data.layout
  per_video = layout.tokens_per_video(layout.frames)
  rows = []
  for i, el in enumerate(elements):
    enc = el["encoded"]
    ids, labels, slots, blocks = [], [], [], []
    placeholders = dict(zip(enc.placeholder_positions.tolist(), el["videos"], strict=True))
    for q, token in enumerate(enc.input_ids.tolist()):
      if q not in placeholders:
        ids.append(token)
        labels.append(int(enc.labels[q]))
        slots.append(-1)
        continue
      key = placeholders[q]
      frames = el["frames"][key]
      n = layout.tokens_per_video(len(frames.indices))
      start = len(ids)
      row = int(batch["video_slot"][i, start]) // per_video
      # The table row the plan points at names exactly this video's sampled frames and text.
      frame_rows = batch["frame_slot"][row]
      assert (frame_rows >= 0).sum() == len(frames.indices)
      frame_rows = frame_rows[:len(frames.indices)]
      np.testing.assert_array_equal(batch["frames"][frame_rows], frames.frames)
      np.testing.assert_array_equal(batch["qformer_text_ids"][frame_rows],
                                    el["qformer_text"][key][0])
      ids += [token] * n
      labels += [IGNORE] * n
      slots += (row * per_video + np.arange(n)).tolist()
      blocks.append((start, n, row))
    rows.append((np.array(ids), np.array(labels), np.array(slots), blocks))
  return rows


def test_splice_plan_matches_a_hand_reassembly(env):
  elements, batch = _shared_video_batch(env, _encoder(env))
  layout = env.data.layout
  b, s = batch["input_ids"].shape
  assert b == layout.batch_size and s in layout.seq_buckets
  rows = _expected_rows(env, elements, batch)
  for i, (ids, labels, slots, _) in enumerate(rows):
    n = len(ids)
    np.testing.assert_array_equal(batch["input_ids"][i, :n], ids)
    np.testing.assert_array_equal(batch["labels"][i, :n], labels)
    np.testing.assert_array_equal(batch["video_slot"][i, :n], slots)
    np.testing.assert_array_equal(batch["position_ids"][i, :n], np.arange(n))
    assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
    assert (batch["labels"][i, n:] == IGNORE).all() and (batch["video_slot"][i, n:] == -1).all()

  # The model's splice puts video row r's j-th embedding exactly at the planned positions.
  model = env.model
  per_video = layout.tokens_per_video(layout.frames)
  assert model.vision.tokens_per_video(layout.frames) == per_video
  v = batch["frame_slot"].shape[0]
  hidden = env.config.model.llm.hidden
  video = np.random.default_rng(0).normal(size=(v, per_video, hidden)).astype(np.float32)
  text = np.asarray(model.llm.embed(batch["input_ids"]))
  out = np.asarray(splice(text, video, batch["video_slot"]))
  for i, (_, _, _, blocks) in enumerate(rows):
    expected = text[i].copy()
    for start, n, row in blocks:
      expected[start:start + n] = video[row, :n]
    np.testing.assert_array_equal(out[i], expected)
    assert len(blocks) == len(elements[i]["videos"]) > 0
  graphdef, state = nnx.split(model)
  shape = jax.eval_shape(lambda s, b: nnx.merge(graphdef, s).video_embeddings(b), state, batch)
  assert shape.shape == (v, per_video, hidden)  # what the model makes fits the plan's table


def test_each_distinct_video_once_in_the_table(env):
  elements, batch = _shared_video_batch(env, _encoder(env))
  per_video = env.data.layout.tokens_per_video(env.data.layout.frames)
  distinct = {key for el in elements for key in el["videos"]}
  used = {int(x) // per_video for x in batch["video_slot"][batch["video_slot"] >= 0]}
  assert used == set(range(len(distinct)))  # one row per distinct video, packed from row 0
  slot = batch["frame_slot"]
  contents = {batch["frames"][slot[r][slot[r] >= 0]].tobytes() for r in used}
  assert len(contents) == len(used)
  # The frame table holds each video's frames once, one after another, then padding rows.
  real = sum(len(key[1]) for key in distinct)
  np.testing.assert_array_equal(np.sort(slot[slot >= 0]), np.arange(real))
  assert (slot[len(used):] == -1).all() and not batch["frames"][real:].any()
  assert len(batch["frames"]) in env.data.layout.frame_buckets


def _batches(it, k):
  return [next(it) for _ in range(k)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_order(env):
  first, again = _batches(iter(_dataset(env, 0)), 2), _batches(iter(_dataset(env, 0)), 2)
  for a, b in zip(first, again, strict=True):
    _assert_same(a, b)
  other = next(iter(_dataset(env, 1)))
  assert not np.array_equal(other["input_ids"], first[0]["input_ids"])


def test_iterator_resumes_exactly(env):
  it = iter(_dataset(env, 3))
  head = _batches(it, 2)
  state = it.get_state()
  expected = _batches(it, 2)
  resumed = iter(_dataset(env, 3))
  resumed.set_state(state)
  for a, b in zip(expected, _batches(resumed, 2), strict=True):
    _assert_same(a, b)
  assert not np.array_equal(head[0]["input_ids"], expected[0]["input_ids"])


def test_worker_processes_give_the_same_batches(env):
  expected = _batches(iter(_dataset(env, 5)), 3)
  it = iter(_dataset(env, 5).mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
  try:
    for a, b in zip(expected, _batches(it, 3), strict=True):
      _assert_same(a, b)
  finally:
    it.close()


def test_aux_positions_spell_the_ground_truth(env):
  digits = {int(t): d for d, t in enumerate(digits_of(env.data.tokenizer))}
  encoder = _encoder(env)
  checked = {"index": 0, "span": 0}
  for start in range(0, len(env.samples) - 3, 4):
    elements = [encoder(s) for s in env.samples[start:start + 4]]
    batch = pipeline.assemble(elements, env.data.layout)
    for i, el in enumerate(elements):
      sample, ids = el["sample"], batch["input_ids"][i]
      assert el["encoded"].number_failures == 0
      turns = [sample.turns[t] for t in sample.supervised]
      retrieval = [t for t in turns if t.kind == RETRIEVAL]
      moment = [t for t in turns if t.kind == MOMENT]
      assert batch["index_valid"][i].sum() == len(retrieval)
      assert batch["span_valid"][i].sum() == len(moment)
      for j, turn in enumerate(retrieval):
        pos = int(batch["index_pos"][i, j])
        number = ""
        while int(ids[pos]) in digits:  # the answer's "video N", read off the input tokens
          assert batch["labels"][i, pos] == ids[pos]
          number += str(digits[int(ids[pos])])
          pos += 1
        assert int(number) == batch["index_target"][i, j] == turn.video_index
        checked["index"] += 1
      for j, turn in enumerate(moment):
        pos, place = batch["span_pos"][i, j], batch["span_place"][i, j]
        spelled = [sum(digits[int(ids[p])] * w for p, w in zip(pos[e], place[e], strict=True)
                       if w) for e in range(2)]
        np.testing.assert_allclose(spelled, batch["span_target"][i, j], atol=1e-4)
        np.testing.assert_allclose(batch["span_target"][i, j], parse_span(turn.answer), atol=1e-4)
        np.testing.assert_allclose(batch["span_target"][i, j], turn.gt_span, atol=0.051)
        checked["span"] += 1
  assert checked["index"] >= 5 and checked["span"] >= 3


def _spliced_length(encoder, sample):
  el = encoder(sample)
  return el["encoded"].spliced_length(
      [encoder.layout.tokens_per_video(len(k[1])) for k in el["videos"]])


def _without_first_turns(sample, k):
  d = sample.dialogue
  return records.Sample(dataclasses.replace(d, turns=d.turns[k:]), sample.num_turns - k,
                        tuple(range(sample.num_turns - k)))


def test_over_long_samples_drop_their_oldest_turns_and_are_counted(env):
  sample = max(env.samples, key=lambda s: s.num_turns)
  assert sample.num_turns >= 3
  full = _spliced_length(_encoder(env), sample)
  shorter = _spliced_length(_encoder(env), _without_first_turns(sample, 1))
  assert shorter < full
  layout = dataclasses.replace(env.data.layout, seq_buckets=(shorter,))
  encoder = _encoder(env, layout)
  el = encoder(sample)
  assert encoder.truncated == {"context_too_long": 1}
  assert el["sample"].turns == sample.turns[1:]
  assert el["sample"].supervised == tuple(range(sample.num_turns - 1))
  assert _spliced_length(encoder, el["sample"]) <= shorter
  batch = pipeline.assemble([el], layout)
  assert batch["input_ids"].shape[1] == shorter

  last = _spliced_length(_encoder(env), _without_first_turns(sample, sample.num_turns - 1))
  tiny = dataclasses.replace(env.data.layout, seq_buckets=(last - 1,))
  with pytest.raises(records.RecordError, match="more than max_len"):
    _encoder(env, tiny)(sample)

  # A sample showing more videos than its share of the largest table is shortened the same way.
  many = next(s for s in env.samples
              if s.num_turns > 1 and len({v for t in s.turns for v in t.videos}) > 10)
  narrow = dataclasses.replace(env.data.layout, video_buckets=(10 * env.data.layout.batch_size,))
  encoder = _encoder(env, narrow)
  el = encoder(many)
  assert encoder.truncated["too_many_videos"] >= 1
  assert len(set(el["videos"])) <= 10
  # ... and one showing more frames than its share of the largest frame table.
  cap = 10 * env.data.layout.frames
  narrow = dataclasses.replace(env.data.layout,
                               frame_buckets=(cap * env.data.layout.batch_size,))
  encoder = _encoder(env, narrow)
  el = encoder(many)
  assert encoder.truncated["too_many_frames"] >= 1 and not encoder.truncated["too_many_videos"]
  assert sum(len(key[1]) for key in set(el["videos"])) <= cap


def _turn_sums(logp, labels):
  """Sums of the supervised tokens' log-probs, one per contiguous answer span."""
  sums, current = [], None
  for t in range(1, len(labels)):
    if labels[t] != IGNORE:
      value = float(logp[t - 1, labels[t]])
      current = value if current is None else current + value
    elif current is not None:
      sums.append(current)
      current = None
  if current is not None:
    sums.append(current)
  return sums


def test_dialogue_mode_equals_prefix_mode_under_the_model(env):
  dialogue = next(d for d in env.data.dialogues("train") if len(d.turns) == 3
                  and {t.kind for t in d.turns} >= {RETRIEVAL, MOMENT})
  whole = records.make_samples([dialogue], "dialogue")
  prefixes = records.make_samples([dialogue], "prefix")
  assert [p.supervised for p in prefixes] == [(0,), (1,), (2,)]
  encoder = _encoder(env)
  batch = pipeline.assemble([encoder(s) for s in whole + prefixes], env.data.layout)
  logits = env.forward(batch)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
  per_turn = _turn_sums(logp[0], batch["labels"][0])
  assert len(per_turn) == 3
  for k in range(3):
    (prefix_sum,) = _turn_sums(logp[k + 1], batch["labels"][k + 1])
    np.testing.assert_allclose(per_turn[k], prefix_sum, rtol=1e-5, atol=1e-4)
  total, count = losses.lm_loss(logits[:1], batch["labels"][:1])
  np.testing.assert_allclose(-float(total), sum(per_turn), rtol=1e-5)
  assert int(count) == (batch["labels"][0, 1:] != IGNORE).sum()


def test_missing_video_is_named(env):
  turn = next(t for s in env.samples for t in s.turns if t.kind == MOMENT)
  bad = dataclasses.replace(turn, video_id="toy/missing.mp4")
  d = records.Dialogue(999, "train", 3, (bad,))
  with pytest.raises(pipeline.MissingVideoError,
                     match=r"record 999 .*'toy/missing\.mp4' is not in the frame store"):
    _encoder(env)(records.Sample(d, 1, (0,)))


def test_frame_store_of_another_size_is_refused(env):
  config = env.config.copy_and_resolve_references()
  with config.unlocked():
    config.model.vit.image_size = 64
  with pytest.raises(ValueError, match="32 px frames but the ViT takes 64 px"):
    pipeline.SampleEncoder(config, env.data.tokenizer, env.data.frame_store, training=True,
                           layout=env.data.layout)


def test_frame_store_of_another_resize_mode_is_refused(env):
  config = env.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.resize_mode = "shorter_side_crop"
  with pytest.raises(ValueError, match="decoded with resize 'squash'.*--resize shorter_side_crop"):
    pipeline.SampleEncoder(config, env.data.tokenizer, env.data.frame_store, training=True,
                           layout=env.data.layout)


def _cropping(env, **kwargs):
  config = env.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.random_resized_crop = True
  return pipeline.SampleEncoder(config, env.data.tokenizer, env.data.frame_store,
                                layout=env.data.layout,
                                qformer_tokenizer=env.data.qformer_tokenizer, **kwargs)


def test_random_resized_crop_one_box_per_video_in_training_only(env):
  from ivcr_jax.data import frames as frames_lib

  plain, crop = _encoder(env, training=True), _cropping(env, training=True)
  sample = next(s for s in env.samples if len({v for t in s.turns for v in t.videos}) >= 5)
  boxes = {}
  for epoch in (0, 1):
    el, ref = crop(sample, epoch), plain(sample, epoch)
    assert el["videos"] == [(v, i, el["videos"][k][2]) for k, (v, i, _) in enumerate(ref["videos"])]
    for key, vf in el["frames"].items():
      video, indices, box = key
      stored = ref["frames"][(video, indices, ())]
      assert vf.frames.shape == stored.frames.shape and vf.frames.dtype == np.uint8
      np.testing.assert_array_equal(vf.indices, stored.indices)
      # Every frame is the same box of its stored frame, resized back to the ViT size.
      np.testing.assert_array_equal(
          vf.frames, frames_lib.resized_crop(stored.frames, box, stored.frames.shape[1:3]))
      size = vf.frames.shape[1:3]
      for t in (0, len(vf.frames) - 1):
        np.testing.assert_array_equal(
            vf.frames[t], frames_lib.resized_crop(stored.frames[t:t + 1], box, size)[0])
      boxes[epoch, video] = box
  videos = {v for _, v in boxes}
  assert len({boxes[0, v] for v in videos}) > 1  # other videos, other boxes
  assert any(boxes[0, v] != boxes[1, v] for v in videos)  # other epochs, other boxes
  el = crop(sample, 0)  # a function of (seed, epoch, video)
  assert all(boxes[0, k[0]] == k[2] for k in el["videos"])
  # Never in evaluation.
  evaluation = _cropping(env, training=False)(sample, 0)
  assert all(k[2] == () for k in evaluation["videos"])
  for key, vf in evaluation["frames"].items():
    np.testing.assert_array_equal(vf.frames, _encoder(env)(sample)["frames"][key].frames)


def test_cropped_batches_are_deterministic_and_resume_exactly(env):
  def dataset(seed):
    return pipeline.train_dataset(env.samples, _cropping(env, training=True), env.data.layout,
                                  seed=seed)

  it = iter(dataset(2))
  _batches(it, 1)
  state = it.get_state()
  expected = _batches(it, 2)
  again = _batches(iter(dataset(2)), 3)[1:]
  resumed = iter(dataset(2))
  resumed.set_state(state)
  for a, b, c in zip(expected, again, _batches(resumed, 2), strict=True):
    _assert_same(a, b)
    _assert_same(a, c)
  plain = _batches(iter(_dataset(env, 2)), 3)[1:]
  for a, b in zip(expected, plain, strict=True):
    _assert_same({k: v for k, v in a.items() if k != "frames"},
                 {k: v for k, v in b.items() if k != "frames"})
    assert not np.array_equal(a["frames"], b["frames"])


@pytest.fixture(scope="module")
def features(env, tmp_path_factory):
  """Feature stores of the model's ViT, in every storage type."""
  out = tmp_path_factory.mktemp("features")
  built = {}
  vision = env.model.vision
  for dtype in feature_store.STORAGE_DTYPES:
    result = feature_store.write_feature_store(
        str(out / dtype), env.data.frame_store,
        frame_encoder(vision, feature_store.storage_dtype(dtype)), model_cfg=vision.cfg,
        fingerprint=feature_store.vit_fingerprint(vision), dtype=dtype, batch_frames=48,
        progress=False)
    built[dtype] = feature_store.FeatureStore(result.path)
  return built


def test_features_equal_the_vit_of_the_stored_frames(env, features):
  exact = features["float32"]
  assert len(exact) == len(env.data.frame_store) and exact.shape == (17, 64)
  encode = jax.jit(env.model.vision.encode_frames)
  for video in list(env.data.frame_store.record_of)[:3]:
    frames = env.data.frame_store[video]
    stored = exact[video]
    np.testing.assert_array_equal(stored.indices, frames.indices)
    assert (stored.fps, stored.num_video_frames) == (frames.fps, frames.num_video_frames)
    want = np.asarray(encode(frames.frames))
    np.testing.assert_allclose(stored.features, want, rtol=1e-5, atol=1e-5)
    # Half-size storage is exactly the float32 features rounded once, and is read as stored.
    half = features["float16"][video].features
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, stored.features.astype(np.float16))
    bf16 = np.asarray(jax.numpy.asarray(stored.features).astype(jax.numpy.bfloat16))
    assert features["bfloat16"][video].features.dtype == bf16.dtype
    np.testing.assert_array_equal(features["bfloat16"][video].features, bf16)


def test_model_output_from_features_equals_output_from_frames(env, features):
  fingerprint = feature_store.vit_fingerprint(env.model.vision)
  from_frames = _encoder(env, training=True)  # rand sampling: rows are sampled like frames
  from_features = _encoder(env, training=True, feature_store=features["float32"],
                           vit_fingerprint=fingerprint)
  samples = env.samples[4:8]
  a = pipeline.assemble([from_frames(s, 2) for s in samples], env.data.layout)
  b = pipeline.assemble([from_features(s, 2) for s in samples], env.data.layout)
  assert "frames" not in b and b["features"].dtype == np.float32
  assert len(b["features"]) == len(a["frames"])
  for key in a.keys() - {"frames"}:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_allclose(env.forward(b), env.forward(a), rtol=1e-4, atol=1e-4)
  # A float16 store's features reach the device as float16 (half the host bytes and transfer).
  half = _encoder(env, training=True, feature_store=features["float16"],
                  vit_fingerprint=fingerprint)
  c = pipeline.assemble([half(s, 2) for s in samples], env.data.layout)
  assert c["features"].dtype == np.float16
  np.testing.assert_allclose(env.forward(c), env.forward(b), rtol=1e-2, atol=1e-2)


def test_a_feature_store_of_other_vit_weights_is_refused(env, features):
  other = experiment.build_model(env.config, env.data.tokenizer, seed=env.config.seed + 1)
  store = features["float16"]
  with pytest.raises(feature_store.FeatureStoreMismatch, match="not this model's"):
    _encoder(env, feature_store=store,
             vit_fingerprint=feature_store.vit_fingerprint(other.vision))
  with pytest.raises(feature_store.FeatureStoreMismatch, match="needs the model's ViT fingerprint"):
    _encoder(env, feature_store=store)
  trains_vit = env.config.copy_and_resolve_references()
  with trains_vit.unlocked():
    trains_vit.model.trainable = (*trains_vit.model.trainable, "vit")
  with pytest.raises(ValueError, match="stale"):
    pipeline.SampleEncoder(trains_vit, env.data.tokenizer, env.data.frame_store, training=True,
                           layout=env.data.layout, feature_store=store,
                           vit_fingerprint=store.fingerprint)
  with pytest.raises(ValueError, match="random_resized_crop needs frames"):
    _cropping(env, training=True, feature_store=store, vit_fingerprint=store.fingerprint)
  other_frames = copy.copy(store)
  other_frames.frame_settings = dataclasses.replace(store.frame_settings, size=64)
  with pytest.raises(feature_store.FeatureStoreMismatch, match="another frame store"):
    _encoder(env, feature_store=other_frames, vit_fingerprint=store.fingerprint)
  with pytest.raises(KeyError, match="toy/missing.mp4"):
    store["toy/missing.mp4"]
