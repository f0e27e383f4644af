"""`python -m ivcr_jax.train` with one injected fault, for the fault tests (test code only).

  python -m tests.inject_faults FAULT@STEP MARKER -- <the flags of python -m ivcr_jax.train>

The train module runs unchanged as `__main__`; only the piece named by FAULT is wrapped:
  between_steps@N  before step N starts (step N-1 done and logged): pause
  save@N           inside the async write of checkpoint N, once its parameters are written
                   (the JSON meta not, nothing committed): pause
  validation@N     inside the validation of step N (its feed started): pause
  enospc@N         the write of checkpoint N fails as on a full disk (OSError ENOSPC)
  nan@N            step N's batch holds token ids past the vocabulary, so its embeddings, and
                   the loss, are NaN (jnp.take fills out-of-range rows with NaN)
A pause writes MARKER and sleeps until the test kills the process with SIGKILL.
"""

import errno
import os
import pathlib
import runpy
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ivcr_jax.training import trainer


def _pause(marker: str) -> None:
  with open(marker, "w", encoding="utf-8") as f:
    f.write(str(os.getpid()))
  time.sleep(3600)


def main() -> None:
  fault, marker, dash, *flags = sys.argv[1:]
  assert dash == "--", sys.argv
  kind, step = fault.split("@")
  step = int(step)

  if kind in ("save", "enospc"):
    write = ocp.JsonCheckpointHandler._save_fn  # the meta item's write, in the save thread

    async def faulty(self, item, directory):
      if directory.parent.name.startswith(f"{step}."):  # <step>.orbax-checkpoint-tmp
        if kind == "enospc":
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        # The array items are written by threads of their own: pause once the parameters'
        # are on disk, so the kill leaves a checkpoint half written.
        deadline = time.monotonic() + 120
        while not any(pathlib.Path(directory.parent).glob("params*/**/manifest.ocdbt")):
          assert time.monotonic() < deadline, "the parameters were never written"
          time.sleep(0.01)
        _pause(marker)
      return await write(self, item, directory)

    ocp.JsonCheckpointHandler._save_fn = faulty
  else:
    class Feed(trainer.Feed):
      """Numbers the batches of the feeds named train@START (the k-th is step START + k + 1)
      and val@STEP (all of step STEP)."""

      def __init__(self, *args, name, **kwargs):
        super().__init__(*args, name=name, **kwargs)
        what, at = name.split("@")
        self.training = what == "train"
        self.fault_step = int(at) + self.training
        self.faults = ("between_steps", "nan") if self.training else ("validation",)

      def __next__(self):
        here = kind in self.faults and self.fault_step == step
        if here and kind != "nan":
          _pause(marker)
        batch = super().__next__()
        if here and kind == "nan":
          ids = batch["input_ids"]
          batch = {**batch, "input_ids": jax.device_put(np.full(ids.shape, 10**6, np.int32),
                                                        ids.sharding)}
        self.fault_step += self.training
        return batch

    trainer.Feed = Feed
  sys.argv = ["ivcr_jax.train", *flags]
  runpy.run_module("ivcr_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
