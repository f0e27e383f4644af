"""The toy world in words (`data.toy_text`): what the demo's LLaMA is pretrained on (#13)."""

import re

import numpy as np
import pytest

from ivcr_jax.data import tokenizer as toks
from ivcr_jax.data import toy_corpus, toy_text, toy_tokenizer

BLOCK = re.compile(r"<VID> (\d+) </VID> <VIDEO> (.*?) </VIDEO>")
TURN = re.compile(r"\[INST\] (.*?) \[/INST\] (.*?) </s>", re.S)
EVENT = re.compile(r"an? (\w+) (\w+) (moves from left to right|moves from right to left|"
                   r"moves down|moves up|stays still)")
PHRASE_TO_WORD = {phrase: word for word, phrase in toy_corpus.MOTIONS.items()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return toks.load_tokenizer(toy_tokenizer.build_toy_tokenizer(str(tmp_path_factory.mktemp("t"))))


@pytest.fixture(scope="module")
def world():
  return toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400))


def _events(words: str) -> set[tuple[str, str, str]]:
  """A block's events, spans dropped: {(colour, shape, motion word)}."""
  return {tuple(e.split()[:3]) for e in words.split(", ")[1:]}


def _asked(question: str) -> set[tuple[str, str, str]]:
  """The events a retrieval question describes, in the blocks' words."""
  if question.startswith("Find: "):
    return {tuple(e.split()) for e in question[len("Find: "):-1].split(", ")}
  return {(c, s, PHRASE_TO_WORD[m]) for c, s, m in EVENT.findall(question)}


@pytest.mark.parametrize("follow_ups", ["official", "words"])
def test_every_answer_names_the_one_candidate_its_question_describes(follow_ups):
  world = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400, follow_ups=follow_ups))
  checked = {"retrieval": 0, "moment": 0, "in_words": 0}
  for example in world.examples(step=0, count=20):
    turns = TURN.findall(example.text)
    blocks = {int(k): words for k, words in BLOCK.findall(turns[0][0])}
    assert sorted(blocks) == list(range(1, 11))
    retrieval = [t for t in turns if "Current video" not in t[0] and "moment" not in t[1]]
    for question, answer in retrieval:
      asked = _asked(question)
      checked["in_words"] += question.startswith("Find: ")
      assert asked
      holders = [k for k, words in blocks.items() if asked <= _events(words)]
      assert holders == [int(re.search(r"video (\d+)", answer).group(1))], (question, answer)
      checked["retrieval"] += 1
    moments = turns[len(retrieval):]
    assert len(moments) == world.cfg.moment_questions
    k, words = BLOCK.search(moments[0][0]).groups()
    assert words.split(", ")[0] == blocks[int(k)].split(", ")[0]  # the same video's background
    for question, answer in moments:
      colour, shape = re.search(r"[Tt]he (\w+) (\w+) (?:moves|stays|is visible)",
                                answer).groups()
      assert f"{colour} {shape}" in question
      span = re.search(r"(\d+\.\d)s-(\d+\.\d)s", answer).groups()
      event = [e for e in words.split(", ")[1:] if e.startswith(f"{colour} {shape} ")]
      assert len(event) == 1 and event[0].endswith(f"{span[0]}s-{span[1]}s")
      assert f"video {k}" in answer
      checked["moment"] += 1
  assert checked["retrieval"] == 20 * world.cfg.retrieval_questions
  assert checked["moment"] == 20 * world.cfg.moment_questions
  follow = 20 * (world.cfg.retrieval_questions - 1)
  assert checked["in_words"] == (follow if follow_ups == "words" else 0)


def test_a_batch_is_a_function_of_its_step_and_stream(world):
  again = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400))
  first = [e.text for e in world.examples(7, 3)]
  assert first == [e.text for e in again.examples(7, 3)]
  assert first != [e.text for e in world.examples(8, 3)]
  held_out = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400), stream=1)
  assert not set(first) & {e.text for e in held_out.examples(7, 3)}


