"""The offline LLaMA-style and BERT-style toy tokenizers, and loading with the IVCR tokens."""

import hashlib
import os
import subprocess
import sys

import pytest

from ivcr_jax.data import tokenizer as toks
from ivcr_jax.data import toy_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return toy_tokenizer.build_toy_tokenizer(str(tmp_path_factory.mktemp("llama_tok")))


@pytest.fixture(scope="module")
def tok(llama_dir):
  return toks.load_tokenizer(llama_dir)


def test_llama_layout(tok):
  assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>",
                                                          "<0xFF>"]
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  assert tok("hi").input_ids[0] == 1  # BOS with add_special_tokens (Q-Former text, §1.2)
  assert tok("hi", add_special_tokens=False).input_ids[0] != 1


def test_ivcr_tokens_are_added_after_the_vocabulary(tok, llama_dir):
  base = len(toks.load_plain_tokenizer(llama_dir))
  ids = tok.convert_tokens_to_ids(list(toks.IVCR_TOKENS))
  assert ids == list(range(base, base + 5))
  assert toks.placeholder_id(tok) == base + 4
  enc = tok("a <VID> 3 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>", add_special_tokens=False)
  assert [i for i in enc.input_ids if i >= base] == [ids[0], ids[1], ids[2], ids[4], ids[3]]


def test_digits_are_single_tokens_and_words_carry_metaspace(tok):
  pieces = tok.convert_ids_to_tokens(tok("at 12.5s-120.0s video 10",
                                         add_special_tokens=False).input_ids)
  digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
  assert digits == list("125") + list("1200") + list("10")
  assert "▁video" in pieces


def test_punctuation_is_apart_so_a_word_is_one_token_wherever_it_stands(tok):
  """A block lists "... square left, ... triangle still" and a question asks for "... square
  left." or "still?": matching them needs "left" to be the same token in every place, as in
  Llama-2's tokenizer (BPE alone merged "▁left," and "▁still." into tokens of their own)."""
  for word in ("left", "still", "up", "square", "match"):
    ids = {tuple(tok(f"a {word}{p} b", add_special_tokens=False).input_ids[1:-1])
           for p in ("", ",", ".", "?", ":")}
    assert {i[0] for i in ids} == set(tok(f"a {word}", add_special_tokens=False).input_ids[1:])
    assert len(ids) == 5 and all(len(i) == (1 if j == 0 else 2)
                                 for j, i in enumerate(sorted(ids, key=len)))


@pytest.mark.parametrize("text", ["The video 3 matches.", "找到一个红色圆形的视频。",
                                  "emoji 😀 and ünïcode", "line\nbreak  double space"])
def test_round_trip(tok, text):
  ids = tok(text, add_special_tokens=False).input_ids
  assert 0 not in ids  # byte fallback: nothing is <unk>
  assert tok.decode(ids) == text


def test_build_is_cached_and_deterministic(llama_dir, tmp_path):
  path = os.path.join(llama_dir, "tokenizer.json")
  before = os.path.getmtime(path)
  assert toy_tokenizer.build_toy_tokenizer(llama_dir) == llama_dir
  assert os.path.getmtime(path) == before
  other = toy_tokenizer.build_toy_tokenizer(str(tmp_path / "again"))
  digest = lambda p: hashlib.md5(open(p, "rb").read()).hexdigest()
  assert digest(os.path.join(other, "tokenizer.json")) == digest(path)
  small = toy_tokenizer.build_toy_tokenizer(str(tmp_path / "again"), vocab_size=600)
  assert len(toks.load_plain_tokenizer(small)) <= 600


def test_bert_tokenizer(tmp_path):
  bert = toks.load_plain_tokenizer(toy_tokenizer.build_toy_bert_tokenizer(str(tmp_path / "bert")))
  ids = bert("This frame is sampled at 3.5 second.").input_ids
  assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
  assert bert.pad_token_id == 0
  assert bert.decode(ids, skip_special_tokens=True) == "this frame is sampled at 3. 5 second."


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    toks.load_tokenizer(str(tmp_path / "nope"))


def test_loading_takes_the_named_class_as_auto_tokenizer_does_without_importing_torch(
    llama_dir, tmp_path):
  """`AutoTokenizer` imports torch through the model configuration code (~200 MiB resident in
  every trainer process); loading by the class the directory names gives the same tokenizer."""
  from transformers import AutoTokenizer

  bert_dir = toy_tokenizer.build_toy_bert_tokenizer(str(tmp_path / "bert"))
  text = "The video 3 matches <VID> 7 </VID> at 12.5s, ünïcode."
  for path in (llama_dir, bert_dir):
    ours, auto = toks.load_plain_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto) and len(ours) == len(auto)
    assert ours(text).input_ids == auto(text).input_ids
    assert ours.special_tokens_map == auto.special_tokens_map
  code = (f"import sys; from ivcr_jax.data import tokenizer as t; t.load_tokenizer({llama_dir!r}); "
          f"t.load_plain_tokenizer({bert_dir!r}); assert 'torch' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_a_directory_naming_no_class_falls_back_to_auto_tokenizer(llama_dir, tmp_path):
  import json
  import shutil

  plain = shutil.copytree(llama_dir, str(tmp_path / "plain"))
  config_path = os.path.join(plain, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  for name in (None, "NoSuchTokenizer"):
    config["tokenizer_class"] = name
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in config.items() if v is not None}, f)
    tok = toks.load_tokenizer(plain)
    assert tok("a b").input_ids == toks.load_tokenizer(llama_dir)("a b").input_ids


def test_data_modules_do_not_import_torch_or_tensorflow():
  code = ("import sys, ivcr_jax, ivcr_jax.data.answers, ivcr_jax.data.records, "
          "ivcr_jax.data.prompt, ivcr_jax.data.tokenizer, ivcr_jax.data.toy_corpus; "
          "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
