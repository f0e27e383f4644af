"""IVCR metrics: R@1, R@1 at IoU 0.3/0.5/0.7, mIoU, BLEU-4, the per-turn table, the retriever's
recall@10 and the model's own ranking.

- `r@1` is the generated answers' R@1: the parsed "video N" against the ground truth.
- `retriever_r@10` is the retriever's recall@10 (the ground truth among the 10 candidates). The
  paper's "R@10" is this figure (the model only chooses among the 10, reference §5.2), so it says
  nothing about the model; it is also written as `r@10`, the paper's name, with the official
  denominators, the mode that compares with the paper.
- `ranking_r@1/3/5` and `ranking_mrr` rank the 10 candidates by the model's probability of
  answering each index (teacher-forced, no generation; `TurnResult.index_scores`): the model's
  re-ranking, whatever the wording of its answers.
- `warnings` says when most answers are unparsable, so that a zero is not read as a ranking.

Inputs are per-turn results whose answers are already parsed (by `ivcr_jax.data.answers`, the
one parser shared with the loss labels and the chat). Every figure comes with the counts behind
it, and unlike the official script (B11) the first retrieval and the first moment turn count.

Denominators:
- default (ours): R@1 and R@10 over the evaluated video-retrieval turns, the IoU metrics and mIoU
  over the evaluated moment-retrieval turns; an unparsable prediction is a miss (IoU 0), never
  dropped.
- official (`Denominators`, reference §5.2): every assistant turn of the split's dialogues with
  type != [0] in the annotation file, evaluated or not (dialogues the reader or the official
  no-zero filter dropped, turns past the turn limit): those count as misses, so the figures are
  end to end, retriever failures included. Type-[7] dialogues are in those counts but are never
  scored: the official test conversion keeps only their human turns (B10), so they yield no test
  samples and count only as misses; the evaluator drops them in this mode
  (`OFFICIAL_UNSCORED_TYPE`).
BLEU-4 is always over the evaluated assistant turns.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
RANKING_CUTOFFS = (1, 3, 5)
OFFICIAL_UNSCORED_TYPE = 7  # dialogue type the official test conversion empties (B10)


@dataclasses.dataclass(frozen=True)
class TurnResult:
  """One evaluated assistant turn.

  kind: "video" (video retrieval), "moment" (moment retrieval) or "chat".
  turn: 1-based index of the assistant turn in its dialogue.
  """

  dialogue_id: str
  turn: int
  kind: str
  reference: str
  prediction: str
  gt_index: int | None = None
  pred_index: int | None = None
  gt_in_candidates: bool = True
  gt_span: tuple[float, float] | None = None
  pred_span: tuple[float, float] | None = None
  index_scores: tuple[float, ...] | None = None  # log P(answer index n), n = 1..10


def model_rank(r: TurnResult) -> int | None:
  """Rank (1 = best) of the ground-truth index under `index_scores`; ties count against it."""
  if r.index_scores is None or r.gt_index is None or not 1 <= r.gt_index <= len(r.index_scores):
    return None
  gt = r.index_scores[r.gt_index - 1]
  return 1 + sum(s >= gt for i, s in enumerate(r.index_scores) if i != r.gt_index - 1)


def iou(pred: Sequence[float] | None, gt: Sequence[float] | None) -> float:
  """Temporal IoU; reversed spans are ordered, and missing or degenerate spans score 0.

  The official `iou` divides by the hull (max end - min start), which equals the union whenever
  the spans overlap and gives 0 when they do not, so the values agree; it would divide by zero on
  identical zero-length spans and silently mis-score reversed ones.
  """
  if pred is None or gt is None:
    return 0.0
  p0, p1 = sorted(float(x) for x in pred)
  g0, g1 = sorted(float(x) for x in gt)
  inter = max(min(p1, g1) - max(p0, g0), 0.0)
  hull = max(p1, g1) - min(p0, g0)
  return inter / hull if hull > 0 else 0.0


_BLEU_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+(?:\.\d+)?", re.UNICODE)


def bleu_tokens(text: str) -> list[str]:
  """Lower-cased words and numbers; each CJK character is a token of its own."""
  return _BLEU_TOKEN.findall(text.lower())


def corpus_bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]],
                 epsilon: float = 0.1) -> float:
  """Corpus BLEU-4 (Papineni et al.), one reference per hypothesis, uniform weights.

  Smoothing: a zero n-gram match count is replaced by `epsilon` (Chen & Cherry's method 1, as
  `nltk` `SmoothingFunction().method1`), so short corpora do not collapse to 0.
  """
  matches, totals = [0] * 4, [0] * 4
  ref_len = hyp_len = 0
  for ref, hyp in zip(references, hypotheses, strict=True):
    ref_len += len(ref)
    hyp_len += len(hyp)
    for n in range(1, 5):
      hyp_ngrams = collections.Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
      ref_ngrams = collections.Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
      matches[n - 1] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
      totals[n - 1] += max(len(hyp) - n + 1, 1)  # as nltk: a too-short hypothesis counts 1
  if hyp_len == 0 or matches[0] == 0:
    return 0.0
  log_precision = sum(math.log((m if m > 0 else epsilon) / t)
                      for m, t in zip(matches, totals, strict=True)) / 4
  brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
  return brevity * math.exp(log_precision)


def _ratio(hits: float, count: int) -> float:
  return hits / count if count else 0.0


@dataclasses.dataclass(frozen=True)
class Denominators:
  """The official script's turn counts (see the module docstring), read from the annotations.

  per_turn: assistant turn index (1-based) -> (video-retrieval turns, moment turns).
  chat: natural-dialogue turns (`gt_se` null, our schema extension), counted in neither; the
    official loop would count them as moment turns, but its data has none.
  unscored: dialogues of type `OFFICIAL_UNSCORED_TYPE`, whose turns are counted but not scored.
  """

  video: int
  moment: int
  per_turn: Mapping[int, tuple[int, int]]
  chat: int = 0
  source: str = ""
  unscored: int = 0


def official_denominators(records: Iterable, split: str = "test", source: str = ""
                          ) -> Denominators:
  """Counts every gpt turn of the `split` records whose type is not [0], as `cal_reslut` and
  `cal_multi_reslut` do: `gt_se == [-1, -1]` is video retrieval, any other span a moment."""
  video = moment = chat = unscored = 0
  per_turn: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
  for record in records:
    if (not isinstance(record, Mapping) or record.get("split") != split
        or record.get("type") == [0]):
      continue
    unscored += record.get("type") == [OFFICIAL_UNSCORED_TYPE]
    for position, conv in enumerate(record.get("conversations") or []):
      if not isinstance(conv, Mapping) or conv.get("from") != "gpt":
        continue
      gt_se = conv.get("gt_se")
      if gt_se is None:
        chat += 1
        continue
      is_video = gt_se == [-1, -1]
      video += is_video
      moment += not is_video
      per_turn[position // 2 + 1][0 if is_video else 1] += 1
  return Denominators(video, moment, {t: (v, m) for t, (v, m) in sorted(per_turn.items())},
                      chat, source, unscored)


def compute(results: Sequence[TurnResult], max_turn: int = 7,
            denominators: Denominators | None = None) -> dict:
  """All metrics with their counts, plus the per-turn table (turns 1..`max_turn`).

  Args:
    denominators: the official counts; None divides by the evaluated turns.
  """
  video = [r for r in results if r.kind == "video"]
  moment = [r for r in results if r.kind == "moment"]
  n_video, n_moment = _checked(len(video), len(moment), denominators)
  ious = [iou(r.pred_span, r.gt_span) for r in moment]
  r1_hits = sum(r.pred_index is not None and r.pred_index == r.gt_index for r in video)
  out = {
      "r@1": _ratio(r1_hits, n_video),
      "retriever_r@10": _ratio(sum(r.gt_in_candidates for r in video), n_video),
      # The retriever's own top-1 (no re-ranking): the baseline that R@1 must beat.
      "retriever_r@1": _ratio(sum(r.gt_index == 1 for r in video), n_video),
      "miou": _ratio(sum(ious), n_moment),
      "bleu4": corpus_bleu4([bleu_tokens(r.reference) for r in results],
                            [bleu_tokens(r.prediction) for r in results]),
      "counts": {
          "video_turns": len(video), "r@1_hits": r1_hits,
          "video_unparsed": sum(r.pred_index is None for r in video),
          "moment_turns": len(moment),
          "moment_unparsed": sum(r.pred_span is None for r in moment),
          "chat_turns": sum(r.kind == "chat" for r in results), "all_turns": len(results),
      },
      "denominators": {"mode": "evaluated" if denominators is None else "official",
                       "video": n_video, "moment": n_moment},
  }
  if denominators is not None:
    out["denominators"].update(chat_excluded=denominators.chat, source=denominators.source,
                               type7_dialogues_unscored=denominators.unscored)
    out["r@10"] = out["retriever_r@10"]  # the paper's name for the same figure
  ranks = [rank for r in video if (rank := model_rank(r)) is not None]
  if ranks:  # turns without scores count as misses
    for k in RANKING_CUTOFFS:
      out[f"ranking_r@{k}"] = _ratio(sum(rank <= k for rank in ranks), n_video)
    out["ranking_mrr"] = _ratio(sum(1 / rank for rank in ranks), n_video)
    out["counts"]["ranked_turns"] = len(ranks)
  for t in IOU_THRESHOLDS:
    hits = sum(v >= t for v in ious)
    out[f"r@1_iou{t}"] = _ratio(hits, n_moment)
    out["counts"][f"iou{t}_hits"] = hits
  out["per_turn"] = per_turn(results, max_turn, denominators)
  out["warnings"] = unparsed_warnings(out["counts"])
  return out


SUMMARY_KEYS = ("r@1", "ranking_r@1", "ranking_r@3", "ranking_r@5", "ranking_mrr",
                "retriever_r@1", "retriever_r@10", *[f"r@1_iou{t}" for t in IOU_THRESHOLDS],
                "miou", "bleu4")


def summary(out: Mapping) -> str:
  """The console lines of `compute`'s result: the figures, then each warning in capitals."""
  figures = ", ".join(f"{k} {out[k]:.3f}" for k in SUMMARY_KEYS if k in out)
  return "\n".join([figures, *(f"WARNING: {w}" for w in out.get("warnings", ()))])