def test_encoded_rows_supervise_the_answers_and_mark_the_index_and_span_digits(world, tokenizer):
  examples = world.examples(3, 4)
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=1024, positions=400)
  assert int(batch["cut_rows"]) == 0
  for row, example in enumerate(examples):
    ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
    used = batch["weight"][row] > 0
    position, label = batch["position"][row][used], batch["label"][row][used]
    np.testing.assert_array_equal(label, np.asarray(ids)[position + 1])
    np.testing.assert_array_equal(batch["ids"][row][:len(ids) - 1], ids[:-1])
    answers = "".join(example.text[a:b] for a, b in example.answer_spans)
    assert tokenizer.decode(label).replace(" ", "") == answers.replace(" ", "")
    indices = [tokenizer.decode([t]) for t in batch["label"][row][batch["index_group"][row] > 0]]
    expected = [m.group(1)[0] for a, b in example.answer_spans
                for m in [re.search(r"video (\d+)", example.text[a:b])]
                if not re.search(r"\d+\.\ds-", example.text[a:b])]  # retrieval answers only
    assert len(expected) == world.cfg.retrieval_questions
    groups = [toy_text.INDEX_GROUPS[g - 1] for g in batch["index_group"][row] if g]
    assert groups == list(example.index_groups) and groups[0].startswith("first")
    assert all(g.startswith("follow") for g in groups[1:])
    blocks = dict(BLOCK.findall(example.text))
    named = [re.search(r"video (\d+)", example.text[a:b]).group(1)
             for a, b in example.answer_spans[:len(groups)]]
    assert [int(g[-1]) for g in groups] == [len(_events(blocks[k])) for k in named]
    assert indices == expected
    spans = "".join(tokenizer.decode([t]) for t in batch["label"][row][batch["is_span"][row] > 0])
    assert spans == "".join(d for a, b in example.answer_spans
                            for m in re.finditer(r"(\d+\.\d)s-(\d+\.\d)s", example.text[a:b])
                            for d in (m.group(1) + m.group(2)).replace(".", ""))


@pytest.mark.parametrize("follow_ups", ["official", "words"])
def test_lookups_mark_each_named_event_and_the_candidates_that_show_it(follow_ups, tokenizer):
  world = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400, follow_ups=follow_ups))
  examples = world.examples(5, 4)
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=1024, positions=400, lookups=64)
  assert int(batch["cut_rows"]) == 0
  for row, example in enumerate(examples):
    turns = TURN.findall(example.text)
    blocks = {int(k) - 1: _events(words) for k, words in BLOCK.findall(turns[0][0])}
    questions = [q.rsplit("</VIDEO>", 1)[-1] for q, _ in turns[:world.cfg.retrieval_questions]]
    in_blocks = [(e, k) for k, words in BLOCK.findall(turns[0][0])
                 for e in (tuple(w.split()) for w in words.split(", ")[1:])]
    named = [(e, len(blocks)) for q in questions
             for e in sorted(_asked(q), key=lambda e: q.index(f"{e[0]} {e[1]}"))]
    used = int(batch["lookup_weight"][row].sum())
    assert used == len(in_blocks) + len(named) == len(example.lookups)
    assert example.block_lookups == len(in_blocks)
    np.testing.assert_array_equal(batch["lookup_in_question"][row][:used],
                                  [0] * len(in_blocks) + [1] * len(named))
    ids = batch["ids"][row]
    for slot, (event, seen) in enumerate(in_blocks + named):
      t = batch["lookup_position"][row, slot]
      # The token ending the event's phrase ("left" of "... moves from right to left").
      assert tokenizer.decode(ids[t - 1:t + 1]).split()[-1] == event[2]
      holders = np.flatnonzero(batch["lookup_target"][row, slot])
      assert list(holders) == [k for k, shown in blocks.items() if event in shown and k < int(seen)]
  few = toy_text.encode_batch(examples, tokenizer, seq_len=1024, positions=400, lookups=5)
  assert int(few["cut_rows"]) == 4 and few["lookup_weight"].sum() == 20


def test_rows_that_do_not_fit_are_cut_and_counted(world, tokenizer):
  examples = world.examples(3, 4)
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=200, positions=400)
  assert int(batch["cut_rows"]) == 4
  assert batch["position"].max() < 200
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=1024, positions=10)
  assert int(batch["cut_rows"]) == 4 and batch["weight"].sum() == 40


