"""Peak resident memory and time of importing a 7B-shaped Llama checkpoint (the llama import path).

Writes a synthetic bf16 safetensors checkpoint of Llama-2-7B's shape (hidden 4096, 32 layers,
MLP 11008, vocab 32000; ~13.5 GB, key names and shapes from `llama_hf.llama_rules`) to a temporary
directory, then imports it in a fresh process with `llama_hf.load_hf_llama` under the official
config (bf16 frozen base weights, LoRA r=32 on q/k/v/o, vocabulary grown to 32005) and reports
peak RSS (`ru_maxrss`), the RSS before loading, time, and peak / checkpoint size. When the disk
(or memory) cannot hold the 7B checkpoint, a 3B shape (OpenLLaMA-3B: hidden 3200, 26 layers) is
used instead, and the output says so. The checkpoint is read back from the page cache (it was
just written), so the time is the import's, not the disk's.

  PYTHONPATH=. python scripts/bench_import_7b.py [--dir DIR] [--shard-gb 2] [--shape 7b|3b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from scripts.bench_llama_import import peak_mib, rss_mib

SHAPES = {
    "7b": dict(hidden=4096, depth=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008),
    "3b": dict(hidden=3200, depth=26, heads=32, kv_heads=32, head_dim=100, mlp_dim=8640),
}
COMMON = dict(vocab_size=32000, rms_eps=1e-5, rope_theta=10000.0, rope_scaling_factor=1.0,
              max_position=4096)
MARGIN = 1.1  # free disk / memory needed per checkpoint byte


def model_config(llm: dict):
  from configs.interllava import get_config

  cfg = get_config("official").model.copy_and_resolve_references()
  cfg.llm.update(llm)
  return cfg


def tensor_shapes(llm: dict) -> dict[str, tuple[int, ...]]:
  """HF key -> shape, from the import table and the abstract model (no hand-written key list)."""
  from flax import nnx

  from ivcr_jax.convert import llama_hf
  from ivcr_jax.models.llama import Llama

  model = nnx.eval_shape(lambda: Llama(model_config(llm), lora=False, rngs=nnx.Rngs(0)))
  shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for r in llama_hf.llama_rules(llm["depth"]):
    shape = shapes[r.target][1:] if r.layer is not None else shapes[r.target]
    out.update(zip(r.sources, r.transform.source_shapes(shape), strict=True))
  return out


def write_checkpoint(directory: str, llm: dict, shard_bytes: int) -> int:
  """bf16 tensors in HF layout, streamed shard by shard; returns the bytes written. Values are
  a random block tiled over each tensor: the import's cost does not depend on them."""
  from ivcr_jax.convert import llama_hf

  block = (np.random.default_rng(0).standard_normal(1 << 20, np.float32) * 0.02).astype(
      ml_dtypes.bfloat16)
  shapes = tensor_shapes(llm)
  tensors = ((k, np.resize(block, s)) for k, s in shapes.items())
  llama_hf.write_safetensors(tensors, directory, "model", max_shard_bytes=shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(llama_hf.hf_config(llm, dtype="bfloat16"), f)
  return 2 * sum(math.prod(s) for s in shapes.values())


def load(directory: str) -> dict:
  """Runs in a fresh process: the import, then measurements."""
  import jax
  from flax import nnx

  from ivcr_jax.convert import llama_hf

  llm = llama_hf.llm_config_from_hf(directory)
  llm["vocab_size"] = 32005  # + the IVCR tokens, mean rows
  cfg = model_config(llm)
  jax.devices()
  before = rss_mib()
  start = time.perf_counter()
  model = llama_hf.load_hf_llama(directory, cfg)
  jax.block_until_ready(nnx.state(model))
  seconds = time.perf_counter() - start
  dtypes = sorted({str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model))})
  return dict(before=before, peak=peak_mib(), after=rss_mib(), seconds=seconds, dtypes=dtypes)


def available_mib() -> float:
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint goes")
  parser.add_argument("--shard-gb", type=float, default=2.0)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
  parser.add_argument("--load", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.load:
    print(json.dumps(load(args.load)))
    return
  shape = args.shape
  need = 2 * sum(math.prod(s) for s in tensor_shapes({**SHAPES[shape], **COMMON}).values())
  free, mem = shutil.disk_usage(args.dir).free, available_mib() * 2**20
  if shape == "7b" and (free < MARGIN * need or mem < MARGIN * need):
    print(f"7B needs {need / 2**30:.1f} GiB of disk and memory; {free / 2**30:.1f} GiB free disk "
          f"in {args.dir}, {mem / 2**30:.1f} GiB available memory: using the 3B shape instead")
    shape = "3b"
  llm = {**SHAPES[shape], **COMMON}
  with tempfile.TemporaryDirectory(dir=args.dir) as directory:
    start = time.perf_counter()
    size = write_checkpoint(directory, llm, int(args.shard_gb * 2**30))
    mib = size / 2**20
    print(f"{shape} shape {llm}: {mib:.0f} MiB bf16 in {args.shard_gb} GiB shards, written in "
          f"{time.perf_counter() - start:.1f} s")
    out = subprocess.run([sys.executable, __file__, "--load", directory], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"load_hf_llama (official config, params {'/'.join(r['dtypes'])}): "
        f"{r['seconds']:.1f} s; peak RSS {r['peak']:.0f} MiB = {r['peak'] / mib:.2f}x the "
        f"checkpoint; baseline {r['before']:.0f} MiB, (peak - baseline) / checkpoint = "
        f"{(r['peak'] - r['before']) / mib:.2f}x; RSS after {r['after']:.0f} MiB")


if __name__ == "__main__":
  main()
