"""Tiny offline LLM and Q-Former tokenizers, trained on the toy corpus's language.

Nothing may be downloaded, so the demo and tests train their own tokenizers: `build_toy_tokenizer`
makes a LLaMA-style one (BPE with byte fallback, digits one per token, newlines apart, Metaspace
"▁", punctuation apart from words as in Llama-2's "▁still" "," where BPE alone merges "▁still,",
`<unk>`=0, `<s>`=1, `</s>`=2, bytes at 3-258 like Llama-2's layout), and
`build_toy_bert_tokenizer` a BERT-style WordPiece one for the Q-Former text without quirk B1. Both
are saved with `save_pretrained`, so `tokenizer.load_tokenizer` loads them like any other.
Apart from `tokenizer` because learning from rendered prompts needs `prompt`, which itself
needs `tokenizer`.

`tokenizers`/`transformers` are imported inside the functions, to keep `import ivcr_jax` light.
"""

from __future__ import annotations

import json
import os

from ivcr_jax.data import prompt, records, toy_corpus
from ivcr_jax.data.tokenizer import IVCR_TOKENS
from ivcr_jax.jsonfile import read_json, write_json

_TOY_FORMAT = 3  # bump when the toy tokenizers' recipe changes, to invalidate cached builds
_MARKER = "ivcr_toy_tokenizer.json"  # the recipe a directory was built with


def toy_training_texts(num_videos: int = 200, seed: int = 0) -> list[str]:
  """Text the toy tokenizers learn from: toy dialogues rendered as the model sees them, plus
  the frame-time sentences of both the LLM prompt and the Q-Former."""
  cfg = toy_corpus.ToyCorpusConfig(num_videos=num_videos, seed=seed)
  specs = toy_corpus.make_video_specs(cfg)
  dialogues, _ = records.read_annotations(toy_corpus.make_dialogues(specs, cfg))
  texts = []
  for d in dialogues:
    times = [[i / cfg.fps for i in range(0, 16 * int(cfg.fps), int(cfg.fps))]] * len(d.turns)
    text = prompt.render_llama2(prompt.chat_messages(d.turns, times))
    for tag in IVCR_TOKENS:  # special tokens never reach the BPE model
      text = text.replace(tag, " ")
    texts.append(text)
  for t in range(0, 400, 7):
    texts.extend(prompt.qformer_frame_texts([t / 10, t / 10 + 0.3]))
  return texts


def _is_built(directory: str, recipe: dict) -> bool:
  marker = os.path.join(directory, _MARKER)
  return os.path.exists(marker) and read_json(marker) == recipe


def _mark_built(directory: str, recipe: dict) -> None:
  write_json(os.path.join(directory, _MARKER), recipe)


def build_toy_tokenizer(directory: str, *, vocab_size: int = 1024, seed: int = 0) -> str:
  """Trains (or reuses, when already built with the same recipe) the LLaMA-style toy tokenizer.

  Returns `directory`, loadable with `load_tokenizer`.
  """
  recipe = {"kind": "llama", "vocab_size": vocab_size, "seed": seed, "format": _TOY_FORMAT}
  if _is_built(directory, recipe):
    return directory
  from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )
  from transformers import PreTrainedTokenizerFast

  specials = ["<unk>", "<s>", "</s>"]
  pre = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\n", behavior="isolated"),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
      pre_tokenizers.Punctuation(behavior="isolated"),
      pre_tokenizers.Digits(individual_digits=True)])
  draft = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  draft.pre_tokenizer = pre
  draft.train_from_iterator(toy_training_texts(seed=seed), trainers.BpeTrainer(
      vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False))
  trained = json.loads(draft.to_str())["model"]
  # Llama-2's layout: specials, then the 256 byte-fallback tokens, then the learned pieces.
  vocab = {t: i for i, t in enumerate(specials)}
  for b in range(256):
    vocab[f"<0x{b:02X}>"] = len(vocab)
  for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
    vocab.setdefault(piece, len(vocab))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
  tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", model_max_length=4096)
  os.makedirs(directory, exist_ok=True)
  hf.save_pretrained(directory)
  _mark_built(directory, recipe)
  return directory


def build_toy_bert_tokenizer(directory: str, *, vocab_size: int = 512, seed: int = 0) -> str:
  """Trains (or reuses) a BERT-style uncased WordPiece tokenizer ([CLS] ... [SEP], [PAD]=0)."""
  recipe = {"kind": "bert", "vocab_size": vocab_size, "seed": seed, "format": _TOY_FORMAT}
  if _is_built(directory, recipe):
    return directory
  from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  from transformers import PreTrainedTokenizerFast

  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(toy_training_texts(seed=seed), trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False))
  tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                 ("[CLS]", tok.token_to_id("[CLS]")))
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                               model_max_length=512)
  os.makedirs(directory, exist_ok=True)
  hf.save_pretrained(directory)
  _mark_built(directory, recipe)
  return directory
