"""Generation-based evaluation: every assistant turn of a split answered by the model.

History modes:
- `oracle`: earlier turns carry the ground-truth answers (the official evaluation);
- `interactive`: earlier turns carry the model's own answers, and a moment turn that follows a
  retrieval turn is asked about the video the model picked, so an early mistake propagates (the
  paper's multi-turn protocol). A moment prediction on a video other than the ground truth
  scores IoU 0.

Prompts are rendered by the same `prompt.encode` as training (generation mode: they end at
" [/INST]"), videos are spliced by the same `assemble`, and answers are parsed by
`ivcr_jax.data.answers`, the module the loss labels use.

The model's own ranking: every retrieval turn is also scored without generation. One
teacher-forced forward pass with the ground-truth history and answer, its index written "1",
gives the model's probability of answering each of the 10 candidates (the restricted index
distribution of L_V, `losses.index_log_probs`); the candidates ranked by it give R@1/3/5 and MRR
(`metrics`), whatever the answers' wording.

Parsing (`official_parsing`): by default generated answers are read by the improved parser and
moment turns are scored against `gt_se`; the official mode reads them with the official parsers,
bugs included, and takes the ground-truth span from the answer text as the official script does
(`extract_time_ranges`). Denominators (`official_denominators`): see `metrics`; in that mode
type-[7] dialogues are not answered (`scored_dialogues`), as the official test set has none of
their turns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ivcr_jax import multihost, sharding
from ivcr_jax.data import answers
from ivcr_jax.data.pipeline import SampleEncoder, assemble
from ivcr_jax.data.records import CHAT, MOMENT, RETRIEVAL, Dialogue, Sample
from ivcr_jax.data.tokenizer import digits_of
from ivcr_jax.evaluation import metrics, plots
from ivcr_jax.evaluation.metrics import TurnResult
from ivcr_jax.jsonfile import write_json
from ivcr_jax.models.generation import Sampling, generate
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import losses

HISTORY_MODES = ("oracle", "interactive")


@dataclasses.dataclass
class Prediction:
  result: TurnResult
  prompt: str  # the rendered prompt, placeholders in place of video embeddings
  video: str | None  # the video a moment turn was asked about


def _kind(turn) -> str:
  return {RETRIEVAL: "video", MOMENT: "moment", CHAT: "chat"}[turn.kind]


@functools.partial(jax.jit, static_argnums=0)
def _index_log_probs(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, digits: jax.Array
                     ) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return losses.index_log_probs(model.hidden_states(batch), batch["index_pos"], digits,
                                model.llm.logits)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def _input_embeddings(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> jax.Array:
  """Module-level, so that evaluators of the same model graph share the compiled program."""
  return nnx.merge(graphdef, state).input_embeddings(batch)


class Evaluator:
  """Batched, jit-compiled greedy (or sampled) answers for evaluation turns.

  `stats` accumulates what `answer` did: turns answered, new tokens generated (EOS included,
  padding rows of a last partial batch excluded) and wall seconds (compilation included).
  """

  def __init__(self, model: InterLLaVA, encoder: SampleEncoder, tokenizer, generation_cfg, *,
               batch_size: int, mesh: jax.sharding.Mesh | None = None, rules=()):
    """`mesh`: the mesh `model`'s parameters live on. Every process assembles the same batches;
    each is placed on the mesh with its rows over the batch axes (all processes take part in
    every program) and the answers are gathered back to every host."""
    self.model = model
    self.encoder = encoder
    self.tokenizer = tokenizer
    self.sampling = Sampling.from_config(generation_cfg)
    self.batch_size = batch_size
    self.mesh, self.rules = mesh, rules
    self._graphdef, self._state = nnx.split(model)
    self.stats = {"turns": 0, "new_tokens": 0, "seconds": 0.0}

  def _place(self, batch: dict) -> dict:
    if self.mesh is None:
      return batch
    return {k: jax.device_put(v, sharding.data_sharding(self.mesh, self.rules, v.shape))
            for k, v in batch.items()}

  def answer(self, samples: Sequence[Sample], desc: str = "turns", *, progress: bool = True
             ) -> list[tuple[str, str]]:
    """(generated text, rendered prompt) for each sample's last turn."""
    start = time.perf_counter()
    out = []
    for i in tqdm(range(0, len(samples), self.batch_size), desc=desc, unit="batch",
                  leave=False, disable=not (progress and multihost.is_main())):
      chunk = samples[i:i + self.batch_size]
      elements = [self.encoder(s, generation=True) for s in chunk]
      batch = assemble(elements + elements[-1:] * (self.batch_size - len(elements)),
                       self.encoder.layout)
      embeds = _input_embeddings(self._graphdef, self._state, self._place(batch))
      gen = generate(self.model.llm, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                     sampling=self.sampling, eos_token_id=self.tokenizer.eos_token_id)
      tokens, lengths = multihost.host_array(gen.tokens), multihost.host_array(gen.lengths)
      for j, el in enumerate(elements):
        text = self.tokenizer.decode(tokens[j, :lengths[j]], skip_special_tokens=True).strip()
        out.append((text, el["encoded"].text))
      self.stats["new_tokens"] += int(lengths[:len(elements)].sum())
    self.stats["turns"] += len(samples)
    self.stats["seconds"] += time.perf_counter() - start
    return out

  def index_scores(self, samples: Sequence[Sample]) -> np.ndarray:
    """`[N, 10]` log-probabilities of answering index 1..10 in each sample's last turn, a
    retrieval answer teacher-forced with its index written "1" (`ranking_sample`); one forward
    pass per batch, no generation."""
    digits = jnp.asarray(digits_of(self.tokenizer))
    out = []
    for i in tqdm(range(0, len(samples), self.batch_size), desc="ranking", unit="batch",
                  leave=False, disable=not multihost.is_main()):
      chunk = samples[i:i + self.batch_size]
      elements = [self.encoder(s) for s in chunk]
      batch = assemble(elements + elements[-1:] * (self.batch_size - len(elements)),
                       self.encoder.layout)
      if not batch["index_valid"][:len(chunk), 0].all():
        raise ValueError(f"a ranking sample's answer has no index to score (dialogues "
                         f"{[s.dialogue.name for s in chunk]})")
      scores = _index_log_probs(self._graphdef, self._state, self._place(batch), digits)
      out.append(multihost.host_array(scores)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def ranking_sample(dialogue: Dialogue, t: int) -> Sample:
  """Turn t (a retrieval turn) supervised, its ground-truth answer's index written "1": the
  tokens up to that digit are all the index distribution depends on, and after a "1" both
  P(1) and P(10) can be read (`losses.index_log_probs`)."""
  turn = dialogue.turns[t]
  found = answers.find_video_index(turn.answer)
  if turn.kind != RETRIEVAL or found is None:
    raise ValueError(f"{dialogue.name} turn {t + 1} is not a retrieval answer naming a video")
  answer = turn.answer[:found.start] + "1" + turn.answer[found.end:]
  turns = (*dialogue.turns[:t], dataclasses.replace(turn, answer=answer), *dialogue.turns[t + 1:])
  return Sample(dataclasses.replace(dialogue, turns=turns), t + 1, (t,))


def with_ranking(evaluator: Evaluator, dialogues: Sequence[Dialogue],
                 preds: Sequence[Prediction]) -> list[Prediction]:
  """`preds` with the model's index scores on every retrieval turn (ground-truth history)."""
  items = [(d, t) for d in dialogues for t, turn in enumerate(d.turns) if turn.kind == RETRIEVAL]
  scores = evaluator.index_scores([ranking_sample(d, t) for d, t in items])
  by_turn = {(str(d.index), t + 1): tuple(map(float, s))
             for (d, t), s in zip(items, scores, strict=True)}
  return [dataclasses.replace(p, result=dataclasses.replace(
      p.result, index_scores=by_turn.get((p.result.dialogue_id, p.result.turn))))
          for p in preds]


def _result(dialogue: Dialogue, t: int, text: str, video_ok: bool, official_parsing: bool
            ) -> TurnResult:
  turn = dialogue.turns[t]
  kind = _kind(turn)
  pred_index = answers.predicted_index(text, official=official_parsing) if kind == "video" else None
  pred_span = (answers.predicted_span(text, official=official_parsing)
               if kind == "moment" and video_ok else None)
  gt_span = None
  if kind == "moment":  # the official script reads the span of the answer text
    gt_span = answers.parse_span(turn.answer) if official_parsing else turn.gt_span
  return TurnResult(
      dialogue_id=str(dialogue.index), turn=t + 1, kind=kind, reference=turn.answer,
      prediction=text, gt_index=turn.video_index if kind == "video" else None,
      pred_index=pred_index if pred_index is not None and 1 <= pred_index <= 10 else None,
      gt_in_candidates=turn.video_id in turn.candidates if kind == "video" else True,
      gt_span=gt_span, pred_span=pred_span)


def evaluate_dialogues(evaluator: Evaluator, dialogues: Sequence[Dialogue], history: str, *,
                       official_parsing: bool = False) -> list[Prediction]:
  """Answers every turn of `dialogues` under `history` mode; `official_parsing` picks the parser
  of the generated answers (and of the model's choice carried forward in interactive mode)."""
  if history not in HISTORY_MODES:
    raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
  preds: list[Prediction] = []
  if history == "oracle":
    items = [(d, t) for d in dialogues for t in range(len(d.turns))]
    samples = [Sample(d, t + 1, ()) for d, t in items]
    for (d, t), (text, prompt_text) in zip(items, evaluator.answer(samples, "oracle turns"),
                                           strict=True):
      turn = d.turns[t]
      preds.append(Prediction(_result(d, t, text, True, official_parsing), prompt_text,
                              turn.video_id if turn.kind == MOMENT else None))
    return preds
  # Interactive: turn by turn across dialogues, each dialogue rewritten with its own answers.
  current = list(dialogues)
  for t in range(max(len(d.turns) for d in dialogues)):
    active = [i for i, d in enumerate(current) if t < len(d.turns)]
    outputs = evaluator.answer([Sample(current[i], t + 1, ()) for i in active],
                               f"interactive turn {t + 1}")
    for i, (text, prompt_text) in zip(active, outputs, strict=True):
      d = current[i]
      turn = d.turns[t]
      video_ok = turn.kind != MOMENT or turn.video_id == dialogues[i].turns[t].video_id
      preds.append(Prediction(_result(dialogues[i], t, text, video_ok, official_parsing),
                              prompt_text, turn.video_id if turn.kind == MOMENT else None))
      current[i] = _carry_forward(d, t, text, official_parsing)
  return preds


def _carry_forward(d: Dialogue, t: int, text: str, official_parsing: bool = False) -> Dialogue:
  """`d` with turn t's answer replaced by the model's, and a following moment turn pointed at
  the candidate the model chose."""
  turns = list(d.turns)
  turns[t] = dataclasses.replace(turns[t], answer=text)
  nxt = t + 1
  if (turns[t].kind == RETRIEVAL and nxt < len(turns) and turns[nxt].kind == MOMENT):
    k = answers.predicted_index(text, official=official_parsing)
    cands = turns[t].candidates
    if k is not None and 1 <= k <= len(cands):
      turns[nxt] = dataclasses.replace(turns[nxt], video_id=cands[k - 1], video_index=k)
  return dataclasses.replace(d, turns=tuple(turns))


def scored_dialogues(dialogues: Sequence[Dialogue], official_denominators: bool
                     ) -> list[Dialogue]:
  """The dialogues to answer: all of them, or with the official denominators those the official
  test conversion keeps (B10 empties type [7]; their turns stay in the denominators as misses)."""
  if not official_denominators:
    return list(dialogues)
  return [d for d in dialogues if d.type != metrics.OFFICIAL_UNSCORED_TYPE]


def write_outputs(preds: Sequence[Prediction], out_dir: str, *, official_parsing: bool = False,
                  denominators: metrics.Denominators | None = None) -> dict:
  """predictions.jsonl, metrics.json, per_turn.md and the PNG plots under `out_dir`.

  metrics.json says which parser and which denominators (with their counts) made the figures."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
    for p in preds:
      r = p.result
      f.write(json.dumps({
          "dialogue": r.dialogue_id, "turn": r.turn, "type": r.kind, "prompt": p.prompt,
          "video": p.video, "generated": r.prediction, "parsed_index": r.pred_index,
          "parsed_span": r.pred_span, "gt_answer": r.reference, "gt_index": r.gt_index,
          "gt_span": r.gt_span, "index_log_probs": r.index_scores,
          "model_rank": metrics.model_rank(r)}, ensure_ascii=False) + "\n")
  results = [p.result for p in preds]
  out = metrics.compute(results, denominators=denominators)
  out["parsing"] = "official" if official_parsing else "improved"
  write_json(os.path.join(out_dir, "metrics.json"), out)
  with open(os.path.join(out_dir, "per_turn.md"), "w", encoding="utf-8") as f:
    f.write(metrics.per_turn_markdown(out["per_turn"]))
  plots.per_turn_bars(out["per_turn"], os.path.join(out_dir, "per_turn.png"),
                      warnings=out["warnings"])
  moment = [r for r in results if r.kind == "moment"]
  plots.iou_histogram([metrics.iou(r.pred_span, r.gt_span) for r in moment],
                      os.path.join(out_dir, "iou_histogram.png"),
                      unparsed=sum(r.pred_span is None for r in moment))
  return out
