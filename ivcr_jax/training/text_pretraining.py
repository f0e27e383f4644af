"""Pretraining the demo's LLaMA on the toy world in words (issue #13; `ivcr_jax.pretrain_llm`).

A plain causal-LM run over `data.toy_text` batches: loss on the answers' tokens only, logits
computed only at those positions, the train state `{params, opt, step}` donated to one jitted
step, AdamW with the project's schedule (`training.optimizer`), orbax checkpoints and exact
resumption (the batch of a step is a pure function of the world seed and the step). Besides the
loss it logs what the demo needs from this model: `index_acc`, the share of retrieval answers
whose index's first digit is predicted (teacher-forced; chance is 0.1, and the first question of
a list, whose answer is the retriever's ground truth, has the rank prior to lean on), and
`span_acc`, the same over the digits of moment spans, both on the training batches and on a
held-out stream of the world. `index_acc_first` / `index_acc_follow` split it by question (a
follow-up has no prior: it measures the matching alone), and `index_acc_follow2` etc. by the
number of events the named video has.

A question naming two or three events is answered by the candidate that shows all of them, and
its look-alikes share all but one: a lookup of the whole question at once cannot tell them apart
unless each event's words are bound together first. With `train.lookup_weight` > 0, a linear
probe (`init_probe`; training only, not exported) reads the last hidden state at the end of each
event phrase, in the blocks and in the questions, and is trained to say which of the candidates
written so far show that event: the LLaMA is taught the two hops the answer is built from (which
block a token stands in, and where else its event appears; `lookup_acc`: the share of events
whose candidate set the probe gets exactly right, `lookup_acc_block` / `lookup_acc_question` by
where the event is written).

With `train.question_weight` > 0 the user's questions' tokens are trained too: after "Find:
cyan square" the next word is the listed cyan square's motion, so each question also asks one
lookup per attribute it names (`scripts/probe_lookup.py --question_weight` measures the effect on
the answers' accuracy in a token-level version of the lists).

With `world.answer_gap_every` > 0 the training rows' follow-ups read their index right after the
question and the answer template is grown back token by token (`toy_text.TextWorldConfig`);
`heldout_gap_index_acc*` then measure the held-out lists in that form, beside the whole-template
`heldout_*`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from ivcr_jax.data import toy_text
from ivcr_jax.models import layers
from ivcr_jax.models.llama import FAN_IN_EMBEDDING_STD, Llama
from ivcr_jax.training import optimizer
from ivcr_jax.training.checkpointing import Checkpointer, abstract_like
from ivcr_jax.training.history import RunHistory
from ivcr_jax.training.step import NonFiniteLossError

HELDOUT_STREAM = 1  # the world's stream of held-out examples (training draws from stream 0)
HITS, COUNT = "/hits", "/count"  # a per-group metric's summands, pooled by `_pool`


def world_config(config: ml_collections.ConfigDict) -> toy_text.TextWorldConfig:
  return toy_text.TextWorldConfig(**config.world.to_dict())


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> Llama:
  m = config.model.copy_and_resolve_references()
  with m.unlocked():
    m.llm.vocab_size = vocab_size
  model = Llama(m, lora=False, rngs=nnx.Rngs(config.seed))
  if "llm" in tuple(m.get("fan_in_init", ())):
    layers.fan_in_init(model, jax.random.key(config.seed + 1),
                       embedding_std=FAN_IN_EMBEDDING_STD)
  return model


def batches(config: ml_collections.ConfigDict, tokenizer, stream: int = 0
            ) -> Callable[..., dict[str, np.ndarray]]:
  """`batch_at(step, gap_of=None)`: the encoded batch of `step` in `stream`, the same on every
  call; with `gap_of`, the follow-ups keep the template of training step `gap_of` (the
  world's `answer_gap_at`) instead of the stream's own."""
  world = toy_text.TextWorld(world_config(config), stream)
  d = config.data

  def batch_at(step: int, gap_of: int | None = None) -> dict[str, np.ndarray]:
    examples = world.examples(step, config.train.batch_size)
    gap = world.answer_gap(step) if gap_of is None else world.cfg.answer_gap_at(gap_of)
    return toy_text.encode_batch(examples, tokenizer, seq_len=d.seq_len, positions=d.positions,
                                 lookups=d.lookups, num_candidates=config.world.num_candidates,
                                 questions=(config.train.question_tokens
                                            if config.train.question_weight > 0 else ""),
                                 answer_gap=gap)

  return batch_at


def init_probe(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The lookup probe: a linear map from the LLM's last hidden state at the end of an event's
  phrase to one logit per candidate ("this candidate shows the event"). Training only: it is
  not part of the LLaMA and is not exported."""
  hidden, k = config.model.llm.hidden, config.world.num_candidates
  kernel = jax.random.normal(jax.random.key(config.seed + 2), (hidden, k)) / np.sqrt(hidden)
  return {"kernel": kernel, "bias": jnp.zeros((k,))}


def _metrics(model: Llama, probe: dict[str, jax.Array], batch: dict, lookup_weight: float,
             question_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective (the answers' cross-entropy + `question_weight` x the questions' +
  `lookup_weight` x the probe's) and metrics."""
  hidden = model.hidden_states(batch["ids"])
  picked = jnp.take_along_axis(hidden, batch["position"][..., None], axis=1)
  logits = model.logits(picked).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][..., None], -1)[..., 0]
  right = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  share = lambda x, w: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  loss = share(nll, batch["weight"])
  group = batch["index_group"]
  is_index = (group > 0).astype(jnp.float32)
  metrics = {"loss": loss, "token_acc": share(right, batch["weight"]),
             "index_acc": share(right, is_index), "index_nll": share(nll, is_index),
             "span_acc": share(right, batch["is_span"])}
  objective = loss
  if question_weight:
    metrics["question_loss"] = share(nll, batch["is_question"])
    metrics["question_acc"] = share(right, batch["is_question"])
    objective += question_weight * metrics["question_loss"]
  if lookup_weight:  # the probe's figures mean nothing while it is not trained
    at_events = jnp.take_along_axis(hidden, batch["lookup_position"][..., None], axis=1)
    shows = at_events.astype(jnp.float32) @ probe["kernel"] + probe["bias"]
    target = batch["lookup_target"]
    metrics["lookup_loss"] = share(optax.sigmoid_binary_cross_entropy(shows, target).mean(-1),
                                   batch["lookup_weight"])
    exact = jnp.all((shows > 0) == (target > 0.5), axis=-1).astype(jnp.float32)
    metrics["lookup_acc"] = share(exact, batch["lookup_weight"])
    asked = batch["lookup_in_question"]
    for name, member in (("block", batch["lookup_weight"] * (1 - asked)), ("question", asked)):
      metrics[f"lookup_acc_{name}{HITS}"] = jnp.sum(exact * member)
      metrics[f"lookup_acc_{name}{COUNT}"] = jnp.sum(member)
    objective += lookup_weight * metrics["lookup_loss"]
  # Per question group, hits and counts (pooled over a window by `_pool`: a group can be
  # absent from a batch).
  for kind in ("first", "follow"):
    names = [g for g in toy_text.INDEX_GROUPS if g.startswith(kind)]
    codes = [1 + toy_text.INDEX_GROUPS.index(g) for g in names]
    for name, member in [(kind, jnp.isin(group, jnp.asarray(codes))),
                         *[(n, group == c) for n, c in zip(names, codes, strict=True)]]:
      metrics[f"index_acc_{name}{HITS}"] = jnp.sum(right * member)
      metrics[f"index_acc_{name}{COUNT}"] = jnp.sum(member).astype(jnp.float32)
  return objective, metrics


def _pool(rows: list[dict[str, float]]) -> dict[str, float]:
  """The mean of each metric over `rows`; `name/hits` and `name/count` pairs become `name`,
  their pooled ratio (left out while the window has no such item)."""
  out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]
         if not k.endswith((HITS, COUNT))}
  for key in rows[0]:
    if key.endswith(HITS):
      name = key[:-len(HITS)]
      count = sum(r[name + COUNT] for r in rows)
      if count:
        out[name] = sum(r[key] for r in rows) / count
  return out


