"""Prompt rendering (vs the HF Llama-2 chat template and the official strings), labels, digit
positions and the Q-Former timestamp text."""

import numpy as np
import pytest

from ivcr_jax.data import prompt, records, toy_corpus, toy_tokenizer
from ivcr_jax.data import tokenizer as toks

# The chat template of meta-llama/Llama-2-7b-chat-hf (tokenizer_config.json).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return toks.load_tokenizer(toy_tokenizer.build_toy_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  path = toy_tokenizer.build_toy_bert_tokenizer(str(tmp_path_factory.mktemp("bert")))
  return toks.load_plain_tokenizer(path)


@pytest.fixture(scope="module")
def dialogues():
  cfg = toy_corpus.ToyCorpusConfig(num_videos=30, seed=5, chinese_fraction=0.3)
  raw = toy_corpus.make_dialogues(toy_corpus.make_video_specs(cfg), cfg)
  return records.read_annotations(raw)[0]


def times_for(turns, n=16, fps=3.0):
  return [[i * 2 / fps for i in range(n)] if t.kind == records.MOMENT else None for t in turns]


# --- the official conversion (convert_dataset.ipynb) and __getitem__ edit, verbatim --------
def official_user_content(sub_data):
  Current_Video = "Current video : <VID> {VID1} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>."
  user_question = sub_data.get('user').strip()
  if sub_data.get('gt_se') == [-1, -1]:
    candiate_video = "Candidate videos : "
    for i in range(10):
      a = f"<VID> {i+1} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>"
      if i < 9:
        a += ','
        candiate_video += a
      else:
        a += '.'
        candiate_video += a
    user_question = candiate_video + user_question
  else:
    import re
    m = re.search(r'(?i)\bvideo\s+(10|[0-9])\b', sub_data.get('assistance').strip())
    video_index = int(m.group(1)) if m else None
    user_question = Current_Video.format(VID1=video_index) + user_question
  return user_question.strip()


def official_insert_times(content, indices, fps):
  sec = ", ".join([str(round(f / fps, 1)) for f in indices])
  msg = f"The video contains {len(indices)} frames sampled at {sec} seconds"
  part1, part2 = content.split("</VIDEO>")
  return part1 + "</VIDEO>. " + msg.strip() + part2
# ------------------------------------------------------------------------------------------


def test_user_content_is_official(dialogues):
  indices, fps = [0, 4, 9, 13, 17, 95], 2.997
  seen = set()
  for d in dialogues:
    for t in d.turns:
      if t.kind == records.CHAT:
        assert prompt.user_content(t, None) == t.question
        continue
      seen.add(t.kind)
      sub = {"user": t.question, "assistance": t.answer,
             "gt_se": [-1, -1] if t.kind == records.RETRIEVAL else list(t.gt_span)}
      expected = official_user_content(sub)
      if t.kind == records.MOMENT:
        expected = official_insert_times(expected, indices, fps)
      assert prompt.user_content(t, [i / fps for i in indices]) == expected
  assert seen == {records.RETRIEVAL, records.MOMENT}


def test_b20_and_b2_strings():
  assert prompt.moment_content("When?", None, [0.0, 95.66]) == (
      "Current video : <VID> None </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains 2 "
      "frames sampled at 0.0, 95.7 seconds.When?")
  assert prompt.qformer_frame_texts([0.33, 1.0, 95.66]) == [
      "This frame is sampled at 0.3 second.", "This frame is sampled at 1.0 second.",
      "This frame is sampled at 95.7 seconds second."]
  assert prompt.qformer_frame_texts([0.33, 95.66], last_frame_quirk=False)[-1] == (
      "This frame is sampled at 95.7 second.")


def test_moment_turn_needs_frame_times(dialogues):
  turn = next(t for d in dialogues for t in d.turns if t.kind == records.MOMENT)
  with pytest.raises(ValueError, match="frame times"):
    prompt.user_content(turn, None)


