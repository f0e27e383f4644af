"""Phase-1 retriever configurations (X-Pool-style two-tower, ivcr_jax.models.retriever).

`--config=configs/retriever.py[:PRESET]`, PRESET one of:
  official  X-Pool over the frozen vision tower's per-frame features (the paper's X-Pool on
            BLIP-2 features): reads `data.features`, the feature store of the official ViT
            (python -m data_prep.build_feature_store), on IVCR-200K (default)
  demo      X-Pool over the pixels of the toy corpus's frame store; trains on CPU in minutes
  tiny      minimal dimensions for unit tests

The `data` section is the InterLLaVA preset's of the same name (configs/interllava.py): the
retriever reads the same stores, so its top-k cache fits the dialogues the LLM trains on. With a
toy preset and an empty `data.stores` the toy corpus is built under `<workdir>/toy_data`; point
`data.stores` at an InterLLaVA demo run's `toy_data` to share that one.
"""

from __future__ import annotations

import ml_collections

from ivcr_jax.configs import interllava

PRESETS = ("official", "demo", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "official"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
  llm = interllava.get_config(preset)
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.data = llm.data.copy_and_resolve_references()
  c.data.unlock()
  c.frame_size = llm.model.vit.image_size  # frame-store frames (pixels input)
  c.model = ml_collections.ConfigDict(dict(
      input="features",  # "features": a feature store's per-frame vision features; "pixels"
      width=512, heads=8, text_layers=4, temporal_layers=1, max_text_len=64,
      max_frames=12,  # frames per video (the paper's 12 per retrieval candidate)
      conv_channels=(32, 64), init_temperature=0.05))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=20_000, batch_size=64, grad_accum=1, lr=1e-4, min_lr=1e-6, warmup_lr=1e-6,
      warmup_steps=1000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, grad_clip=1.0,
      log_every=100, eval_every=2000, checkpoint_every=2000, keep_checkpoints=3,
      stop_after=0,  # end this invocation after this step (0: at num_steps); the command resumes
      frame_sampling="rand"))  # training frames: official random per-interval sampling
  c.evaluation = ml_collections.ConfigDict(dict(
      split="val",  # ranked during training (every eval_every) and at the end
      query_batch=64, video_batch=64))
  c.topk = 10  # candidates per query turn in the top-k cache (the LLM's list)
  if preset in ("demo", "tiny"):
    c.data.features = ""
    c.model.update(dict(input="pixels", width=128, heads=4, text_layers=2, max_frames=8,
                        conv_channels=(32, 64)))
    c.train.update(dict(num_steps=1500, batch_size=32, lr=1e-3, min_lr=1e-5, warmup_steps=100,
                        weight_decay=0.05, log_every=50, eval_every=500, checkpoint_every=500))
  if preset == "tiny":
    c.model.update(dict(width=32, heads=2, text_layers=1, max_frames=4, conv_channels=(8, 16)))
    c.train.update(dict(num_steps=40, batch_size=8, warmup_steps=5, log_every=10, eval_every=20,
                        checkpoint_every=20))
  return c.lock()
