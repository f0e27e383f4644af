"""The LLM tokenizer with the IVCR tokens.

`load_tokenizer` does what the official `train.py`/`evaluate.py` do (reference §1.6): load a
Hugging Face tokenizer directory, add `<VID>`, `</VID>`, `<VIDEO>`, `</VIDEO>`, `<VIDEOTOKEN>` as
special tokens (ids 32000-32004 for Llama-2), pad = eos. Offline stand-ins trained on the toy
corpus are built by `ivcr_jax.data.toy_tokenizer`.

`transformers` is imported inside the functions: `AutoTokenizer` imports torch (~1.5 s), which
must stay out of `import ivcr_jax`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

IVCR_TOKENS = ("<VID>", "</VID>", "<VIDEO>", "</VIDEO>", "<VIDEOTOKEN>")
VIDEO_PLACEHOLDER = "<VIDEOTOKEN>"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """A local HF tokenizer directory, with the five IVCR tokens added and pad = eos."""
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} not found (nothing is downloaded; "
                            "build the toy one with "
                            "ivcr_jax.data.toy_tokenizer.build_toy_tokenizer)")
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  tok.add_tokens(list(IVCR_TOKENS), special_tokens=True)
  tok.pad_token = tok.eos_token
  tok.padding_side = "right"
  return tok


def load_plain_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """A local HF tokenizer directory as saved (for the BERT-style Q-Former text tokenizer)."""
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def placeholder_id(tok: PreTrainedTokenizerBase) -> int:
  return tok.convert_tokens_to_ids(VIDEO_PLACEHOLDER)


def digits_of(tok: PreTrainedTokenizerBase) -> np.ndarray:
  """Token ids of "0".."9" as single tokens (LLaMA splits numbers into digits): the aux losses
  read answers digit by digit."""
  ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
  if any(i is None or i == tok.unk_token_id for i in ids):
    raise ValueError("the tokenizer has no single-token digits 0-9 (required by the aux losses)")
  return np.asarray(ids, np.int32)