def unparsed_warnings(counts: Mapping[str, int], most: float = 0.5) -> list[str]:
  """A sentence for each answer kind of which more than `most` was unparsable."""
  out = []
  for kind, what, named in (("video", "video-retrieval", "no candidate ('video N')"),
                            ("moment", "moment", "no time span")):
    n, bad = counts[f"{kind}_turns"], counts[f"{kind}_unparsed"]
    if n and bad > most * n:
      out.append(f"{bad} of {n} {what} answers name {named}: they score as misses, so the "
                 f"{kind} figures measure the answers' format, not retrieval")
  return out


def _checked(n_video: int, n_moment: int, denominators: Denominators | None,
             turn: int | None = None) -> tuple[int, int]:
  """The (video, moment) denominators to use, overall or for one turn index; official counts
  below the evaluated ones mean the annotation file is not the one the dialogues came from."""
  if denominators is None:
    return n_video, n_moment
  video, moment = ((denominators.video, denominators.moment) if turn is None
                   else denominators.per_turn.get(turn, (0, 0)))
  if video < n_video or moment < n_moment:
    where = "in all" if turn is None else f"at turn {turn}"
    raise ValueError(f"official denominators {where} ({video} video, {moment} moment turns) are "
                     f"below the evaluated turns ({n_video}, {n_moment}): is "
                     f"{denominators.source or 'the annotation file'} the file the evaluated "
                     "dialogues came from?")
  return video, moment


