"""Generation-based evaluation: every assistant turn of a split answered by the model.

History modes:
- `oracle`: earlier turns carry the ground-truth answers (the official evaluation);
- `interactive`: earlier turns carry the model's own answers, and a moment turn that follows a
  retrieval turn is asked about the video the model picked, so an early mistake propagates (the
  paper's multi-turn protocol). A moment prediction on a video other than the ground truth
  scores IoU 0.

Prompts are rendered by the same `prompt.encode` as training (generation mode: they end at
" [/INST]"), videos are spliced by the same `assemble`, and answers are parsed by
`ivcr_jax.data.answers`, the parser the loss labels use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from ivcr_jax import experiment
from ivcr_jax.data import answers
from ivcr_jax.data.pipeline import SampleEncoder, assemble
from ivcr_jax.data.records import CHAT, MOMENT, RETRIEVAL, Dialogue, Sample
from ivcr_jax.evaluation import metrics, plots
from ivcr_jax.evaluation.metrics import TurnResult
from ivcr_jax.models.generation import generate
from ivcr_jax.models.interllava import InterLLaVA
from ivcr_jax.training import trainer

HISTORY_MODES = ("oracle", "interactive")


@dataclasses.dataclass
class Prediction:
  result: TurnResult
  prompt: str  # the rendered prompt, placeholders in place of video embeddings
  video: str | None  # the video a moment turn was asked about


def _kind(turn) -> str:
  return {RETRIEVAL: "video", MOMENT: "moment", CHAT: "chat"}[turn.kind]


class Evaluator:
  """Batched, jit-compiled greedy (or sampled) answers for evaluation turns."""

  def __init__(self, model: InterLLaVA, encoder: SampleEncoder, tokenizer, generation_cfg, *,
               batch_size: int):
    self.model = model
    self.encoder = encoder
    self.tokenizer = tokenizer
    self.gen = generation_cfg
    self.batch_size = batch_size
    graphdef, state = nnx.split(model)
    self._embed = jax.jit(lambda s, b: nnx.merge(graphdef, s).input_embeddings(b))
    self._state = state

  def answer(self, samples: Sequence[Sample], desc: str = "turns") -> list[tuple[str, str]]:
    """(generated text, rendered prompt) for each sample's last turn."""
    out = []
    for i in tqdm(range(0, len(samples), self.batch_size), desc=desc, unit="batch",
                  leave=False):
      chunk = samples[i:i + self.batch_size]
      elements = [self.encoder(s, generation=True) for s in chunk]
      batch = assemble(elements + elements[-1:] * (self.batch_size - len(elements)),
                       self.encoder.layout)
      embeds = self._embed(self._state, batch)
      gen = generate(self.model.llm, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                     max_new_tokens=self.gen.max_new_tokens,
                     eos_token_id=self.tokenizer.eos_token_id, do_sample=self.gen.do_sample,
                     temperature=self.gen.temperature, top_p=self.gen.top_p, seed=self.gen.seed)
      tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
      for j, el in enumerate(elements):
        text = self.tokenizer.decode(tokens[j, :lengths[j]], skip_special_tokens=True).strip()
        out.append((text, el["encoded"].text))
    return out


def _result(dialogue: Dialogue, t: int, text: str, video_ok: bool) -> TurnResult:
  turn = dialogue.turns[t]
  kind = _kind(turn)
  pred_index = answers.parse_video_index(text) if kind == "video" else None
  pred_span = answers.parse_span(text, lenient=True) if kind == "moment" and video_ok else None
  return TurnResult(
      dialogue_id=str(dialogue.index), turn=t + 1, kind=kind, reference=turn.answer,
      prediction=text, gt_index=turn.video_index if kind == "video" else None,
      pred_index=pred_index if pred_index is not None and 1 <= pred_index <= 10 else None,
      gt_in_candidates=turn.video_id in turn.candidates if kind == "video" else True,
      gt_span=turn.gt_span if kind == "moment" else None, pred_span=pred_span)


