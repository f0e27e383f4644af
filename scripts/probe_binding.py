"""Can the demo's LLaMA learn to pick a candidate video from scratch, and after how many examples?

The retrieval answer needs an in-context binding: the answer position has to find the video block
that matches the query and read the index written before that block (`<VID> k </VID> <VIDEO>
... </VIDEO>`). This probe isolates that step: the project's LLaMA alone, the official candidate
layout, each video block made of `--video_tokens` feature vectors (a learned embedding of the
video's colour, shape and motion plus noise, standing in for the vision tower), and a query naming
the ground truth's colour and shape (all candidates differ in that pair) or its colour, shape and
motion (`--full_query`). Loss: cross-entropy of the index token at the answer position.

`--index_hint S` adds S times the index token's embedding to every video token of its block, i.e.
gives the first hop (block -> its index) for free. `--candidates 2` is solvable by a shortcut
(does the last block match?) and so learns quickly; it does not transfer to 10 candidates.

    python -m scripts.probe_binding --steps 1500            # 2x64 as the demo, batch 16
    python -m scripts.probe_binding --candidates 2 --steps 1000
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import interllava
from ivcr_jax.models import layers
from ivcr_jax.models.llama import Llama

COLOURS, SHAPES, MOTIONS = 8, 3, 5
# Token ids of the probe's own vocabulary.
(BOS, INST, END_INST, CANDIDATE, VIDEOS, COLON, VID, END_VID, VIDEO, END_VIDEO, COMMA, DOT, FIND,
 WHERE, THE, VIDEO_WORD) = range(16)
DIGIT = 20  # index k is token DIGIT + k
COLOUR_WORD, SHAPE_WORD, MOTION_WORD = 40, 50, 60
VOCAB = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--candidates", type=int, default=10)
  p.add_argument("--video_tokens", type=int, default=8, help="tokens per video block (demo: 8)")
  p.add_argument("--full_query", action="store_true", help="query colour, shape and motion")
  p.add_argument("--index_hint", type=float, default=0.0)
  p.add_argument("--noise", type=float, default=0.3, help="std of the noise on video tokens")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--fan_in", action="store_true", help="1/sqrt(fan_in) kernels, not std 0.02")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--report_every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


class Batches:
  """Random candidate lists in the official layout, padded to one length."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.rng = np.random.default_rng(args.seed)
    self.length = 5 + args.candidates * (6 + args.video_tokens) + 9

  def example(self) -> tuple[list[int], list, int]:
    a = self.args
    videos: list[tuple[int, int, int]] = []
    while len(videos) < a.candidates:
      v = (int(self.rng.integers(COLOURS)), int(self.rng.integers(SHAPES)),
           int(self.rng.integers(MOTIONS)))
      key = v if a.full_query else v[:2]
      if all((u if a.full_query else u[:2]) != key for u in videos):
        videos.append(v)
    gt = int(self.rng.integers(a.candidates))
    ids, features = [BOS, INST, CANDIDATE, VIDEOS, COLON], [None] * 5
    for k, v in enumerate(videos):
      ids += [VID, DIGIT + k + 1, END_VID, VIDEO] + [DIGIT + k + 1] * a.video_tokens
      ids += [END_VIDEO, COMMA]
      features += [None] * 4 + [v] * a.video_tokens + [None] * 2
    colour, shape, motion = videos[gt]
    query = [COLOUR_WORD + colour, SHAPE_WORD + shape]
    if a.full_query:
      query.append(MOTION_WORD + motion)
    ids += [DOT, FIND, WHERE, *query, END_INST, THE, VIDEO_WORD]
    features += [None] * (len(ids) - len(features))
    return ids, features, DIGIT + gt + 1

  def __call__(self) -> dict[str, jax.Array]:
    b, s = self.args.batch, self.length
    ids = np.zeros((b, s), np.int32)
    attributes = np.zeros((b, s, COLOURS + SHAPES + MOTIONS), np.float32)
    target, last = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for i in range(b):
      seq, features, target[i] = self.example()
      ids[i, :len(seq)], last[i] = seq, len(seq) - 1
      for t, v in enumerate(features):
        if v is not None:
          attributes[i, t, [v[0], COLOURS + v[1], COLOURS + SHAPES + v[2]]] = 1.0
    return {k: jnp.asarray(x) for k, x in
            dict(ids=ids, attributes=attributes, target=target, last=last).items()}


class Probe(nnx.Module):
  """LLaMA reading text embeddings, with video positions replaced by noisy attribute features."""

  def __init__(self, args: argparse.Namespace):
    cfg = interllava.get_config("demo").model
    with cfg.unlocked():
      cfg.llm.update(dict(hidden=args.hidden, depth=args.depth, heads=args.heads,
                          kv_heads=args.heads, head_dim=args.hidden // args.heads,
                          mlp_dim=2 * args.hidden, vocab_size=VOCAB))
      cfg.lora.rank = 0
    self.llm = Llama(cfg, lora=False, rngs=nnx.Rngs(args.seed))
    if args.fan_in:
      layers.fan_in_init(self.llm, jax.random.key(args.seed + 1))
    width = COLOURS + SHAPES + MOTIONS
    self.attribute_embedding = nnx.Param(
        jax.random.normal(jax.random.key(args.seed + 2), (width, args.hidden)) / np.sqrt(3))
    self.noise, self.hint = args.noise, args.index_hint

  def __call__(self, batch: dict, key: jax.Array) -> jax.Array:
    text = self.llm.embed(batch["ids"])
    is_video = batch["attributes"].sum(-1, keepdims=True) > 0
    video = (batch["attributes"] @ self.attribute_embedding[...] + self.hint * text
             + self.noise * jax.random.normal(key, text.shape))
    return self.llm(inputs_embeds=jnp.where(is_video, video, text))


def main(argv: list[str] | None = None) -> float:
  """Trains and prints the accuracy per window; returns the last window's accuracy."""
  args = parse_args(argv)
  print(vars(args), flush=True)
  model = Probe(args)
  optimizer = nnx.Optimizer(model, optax.adamw(args.lr, b2=0.98, weight_decay=0.0),
                            wrt=nnx.Param)
  legal = DIGIT + 1 + jnp.arange(args.candidates)

  @nnx.jit
  def step(model, optimizer, batch, key):
    def loss_fn(model):
      logits = model(batch, key)
      last = jnp.take_along_axis(logits, batch["last"][:, None, None], 1)[:, 0]
      nll = -jnp.take_along_axis(jax.nn.log_softmax(last), batch["target"][:, None], 1)
      accuracy = legal[jnp.argmax(last[:, legal], -1)] == batch["target"]
      return jnp.mean(nll), jnp.mean(accuracy)

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy

  batches, start, window, acc = Batches(args), time.perf_counter(), [], float("nan")
  chance = 1 / args.candidates
  for i in range(args.steps):
    loss, accuracy = step(model, optimizer, batches(), jax.random.key(i))
    window.append(float(accuracy))
    if (i + 1) % args.report_every == 0:
      acc = float(np.mean(window))
      print(f"step {i + 1:6d}  examples {(i + 1) * args.batch:8d}  loss {float(loss):.3f}  "
            f"accuracy {acc:.3f} (chance {chance:.3f})  {time.perf_counter() - start:.0f} s",
            flush=True)
      window = []
  return acc


if __name__ == "__main__":
  main()
