"""A shortened demo run: toy corpus -> stores -> training -> checkpoint; the loss must fall."""

import json

from configs.interllava import get_config
from ivcr_jax import train


def test_short_demo_trains_and_the_loss_falls(tmp_path):
  cfg = get_config("demo").copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.toy_num_videos = 40
    cfg.train.update(dict(num_steps=30, log_every=10, eval_every=30, checkpoint_every=30,
                          warmup_steps=5, evaluate_after=False))
  result = train.train(cfg, str(tmp_path))
  losses = [h["loss_lm"] for h in result.history]
  assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
  assert (tmp_path / "checkpoints" / "30").is_dir()
  history = json.loads((tmp_path / "train_history.json").read_text())
  assert history[-1]["step"] == 30 and "val_loss_lm" in history[-1]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