def test_the_list_length_curriculum():
  cfg = toy_text.TextWorldConfig(num_videos=400, min_candidates=3, curriculum_steps=70)
  assert [cfg.candidates_at(s) for s in (0, 9, 10, 69, 70, 1000)] == [3, 3, 4, 9, 10, 10]
  world = toy_text.TextWorld(cfg)
  for step, k in [(0, 3), (35, 6), (70, 10)]:
    for example in world.examples(step, 4):
      turns = TURN.findall(example.text)
      assert sorted(int(i) for i, _ in BLOCK.findall(turns[0][0])) == list(range(1, k + 1))
      named = [int(re.search(r"video (\d+)", a).group(1)) for q, a in turns
               if "Current video" not in q and "moment" not in a]
      assert named and max(named) <= k
  held_out = toy_text.TextWorld(cfg, stream=1)
  assert len(BLOCK.findall(TURN.findall(held_out.examples(0, 1)[0].text)[0][0])) == 10
  with pytest.raises(ValueError, match="min_candidates"):
    toy_text.TextWorldConfig(min_candidates=1)


@pytest.mark.parametrize("follow_ups", ["official", "words"])
def test_question_slots_hold_each_questions_tokens_after_the_answers(follow_ups, tokenizer):
  world = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400, follow_ups=follow_ups))
  examples = world.examples(7, 3)
  plain = toy_text.encode_batch(examples, tokenizer, seq_len=2048, positions=800)
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=2048, positions=800,
                                questions="all")
  assert int(batch["cut_rows"]) == 0 and not plain["is_question"].any()
  for row, example in enumerate(examples):
    turns = TURN.findall(example.text)
    # Each question is its turn's text after the candidate list or the moment block.
    asked = [re.split(r"</VIDEO>[.,]?|seconds\.", q)[-1].strip() for q, _ in turns]
    assert [example.text[a:b] for a, b in example.question_spans] == asked
    answers = int(plain["weight"][row].sum())
    for key in ("position", "label", "weight", "index_group", "is_span"):  # answers untouched
      np.testing.assert_array_equal(batch[key][row][:answers], plain[key][row][:answers])
    is_question = batch["is_question"][row]
    assert not is_question[:answers].any() and not batch["weight"][row][answers:].any()
    positions = batch["position"][row][is_question > 0]
    labels = batch["label"][row][is_question > 0]
    np.testing.assert_array_equal(batch["ids"][row][positions + 1], labels)  # the next token
    # The slots spell the questions, one after the other, and nothing else.
    assert tokenizer.decode(labels).replace(" ", "") == "".join(asked).replace(" ", "")


@pytest.mark.parametrize("follow_ups", ["official", "words"])
def test_event_question_slots_hold_only_the_named_events(follow_ups, tokenizer):
  world = toy_text.TextWorld(toy_text.TextWorldConfig(num_videos=400, follow_ups=follow_ups))
  examples = world.examples(3, 3)
  batch = toy_text.encode_batch(examples, tokenizer, seq_len=2048, positions=800,
                                questions="events")
  for row, example in enumerate(examples):
    phrases = [example.text[a:b] for a, b in example.question_event_spans]
    # One phrase per event of each asked video, each inside its question.
    assert len(phrases) == len(example.lookups) - example.block_lookups
    retrieval = example.question_spans[:len(example.index_chars)]
    assert all(any(lo <= a and b <= hi for lo, hi in retrieval)
               for a, b in example.question_event_spans)
    labels = batch["label"][row][batch["is_question"][row] > 0]
    assert tokenizer.decode(labels).replace(" ", "") == "".join(phrases).replace(" ", "")
  with pytest.raises(ValueError, match="questions must be one of"):
    toy_text.encode_batch(examples, tokenizer, seq_len=2048, positions=800, questions="some")