def test_rendering_equals_hf_chat_template(tok, dialogues):
  for d in dialogues[:40]:
    for generation in (False, True):
      messages = prompt.chat_messages(d.turns, times_for(d.turns), generation=generation)
      expected = tok.apply_chat_template(messages, chat_template=LLAMA2_TEMPLATE, tokenize=False,
                                         add_generation_prompt=generation)
      assert prompt.render_llama2(messages) == expected
      assert expected.endswith(" [/INST]") == generation
  odd = [{"role": "user", "content": "  a "}, {"role": "assistant", "content": "b\n"},
         {"role": "user", "content": "c"}]
  assert prompt.render_llama2(odd) == tok.apply_chat_template(
      odd, chat_template=LLAMA2_TEMPLATE, tokenize=False)
  with pytest.raises(ValueError, match="alternate"):
    prompt.render_llama2([{"role": "assistant", "content": "x"}])


def _runs(mask):
  """Contiguous [start, end) runs of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2], strict=True))


def official_labels(ids, tok):
  """`get_label` with cur_token_len 1 per video (no expansion), searching for the in-context
  ids of " [/INST]" (Llama-2's legacy tokenizer gives the same ids without the space)."""
  inst = tok(" [/INST]", add_special_tokens=False).input_ids
  target = list(ids)
  last_pos = -1
  for i in range(len(target) - len(inst) + 1):
    if target[i:i + len(inst)] == inst:
      last_pos = i + len(inst) - 1
  return np.array([-100] * (last_pos + 1) + target[last_pos + 1:])


@pytest.mark.parametrize("mode", ["dialogue", "prefix"])
def test_encode_labels_placeholders_and_digits(tok, dialogues, mode):
  pid = toks.placeholder_id(tok)
  kinds_seen = set()
  for sample in records.make_samples(dialogues[:60], mode):
    turns = sample.turns
    enc = prompt.encode(sample, tok, times_for(turns))
    assert enc.input_ids.tolist() == tok(enc.text, add_special_tokens=False).input_ids
    assert enc.number_failures == 0

    # Labels: exactly the supervised answers, each " {answer} </s>".
    runs = _runs(enc.labels != prompt.IGNORE_INDEX)
    assert len(runs) == len(sample.supervised)
    for (a, b), t in zip(runs, sample.supervised, strict=True):
      assert np.array_equal(enc.labels[a:b], enc.input_ids[a:b])
      assert enc.input_ids[b - 1] == tok.eos_token_id
      assert tok.decode(enc.input_ids[a:b - 1]).strip() == turns[t].answer
    if mode == "prefix":
      assert np.array_equal(enc.labels, official_labels(enc.input_ids, tok))

    # Placeholders: one per video, in turn order.
    assert np.array_equal(enc.placeholder_positions, np.flatnonzero(enc.input_ids == pid))
    assert enc.videos == tuple(v for t in turns for v in t.videos)
    assert enc.video_turns == tuple(i for i, t in enumerate(turns) for _ in t.videos)

    # Digit positions spell the numbers, inside the labels of their answer.
    expected = {t: {records.RETRIEVAL: ["index"], records.MOMENT: ["start", "end"]}.get(
        turns[t].kind, []) for t in sample.supervised}
    got: dict[int, list[str]] = {t: [] for t in sample.supervised}
    for n in enc.numbers:
      got[n.turn].append(n.role)
      pieces = tok.convert_ids_to_tokens(enc.input_ids[list(n.positions)].tolist())
      assert pieces == [str(x) for x in n.digits]
      value = sum(d * p for d, p in zip(n.digits, n.places, strict=True))
      assert value == pytest.approx(n.value)
      assert all(enc.labels[p] != prompt.IGNORE_INDEX for p in n.positions)
      between = [p for p in range(n.positions[0], n.next_position) if p not in n.positions]
      assert tok.convert_ids_to_tokens(enc.input_ids[between].tolist()) in ([], ["."])
      assert n.next_position == n.positions[-1] + 1
      assert not tok.convert_ids_to_tokens(int(enc.input_ids[n.next_position]))[0].isdigit()
      turn = turns[n.turn]
      if n.role == "index":
        assert n.value == turn.video_index
        kinds_seen.add("index")
      else:
        assert n.value == turn.gt_span[n.role == "end"]
        kinds_seen.add("span")
    assert got == expected
  assert kinds_seen == {"index", "span"}


def test_two_digit_index(tok):
  cands = tuple(f"v{i}.mp4" for i in range(10))
  turn = records.Turn(records.RETRIEVAL, "q", "I see. The video 10 matches.", 1, "v9.mp4", cands,
                      None, 10)
  dialogue = records.Dialogue(0, "train", 1, (turn,))
  enc = prompt.encode(records.make_samples([dialogue])[0], tok, [None])
  [n] = enc.numbers
  assert n.digits == (1, 0) and n.places == (10.0, 1.0) and n.value == 10


def test_unparsable_answers_are_counted(tok):
  turns = (records.Turn(records.RETRIEVAL, "q", "It is the last one.", 1, "v9.mp4",
                        tuple(f"v{i}.mp4" for i in range(10)), None, 10),
           records.Turn(records.MOMENT, "q", "In video 2, early.", 2, "v1.mp4", (), (1.0, 2.0), 2),
           records.Turn(records.CHAT, "q", "Fine.", 3, None, (), None, None))
  sample = records.make_samples([records.Dialogue(0, "train", 1, turns)])[0]
  enc = prompt.encode(sample, tok, [None, [0.0, 1.0], None])
  assert enc.number_failures == 2 and not enc.numbers


def test_generation_prompt(tok, dialogues):
  d = next(d for d in dialogues if len(d.turns) >= 2)
  sample = records.make_samples([d])[0]
  enc = prompt.encode(sample, tok, times_for(d.turns), generation=True)
  assert enc.text.endswith(" [/INST]") and d.turns[-1].answer not in enc.text
  assert (enc.labels == prompt.IGNORE_INDEX).all() and not enc.numbers
  assert len(enc.videos) == sum(len(t.videos) for t in d.turns)


def test_context_length_is_checked(tok, dialogues):
  d = next(d for d in dialogues if d.turns[0].kind == records.RETRIEVAL)
  sample = records.make_samples([d])[0]
  enc = prompt.encode(sample, tok, times_for(d.turns))
  per_video = [64] * len(enc.videos)
  length = enc.spliced_length(per_video)
  assert length == len(enc.input_ids) + 63 * len(enc.videos)
  prompt.encode(sample, tok, times_for(d.turns), tokens_per_video=per_video, max_len=length)
  with pytest.raises(records.RecordError, match=rf"record {d.index} .*more than max_len") as e:
    prompt.encode(sample, tok, times_for(d.turns), tokens_per_video=per_video,
                  max_len=length - 1)
  assert e.value.reason == "context_too_long"
  with pytest.raises(ValueError):
    enc.spliced_length([64])


def test_qformer_text_llm_tokenizer_b1(tok):
  times = [0.33, 1.0, 12.3, 95.66]
  ids, mask = prompt.qformer_text_ids(times, tok)
  texts = prompt.qformer_frame_texts(times)
  assert ids.dtype == np.int32 and ids.shape == mask.shape and ids.shape[0] == 4
  assert (ids[:, 0] == 1).all()  # BOS
  for row, m, text in zip(ids, mask, texts, strict=True):
    n = int(m.sum())
    assert (m[:n] == 1).all() and (m[n:] == 0).all()  # right padding
    assert (row[n:] == 2).all()  # pad = eos = 2
    assert row.tolist()[:n] == tok(text).input_ids
  assert mask[-1].all()  # the "seconds second." row is the longest
  ids32, mask32 = prompt.qformer_text_ids(times, tok, pad_to=32)
  assert ids32.shape == (4, 32) and np.array_equal(ids32[:, :ids.shape[1]], ids)
  assert mask32[:, ids.shape[1]:].sum() == 0
  short, short_mask = prompt.qformer_text_ids(times, tok, max_len=5)
  assert short.shape == (4, 5) and short_mask.all()
  with pytest.raises(ValueError, match="pad_to"):
    prompt.qformer_text_ids(times, tok, pad_to=3)
  with pytest.raises(ValueError, match="B1"):
    prompt.qformer_text_ids(times, tok, vocab_size=100)


def test_qformer_text_bert_tokenizer(bert):
  ids, mask = prompt.qformer_text_ids([0.5, 7.25], bert, last_frame_quirk=False)
  assert (ids[:, 0] == bert.cls_token_id).all()
  for row, m in zip(ids, mask, strict=True):
    n = int(m.sum())
    assert row[n - 1] == bert.sep_token_id and (row[n:] == bert.pad_token_id).all()
  assert bert.decode(ids[1], skip_special_tokens=True) == "this frame is sampled at 7. 2 second."
