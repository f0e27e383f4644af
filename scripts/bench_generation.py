"""Greedy generation speed on this machine: our jitted KV-cache `generate` vs torch `generate`.

For the LLaMA dimensions of the `tiny` and `small` presets (`model.llm`, float32), one random
torch `LlamaForCausalLM` per preset is built and its weights are loaded into our model, so both
sides decode the same tokens (checked). Reported side by side in one run: new tokens/s of each
(median of `--repeats` runs after a warm-up; our compile time separately) and their ratio. torch
uses as many threads as JAX has cores.

  PYTHONPATH=. python scripts/bench_generation.py [--batch 1] [--prompt 32] [--new 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from configs.interllava import get_config
from ivcr_jax.convert import llama_hf
from ivcr_jax.convert.sources import DictSource
from ivcr_jax.models import generation, llama


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(preset: str, args: argparse.Namespace) -> dict:
  cfg = get_config(preset).model
  llm = cfg.llm
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.mlp_dim,
      num_hidden_layers=llm.depth, num_attention_heads=llm.heads,
      num_key_value_heads=llm.kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_eps,
      rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta})).eval()
  hf.generation_config.update(eos_token_id=None, pad_token_id=0)
  model = nnx.eval_shape(lambda: llama.Llama(cfg, lora=False, rngs=nnx.Rngs(0)))
  llama_hf.assign_params(model, llama_hf.llama_rules(llm.depth), DictSource(hf.state_dict()))

  ids = np.random.default_rng(0).integers(3, llm.vocab_size, (args.batch, args.prompt))
  ours = lambda: jax.block_until_ready(
      generation.generate(model, ids, sampling=generation.Sampling(args.new)).tokens)
  start = time.perf_counter()
  tokens = np.asarray(ours())
  first = time.perf_counter() - start

  def theirs():
    with torch.no_grad():
      return hf.generate(torch.as_tensor(ids), max_new_tokens=args.new,
                         min_new_tokens=args.new, do_sample=False)

  ref = theirs()[:, args.prompt:].numpy()
  agree = float((tokens == ref).mean())
  t_ours = median_time(ours, args.repeats)
  t_torch = median_time(theirs, args.repeats)
  n = args.batch * args.new
  return dict(preset=preset, params=sum(p.numel() for p in hf.parameters()) / 1e6,
              compile=first - t_ours, ours=n / t_ours, torch=n / t_torch, agree=agree)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy, float32")
  print(f"{'preset':>7} {'params':>8} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} "
        f"{'compile s':>10} {'same tokens':>12}")
  for preset in ("tiny", "small"):
    r = bench(preset, args)
    print(f"{r['preset']:>7} {r['params']:>7.1f}M {r['ours']:>11.1f} {r['torch']:>12.1f} "
          f"{r['ours'] / r['torch']:>5.2f}x {r['compile']:>10.2f} {r['agree']:>11.0%}")


if __name__ == "__main__":
  main()
