"""The batched video branch, its sharding, dropout/remat switches and the trainable groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.data.pipeline import frame_slots
from ivcr_jax.models import trainable
from ivcr_jax.models.vision_tower import VisionTower
from ivcr_jax.video_windows import num_windows


def _tower(cfg, seed=0):
  return VisionTower(cfg.model, rngs=nnx.Rngs(seed))


def _inputs(cfg, num_frames, text_lens, t_max, l_max, seed=0):
  """Random ViT features and right-padded timestamp text for videos of different lengths."""
  rng = np.random.default_rng(seed)
  v = len(num_frames)
  n_tokens = 1 + (cfg.model.vit.image_size // cfg.model.vit.patch_size) ** 2
  feats = rng.normal(size=(v, t_max, n_tokens, cfg.model.vit.width)).astype(np.float32)
  ids = np.full((v, t_max, l_max), 2, np.int32)
  mask = np.zeros((v, t_max, l_max), bool)
  for i, (t, lens) in enumerate(zip(num_frames, text_lens, strict=True)):
    for f in range(t):
      n = lens[f]
      ids[i, f, :n] = rng.integers(3, 100, n)
      mask[i, f, :n] = True
  return feats, ids, mask


def _packed(num_frames, *padded, order=None):
  """The frame table of videos padded to `[V, T, ...]` (`pipeline.frame_slots` layout, or its
  rows permuted by `order` with the padding rows among them) and its `frame_slot`."""
  tables = [np.concatenate([x[i, :t] for i, t in enumerate(num_frames)]) for x in padded]
  slot = frame_slots(num_frames, len(num_frames), padded[0].shape[1])
  if order is None:
    return (*tables, slot)
  tables = [np.concatenate([x, np.zeros_like(x[:len(order) - len(x)])])[np.argsort(order)]
            for x in tables]
  return (*tables, np.where(slot >= 0, np.asarray(order)[np.maximum(slot, 0)], -1))


def _official_loop(tower, feats, ids, mask, t, cfg):
  """The official algorithm for one unpadded video: Q-Former over its frames with text padded to
  its own longest string, + frame positions, then one video Q-Former call per window."""
  num_q = cfg.model.qformer.num_query_tokens
  length = int(mask[:t].sum(-1).max())
  queries = jnp.broadcast_to(tower.query_tokens[...], (t, num_q, tower.query_tokens.shape[-1]))
  hidden = tower.qformer(queries, feats[:t], text_ids=jnp.asarray(ids[:t, :length]),
                         text_mask=jnp.asarray(mask[:t, :length]))
  hidden = hidden + tower.frame_position_embedding(jnp.arange(t))[:, None, :]
  outputs = []
  for start in range(0, t, cfg.model.video.stride):
    clip = hidden[start:start + cfg.model.video.window]
    keys = clip.reshape(1, -1, clip.shape[-1])
    vq = tower.video_query_tokens[...]
    outputs.append(tower.projection(tower.video_qformer(vq, keys))[0])
  return jnp.concatenate(outputs, axis=0)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 5)])
def test_packed_frames_and_windows_equal_official_loop(tiny_config, window, stride):
  """Tokens and their gradients with respect to the features, from a packed frame table whose
  rows are out of order with padding rows among them, equal the official per-video loop; the
  Q-Formers see exactly the real frames (one table row each, no padding frames)."""
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.video.window, cfg.model.video.stride = window, stride
  tower = _tower(cfg)
  num_frames = [13, 6]  # 13 is not a multiple of the window; the 2nd video is shorter
  text_lens = [[5 + f % 3 for f in range(13)], [4] * 6]
  t_max, l_max = 16, 9  # static padding beyond every video's own length
  feats, ids, mask = _inputs(cfg, num_frames, text_lens, t_max, l_max)
  order = np.random.default_rng(1).permutation(22)  # 19 real frames and 3 padding rows
  table, table_ids, table_mask, slot = _packed(num_frames, feats, ids, mask, order=order)
  num_vq = cfg.model.video_qformer.num_query_tokens
  cotangent = np.random.default_rng(2).normal(
      size=(2, num_windows(t_max, stride) * num_vq, cfg.model.llm.hidden)).astype(np.float32)

  def batched(table):
    tokens, valid = tower(table, jnp.asarray(slot), text_ids=table_ids, text_mask=table_mask)
    return jnp.sum(jnp.where(valid[..., None], tokens * cotangent, 0.0)), (tokens, valid)

  (_, (tokens, valid)), grad = jax.jit(jax.value_and_grad(batched, has_aux=True))(table)
  assert tokens.shape == cotangent.shape
  for v, t in enumerate(num_frames):
    loop = lambda f, v=v, t=t: _official_loop(tower, f, ids[v], mask[v], t, cfg)
    want, vjp = jax.vjp(loop, jnp.asarray(feats[v]))
    assert int(valid[v].sum()) == want.shape[0] == tower.tokens_per_video(t)
    got = tokens[v][np.asarray(valid[v])]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    (want_grad,) = vjp(jnp.asarray(cotangent[v][np.asarray(valid[v])]))
    np.testing.assert_allclose(np.asarray(grad)[slot[v, :t]], np.asarray(want_grad)[:t],
                               atol=2e-5, rtol=0)
  padding_rows = np.setdiff1d(np.arange(len(order)), slot[slot >= 0])
  assert len(padding_rows) == 3 and not np.asarray(grad)[padding_rows].any()


def test_frames_to_tokens_end_to_end(tiny_config):
  tower = _tower(tiny_config)
  size = tiny_config.model.vit.image_size
  frames = jax.random.randint(jax.random.key(0), (13, size, size, 3), 0, 256).astype(jnp.uint8)
  feats = tower.encode_frames(frames)
  assert feats.shape[0] == 13
  tokens, valid = tower(feats, jnp.asarray(frame_slots([9, 4], 2, 9)))
  assert tokens.shape == (2, 16, tiny_config.model.llm.hidden)
  assert valid.sum(1).tolist() == [16, 8]
  assert bool(jnp.isfinite(tokens).all())


def test_dropout_only_in_training_and_remat_keeps_gradients(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  feats, ids, mask, slot = _packed([10], *_inputs(cfg, [10], [[6] * 10], 10, 6))

  def make_loss(graphdef):
    def loss(state, key):
      tokens, _ = nnx.merge(graphdef, state)(feats, slot, text_ids=ids, text_mask=mask,
                                             dropout_key=key)
      return jnp.sum(tokens**2)
    return loss

  graphdef, state = nnx.split(_tower(cfg))
  loss = jax.jit(make_loss(graphdef))
  eval_a, eval_b = loss(state, None), loss(state, None)
  train_a, train_b = loss(state, jax.random.key(1)), loss(state, jax.random.key(1))
  assert eval_a == eval_b and train_a == train_b and train_a != eval_a
  assert loss(state, jax.random.key(2)) != train_a
  grads = jax.jit(jax.grad(make_loss(graphdef)))(state, jax.random.key(1))
  for policy in ("full", "minimal"):
    with cfg.unlocked():
      cfg.model.qformer.remat_policy = cfg.model.video_qformer.remat_policy = policy
    remat_graphdef, _ = nnx.split(_tower(cfg))
    remat_grads = jax.jit(jax.grad(make_loss(remat_graphdef)))(state, jax.random.key(1))
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(remat_grads),
                                 strict=True):
      np.testing.assert_allclose(np.asarray(r[...]), np.asarray(g[...]), atol=1e-5,
                                 err_msg=f"{policy} {path}")


def test_frame_chunks_equal_the_whole_table(tiny_config):
  """The ViT and image Q-Former over the frame table in 3 chunks (rematerialised, a table
  that 3 does not divide) give the tokens and gradients of one pass over the whole table."""
  cfg = tiny_config.copy_and_resolve_references()
  size = cfg.model.vit.image_size
  frames = np.random.default_rng(4).integers(0, 256, (2, 9, size, size, 3), dtype=np.uint8)
  _, ids, mask = _inputs(cfg, [9, 5], [[4] * 9, [6] * 5], 9, 6)
  frames, ids, mask, slot = _packed([9, 5], frames, ids, mask)  # 14 rows
  results = []
  for chunks, policy in ((1, "none"), (3, "full")):
    with cfg.unlocked():
      cfg.model.video.frame_chunks, cfg.model.qformer.remat_policy = chunks, policy
    graphdef, state = nnx.split(_tower(cfg))

    def loss(state, frames, graphdef=graphdef):
      tower = nnx.merge(graphdef, state)
      tokens, valid = tower(tower.encode_frames(frames), slot, text_ids=ids, text_mask=mask)
      return jnp.sum(jnp.where(valid[..., None], tokens, 0.0) ** 2), tokens

    (_, tokens), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, frames)
    results.append((tokens, nnx.to_flat_state(grads)))
  (want, want_grads), (got, got_grads) = results
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
  for (path, g), (_, w) in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w[...]), atol=2e-5,
                               err_msg=str(path))


def test_a_frozen_vit_is_never_rematerialised(tiny_config):
  """`vit.remat_policy` applies only when the ViT is trained (the demo): a frozen ViT keeps no
  activations for a backward pass, so recomputing them would only cost time."""
  cfg = tiny_config.copy_and_resolve_references()
  frames = jnp.zeros((2, cfg.model.vit.image_size, cfg.model.vit.image_size, 3), jnp.uint8)
  for groups, policy in ((cfg.model.trainable, "none"), (("vit", "qformer"), "full")):
    with cfg.unlocked():
      cfg.model.vit.remat_policy = "full"
      cfg.model.trainable = groups
    tower = _tower(cfg)
    assert tower.vit.remat_policy == policy
    jaxpr = jax.make_jaxpr(lambda f, tower=tower: tower.encode_frames(f))(frames).jaxpr
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")  # the blocks
    remat = [e for e in scan.params["jaxpr"].jaxpr.eqns if "policy" in e.params]
    assert len(remat) == (policy != "none")


def test_sharded_tower_equals_unsharded(tiny_config):
  """The (fsdp=2, tensor=4) mesh with the config's rules gives the single-device result."""
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  cfg = tiny_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape = (1, 2, 4)
  tower = _tower(cfg)
  size = cfg.model.vit.image_size
  frames = np.asarray(jax.random.randint(jax.random.key(3), (2, 12, size, size, 3), 0, 256),
                      np.uint8)
  _, ids, mask = _inputs(cfg, [12, 8], [[5] * 12, [3] * 8], 12, 5)
  frames, ids, mask, slot = _packed([12, 8], frames, ids, mask)  # 20 frames: 2 per device
  graphdef, state = nnx.split(tower)

  def forward(state, frames, slot, ids, mask):
    model = nnx.merge(graphdef, state)
    return model(model.encode_frames(frames), slot, text_ids=ids, text_mask=mask)

  want = jax.jit(forward)(state, frames, slot, ids, mask)
  mesh = sharding.make_mesh(cfg.mesh)
  state_sh = sharding.state_shardings(state, mesh, cfg.mesh.rules)
  specs = [s.spec for s in jax.tree.leaves(state_sh)]
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  batch = [sharding.data_sharding(mesh, cfg.mesh.rules, np.shape(x))
           for x in (frames, slot, ids, mask)]
  assert batch[0].spec[0] == batch[1].spec[0] == "fsdp"  # 20 frames and 2 videos over fsdp=2
  with jax.set_mesh(mesh):
    sharded_state = jax.device_put(state, state_sh)
    got = jax.jit(forward, in_shardings=(state_sh, *batch))(
        sharded_state, frames, slot, ids, mask)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0)


def test_trainable_groups_follow_the_official_split(tiny_config):
  tower = _tower(tiny_config)
  graphdef, train, frozen = trainable.split_trainable(tower, tiny_config.model.trainable)
  train_roots = {p[0] for p, _ in nnx.to_flat_state(train)}
  frozen_roots = {p[0] for p, _ in nnx.to_flat_state(frozen)}
  assert train_roots == {"qformer", "query_tokens", "frame_position_embedding", "video_qformer",
                         "video_query_tokens", "projection"}
  assert frozen_roots == {"vit"}  # the ViT and its ln_vision
  assert any("ln_vision" in p for p, _ in nnx.to_flat_state(frozen))
  with pytest.raises(ValueError, match="unknown trainable groups"):
    trainable.trainable_filter(["vision"])
  lora_only = trainable.trainable_filter(["lora"])
  assert lora_only(("llm", "layers", "q_proj", "lora_a"), nnx.Param(jnp.zeros(1)))
  assert not lora_only(("llm", "layers", "q_proj", "kernel"), nnx.Param(jnp.zeros(1)))
