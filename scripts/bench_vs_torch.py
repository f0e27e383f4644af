"""Our train step against a PyTorch peer doing the same work, side by side (issue #18, part 1).

The peer is InterLLaVA assembled from `transformers` / `peft` parts exactly as the export's model
card says (`ivcr_jax.convert.export.CARD`): `InstructBlipVisionModel` (+ `ln_vision` as
`post_layernorm`), an `InstructBlipQFormerModel` image Q-Former (timestamp text, unsliced output),
the frame position embedding, a 2-layer `InstructBlipQFormerModel` video Q-Former over sliding
windows, the linear projection, and `LlamaForCausalLM` with a PEFT LoRA, frozen / trainable as
the official recipe. Its weights are the JAX model's, written by `export.write_export` and read
back with `from_pretrained`, so both sides start from the same parameters; the batches are the
pipeline's (`pipeline.assemble` on the toy corpus, frame tables of the real frames only), the
video tokens spliced in at `video_slot`.

Both sides run forward + backward + AdamW in float32 on one retrieval turn (10 videos) and one
moment turn (1 video). The loss is L_M alone (`train.alpha = beta = 0`, the official dynamics;
the official L_V / L_C carry no gradient). First the deterministic losses (dropout off) must agree
to 1e-4 relative, else the script stops: the same work is then timed, with dropout as configured.

Each framework lives in its own subprocess (no shared thread pools; peak RSS of each), and the
parent alternates them step by step (JAX, torch, JAX, ...), the first step of each excluded.
FLOPs per step are XLA's cost analysis of the compiled step with layers unrolled
(`bench_train.Runner`), used for both sides; achieved FLOP/s are set against each framework's
float32 2048^3 matmul rate measured in the same run.

  PYTHONPATH=. python scripts/bench_vs_torch.py [--preset small|tiny] [--steps 5]
      [--kind retrieval|moment|both]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

KINDS = ("retrieval", "moment")
PARITY_RTOL = 1e-4
MATMUL_N = 2048


def peak_rss_mib() -> float:
  """This process's peak RSS over its whole life. The kernel folds the current mark (VmHWM)
  into `ru_maxrss` only now and then, so the larger of the two is the lifetime peak."""
  lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  try:
    return max(lifetime, marked_peak_rss_mib())
  except (OSError, StopIteration):
    return lifetime


def cpu_description() -> str:
  """The CPU's model name, core count and widest vector extension (figures differ by host)."""
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = set(info.get("flags", "").split())
  vector = next((v for v in ("avx512f", "avx2", "avx") if v in flags), "no AVX")
  return f"{info.get('model name', 'unknown CPU')}, {os.cpu_count()} cores, {vector}"


def reset_peak_rss() -> bool:
  """Restarts the kernel's peak-RSS mark (Linux: "5" to /proc/self/clear_refs), so that
  `marked_peak_rss_mib` then reads the peak of what follows; False where that is unsupported."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def release_free_heap() -> None:
  """Hands the C heap's free pages back to the OS (glibc `malloc_trim`; nothing elsewhere), so
  that what building and compiling freed is not counted as stepping memory."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _status_mib(field: str) -> float:
  """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MiB."""
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def current_rss_mib() -> float:
  return _status_mib("VmRSS")


def marked_peak_rss_mib() -> float:
  """Peak RSS since `reset_peak_rss` (VmHWM)."""
  return _status_mib("VmHWM")


# ------------------------------------------------------------------------------------ JAX side