def evaluate_dialogues(evaluator: Evaluator, dialogues: Sequence[Dialogue], history: str
                       ) -> list[Prediction]:
  """Answers every turn of `dialogues` under `history` mode."""
  if history not in HISTORY_MODES:
    raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
  preds: list[Prediction] = []
  if history == "oracle":
    items = [(d, t) for d in dialogues for t in range(len(d.turns))]
    samples = [Sample(d, t + 1, ()) for d, t in items]
    for (d, t), (text, prompt_text) in zip(items, evaluator.answer(samples, "oracle turns"),
                                           strict=True):
      turn = d.turns[t]
      preds.append(Prediction(_result(d, t, text, True), prompt_text,
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
      preds.append(Prediction(_result(dialogues[i], t, text, video_ok), prompt_text,
                              turn.video_id if turn.kind == MOMENT else None))
      current[i] = _carry_forward(d, t, text)
  return preds


def _carry_forward(d: Dialogue, t: int, text: str) -> Dialogue:
  """`d` with turn t's answer replaced by the model's, and a following moment turn pointed at
  the candidate the model chose."""
  turns = list(d.turns)
  turns[t] = dataclasses.replace(turns[t], answer=text)
  nxt = t + 1
  if (turns[t].kind == RETRIEVAL and nxt < len(turns) and turns[nxt].kind == MOMENT):
    k = answers.parse_video_index(text)
    cands = turns[t].candidates
    if k is not None and 1 <= k <= len(cands):
      turns[nxt] = dataclasses.replace(turns[nxt], video_id=cands[k - 1], video_index=k)
  return dataclasses.replace(d, turns=tuple(turns))


def write_outputs(preds: Sequence[Prediction], out_dir: str) -> dict:
  """predictions.jsonl, metrics.json, per_turn.md and the PNG plots under `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
    for p in preds:
      r = p.result
      f.write(json.dumps({
          "dialogue": r.dialogue_id, "turn": r.turn, "type": r.kind, "prompt": p.prompt,
          "video": p.video, "generated": r.prediction, "parsed_index": r.pred_index,
          "parsed_span": r.pred_span, "gt_answer": r.reference, "gt_index": r.gt_index,
          "gt_span": r.gt_span}, ensure_ascii=False) + "\n")
  results = [p.result for p in preds]
  out = metrics.compute(results)
  with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(out_dir, "per_turn.md"), "w", encoding="utf-8") as f:
    f.write(metrics.per_turn_markdown(out["per_turn"]))
  plots.per_turn_bars(out["per_turn"], os.path.join(out_dir, "per_turn.png"))
  plots.iou_histogram([metrics.iou(r.pred_span, r.gt_span) for r in results if r.kind == "moment"],
                      os.path.join(out_dir, "iou_histogram.png"))
  return out


def run(config, workdir: str, *, split: str = "test", history: str = "oracle",
             step: int | None = None, max_dialogues: int = 0) -> dict:
  """Restores a run's checkpoint, answers every turn of `split`, writes the outputs under
  `workdir/eval/<split>[_interactive]` and returns the metrics (the demo's training run calls
  this too)."""
  experiment.check_inputs(config)
  data = experiment.open_data(config, workdir)
  model = experiment.build_model(config, data.tokenizer)
  step = trainer.load_trained(config, os.path.join(workdir, "checkpoints"), model, step)
  dialogues = data.dialogues(split)
  if max_dialogues:
    dialogues = dialogues[:max_dialogues]
  ev = Evaluator(model, data.encoder(config, training=False, model=model), data.tokenizer,
                           config.generation, batch_size=config.train.batch_size)
  preds = evaluate_dialogues(ev, dialogues, history)
  out_dir = os.path.join(workdir, "eval", split if history == "oracle" else f"{split}_{history}")
  metrics = write_outputs(preds, out_dir)
  metrics["checkpoint_step"] = step
  logging.info("evaluated step %d on %d %s dialogues -> %s", step, len(dialogues), split, out_dir)
  return metrics