def _device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items() if k != "cut_rows"}


def pretrain(config: ml_collections.ConfigDict, workdir: str, tokenizer) -> tuple[Llama, dict]:
  """Trains (or resumes) in `workdir`; returns the model and the last held-out measure."""
  tc = config.train
  model = build_model(config, len(tokenizer))
  graphdef, llm = nnx.split(model)
  params = {"llm": llm, "probe": init_probe(config)}
  tx = optimizer.make_optimizer(tc)
  world_cfg = world_config(config)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  logging.info("toy LLM: %s parameters", f"{sum(x.size for x in jax.tree.leaves(llm)):,}")

  def objective(p, batch):
    return _metrics(nnx.merge(graphdef, p["llm"]), p["probe"], batch, tc.lookup_weight,
                    tc.question_weight)

  def train_step(state, batch):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
            "step": state["step"] + 1}, metrics

  step_fn = jax.jit(train_step, donate_argnums=(0,))
  measure_fn = jax.jit(lambda p, batch: objective(p, batch)[1])
  batch_at = batches(config, tokenizer)
  heldout_at = batches(config, tokenizer, HELDOUT_STREAM)
  heldout = [heldout_at(i) for i in range(config.data.heldout_batches)]

  def measure(params, gap_of: int) -> dict[str, float]:
    """The held-out stream's figures (`heldout_*`, the whole template); while the follow-ups'
    template is being grown, also the index accuracies on the held-out lists with the gap of
    training step `gap_of` (`heldout_gap_*`: is the lookup learnt where training reads it?),
    until the template is whole again."""
    pooled = lambda rows: _pool([{k: float(v) for k, v in jax.device_get(
        measure_fn(params, _device_batch(b))).items()} for b in rows])
    out = {f"heldout_{k}": v for k, v in pooled(heldout).items()}
    if world_cfg.answer_gap_at(gap_of) is not None:
      gapped = [heldout_at(i, gap_of=gap_of) for i in range(config.data.heldout_batches)]
      grown = all(np.array_equal(g["ids"], h["ids"]) for g, h in zip(gapped, heldout,
                                                                     strict=True))
      if not grown:  # once the whole template is back, the figures are `heldout_*`'s
        out.update({f"heldout_gap_{k}": v for k, v in pooled(gapped).items()
                    if k.startswith("index_acc")})
    return out

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  start = 0
  resumed = ckpt.restore_latest(abstract_like(state))
  if resumed is not None:
    state, _, start = resumed
    logging.info("resumed the toy LLM from step %d", start)
  end = min(tc.num_steps, tc.stop_after) if tc.stop_after else tc.num_steps
  history = RunHistory(workdir, start)
  pending, cut, t0, last = [], 0, time.perf_counter(), {}
  try:
    for i in tqdm(range(start, end), initial=start, total=tc.num_steps, desc="toy LLM",
                  unit="step", dynamic_ncols=True):
      batch = batch_at(i)
      cut += int(batch["cut_rows"])
      state, metrics = step_fn(state, _device_batch(batch))
      pending.append(metrics)
      step = i + 1
      due_eval = step % tc.eval_every == 0 or step == end
      due_ckpt = step % tc.checkpoint_every == 0 or step == end
      if step % tc.log_every == 0 or due_eval or due_ckpt:
        rows = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        row = _pool(rows)
        if not np.isfinite(row["loss"]) or not np.isfinite(row["grad_norm"]):
          raise NonFiniteLossError(f"toy LLM loss or gradient non-finite before step {step}; "
                                   f"the last good checkpoint is step {ckpt.latest_step()}")
        row["lr"] = float(optimizer.learning_rate(tc)(i))
        if (gap := world_cfg.answer_gap_at(i)) is not None:
          row["answer_gap"] = gap
        if (most := world_cfg.events_at(i)) is not None:
          row["most_events"] = most
        row["cut_rows"] = cut / (len(rows) * tc.batch_size)
        row["steps_per_s"] = len(rows) / (time.perf_counter() - t0)
        if due_eval:
          last = measure(state["params"], i)
          row.update(last)
        history.add(step, row)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if due_ckpt:
          ckpt.save(step, state, force=step == end, meta={"loss": row["loss"]})
        pending, cut, t0 = [], 0, time.perf_counter()
  finally:
    ckpt.close()
    history.close()
  if not last:  # resumed at the end: measure what was restored
    last = measure(state["params"], end - 1)
  return nnx.merge(graphdef, state["params"]["llm"]), {"step": end, **last}