class JaxSide:
  """The trainer's step (`bench_train.Runner`) on the pipeline's batches; it also writes the
  batches the torch side reads (the export it loads comes from `ExportSide`)."""

  def __init__(self, setup: dict):
    import jax
    import numpy as np
    import tensorflow_datasets as tfds
    from absl import flags

    from ivcr_jax import experiment
    from ivcr_jax.data import records
    from ivcr_jax.data.records import MOMENT, RETRIEVAL
    from ivcr_jax.training import optimizer
    from ivcr_jax.training import step as step_lib
    from scripts import bench_train as bt

    flags.FLAGS.is_parsed() or flags.FLAGS.mark_as_parsed()  # the data modules read absl flags
    tfds.disable_progress_bar()
    self.bt, work = bt, setup["workdir"]
    clock, phases = time.perf_counter(), {}

    def phase(name: str) -> None:
      nonlocal clock
      phases[name] = round(time.perf_counter() - clock, 1)
      clock = time.perf_counter()

    config = _bench_config(setup)
    data = experiment.open_data(config, os.path.join(work, "jax"))
    train = data.dialogues("train")
    phase("toy corpus")
    k = setup.get("candidates") or config.data.num_candidates
    with config.unlocked():
      config.data.num_candidates = k  # what the encoder renders (the stores keep their lists)
    self.runner = runner = bt.Runner(config, data, repeats=1)
    _perturb_lora(runner.model, config.seed)
    runner.split = step_lib.TrainableSplit.of(runner.model, config.model.trainable)
    phase("model")

    enc = runner.encoder(runner.data.layout)
    samples = {}
    if "retrieval" in setup["kinds"]:
      r_m = bt.find_dialogue(train, lambda k: k == [RETRIEVAL, MOMENT], "retrieval -> moment")
      samples["retrieval"] = [records.make_samples([first_candidates(r_m, k)], "prefix")[0]]
    if "moment" in setup["kinds"]:
      one = bt.find_dialogue(train, lambda k: k == [MOMENT], "single moment turn")
      samples["moment"] = records.make_samples([one], "prefix")
    # Frame tables of exactly the real frames (the trainer pads them to a bucket of videos x T;
    # the toy videos are shorter than T): neither side encodes padding rows.
    real = {int(np.sum(bt.batch_of(enc, s)["frame_slot"] >= 0)) for s in samples.values()}
    enc = runner.encoder(dataclasses.replace(runner.data.layout, frame_buckets=tuple(sorted(real))))
    self.batches = {k: bt.batch_of(enc, s) for k, s in samples.items()}
    phase("batches")

    state, frozen = runner.placed()  # before any (donating) step: the exported values
    eval_step = jax.jit(step_lib.make_eval_step(runner.split, runner.loss_cfg))
    kinds = {}
    for kind, batch in self.batches.items():
      path = os.path.join(work, f"batch_{kind}.npz")
      np.savez(path, **batch)
      loss = float(eval_step(state["params"], frozen, batch)["loss"])
      phase(f"{kind} eval loss")
      flops, compile_s = runner.cost(batch)
      phase(f"{kind} step compile")
      used = int(np.sum(batch["frame_slot"] >= 0))
      kinds[kind] = {"batch": path, "loss": loss, "flops": flops, "compile_s": compile_s,
                     "shape": f"{bt.shape_of(batch)} ({used} real frames)"}
    t = config.train
    q, vq, lora = (config.model.qformer, config.model.video_qformer, config.model.lora)
    self.info = {
        "version": jax.__version__, "export": export_dir(setup), "phases": phases, "kinds": kinds,
        "trainable": sum(x.size for x in jax.tree.leaves(state["params"])),
        "frozen": sum(x.size for x in jax.tree.leaves(frozen)),
        "adamw": {"lr": float(optimizer.learning_rate(t)(0)), "b1": t.b1, "b2": t.b2,
                  "eps": t.eps, "weight_decay": t.weight_decay},
        "dropout": {"qformer": [q.dropout, q.attention_dropout],
                    "video_qformer": [vq.dropout, vq.attention_dropout], "lora": lora.dropout},
        "lora": [lora.rank, lora.alpha], "limit": bt.matmul_limit(n=MATMUL_N)}
    del eval_step, state, frozen
    jax.clear_caches()  # the parity check's programs are not the step's (the runner keeps its own)

  def step(self, kind: str) -> float:
    return self.runner.step(self.batches[kind])

  def finish(self) -> dict:
    return {"compiled_mib": self.compiled_mib(), "limit": self.bt.matmul_limit(n=MATMUL_N),
            "rss_mib": peak_rss_mib()}

  def compiled_mib(self) -> float:
    """What the compiled train steps hold: the RSS that dropping them frees (after the steps,
    the free heap handed back before and after). XLA:CPU keeps far more per program than its
    serialized size; torch compiles nothing, so this is the JAX side's own standing cost."""
    gc.collect()
    release_free_heap()
    before = current_rss_mib()
    self.runner.cache.clear()
    gc.collect()
    release_free_heap()
    return before - current_rss_mib()


