"""Peak memory of importing a Hugging Face LLaMA checkpoint, as a multiple of its size.

Writes a synthetic bf16 checkpoint of a 1.1B LLaMA shape (TinyLlama: hidden 2048, 22 layers,
32 heads, 4 kv heads, MLP 5632, vocab 32000; ~2.2 GB) to a temporary directory, then imports it
in fresh processes, side by side:
- ours: `ivcr_jax.convert.llama_hf.load_hf_llama` (official config: bf16 base weights, LoRA r=32
  on q/k/v/o, vocabulary grown to 32005);
- transformers: `LlamaForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`, then every weight
  read once (it may keep them as lazy mappings of the file, which become resident when used).
Reported: peak RSS (`resource.getrusage` ru_maxrss), the RSS before loading (interpreter and
libraries), and the peak minus that baseline, each divided by the checkpoint size; and time.

  PYTHONPATH=. python scripts/bench_llama_import.py [--shard-gb 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

SHAPE = dict(hidden=2048, depth=22, heads=32, kv_heads=4, head_dim=64, mlp_dim=5632,
             vocab_size=32000, rms_eps=1e-5, rope_theta=10000.0, rope_scaling_factor=1.0,
             max_position=2048)


def rss_mib() -> float:
  """Current resident set size."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_checkpoint(directory: str, shard_bytes: int) -> int:
  """Random bf16 tensors in HF layout, streamed shard by shard; returns the bytes written."""
  from ivcr_jax.convert import llama_hf

  rng = np.random.default_rng(0)
  llm = SHAPE
  d, h, kv, hd, m = llm["hidden"], llm["heads"], llm["kv_heads"], llm["head_dim"], llm["mlp_dim"]
  shapes = {"model.embed_tokens.weight": (llm["vocab_size"], d), "model.norm.weight": (d,),
            "lm_head.weight": (llm["vocab_size"], d)}
  for i in range(llm["depth"]):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (h * hd, d),
                   p + "self_attn.k_proj.weight": (kv * hd, d),
                   p + "self_attn.v_proj.weight": (kv * hd, d),
                   p + "self_attn.o_proj.weight": (d, h * hd),
                   p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
                   p + "mlp.down_proj.weight": (d, m),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
  tensors = ((k, (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
             for k, s in shapes.items())
  llama_hf.write_safetensors(tensors, directory, "model", max_shard_bytes=shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(llama_hf.hf_config(llm, dtype="bfloat16"), f)
  return 2 * sum(int(np.prod(s)) for s in shapes.values())


def load(directory: str, which: str) -> dict:
  """Runs in a fresh process: imports, then measures."""
  if which == "ours":
    import jax
    from flax import nnx

    from configs.interllava import get_config
    from ivcr_jax.convert import llama_hf

    cfg = get_config("official").model.copy_and_resolve_references()
    cfg.llm.update(llama_hf.llm_config_from_hf(directory))
    cfg.llm.vocab_size = 32005
    jax.devices()
    before = rss_mib()
    start = time.perf_counter()
    model = llama_hf.load_hf_llama(directory, cfg)
    jax.block_until_ready(nnx.state(model))
  else:
    import torch
    from transformers import LlamaForCausalLM

    before = rss_mib()
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    with torch.no_grad():  # weights may still be lazy file mappings: read each once
      for p in model.parameters():
        p.sum()
  seconds = time.perf_counter() - start
  return dict(before=before, peak=peak_mib(), after=rss_mib(), seconds=seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shard-gb", type=float, default=1.0)
  parser.add_argument("--keep", help="write the checkpoint here (and keep it)")
  parser.add_argument("--load", nargs=2, metavar=("DIR", "WHICH"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.load:
    print(json.dumps(load(*args.load)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    directory = args.keep or tmp
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    size = write_checkpoint(directory, int(args.shard_gb * 2**30))
    mib = size / 2**20
    print(f"synthetic checkpoint: {mib:.0f} MiB bf16, {args.shard_gb} GiB shards, written in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"{'loader':>13} {'peak MiB':>9} {'peak/ckpt':>10} {'baseline MiB':>13} "
          f"{'(peak-base)/ckpt':>17} {'seconds':>8}")
    for which in ("ours", "transformers"):
      out = subprocess.run([sys.executable, __file__, "--load", directory, which],
                           capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{which:>13} {r['peak']:>9.0f} {r['peak'] / mib:>9.2f}x {r['before']:>13.0f} "
            f"{(r['peak'] - r['before']) / mib:>16.2f}x {r['seconds']:>8.1f}")


if __name__ == "__main__":
  main()