def per_turn(results: Sequence[TurnResult], max_turn: int = 7,
             denominators: Denominators | None = None) -> list[dict]:
  """The paper's Table 4: per assistant-turn index, R@1 and R@1 at each IoU threshold.

  `video_turns` / `moment_turns` are the denominators used, `*_evaluated` the turns scored."""
  rows = []
  for turn in range(1, max_turn + 1):
    video = [r for r in results if r.turn == turn and r.kind == "video"]
    moment = [iou(r.pred_span, r.gt_span) for r in results if r.turn == turn and r.kind == "moment"]
    n_video, n_moment = _checked(len(video), len(moment), denominators, turn)
    row = {"turn": turn, "video_turns": n_video, "moment_turns": n_moment,
           "video_evaluated": len(video), "moment_evaluated": len(moment),
           "video_unparsed": sum(r.pred_index is None for r in video),
           "moment_unparsed": sum(r.pred_span is None for r in results
                                  if r.turn == turn and r.kind == "moment"),
           "r@1": _ratio(sum(r.pred_index == r.gt_index and r.pred_index is not None
                             for r in video), n_video)}
    for t in IOU_THRESHOLDS:
      row[f"r@1_iou{t}"] = _ratio(sum(v >= t for v in moment), n_moment)
    rows.append(row)
  return rows


def per_turn_markdown(rows: Sequence[dict]) -> str:
  """The per-turn table as Markdown (Table 4 layout: one column per turn)."""
  header = "| metric | " + " | ".join(f"turn {r['turn']}" for r in rows) + " |"
  lines = [header, "|---" * (len(rows) + 1) + "|"]
  names = [("r@1", "R@1"), *[(f"r@1_iou{t}", f"R@1 IoU={t}") for t in IOU_THRESHOLDS]]
  for key, label in names:
    lines.append(f"| {label} | " + " | ".join(f"{100 * r[key]:.1f}" for r in rows) + " |")
  lines.append("| video / moment turns | "
               + " | ".join(f"{r['video_turns']} / {r['moment_turns']}" for r in rows) + " |")
  lines.append("| unparsed video / moment | "
               + " | ".join(f"{r['video_unparsed']} / {r['moment_unparsed']}" for r in rows)
               + " |")
  return "\n".join(lines) + "\n"
