"""Top-k cache store: a retriever's candidate lists for every query turn of a dialogue store.

The official data carries X-Pool's top-10 inside the annotation (`candidate_videos`, reference
§4.2). This store holds another retriever's lists instead, so the LLM can be trained and
evaluated on them with one flag (`data.candidates = PATH`; the paper's Table 3 experiment).

Layout of a store directory (written by `python -m data_prep.build_topk_cache`):
- `topk.json`: format, k, the retriever's fingerprint (a hash of its checkpoint's parameters,
  its step and model config), the corpus fingerprint (the frame store's videos) and per split
  the number of records and a fingerprint of the dialogues' query turns;
- `<split>.array_record`: one JSON record per dialogue, in dialogue-store order:
  `{"index", "turns": [{"text_id", "videos": [...], "scores": [...]}]}` (empty lists for chat
  turns). A moment turn has the list of the latest retrieval turn before it (the video it asks
  about was chosen from that list), or its own query's list when it opens the dialogue.

`TopKStore.check` refuses a store built from other dialogues or another corpus. Replacing the
annotation's lists (`with_candidates`) follows the official test filter (reference §4.3): a
dialogue is kept only if its first turn is solvable (retrieval: the ground truth in the top-k;
moment: the ground truth is the top-1); for type [7] only the failing turns are dropped. A
later turn whose ground truth is not in its list ends the dialogue there (its answer cannot be
stated, and the following turns build on it). Dropped turns are counted; under the official
denominators (`evaluation.official_denominators`) they are misses.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ivcr_jax.data import stores
from ivcr_jax.data.answers import find_video_index
from ivcr_jax.data.records import CHAT, MOMENT, RETRIEVAL, Dialogue, Turn
from ivcr_jax.jsonfile import write_json

META_FILE = "topk.json"
FORMAT = 1


class TopKMismatch(ValueError):
  """The top-k store was built from other dialogues or another video corpus."""


def corpus_fingerprint(videos: Sequence[str]) -> str:
  """sha256 of the ranked corpus: the sorted video paths."""
  return hashlib.sha256("\n".join(sorted(videos)).encode()).hexdigest()


def queries_fingerprint(dialogues: Sequence[Dialogue]) -> str:
  """sha256 of what the lists are keyed by and computed from: every turn's record index,
  text_id, kind and question, in store order."""
  h = hashlib.sha256()
  for d in dialogues:
    for t in d.turns:
      h.update(json.dumps([d.index, t.text_id, t.kind, t.question], ensure_ascii=False).encode())
  return h.hexdigest()


def write_topk_store(out: str, splits: Mapping[str, tuple[Sequence[Dialogue], Sequence[list]]],
                     *, k: int, retriever: dict, corpus: str) -> str:
  """Writes the store to `out`.

  Args:
    splits: split -> (dialogues in store order, per dialogue one `(videos, scores)` per turn).
    retriever: JSON description with its `fingerprint`.
    corpus: `corpus_fingerprint` of the ranked videos.
  """
  from array_record.python import array_record_module

  os.makedirs(out, exist_ok=True)
  meta = {"format": FORMAT, "k": k, "retriever": retriever, "corpus": corpus, "splits": {}}
  for split, (dialogues, lists) in splits.items():
    path = os.path.join(out, f"{split}.array_record")
    writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
    try:
      for d, turns in zip(dialogues, lists, strict=True):
        writer.write(json.dumps({"index": d.index, "turns": [
            {"text_id": t.text_id, "videos": list(v), "scores": [round(float(s), 6) for s in sc]}
            for t, (v, sc) in zip(d.turns, turns, strict=True)]}, ensure_ascii=False).encode())
    finally:
      writer.close()
    os.replace(path + ".tmp", path)
    meta["splits"][split] = {"records": len(dialogues), "queries": queries_fingerprint(dialogues)}
  write_json(os.path.join(out, META_FILE), meta)  # last: its presence marks a complete store
  return out


REBUILD = ("rebuild the top-k cache with python -m data_prep.build_topk_cache --overwrite and "
           "the --config and --retriever it was built with")


def read_meta(path: str) -> dict | None:
  """The store's `topk.json`, or None when there is no complete store at `path`
  (`stores.StoreError` if it is damaged)."""
  return stores.read_settings(os.path.join(path, META_FILE), REBUILD)


@dataclasses.dataclass
class Applied:
  """What replacing the candidate lists kept and dropped (`TopKStore.with_candidates`)."""

  dialogues: list[Dialogue]
  counts: collections.Counter

  def summary(self) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))


class TopKStore:
  """A top-k store opened for reading (module docstring)."""

  def __init__(self, path: str):
    meta = read_meta(path)
    if meta is None:
      raise FileNotFoundError(f"no top-k cache at {path} (build one with python -m "
                              "data_prep.build_topk_cache)")
    if meta.get("format") != FORMAT:
      raise TopKMismatch(f"the top-k cache at {path} has format {meta.get('format')}, expected "
                         f"{FORMAT}; rebuild it with python -m data_prep.build_topk_cache")
    self.path, self.meta = path, meta
    self.k: int = meta["k"]
    stores.check_shards(((self._file(split), info["records"])
                         for split, info in meta["splits"].items()), REBUILD)

  def _file(self, split: str) -> str:
    return os.path.join(self.path, f"{split}.array_record")

  def check(self, corpus: str, split: str, dialogues: Sequence[Dialogue]) -> None:
    """Refuses the store unless it was built over `corpus` and exactly these dialogues."""
    if corpus != self.meta["corpus"]:
      raise TopKMismatch(f"the top-k cache {self.path} ranks another video corpus (fingerprint "
                         f"{self.meta['corpus'][:12]}, the frame store's is {corpus[:12]}); "
                         "rebuild it with python -m data_prep.build_topk_cache for these stores")
    info = self.meta["splits"].get(split)
    if info is None:
      raise TopKMismatch(f"the top-k cache {self.path} has no split {split!r} (it has "
                         f"{sorted(self.meta['splits'])})")
    if info["queries"] != queries_fingerprint(dialogues):
      raise TopKMismatch(f"the top-k cache {self.path} was built from other {split} dialogues "
                         "than the dialogue store's; rebuild it with python -m "
                         "data_prep.build_topk_cache for these stores")

  def lists(self, split: str) -> list[dict[str, Any]]:
    """Every record of `split`, in dialogue-store order."""
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(self._file(split))
    try:
      return [json.loads(r) for r in reader.read_all()]
    finally:
      reader.close()

  def with_candidates(self, dialogues: Sequence[Dialogue], split: str, corpus: str,
                      num_candidates: int) -> Applied:
    """`dialogues` with every turn's candidates taken from this store (checked first), the
    answers' "video N" rewritten to the new ranks, and the official test filter applied
    (module docstring)."""
    if num_candidates > self.k:
      raise TopKMismatch(f"the top-k cache {self.path} holds {self.k} videos per query, fewer "
                         f"than data.num_candidates={num_candidates}")
    self.check(corpus, split, dialogues)
    counts = collections.Counter()
    kept = []
    for d, rec in zip(dialogues, self.lists(split), strict=True):
      turns = _replace(d, [t["videos"][:num_candidates] for t in rec["turns"]], counts)
      counts["turns_dropped"] += len(d.turns) - len(turns)
      if turns:
        kept.append(dataclasses.replace(d, turns=tuple(turns)))
      else:
        counts["dialogues_dropped"] += 1
    counts["dialogues_kept"] = len(kept)
    return Applied(kept, counts)


def _rewrite_index(answer: str, rank: int) -> str:
  found = find_video_index(answer)
  if found is None:
    return answer
  return answer[:found.start] + str(rank) + answer[found.end:]


def _replace(d: Dialogue, lists: Sequence[Sequence[str]], counts: collections.Counter
             ) -> list[Turn]:
  """The turns of `d` on the new lists, up to the first unsolvable one (module docstring)."""
  out: list[Turn] = []
  renumber: dict[int, int] = {}  # old rank -> new rank of the videos chosen so far
  for i, (turn, videos) in enumerate(zip(d.turns, lists, strict=True)):
    if turn.kind == CHAT:
      old = find_video_index(turn.answer)
      if old is not None and int(old.text) not in renumber:
        counts["chat_index_unmapped"] += 1
        break
      new = renumber.get(int(old.text)) if old is not None else None
      out.append(turn if new is None else
                 dataclasses.replace(turn, answer=_rewrite_index(turn.answer, new)))
      continue
    rank = videos.index(turn.video_id) + 1 if turn.video_id in videos else None
    solvable = rank is not None and (turn.kind == RETRIEVAL or i > 0 or rank == 1)
    if turn.kind == MOMENT and turn.video_index is None:
      solvable = solvable or i > 0  # "<VID> None </VID>" (B20): no index to state
    if not solvable:
      counts[f"{turn.kind}_misses"] += 1
      if d.type == 7:  # official: type-7 dialogues are filtered turn by turn
        continue
      break
    if rank is None:  # a later moment turn without an index: only its list changes
      out.append(dataclasses.replace(turn, candidates=tuple(videos)))
      continue
    if turn.kind == RETRIEVAL:  # later turns refer to this turn's list
      renumber = {}
    if turn.video_index is not None:
      renumber[turn.video_index] = rank
    out.append(dataclasses.replace(
        turn, candidates=tuple(videos),
        video_index=rank if turn.video_index is not None else None,
        answer=_rewrite_index(turn.answer, rank)))
  return out
