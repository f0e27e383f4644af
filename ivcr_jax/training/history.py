"""A run's logged rows: TensorBoard scalars and `train_history.json`, whole across resumes.

Shared by the InterLLaVA trainer and the retriever's: a resumed run keeps the rows of earlier
invocations up to the step it resumes from and redoes the later ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ivcr_jax.jsonfile import read_json, write_json
from ivcr_jax.training.event_file import EventFileWriter

HISTORY_FILE = "train_history.json"


class RunHistory:
  """The logged rows of this invocation (`rows`). With `write` (process 0 only, of several) each
  also goes to the event file, and the run's whole history, earlier invocations' rows up to the
  resumed step `start` included, to `train_history.json` (atomically: a kill leaves the previous
  version); `on_log(step, row)` is called on every process."""

  def __init__(self, workdir: str, start: int, *, write: bool = True,
               on_log: Callable[[int, dict], None] | None = None):
    self.rows: list[dict] = []
    self.on_log = on_log
    self.path = os.path.join(workdir, HISTORY_FILE)
    self.writer = EventFileWriter(os.path.join(workdir, "tensorboard")) if write else None
    self.earlier = []
    if write and os.path.exists(self.path):  # later rows are redone by this invocation
      self.earlier = [row for row in read_json(self.path) if row["step"] <= start]

  def add(self, step: int, logged: dict) -> None:
    self.rows.append({"step": step, **logged})
    if self.writer:
      self.writer.scalars(step, logged)
      write_json(self.path, self.earlier + self.rows)
    if self.on_log:
      self.on_log(step, logged)

  def close(self) -> None:
    if self.writer:
      self.writer.close()
