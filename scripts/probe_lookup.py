"""How fast does the toy LLM learn the reverse lookup a candidate list needs, and what speeds it up?

A token-level model of the text world's retrieval question (issue #13): `--blocks` candidate
blocks in the official layout, `<VID> k </VID> [<VIDEO>] event </VIDEO>`, then `--questions`
questions `FIND event k`, each about one block (`--answer_gap G`: G template tokens before k;
`--events 1,3`: blocks of one to three events, a question naming all of its block's).
An event is one token from an alphabet of `--alphabet`, or with `--attrs 8,3,5` one token per
attribute ("colour shape motion", the text world's 120 combinations), distinct within a list;
`--lookalike P` draws each distractor, with probability P, from an earlier one with one attribute
changed. The answer k is predicted at the question's last event token (or the last template
token): the model has to match the question's event to a block's and read the index written
before it. `--block_event` says how a block shows its event: `words` (one token
per attribute), `token` (one token per combination) or `sum` (one position whose input
embedding is the sum of the attribute words' embeddings, as a video's Q-Former tokens could
be); the questions always use the words, so with `token` or `sum` only the question side has to
compose them.

`--question_weight W` adds W x the cross-entropy of the question's own attribute tokens (each
predicted from the ones before it: after "FIND red circle" the motion is the listed red
circle's), the lever `train.question_weight` of the text pretraining. The model, initialisation
(fan-in kernels, std-1 embeddings), AdamW and schedule are the text pretraining's
(`configs/toy_llm.py`, 4 layers, 4 KV heads). It prints the accuracy of k on the training
batches and on fresh lists per window.

    python -m scripts.probe_lookup                                  # one token per block
    python -m scripts.probe_lookup --attrs 8,3,5 --lookalike 0.5    # conjunctions of three
    python -m scripts.probe_lookup --attrs 8,3,5 --lookalike 0.5 --question_weight 1
    python -m scripts.probe_lookup --attrs 8,3,5 --lookalike 0.5 --block_event sum
    python -m scripts.probe_lookup --attrs 8,3,5 --lookalike 0.5 --question_weight 3 --answer_gap 4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.toy_llm import get_config
from ivcr_jax.training import optimizer, text_pretraining

# Token ids of the probe's own vocabulary: markers, then the indices, then the events' tokens.
BOS, VID, END_VID, VIDEO, END_VIDEO, FIND = range(6)
INDEX = 8  # block k (0-based) is written INDEX + k
EVENT = 40  # alphabet token a is EVENT + a
BLOCK_EVENTS = ("words", "token", "sum")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--alphabet", type=int, default=38, help="event tokens (without --attrs)")
  p.add_argument("--attrs", default="", help="values per attribute, e.g. 8,3,5")
  p.add_argument("--lookalike", type=float, default=0.0)
  p.add_argument("--events", default="1,1",
                 help="LO,HI: events per block, drawn uniformly (the text world has 1-3); a "
                 "question names all of its block's events, and only blocks whose events no "
                 "other block shows all of are asked about")
  p.add_argument("--video_marker", action="store_true", help="write <VIDEO> before the event")
  p.add_argument("--block_event", default="words", choices=BLOCK_EVENTS,
                 help="how a block shows its event (module docstring); questions use words")
  p.add_argument("--question_weight", type=float, default=0.0)
  p.add_argument("--events_every", type=int, default=0,
                 help="a curriculum: training blocks have at most 1 + step // this many events "
                 "(up to --events' HI; held-out lists have them all; 0: off)")
  p.add_argument("--answer_gap", type=int, default=0,
                 help="template tokens between a question's last event and its answer k (the "
                 "text world writes '. [/INST] The video' and a space there)")
  p.add_argument("--gap_from", type=int, default=0,
                 help="training lists have no template gap before this step (a curriculum)")
  p.add_argument("--gap_every", type=int, default=0,
                 help="from --gap_from on, the gap grows by one token every this many steps "
                 "up to --answer_gap (0: all of it at once)")
  p.add_argument("--blocks", type=int, default=10)
  p.add_argument("--questions", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=700)
  p.add_argument("--schedule_steps", type=int, default=0, help="cosine length (0: --steps)")
  p.add_argument("--report_every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


class Lists:
  """Candidate lists and their questions, as fixed-length rows of token ids."""

  def __init__(self, args: argparse.Namespace, seed: int):
    self.args = args
    self.sizes = [int(n) for n in args.attrs.split(",")] if args.attrs else [args.alphabet]
    self.min_events, self.max_events = (int(n) for n in args.events.split(","))
    if not 1 <= self.min_events <= self.max_events:
      raise ValueError(f"--events {args.events}: want LO,HI with 1 <= LO <= HI")
    if self.max_events > 1 and args.block_event != "words":
      raise ValueError("--block_event token/sum show one event per block: use --events 1,1")
    self.offsets = np.cumsum([0, *self.sizes])[:-1]
    self.combos = EVENT + sum(self.sizes)  # --block_event token: combination c is combos + c
    # --answer_gap: template token j is gap + j; then the separator of a block's events.
    self.gap = self.combos + (int(np.prod(self.sizes)) if args.block_event == "token" else 0)
    self.sep = self.gap + args.answer_gap
    self.vocab = self.sep + (self.max_events > 1)
    width = len(self.sizes)
    shown = width if args.block_event == "words" else 1
    self.length = (1 + args.blocks * (4 + args.video_marker + shown * self.max_events
                                      + self.max_events - 1)
                   + args.questions * (2 + width * self.max_events + self.max_events - 1
                                       + args.answer_gap))
    self.rng = np.random.default_rng(seed)

  def _event(self) -> tuple[int, ...]:
    return tuple(int(o + self.rng.integers(n)) for o, n in zip(self.offsets, self.sizes,
                                                                strict=True))

  def events(self, most: int | None = None) -> list[tuple[tuple[int, ...], ...]]:
    """`blocks` blocks of distinct events (at most `most`, default --events' HI); a look-alike
    copies an earlier block and changes one attribute of one of its events."""
    out: list[tuple[tuple[int, ...], ...]] = []
    several = self.max_events > 1
    most = self.max_events if most is None else max(self.min_events, min(most, self.max_events))
    while len(out) < self.args.blocks:
      if out and self.rng.random() < self.args.lookalike:
        block = [list(e) for e in out[self.rng.integers(len(out))]]
        event = block[self.rng.integers(len(block))] if several else block[0]
        j = self.rng.integers(len(self.sizes))
        event[j] = int(self.offsets[j] + self.rng.integers(self.sizes[j]))
        block = [tuple(e) for e in block]
      else:
        count = int(self.rng.integers(self.min_events, most + 1)) if several else 1
        block = [self._event() for _ in range(count)]
      if len(set(block)) == len(block) and tuple(block) not in out:
        out.append(tuple(block))
    return out

  @staticmethod
  def named(blocks: list[tuple[tuple[int, ...], ...]]) -> list[int]:
    """The blocks a question naming all of their events singles out: no other block shows all
    of them."""
    return [k for k, b in enumerate(blocks)
            if not any(set(b) <= set(c) for j, c in enumerate(blocks) if j != k)]

  def words(self, block: tuple[tuple[int, ...], ...]) -> list[int]:
    """A block's (or a question's) events as attribute tokens, separated."""
    out: list[int] = []
    for e, event in enumerate(block):
      out += [self.sep] * (e > 0) + [EVENT + t for t in event]
    return out

  def block_tokens(self, event: tuple[int, ...]) -> list[int]:
    """How a block shows `event`: its attribute tokens, one token of the combination, or (`sum`)
    its first attribute's token, to which `__call__`'s `added` adds the others."""
    mode = self.args.block_event
    if mode == "words":
      return [EVENT + t for t in event]
    if mode == "sum":
      return [EVENT + event[0]]
    values = [t - o for t, o in zip(event, self.offsets, strict=True)]
    return [self.combos + int(np.ravel_multi_index(values, self.sizes))]

  def __call__(self, batch: int, gap: int | None = None, most_events: int | None = None
               ) -> dict[str, jax.Array]:
    """`ids`, per position `answer` (1 where the next token is an answer's index) and
    `question` (1 where it is a question's next attribute), and with `--block_event sum`
    `added`: `[batch, length, attributes - 1]` tokens whose embeddings are added to the
    position's (-1: none). `gap`: template tokens before k (default `--answer_gap`; rows with
    fewer end in padding that nothing is predicted from). `most_events`: at most this many
    events per block (default --events' HI)."""
    a = self.args
    gap = a.answer_gap if gap is None else gap
    ids = np.zeros((batch, self.length), np.int32)
    answer = np.zeros((batch, self.length), np.float32)
    question = np.zeros((batch, self.length), np.float32)
    added = np.full((batch, self.length, len(self.sizes) - 1), -1, np.int32)
    for row in range(batch):
      events = self.events(most_events)
      seq = [BOS]
      for k, block in enumerate(events):
        seq += [VID, INDEX + k, END_VID, *[VIDEO] * a.video_marker]
        if a.block_event == "sum":
          added[row, len(seq)] = [EVENT + t for t in block[0][1:]]
        seq += (self.block_tokens(block[0]) if a.block_event != "words" else self.words(block))
        seq += [END_VIDEO]
      named = self.named(events)
      for k in (named[int(i)] for i in self.rng.integers(len(named), size=a.questions)):
        seq.append(FIND)
        for e in range(len(events[k])):  # each event's 2nd, 3rd, ... attribute is a target
          first = len(seq) + e * (len(self.sizes) + 1)
          question[row, first:first + len(self.sizes) - 1] = 1.0
        seq += self.words(events[k])
        seq += [self.gap + j for j in range(gap)] + [INDEX + k]
        answer[row, len(seq) - 2] = 1.0
      ids[row, :len(seq)] = seq
    out = {"ids": ids, "answer": answer, "question": question}
    if a.block_event == "sum":
      out["added"] = added
    return {k: jnp.asarray(v) for k, v in out.items()}


def train_gap(args: argparse.Namespace, step: int) -> int:
  """The template gap of training step `step` (held-out lists always have `--answer_gap`)."""
  if step < args.gap_from:
    return 0
  if not args.gap_every:
    return args.answer_gap
  return min(args.answer_gap, 1 + (step - args.gap_from) // args.gap_every)


def train_events(args: argparse.Namespace, step: int) -> int | None:
  """The most events a training block of step `step` has (None: --events' HI)."""
  return 1 + step // args.events_every if args.events_every else None


def main(argv: list[str] | None = None) -> float:
  """Trains and prints the accuracy per window; returns the last window's held-out accuracy."""
  args = parse_args(argv)
  print(vars(args), flush=True)
  train_lists, heldout_lists = Lists(args, args.seed), Lists(args, args.seed + 1)
  config = get_config("demo").unlock()
  config.seed = args.seed
  config.model.llm.update(dict(depth=args.depth, hidden=args.hidden, heads=args.heads,
                               kv_heads=args.heads, head_dim=args.hidden // args.heads,
                               mlp_dim=2 * args.hidden))
  config.train.update(dict(lr=args.lr, num_steps=args.schedule_steps or args.steps))
  graphdef, params = nnx.split(text_pretraining.build_model(config, train_lists.vocab))
  tx = optimizer.make_optimizer(config.train)

  def objective(params, batch):
    model = nnx.merge(graphdef, params)
    x = model.embed(batch["ids"])
    if "added" in batch:  # --block_event sum: the other attributes' embeddings, summed in
      more = batch["added"]
      x = x + jnp.sum(model.embed(jnp.maximum(more, 0)) * (more >= 0)[..., None], axis=-2)
    logits = model(inputs_embeds=x)[:, :-1].astype(jnp.float32)
    target = batch["ids"][:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1)[..., 0]
    right = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
    mean = lambda x, w: jnp.sum(x * w[:, :-1]) / jnp.sum(w[:, :-1])
    loss = mean(nll, batch["answer"]) + args.question_weight * mean(nll, batch["question"])
    return loss, mean(right, batch["answer"])

  @jax.jit
  def step(params, opt, batch):
    (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, accuracy

  measure = jax.jit(lambda params, batch: objective(params, batch)[1])
  opt, window, start, heldout = tx.init(params), [], time.perf_counter(), float("nan")
  for i in range(args.steps):
    gap = train_gap(args, i)
    batch = train_lists(args.batch, gap, train_events(args, i))
    params, opt, loss, accuracy = step(params, opt, batch)
    window.append(float(accuracy))
    if (i + 1) % args.report_every == 0:
      heldout = float(measure(params, heldout_lists(128)))
      print(f"step {i + 1:6d}  lists {(i + 1) * args.batch:8d}  loss {float(loss):.3f}  "
            f"accuracy {np.mean(window):.3f}  held out {heldout:.3f} (chance "
            f"{1 / args.blocks:.3f})  {time.perf_counter() - start:.0f} s", flush=True)
      window = []
  return heldout


if __name__ == "__main__":
  main()
