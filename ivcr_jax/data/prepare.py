"""Annotations + videos -> frame and dialogue stores (the library behind `data_prep.build_stores`).

Every record is validated (`ivcr_jax.data.records`); every referenced video is decoded once
(`ivcr_jax.data.frames`). Bad records and undecodable videos are reported by name, counted and
left out; a dialogue that needs a video which failed is left out too. The summary is returned and
written to `<out>/prep_report.json` last, so its presence marks complete stores, and its `recipe`
says what they were built from (callers rebuild when it differs from what they need). A build that
stopped resumes when run again with the same arguments: the frame store keeps the shards it had
finished (`stores.write_video_store`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from ivcr_jax.data import records, stores, toy_corpus
from ivcr_jax.jsonfile import read_json, write_json

REPORT_FILE = "prep_report.json"
DEFAULT_FRAMES = stores.FrameSettings()
DEFAULT_OPTIONS = records.RecordOptions()


def recipe(*, annotations: str | None, video_root: str | None,
           toy: toy_corpus.ToyCorpusConfig | None, frames: stores.FrameSettings,
           options: records.RecordOptions) -> dict[str, Any]:
  """What a set of stores is built from, as plain JSON (compared to decide on a rebuild)."""
  source = ({"toy": dataclasses.asdict(toy)} if toy is not None
            else {"annotations": annotations, "video_root": video_root})
  return json.loads(json.dumps({**source, "frames": dataclasses.asdict(frames),
                                "options": dataclasses.asdict(options)}))


def read_report(out: str) -> dict[str, Any] | None:
  """The summary of complete stores under `out`, or None (`stores.StoreError` if damaged)."""
  return stores.read_settings(os.path.join(out, REPORT_FILE), stores.rebuild_stores_hint(out))


def build_stores(out: str, *, annotations: str | None = None, video_root: str | None = None,
                 toy: toy_corpus.ToyCorpusConfig | None = None,
                 frames: stores.FrameSettings = DEFAULT_FRAMES,
                 options: records.RecordOptions = DEFAULT_OPTIONS, workers: int = 2,
                 shard_videos: int = stores.SHARD_VIDEOS, progress: bool = True,
                 overwrite: bool = False) -> dict[str, Any]:
  """Builds the frame and dialogue stores under `out`; returns the summary it writes.

  Args:
    annotations, video_root: the IVCR-200K annotation JSON and the directory its video paths are
      relative to; or
    toy: a toy corpus to write under `<out>/toy` and build the stores from.
    frames: how the frame store samples and decodes.
    options: how records are read (splits to keep, turn limit, ...).
    workers: videos decoded at a time.
    shard_videos: videos per frame-store shard (the unit of resumption).
    overwrite: replace stores already under `out`. Without it, complete stores (a report) are an
      error, and an interrupted build resumes (a frame store of other settings is an error).
  """
  if (toy is None) == (annotations is None or video_root is None):
    raise ValueError("give annotations and video_root, or a toy corpus config")
  if not overwrite and read_report(out) is not None:  # (a damaged report is replaced, too)
    raise FileExistsError(f"{out} already holds complete stores ({REPORT_FILE}); choose another "
                          "directory or overwrite")
  _clear(out, overwrite)
  start = time.perf_counter()
  what = recipe(annotations=annotations, video_root=video_root, toy=toy, frames=frames,
                options=options)
  if toy is not None:
    corpus = toy_corpus.write_toy_corpus(os.path.join(out, "toy"), toy, workers=workers,
                                         progress=progress)
    annotations, video_root = corpus.annotations, corpus.video_root

  raw = read_json(annotations)
  # Pass 1: which videos do the structurally valid dialogues need?
  first, _ = records.read_annotations(raw, options, video_root=video_root)
  needed = sorted({v for d in first for t in d.turns for v in t.videos})
  frame_store = stores.write_frame_store(out, needed, video_root, frames, workers=workers,
                                         progress=progress, shard_videos=shard_videos)
  # Pass 2: with the decoded durations (spans inside videos, every video available).
  dialogues, report = records.read_annotations(raw, options, video_root=video_root,
                                               durations=frame_store.durations)
  dialogue_store = stores.write_dialogue_store(out, dialogues)

  summary = _summary(what, annotations, video_root, needed, frame_store, dialogue_store,
                     dialogues, report, seconds=round(time.perf_counter() - start, 2))
  write_json(os.path.join(out, REPORT_FILE), summary)
  return summary


def _clear(out: str, overwrite: bool) -> None:
  """Removes the report and the dialogue store under `out` (cheap, and TFDS would keep old
  records silently: always written anew), and with `overwrite` the frame store too."""
  for name in (REPORT_FILE, stores.DIALOGUE_STORE) + ((stores.FRAME_STORE,) if overwrite else ()):
    path = os.path.join(out, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _summary(what: dict[str, Any], annotations: str, video_root: str, needed: Sequence[str],
             frame_store: stores.FrameStoreResult, dialogue_store: str,
             dialogues: Sequence[records.Dialogue], report: records.ReadReport, *,
             seconds: float) -> dict[str, Any]:
  """The build report (`REPORT_FILE`): what the stores hold and what was left out, and why."""
  return {
      "recipe": what, "annotations": annotations, "video_root": video_root,
      "frame_store": frame_store.path, "dialogue_store": dialogue_store,
      "videos": {"needed": len(needed), "stored": len(frame_store.videos),
                 "failed": len(frame_store.failures), "short": len(frame_store.short)},
      "frame_shards": {"total": frame_store.shards, "reused": frame_store.shards_reused},
      "records": {"total": report.total, "kept": report.kept, "other_split": report.other_split,
                  "skipped": dict(report.skipped), "notes": dict(report.notes)},
      "summary": report.summary(),
      "splits": {s: sum(d.split == s for d in dialogues)
                 for s in sorted({d.split for d in dialogues})},
      "messages": report.messages, "video_failures": frame_store.failures,
      "short_videos": frame_store.short,
      "seconds": seconds}
