"""Pretraining the demo's LLaMA on the toy world in words (`python -m ivcr_jax.pretrain_llm`).

`--config=configs/toy_llm.py[:PRESET]`, PRESET one of:
  demo  the demo preset's LLaMA (`configs/interllava.py:demo`, `model.llm`), on text lists of 10
        candidates with dense questions (`ivcr_jax.data.toy_text`); the run the demo loads
  tiny  the same world, a few short steps (tests)

The model section is the InterLLaVA preset's, so the pretrained LLaMA has the demo's dimensions
by construction; its vocabulary is the toy tokenizer's.
"""

from __future__ import annotations

import ml_collections

from ivcr_jax.configs import interllava

PRESETS = ("demo", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "demo"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
  llava = interllava.get_config("demo")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.model = llava.model.copy_and_resolve_references()
  c.model.unlock()
  # Trained from scratch at width 64: fan-in initialised kernels (see layers.fan_in_init).
  c.model.fan_in_init = ("llm",)
  # Unrolled layers: 25% faster steps than a scan at these sizes on XLA:CPU (4 x 64, 32 x 256
  # tokens: 546 against 737 ms); a layout choice that the weights and their export do not see.
  c.model.llm.scan_layers = False
  c.world = ml_collections.ConfigDict(dict(
      seed=987654,  # the text world's own videos (toy_text.TextWorldConfig)
      num_videos=4000, num_candidates=10, retrieval_questions=8, moment_questions=2, frames=8,
      follow_ups="official", min_candidates=0, curriculum_steps=0,
      answer_gap_from=0, answer_gap_every=0,  # the follow-ups' template curriculum (off)
      events_every=0))  # the curriculum on the videos' events per block (off)
  c.data = ml_collections.ConfigDict(dict(
      seq_len=768,  # tokens per row; longer examples are cut (counted in `cut_rows`)
      positions=320,  # supervised tokens per row
      lookups=96,  # events in the blocks and the questions of a row, for the lookup probe
      heldout_batches=4))  # batches of the world's held-out stream measured at each eval
  t = ml_collections.ConfigDict()
  t.num_steps = 6000
  t.batch_size = 16
  t.grad_accum = 1
  t.lr = 3e-3
  t.min_lr = 3e-4
  t.warmup_lr = 3e-4
  t.warmup_steps = 100
  t.weight_decay = 0.01
  t.b1, t.b2, t.eps = 0.9, 0.98, 1e-8
  t.grad_clip = 1.0
  # Weight of the lookup probe's loss (`text_pretraining.init_probe`): at the end of each event
  # phrase, which candidates written so far show it; 0 trains the answers alone.
  t.lookup_weight = 0.0
  # Weight of the cross-entropy on the user's questions' tokens (`toy_text.TextExample.
  # question_spans`; they take the `data.positions` slots after the answers'); 0 trains the
  # answers alone.
  t.question_weight = 0.0
  # Which question tokens: "all" (template words included) or "events" (only the event phrases
  # the retrieval questions name, the words the list determines: what `scripts/probe_lookup.py
  # --question_weight` supervises).
  t.question_tokens = "all"
  t.log_every = 50
  t.eval_every = 500
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  t.stop_after = 0  # end this invocation after this step (0: at num_steps); the command resumes
  c.train = t
  if preset == "tiny":
    c.world.num_videos = 200
    c.data.heldout_batches = 1
    t.update(dict(num_steps=12, batch_size=2, warmup_steps=2, log_every=4, eval_every=6,
                  checkpoint_every=6))
  return c.lock()
