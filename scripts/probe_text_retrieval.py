"""Can the demo's LLaMA learn the toy world's retrieval from text, and how fast? (issue #13)

The official recipe starts from a pretrained LLaMA; the demo has none. This probe is the text
half of making one: the project's `Llama` reads candidate lists in the official layout (`<VID> k
</VID> <VIDEO> ... </VIDEO>`) whose video blocks are the toy videos described in words, and is
trained on the answers only. It measures the teacher-forced accuracy of the answer's index (the
first digit of k) per window, the number the demo's re-ranking needs.

Videos come from the toy corpus generator with a seed of their own (`WORLD_SEED`), so no demo
video or dialogue is seen. Levers (see the README, "The demo", for what each measured):
- `--kinds`: the question kinds drawn per query, comma-separated: `full` (the toy corpus's
  retrieval questions and answers), `word` (one colour + shape unique in the list, official
  answer), `near` (same question, answered "The <colour> <shape> is in video k.", so the matched
  words sit next to the index), `desc` (index -> content: "What does video k show?", the
  induction direction); `--queries` per candidate list (follow-ups are chat turns).
- `--statements N`: the densest form instead: after the list one answer of N sentences "The
  <colour> <shape> is in video k." (every index supervised).
- `--shuffle p`: labels are a random subset of 1..10 in random order with probability p (no
  positional shortcut); `--compact`: blocks say "red circle up, ..." instead of sentences;
  `--induction N`: N warm-up steps on repeated random token sequences first (induction heads).

    python -m scripts.probe_text_retrieval --kinds near,desc --queries 6 --compact --shuffle 0.5 \\
        --induction 300 --steps 3000
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ivcr_jax.configs import interllava
from ivcr_jax.data import prompt, toy_corpus, toy_tokenizer
from ivcr_jax.data import tokenizer as tokenizer_lib
from ivcr_jax.models import layers
from ivcr_jax.models.llama import Llama

WORLD_SEED = 987654  # the probe's own toy videos
FIRST_WORD_ID = 259  # after <unk>, <s>, </s> and the 256 byte tokens of the toy tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--candidates", type=int, default=10)
  p.add_argument("--start_candidates", type=int, default=0,
                 help="curriculum: lists grow linearly from this many to --candidates")
  p.add_argument("--ramp_steps", type=int, default=1000, help="steps of that growth")
  p.add_argument("--kinds", default="full", help="comma-separated: full, word, near, desc")
  p.add_argument("--queries", type=int, default=1, help="questions per candidate list")
  p.add_argument("--statements", type=int, default=0, help="dense mode: sentences per list")
  p.add_argument("--shuffle", type=float, default=0.0)
  p.add_argument("--compact", action="store_true")
  p.add_argument("--induction", type=int, default=0)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--mlp", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seq", type=int, default=512, help="tokens per row (longer rows are cut)")
  p.add_argument("--positions", type=int, default=256, help="supervised positions per row")
  p.add_argument("--report_every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer_dir", default=os.path.join("/tmp", "ivcr_toy_tokenizer"))
  return p.parse_args(argv)


class World:
  """Text examples of the toy world: rendered prompt, answer spans, index character offsets."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.rng = np.random.default_rng(args.seed)
    self.specs = toy_corpus.make_video_specs(
        toy_corpus.ToyCorpusConfig(num_videos=4000, seed=WORLD_SEED))
    self.events = [frozenset((e.colour, e.shape, e.motion) for e in s.events) for s in self.specs]
    self.pairs = [frozenset((e.colour, e.shape) for e in s.events) for s in self.specs]
    self.candidates = args.candidates
    self.blocks = [", ".join(f"{e.colour} {e.shape} {e.motion}" for e in s.events)
                   if args.compact else toy_corpus.describe(s, False) for s in self.specs]

  def _candidates(self) -> tuple[list[int], list[int]]:
    """Videos (the first is the ground truth of the first query; none contains all its events)
    and their labels."""
    k, rng = self.candidates, self.rng
    gt = int(rng.integers(len(self.specs)))
    videos = [gt]
    while len(videos) < k:
      v = int(rng.integers(len(self.specs)))
      if v in videos or self.events[gt] <= self.events[v]:
        continue
      if not self.pairs[gt] & self.pairs[v] and rng.random() < 0.7:
        continue  # mostly look-alikes, as the toy retriever's distractors
      videos.append(v)
    videos = [videos[i] for i in rng.permutation(k)]
    labels = list(range(1, k + 1))
    if rng.random() < self.args.shuffle:
      labels = [int(x) for x in rng.choice(np.arange(1, 11), size=k, replace=False)]
    return videos, labels

  def _unique_pairs(self, videos: list[int], i: int) -> list[tuple[str, str]]:
    return sorted(p for p in self.pairs[videos[i]]
                  if not any(p in self.pairs[v] for j, v in enumerate(videos) if j != i))

  def _turn(self, kind: str, videos: list[int], labels: list[int], i: int
            ) -> tuple[str, str] | None:
    """(question, answer) about candidate i, or None when the kind cannot name it uniquely."""
    spec, rng, label = self.specs[videos[i]], self.rng, labels[i]
    if kind == "desc":
      return f"What does video {label} show?", f"It shows {self.blocks[videos[i]]}."
    if kind in ("word", "near"):
      unique = self._unique_pairs(videos, i)
      if not unique:
        return None
      colour, shape = unique[int(rng.integers(len(unique)))]
      question = f"Which video shows the {colour} {shape}?"
      if kind == "near":
        return question, f"The {colour} {shape} is in video {label}."
    elif any(self.events[videos[i]] <= self.events[v] for v in videos if v != videos[i]):
      return None
    else:
      d = toy_corpus.describe(spec, False)
      question = [f"Find the video where {d}.", f"I am looking for a video in which {d}.",
                  f"Show me the clip where {d} on a {spec.background} background."][
                      int(rng.integers(3))]
    d = toy_corpus.describe(spec, False)
    return question, [
        f"I understand you want to find a video. The video {label} matches your description: "
        f"{d}.",
        f"You are looking for a specific video. The video {label} is the best match, since {d}."
    ][int(rng.integers(2))]

  def example(self) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and its answers' character spans."""
    a, rng = self.args, self.rng
    videos, labels = self._candidates()
    owners = [(p, i) for i in range(len(videos)) for p in self._unique_pairs(videos, i)]
    while a.statements and not owners:  # look-alikes can leave no pair unique in a short list
      videos, labels = self._candidates()
      owners = [(p, i) for i in range(len(videos)) for p in self._unique_pairs(videos, i)]
    entries = ",".join(f"<VID> {label} </VID> <VIDEO> {self.blocks[v]} </VIDEO>"
                       for label, v in zip(labels, videos, strict=True))
    messages = [{"role": "system", "content": prompt.SYSTEM_PROMPT}]
    if a.statements:
      sentences = [f"The {c} {s} is in video {labels[i]}." for (c, s), i in
                   (owners[int(j)] for j in rng.integers(len(owners), size=a.statements))]
      messages += [{"role": "user", "content": "Candidate videos : " + entries + "."},
                   {"role": "assistant", "content": " ".join(sentences)}]
    else:
      kinds = a.kinds.split(",")
      for q in range(a.queries):
        kind = kinds[int(rng.integers(len(kinds)))]
        if q == 0 and kind == "desc":
          kind = "full"  # the list's first question is a retrieval one
        i, turn = (0 if q == 0 else int(rng.integers(len(videos)))), None
        for _ in range(20):
          turn = self._turn(kind, videos, labels, i)
          if turn:
            break
          i = int(rng.integers(len(videos)))
        if turn is None:
          break
        question, answer = turn
        messages += [{"role": "user",
                      "content": ("Candidate videos : " + entries + "." if q == 0 else "")
                      + question},
                     {"role": "assistant", "content": answer}]
    return prompt.render_with_spans(messages, "<s>", "</s>")