def first_candidates(dialogue: Any, k: int) -> Any:
  """`dialogue` with its first turn's candidate list cut to the first `k`, the ground truth kept
  among them (in the last place when it ranked lower; the answer text is left as recorded)."""
  turn = dialogue.turns[0]
  if k >= len(turn.candidates):
    return dialogue
  kept = list(turn.candidates[:k])
  if turn.video_id not in kept:
    kept[-1] = turn.video_id
  turn = dataclasses.replace(turn, candidates=tuple(kept),
                             video_index=kept.index(turn.video_id) + 1)
  return dataclasses.replace(dialogue, turns=(turn, *dialogue.turns[1:]))


def _bench_config(setup: dict) -> Any:
  from scripts import bench_train as bt

  config = bt.bench_config(setup["preset"], scan=False)
  with config.unlocked():
    config.train.alpha = config.train.beta = 0.0  # L_M only (see the module docstring)
    for path, value in setup.get("overrides", {}).items():  # "section.key": value
      section, key = path.rsplit(".", 1)
      config[section][key] = value  # ConfigDict resolves the dotted section
  return config


def export_dir(setup: dict) -> str:
  return os.path.join(setup["workdir"], "export")


class ExportSide:
  """Builds the JAX side's model again (the same seed and LoRA perturbation; the parity check
  proves them equal) and writes the export the torch side loads. In a process of its own, so
  that the JAX side's memory holds no export buffers: a trainer does not export while it
  steps."""

  def __init__(self, setup: dict):
    from absl import flags

    from ivcr_jax import experiment
    from ivcr_jax.convert import export

    flags.FLAGS.is_parsed() or flags.FLAGS.mark_as_parsed()
    config = _bench_config(setup)
    data = experiment.open_data(config, os.path.join(setup["workdir"], "jax"))  # the JAX side's
    model = experiment.build_model(config, data.tokenizer)
    _perturb_lora(model, config.seed)
    export.write_export(model, config, export_dir(setup), tokenizer=data.tokenizer,
                        log=lambda _: None)
    self.info = {}


def _perturb_lora(model: Any, seed: int) -> None:
  """LoRA's B starts at zero; small random values make the parity check cover the adapters."""
  import jax
  from flax import nnx

  key = jax.random.key(seed + 1)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
    if path[-1] == "lora_b":
      value = var.get_value()
      var.set_value(0.02 * jax.random.normal(jax.random.fold_in(key, i), value.shape,
                                             value.dtype))


# ---------------------------------------------------------------------------------- torch side


