"""The LLM tokenizer with the IVCR tokens.

`load_tokenizer` does what the official `train.py`/`evaluate.py` do (reference §1.6): load a
Hugging Face tokenizer directory, add `<VID>`, `</VID>`, `<VIDEO>`, `</VIDEO>`, `<VIDEOTOKEN>` as
special tokens (ids 32000-32004 for Llama-2), pad = eos. Offline stand-ins trained on the toy
corpus are built by `ivcr_jax.data.toy_tokenizer`.

`transformers` is imported inside the functions, and `AutoTokenizer` only where the directory
does not name its tokenizer class: `AutoTokenizer` imports the model configuration code, which
imports torch wherever it is installed (~4 s and ~200 MiB resident in a JAX process that never
uses it).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

IVCR_TOKENS = ("<VID>", "</VID>", "<VIDEO>", "</VIDEO>", "<VIDEOTOKEN>")
VIDEO_PLACEHOLDER = "<VIDEOTOKEN>"


def _from_directory(path: str) -> PreTrainedTokenizerBase:
  """`AutoTokenizer.from_pretrained(path)` without importing torch: the class the directory's
  `tokenizer_config.json` names is taken from `transformers` itself, `AutoTokenizer` is the
  fallback for directories that name none (or one `transformers` does not export)."""
  import transformers

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} not found (nothing is downloaded; "
                            "build the toy one with "
                            "ivcr_jax.data.toy_tokenizer.build_toy_tokenizer)")
  try:
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    name = None
  cls = getattr(transformers, name, None) if isinstance(name, str) else None
  if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
    cls = transformers.AutoTokenizer
  return cls.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """A local HF tokenizer directory, with the five IVCR tokens added and pad = eos."""
  tok = _from_directory(path)
  tok.add_tokens(list(IVCR_TOKENS), special_tokens=True)
  tok.pad_token = tok.eos_token
  tok.padding_side = "right"
  return tok


def load_plain_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """A local HF tokenizer directory as saved (for the BERT-style Q-Former text tokenizer)."""
  return _from_directory(path)


def placeholder_id(tok: PreTrainedTokenizerBase) -> int:
  return tok.convert_tokens_to_ids(VIDEO_PLACEHOLDER)


def digits_of(tok: PreTrainedTokenizerBase) -> np.ndarray:
  """Token ids of "0".."9" as single tokens (LLaMA splits numbers into digits): the aux losses
  read answers digit by digit."""
  ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
  if any(i is None or i == tok.unk_token_id for i in ids):
    raise ValueError("the tokenizer has no single-token digits 0-9 (required by the aux losses)")
  return np.asarray(ids, np.int32)
