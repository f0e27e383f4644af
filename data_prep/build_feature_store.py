"""Frame store -> post-ViT feature store, with the frozen ViT of the model training will use.

  python -m data_prep.build_feature_store --config=configs/interllava.py:PRESET \\
      --workdir=DIR [--out=STORES] [--dtype=float16] [--batch_frames=64]

The data and the model are opened exactly as `python -m ivcr_jax.train` with the same config and
workdir opens them (`ivcr_jax.experiment`): the frame store of `data.stores` (toy presets:
`<workdir>/toy_data`) and the model's own ViT weights. Then train with the printed
`--config.data.features=...`; a store from other ViT weights is refused there. An interrupted
build resumes when the same command is run again (finished shards are kept).
"""

from __future__ import annotations

import os

from absl import app, flags

from ivcr_jax import configs, experiment
from ivcr_jax.data import feature_store
from ivcr_jax.models.vision_tower import frame_encoder

_CONFIG = configs.define_config_flag(
    "config", "Config file[:preset], as for training.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (toy presets keep their "
                               "stores there).", required=True)
_OUT = flags.DEFINE_string("out", "", "Directory for the feature store (default: beside the "
                           "frame store).")
_DTYPE = flags.DEFINE_enum("dtype", "float16", feature_store.STORAGE_DTYPES,
                           "Storage type of the features (reads give float32).")
_BATCH_FRAMES = flags.DEFINE_integer("batch_frames", 64, "Frames per ViT call.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing feature store (of other "
                                "weights or frames; one of these is reused or resumed).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "vit" in config.model.trainable:
    raise app.UsageError(f"preset {config.preset!r} trains the ViT (model.trainable has 'vit'): "
                         "stored features would go stale; use a preset with a frozen ViT")
  data = experiment.open_data(config, _WORKDIR.value)
  vision = experiment.build_model(config, data.tokenizer).vision
  encode = frame_encoder(vision, feature_store.storage_dtype(_DTYPE.value))
  try:
    result = feature_store.write_feature_store(
        _OUT.value or data.store_dir, data.frame_store, encode, model_cfg=vision.cfg,
        fingerprint=feature_store.vit_fingerprint(vision), dtype=_DTYPE.value,
        batch_frames=_BATCH_FRAMES.value, overwrite=_OVERWRITE.value)
  except FileExistsError as e:
    raise app.UsageError(f"{e} (--overwrite)") from e
  size = sum(os.path.getsize(os.path.join(result.path, f)) for f in os.listdir(result.path))
  print(f"{len(result.videos)} videos, {size / 2**20:.1f} MiB ({_DTYPE.value}), ViT "
        f"{result.fingerprint[:12]} -> {result.path}\ntrain with "
        f"--config.data.features={result.path}")


if __name__ == "__main__":
  app.run(main)