def _torch_peer(out: str) -> Any:
  """The PyTorch InterLLaVA from the export `out` (an `nn.Module` whose forward is the loss)."""
  import torch
  from peft import PeftModel
  from safetensors.torch import load_file
  from transformers import InstructBlipQFormerModel, InstructBlipVisionModel, LlamaForCausalLM

  from ivcr_jax.models.eva_vit import CLIP_MEAN, CLIP_STD

  f32 = {"dtype": torch.float32}
  cfg = json.load(open(os.path.join(out, "interllava_config.json"), encoding="utf-8"))

  class Peer(torch.nn.Module):
    """Vision (frozen), both Q-Formers, glue, LLaMA (frozen) + LoRA."""

    def __init__(self):
      super().__init__()
      self.vision = InstructBlipVisionModel.from_pretrained(os.path.join(out, "vision"), **f32)
      self.vision.post_layernorm.eps = cfg["eps"]["ln_vision"]
      self.vision.requires_grad_(False)
      self.qformer = InstructBlipQFormerModel.from_pretrained(os.path.join(out, "qformer"),
                                                              **f32)
      self.video_qformer = InstructBlipQFormerModel.from_pretrained(
          os.path.join(out, "video_qformer"), **f32)
      for name, p in self.video_qformer.named_parameters():  # HF's text parts: never used
        parts = name.split(".")
        if (parts[:2] in (["embeddings", "word_embeddings"], ["embeddings",
                                                              "position_embeddings"])
            or (parts[0] == "encoder" and parts[3] in ("intermediate", "output"))):
          p.requires_grad_(False)
      glue = load_file(os.path.join(out, "projector.safetensors"))
      self.query_tokens = torch.nn.Parameter(glue["query_tokens"])
      self.video_query_tokens = torch.nn.Parameter(glue["video_query_tokens"])
      self.frame_position = torch.nn.Parameter(glue["video_frame_position_embedding.weight"])
      w = glue["llama_proj.weight"]
      self.projection = torch.nn.Linear(w.shape[1], w.shape[0])
      self.projection.load_state_dict({"weight": w, "bias": glue["llama_proj.bias"]})
      base = LlamaForCausalLM.from_pretrained(os.path.join(out, "llm_base"), **f32)
      self.llm = PeftModel.from_pretrained(base, os.path.join(out, "llm_lora"), is_trainable=True)
      self.window, self.stride = cfg["video"]["window"], cfg["video"]["stride"]
      self.attend_text = cfg["video"]["attend_qformer_text"]
      self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> Peer:
      super().train(mode)
      self.vision.eval()  # frozen (and dropout-free)
      return self

    def video_tokens(self, b: dict) -> torch.Tensor:
      """`[V, n_w * Qv, llm_hidden]`: the card's `video_tokens`, batched over every frame and
      window of the batch's video table (windows a video lacks are masked, as in JAX)."""
      slot = b["frame_slot"]  # [V, T] rows of the frame table, -1: no frame
      v, t = slot.shape
      used = slot[slot >= 0]
      n = used.numel()
      pixels = b["frames"][used].permute(0, 3, 1, 2).float() / 255
      with torch.no_grad():
        image = self.vision(pixel_values=(pixels - self.mean) / self.std).last_hidden_state
      text_mask = b["qformer_text_mask"][used].long()
      queries = self.query_tokens.expand(n, -1, -1)
      mask = torch.cat([torch.ones(n, queries.shape[1], dtype=torch.long), text_mask], 1)
      hidden = self.qformer(input_ids=b["qformer_text_ids"][used], attention_mask=mask,
                            query_embeds=queries, encoder_hidden_states=image
                            ).last_hidden_state  # [n, Q + L, D]: unsliced
      row = torch.full((b["frames"].shape[0] + 1,), n, dtype=torch.long)
      row[used] = torch.arange(n)
      at = row[slot]  # [V, T] row of `hidden`, n (a zero row) where there is no frame
      hidden = torch.cat([hidden, hidden.new_zeros(1, *hidden.shape[1:])])[at]
      hidden = hidden + self.frame_position[:t, None]
      n_w = math.ceil(t / self.stride)
      frame = torch.arange(n_w)[:, None] * self.stride + torch.arange(self.window)[None]
      clamped = frame.clamp(max=t - 1)
      in_window = (slot >= 0)[:, clamped] & (frame < t)  # [V, n_w, W]
      clip = hidden[:, clamped]  # [V, n_w, W, Q + L, D]
      num_q, positions = queries.shape[1], torch.arange(hidden.shape[2])
      if self.attend_text:  # each video's texts padded to its longest (official)
        lengths = torch.cat([text_mask.sum(-1), torch.zeros(1, dtype=torch.long)])[at]
        token_valid = positions[None] < num_q + lengths.max(1).values[:, None]
      else:
        token_valid = (positions < num_q).expand(v, -1)
      key_mask = in_window[..., None] & token_valid[:, None, None]
      keys = clip.reshape(v * n_w, -1, clip.shape[-1])
      out = self.video_qformer(input_ids=None,
                               query_embeds=self.video_query_tokens.expand(v * n_w, -1, -1),
                               encoder_hidden_states=keys,
                               encoder_attention_mask=key_mask.reshape(v * n_w, -1).long())
      return self.projection(out.last_hidden_state).reshape(v, -1, self.projection.out_features)

    def forward(self, b: dict) -> torch.Tensor:
      """L_M of the batch: HF's causal-LM loss on `labels` (-100: unsupervised)."""
      table = self.video_tokens(b).reshape(-1, self.projection.out_features)
      vs = b["video_slot"]
      embeds = self.llm.get_input_embeddings()(b["input_ids"])
      embeds = torch.where((vs >= 0)[..., None], table[vs.clamp(min=0)], embeds)
      return self.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"].long(),
                      position_ids=b["position_ids"], labels=b["labels"]).loss

  return Peer()


