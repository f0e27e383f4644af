"""A shortened demo run: toy corpus -> stores -> training -> checkpoint; the loss must fall."""

import json

from configs.interllava import get_config
from ivcr_jax import train


def test_short_demo_trains_and_the_loss_falls(tmp_path):
  cfg = get_config("demo").copy_and_resolve_references()
  with cfg.unlocked():  # CI-sized: one bucket pair, short dialogues
    cfg.data.update(dict(toy_num_videos=40, max_turns=2, seq_buckets=(640,),
                         video_buckets=(24,)))
    cfg.train.update(dict(num_steps=24, batch_size=2, log_every=8, eval_every=24,
                          checkpoint_every=24, warmup_steps=4, lr=2e-3, evaluate_after=False))
  result = train.train(cfg, str(tmp_path))
  losses = [h["loss_lm"] for h in result.history]
  assert len(losses) == 3 and losses[-1] < 0.85 * losses[0], losses
  assert (tmp_path / "checkpoints" / "24").is_dir()
  history = json.loads((tmp_path / "train_history.json").read_text())
  assert history[-1]["step"] == 24 and "val_loss_lm" in history[-1]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