class Batches:
  """Token rows with the supervised positions (answer tokens) and which of them are indices."""

  def __init__(self, args: argparse.Namespace, tokenizer):
    self.args, self.tokenizer, self.world = args, tokenizer, World(args)
    self.rng = self.world.rng

  def _rows(self, texts, spans):
    a = self.args
    enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids = np.full((a.batch, a.seq), self.tokenizer.eos_token_id, np.int32)
    labels = np.zeros((a.batch, a.positions), np.int32)
    positions = np.zeros((a.batch, a.positions), np.int32)
    weight = np.zeros((a.batch, a.positions), np.float32)
    is_index = np.zeros((a.batch, a.positions), np.float32)
    for b, (text, answer_spans) in enumerate(zip(texts, spans, strict=True)):
      tokens = enc["input_ids"][b][:a.seq + 1]
      ids[b, :len(tokens) - 1] = tokens[:-1]
      index_chars = {s + m.start(1) for s, e in answer_spans
                     for m in re.finditer(r"video (\d+)", text[s:e])}
      supervised, index = [], set()
      for p, (start, _) in enumerate(enc["offset_mapping"][b][1:len(tokens)]):
        if any(s <= start < e for s, e in answer_spans):
          supervised.append(p)
          if start in index_chars:
            index.add(p)
      chosen = sorted(index) + [p for p in supervised if p not in index]
      chosen = sorted(chosen[:a.positions])
      n = len(chosen)
      positions[b, :n] = chosen
      labels[b, :n] = [tokens[p + 1] for p in chosen]
      weight[b, :n] = 1.0
      is_index[b, :n] = [p in index for p in chosen]
    return dict(ids=ids, positions=positions, labels=labels, weight=weight, is_index=is_index)

  def __call__(self, step: int = 0) -> dict[str, jax.Array]:
    a = self.args
    if a.start_candidates:
      grown = a.start_candidates + (a.candidates - a.start_candidates) * step / a.ramp_steps
      self.world.candidates = min(a.candidates, round(grown))
    texts, spans = zip(*(self.world.example() for _ in range(self.args.batch)), strict=True)
    return {k: jnp.asarray(v) for k, v in self._rows(texts, spans).items()}

  def induction(self) -> dict[str, jax.Array]:
    """`<s> x x` for random word sequences x (the second copy supervised), in the task's shapes
    so that one compilation serves both."""
    a, n = self.args, self.args.seq // 2
    x = self.rng.integers(FIRST_WORD_ID, len(self.tokenizer) - 5, size=(a.batch, n))
    rows = np.concatenate([np.ones((a.batch, 1), np.int64), x, x], 1)  # seq + 1 tokens
    supervised = np.arange(n, 2 * n)[:a.positions]
    positions = np.zeros((a.batch, a.positions), np.int32)
    positions[:, :len(supervised)] = supervised
    weight = np.zeros((a.batch, a.positions), np.float32)
    weight[:, :len(supervised)] = 1.0
    batch = dict(ids=rows[:, :-1].astype(np.int32), positions=positions,
                 labels=np.take_along_axis(rows[:, 1:], positions, 1).astype(np.int32),
                 weight=weight, is_index=weight)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def build_model(args: argparse.Namespace, vocab_size: int) -> Llama:
  cfg = interllava.get_config("demo").model
  with cfg.unlocked():
    cfg.llm.update(dict(hidden=args.hidden, depth=args.depth, heads=args.heads,
                        kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                        mlp_dim=args.mlp, vocab_size=vocab_size))
  model = Llama(cfg, lora=False, rngs=nnx.Rngs(args.seed))
  layers.fan_in_init(model, jax.random.key(args.seed + 1))
  return model