def _import_torch() -> None:
  import peft  # noqa: F401
  import transformers

  transformers.InstructBlipQFormerModel, transformers.LlamaForCausalLM  # noqa: B018


def torch_matmul_limit(n: int = MATMUL_N, repeats: int = 3) -> float:
  """torch's float32 `n^3` matmul FLOP/s (best of `repeats`), as `bench_train.matmul_limit`."""
  import torch

  a = torch.randn(n, n)
  a @ a
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


class TorchSide:
  """The peer, its AdamW (official decay rule: tensors of >= 2 dims), the JAX side's batches."""

  def __init__(self, setup: dict):
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    self.torch = torch
    self.peer = _torch_peer(setup["export"])
    self.batches = {}
    for kind, k in setup["kinds"].items():
      with np.load(k["batch"]) as z:
        self.batches[kind] = {name: torch.from_numpy(z[name]).long()
                              if z[name].dtype.kind in "iu" and name != "frames"
                              else torch.from_numpy(z[name]) for name in z.files}
    params = [(n, p) for n, p in self.peer.named_parameters() if p.requires_grad]
    a = setup["adamw"]
    self.opt = torch.optim.AdamW(
        [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": a["weight_decay"]},
         {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=a["lr"], betas=(a["b1"], a["b2"]), eps=a["eps"])
    self.peer.eval()
    losses = {}
    for kind, b in self.batches.items():
      with torch.no_grad():
        losses[kind] = float(self.peer(b))
    self.peer.train()
    lora = self.peer.llm.peft_config["default"]
    self.info = {"version": torch.__version__, "threads": torch.get_num_threads(),
                 "losses": losses, "trainable": sum(p.numel() for _, p in params),
                 "lora_dropout": lora.lora_dropout,
                 "qformer_dropout": [self.peer.qformer.config.hidden_dropout_prob,
                                     self.peer.qformer.config.attention_probs_dropout_prob],
                 "limit": torch_matmul_limit()}

  def step(self, kind: str) -> float:
    start = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self.peer(self.batches[kind])
    loss.backward()
    self.opt.step()
    if not math.isfinite(loss.item()):
      raise FloatingPointError(f"non-finite torch loss {loss.item()}")
    return time.perf_counter() - start

  def finish(self) -> dict:
    return {"limit": torch_matmul_limit(), "rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------------------------- protocol


def _serve(conn: Connection, side_cls: Callable[[dict], Any],
           preload: Callable[[], None] | None) -> None:
  """A worker: ("setup", dict) -> info, ("step", kind) -> seconds, ("finish",) -> info (with
  the peak RSS from the first step on: what stepping holds, not building or exporting); any
  error goes back as ("error", traceback) so the parent never waits forever. `preload` runs
  first (the torch side imports while the JAX side builds)."""
  try:
    side, stepping, ready_rss_mib = None, False, None
    if preload:
      preload()
    while True:
      try:
        msg = conn.recv()
      except EOFError:  # the parent stopped
        return
      if msg[0] == "setup":
        side = side_cls(msg[1])
        reply = side.info
      elif msg[0] == "step":
        if not stepping:  # from the first (warm-up) step on
          release_free_heap()
          ready_rss_mib = current_rss_mib()
          stepping = reset_peak_rss()
        reply = side.step(msg[1])
      else:
        step_rss_mib = marked_peak_rss_mib() if stepping else None  # before finish() allocates
        ends = {**side.finish(), "step_rss_mib": step_rss_mib, "ready_rss_mib": ready_rss_mib}
        conn.send(("ok", ends))
        return
      conn.send(("ok", reply))
  except Exception:  # reported to the parent, which stops
    conn.send(("error", traceback.format_exc()))


class Worker:
  """One framework in its own process."""

  def __init__(self, name: str, side_cls: Callable[[dict], Any],
               preload: Callable[[], None] | None = None):
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited thread pools
    self.name, (self.conn, child) = name, ctx.Pipe()
    self.process = ctx.Process(target=_serve, args=(child, side_cls, preload),
                               daemon=True)
    self.process.start()

  def ask(self, *msg: Any) -> Any:
    self.conn.send(msg)
    status, reply = self.conn.recv()
    if status == "error":
      raise RuntimeError(f"the {self.name} worker failed:\n{reply}")
    return reply

  def stop(self) -> None:
    self.conn.close()
    self.process.join(timeout=10)
    if self.process.is_alive():
      self.process.terminate()


# --------------------------------------------------------------------------------------- main


def check_parity(jax_info: dict, torch_info: dict) -> dict[str, float]:
  """Relative difference of the deterministic losses per turn kind; raises if any exceeds
  `PARITY_RTOL` (the two sides would not be doing the same work)."""
  diffs = {}
  for kind, k in jax_info["kinds"].items():
    ours, theirs = k["loss"], torch_info["losses"][kind]
    diffs[kind] = abs(theirs - ours) / max(abs(ours), 1e-12)
    print(f"  {kind}: JAX loss {ours:.7f}, torch loss {theirs:.7f}, relative difference "
          f"{diffs[kind]:.1e}", flush=True)
  bad = {k: d for k, d in diffs.items() if not d <= PARITY_RTOL}
  if bad:
    raise SystemExit(f"loss parity failed (> {PARITY_RTOL:g} relative): {bad}; not timing")
  if jax_info["trainable"] != torch_info["trainable"]:
    raise SystemExit(f"trainable parameters differ: JAX {jax_info['trainable']}, torch "
                     f"{torch_info['trainable']}; not timing")
  return diffs


def set_up(jax_w: Worker, torch_w: Worker, setup: dict) -> tuple[dict, dict]:
  """The JAX side (it builds the toy corpus), then the export in a passing process, then the
  torch side: their setup replies."""
  jax_info = jax_w.ask("setup", setup)
  exporter = Worker("export", ExportSide)
  try:
    exporter.ask("setup", setup)
  finally:
    exporter.stop()
  return jax_info, torch_w.ask("setup", {**jax_info})


def alternate(workers: Sequence[Worker], kinds: Sequence[str], steps: int
              ) -> dict[str, dict[str, list[float]]]:
  """Step times per kind and framework, the frameworks taking turns; the first of each is a
  warm-up and not kept."""
  times = {k: {w.name: [] for w in workers} for k in kinds}
  for kind in kinds:
    for i in range(steps + 1):
      for w in workers:
        seconds = w.ask("step", kind)
        print(f"  {kind} {w.name} step {i}{' (warm-up)' if i == 0 else ''}: {seconds:.3f} s",
              flush=True)
        if i:
          times[kind][w.name].append(seconds)
  return times


def report(preset: str, jax_info: dict, torch_info: dict, times: dict, ends: dict,
           diffs: dict) -> dict:
  """Prints the table and returns its figures."""
  limits = {"jax": (jax_info["limit"] + ends["jax"]["limit"]) / 2,
            "torch": (torch_info["limit"] + ends["torch"]["limit"]) / 2}
  print(f"\n### {preset}: train step (forward + backward + AdamW), float32, JAX vs PyTorch\n")
  print("| turn | batch | JAX s/step | torch s/step | torch / JAX | GFLOP/step | JAX GFLOP/s "
        "(of limit) | torch GFLOP/s (of limit) | JAX compile s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  rows = {}
  for kind, by in times.items():
    k = jax_info["kinds"][kind]
    jt, tt = statistics.median(by["jax"]), statistics.median(by["torch"])
    rate_j, rate_t = k["flops"] / jt, k["flops"] / tt
    rows[kind] = {"jax_s": jt, "torch_s": tt, "ratio": tt / jt, "flops": k["flops"],
                  "jax_loss": k["loss"], "torch_loss": torch_info["losses"][kind],
                  "rel_diff": diffs[kind], "jax_times": by["jax"], "torch_times": by["torch"]}
    print(f"| {kind} | {k['shape']} | {jt:.3f} | {tt:.3f} | {tt / jt:.2f} | "
          f"{k['flops'] / 1e9:.1f} | {rate_j / 1e9:.1f} ({rate_j / limits['jax']:.0%}) | "
          f"{rate_t / 1e9:.1f} ({rate_t / limits['torch']:.0%}) | {k['compile_s']:.1f} |")
  steps = len(next(iter(times.values()))["jax"])
  print(f"\njax {jax_info['version']}, torch {torch_info['version']} "
        f"({torch_info['threads']} threads), {os.cpu_count()} cores; median of {steps} steps "
        "per cell, the frameworks alternating step by step in two processes, warm-up excluded. "
        "torch / JAX > 1: JAX is faster.")
  print(f"GFLOP/step: XLA's cost analysis of the compiled JAX step (layers unrolled), used for "
        f"both sides. Matmul limit (float32 {MATMUL_N}^3, mean of the start and the end of the "
        f"run): XLA {limits['jax'] / 1e9:.1f} GFLOP/s, torch {limits['torch'] / 1e9:.1f} "
        "GFLOP/s; each side's rate is set against its own.")
  print(f"Same work: {jax_info['trainable']:,} trainable parameters on both sides "
        f"({jax_info['frozen']:,} frozen in JAX); loss L_M only (train.alpha = beta = 0); "
        f"dropout as configured: Q-Formers (hidden, attention) JAX "
        f"{jax_info['dropout']['qformer']} / {jax_info['dropout']['video_qformer']}, torch "
        f"{torch_info['qformer_dropout']}; LoRA r, alpha {jax_info['lora']}, dropout JAX "
        f"{jax_info['dropout']['lora']}, torch {torch_info['lora_dropout']}. AdamW lr "
        f"{jax_info['adamw']['lr']:g} (the schedule's step 0), weight decay "
        f"{jax_info['adamw']['weight_decay']:g}.")
  print(f"Peak RSS from the first step on (the model, optimizer state, batches and what the "
        f"steps allocate; each side hands its free heap back to the OS first, holding JAX "
        f"{_mib(ends['jax']['ready_rss_mib'])}, torch {_mib(ends['torch']['ready_rss_mib'])} "
        f"then): JAX {_mib(ends['jax']['step_rss_mib'])}, torch "
        f"{_mib(ends['torch']['step_rss_mib'])}; over each process's whole life (building, "
        f"export or loading, compiling, stepping): JAX {_mib(ends['jax']['rss_mib'])}, torch "
        f"{_mib(ends['torch']['rss_mib'])}. Of what JAX holds, its compiled steps: "
        f"{_mib(ends['jax']['compiled_mib'])} (freed by dropping them after the steps).")
  result = {"preset": preset, "cpu": cpu_description(), "kinds": rows, "trainable": {
      "jax": jax_info["trainable"], "torch": torch_info["trainable"]},
      "limits": limits, "rss_mib": {n: e["rss_mib"] for n, e in ends.items()},
      "step_rss_mib": {n: e["step_rss_mib"] for n, e in ends.items()},
      "ready_rss_mib": {n: e["ready_rss_mib"] for n, e in ends.items()},
      "compiled_mib": ends["jax"]["compiled_mib"]}
  print("result: " + json.dumps(result), flush=True)
  return result


def _mib(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.0f} MiB"


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="small", choices=("small", "tiny"))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per turn kind and side")
  parser.add_argument("--kind", default="both", choices=(*KINDS, "both"))
  parser.add_argument("--workdir", default="", help="toy corpus, export, batches (default: temp)")
  args = parser.parse_args(argv)
  kinds = KINDS if args.kind == "both" else (args.kind,)
  workdir = args.workdir or tempfile.mkdtemp(prefix="ivcr_bench_vs_torch_")
  print(f"{args.preset}: workdir {workdir}; {cpu_description()}; loads {os.getloadavg()}",
        flush=True)
  jax_w, torch_w = Worker("jax", JaxSide), Worker("torch", TorchSide, _import_torch)
  try:
    start = time.perf_counter()
    jax_info, torch_info = set_up(jax_w, torch_w, {"preset": args.preset, "kinds": kinds,
                                                   "workdir": workdir})
    print(f"both sides ready in {time.perf_counter() - start:.1f} s; JAX: {jax_info['phases']}",
          flush=True)
    print("Loss parity, dropout off (eval losses of the exported weights):", flush=True)
    diffs = check_parity(jax_info, torch_info)
    times = alternate([jax_w, torch_w], kinds, args.steps)
    ends = {"jax": jax_w.ask("finish"), "torch": torch_w.ask("finish")}
  finally:
    jax_w.stop()
    torch_w.stop()
  print(f"loads at the end {os.getloadavg()}")
  return report(args.preset, jax_info, torch_info, times, ends, diffs)


if __name__ == "__main__":
  main()