@pytest.mark.parametrize("follow_ups", ["official", "words"])
def test_the_answer_gap_curriculum_shortens_only_the_follow_ups_template(follow_ups, tokenizer):
  cfg = toy_text.TextWorldConfig(num_videos=400, follow_ups=follow_ups, retrieval_questions=4,
                                 answer_gap_from=5, answer_gap_every=3)
  assert [cfg.answer_gap_at(s) for s in (0, 4, 5, 7, 8, 30)] == [0, 0, 1, 1, 2, 9]
  assert toy_text.TextWorldConfig().answer_gap_at(10) is None  # off by default
  assert toy_text.TextWorld(cfg, stream=1).answer_gap(0) is None  # held out: the whole template
  assert toy_text.TextWorld(cfg).answer_gap(0) == 0
  with pytest.raises(ValueError, match="answer_gap_every"):
    toy_text.TextWorldConfig(answer_gap_every=-1)
  examples = toy_text.TextWorld(cfg).examples(2, 3)
  encode = lambda gap: toy_text.encode_batch(examples, tokenizer, seq_len=2048, positions=800,
                                             questions="events", answer_gap=gap)
  full = encode(None)
  template = ["▁", "[", "/", "INST", "]", "▁The", "▁video", "▁"]
  np.testing.assert_array_equal(encode(10**6)["ids"], full["ids"])
  if follow_ups == "words":  # the question ends with its last event: the gap is the template
    np.testing.assert_array_equal(encode(len(template) + 1)["ids"], full["ids"])
  for gap in (0, 1, 4):
    batch = encode(gap)
    for row, example in enumerate(examples):
      follow_ups = len(example.answer_gaps)
      assert follow_ups == cfg.retrieval_questions - 1
      dropped = (full["ids"][row] != tokenizer.eos_token_id).sum() - (
          batch["ids"][row] != tokenizer.eos_token_id).sum()
      groups = batch["index_group"][row]
      assert (batch["label"][row][groups > 0] == full["label"][row][full["index_group"][row] > 0]
              ).all()  # the same digits are asked, in the same groups
      before = [tokenizer.convert_ids_to_tokens(batch["ids"][row][p - gap:p + 1].tolist())
                for p in batch["position"][row][groups > 0]]
      first, *rest = before
      assert first[-1] != "." and first == tokenizer.convert_ids_to_tokens(
          full["ids"][row][full["position"][row][full["index_group"][row] > 0][0] - gap:][
              :gap + 1].tolist())  # the first question keeps its answer whole
      for (end, _), tokens in zip(example.answer_gaps, rest, strict=True):
        # The index follows the question's last event word, then the template's last `gap`.
        last_word = example.text[:end].split()[-1]
        assert tokens[0] == "▁" + last_word and tokens[1:] == template[len(template) - gap:]
      # Official questions may go on after their last event; words follow-ups end with it.
      assert dropped >= follow_ups * (len(template) + 1 - gap)
      if follow_ups == "words":
        assert dropped == follow_ups * (len(template) + 1 - gap)
      # The question's event tokens are still supervised, the dropped template's never.
      assert batch["is_question"][row].sum() == full["is_question"][row].sum()


def test_the_events_curriculum_draws_lists_of_videos_with_few_events_first():
  cfg = toy_text.TextWorldConfig(num_videos=400, events_every=10)
  assert [cfg.events_at(s) for s in (0, 9, 10, 25)] == [1, 1, 2, 3]
  assert toy_text.TextWorldConfig().events_at(5) is None
  with pytest.raises(ValueError, match="events_every"):
    toy_text.TextWorldConfig(events_every=-1)
  most = lambda world, step: max(len(_events(words)) for e in world.examples(step, 6)
                                 for _, words in BLOCK.findall(e.text))
  train, held_out = toy_text.TextWorld(cfg), toy_text.TextWorld(cfg, stream=1)
  assert [most(train, s) for s in (0, 10, 20)] == [1, 2, 3]
  assert most(held_out, 0) == 3
  for example in train.examples(0, 4):  # one-event lists still ask about every candidate
    turns = TURN.findall(example.text)
    assert len(BLOCK.findall(turns[0][0])) == 10
    assert all(len(_asked(q)) == 1 for q, a in turns if "Current video" not in q
               and "moment" not in a)