def main(argv: list[str] | None = None) -> float:
  """Trains and prints loss and index accuracy per window; returns the last window's accuracy."""
  args = parse_args(argv)
  print(vars(args), flush=True)
  tokenizer = tokenizer_lib.load_tokenizer(toy_tokenizer.build_toy_tokenizer(args.tokenizer_dir))
  model = build_model(args, len(tokenizer))
  total = args.induction + args.steps
  schedule = optax.warmup_cosine_decay_schedule(args.lr / 10, args.lr, min(100, total // 10 + 1),
                                                total, args.lr / 10)
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, b2=0.98, weight_decay=0.01)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      hidden = model.hidden_states(batch["ids"])
      logits = model.logits(jnp.take_along_axis(hidden, batch["positions"][..., None], 1))
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                 batch["labels"][..., None], -1)[..., 0]
      loss = jnp.sum(nll * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1)
      right = (jnp.argmax(logits, -1) == batch["labels"]) * batch["is_index"]
      return loss, jnp.sum(right) / jnp.maximum(jnp.sum(batch["is_index"]), 1)

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy

  batches, start, accuracy = Batches(args, tokenizer), time.perf_counter(), float("nan")
  window: list[tuple[float, float]] = []
  for i in range(total):
    warm_up = i < args.induction
    loss, acc = step(model, optimizer,
                     batches.induction() if warm_up else batches(i - args.induction))
    window.append((float(loss), float(acc)))
    if (i + 1) % args.report_every == 0 or i + 1 == total:
      loss_mean, accuracy = np.mean(window, axis=0)
      what = ("induction" if warm_up else
              f"examples {(i + 1 - args.induction) * args.batch:8d}  "
              f"candidates {batches.world.candidates:2d}  index accuracy")
      print(f"step {i + 1:6d}  loss {loss_mean:.3f}  {what} {accuracy:.3f}  "
            f"{time.perf_counter() - start:.0f} s", flush=True)
      window = []
  return float(accuracy)


if __name__ == "__main__":
  main()
