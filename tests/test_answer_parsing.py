"""Parsing generated answers in both modes, on answers written out by hand.

Each case gives what the official `metrics/eval.py` parsers return (read off their code, reference
§5.2) and what our improved parser returns. Official span column: the span of
`extract_time(text)[0]`, or None where nothing parses and it returns [[0, 0]].
"""

import random

import pytest

from ivcr_jax.data import answers

NOTHING = None  # official `extract_time` -> [[0, 0]]: nothing parsed

SPAN_CASES = [
    # text, official, improved
    # -- the official main pattern "a - b" and its normalisation --
    ("In video 3, the red circle moves up during 12.5s-20.0s.", (12.5, 20.0), (12.5, 20.0)),
    ("The moment happens at 12.5s - 20.0s.", (12.5, 20.0), (12.5, 20.0)),
    ("The moment is 12.5 - 20.0 seconds", (12.5, 20.0), (12.5, 20.0)),
    ("12.5-20.0", (12.5, 20.0), (12.5, 20.0)),
    ("at 20s-12s", (12.0, 20.0), (12.0, 20.0)),
    ("from 5s-10s and 1.5s-3.2s", (5.0, 10.0), (5.0, 10.0)),
    ("12.5s - 20.0s and 30s-40s", (12.5, 20.0), (12.5, 20.0)),
    ("12.5s-20.0s-30.0s", (12.5, 20.0), (12.5, 20.0)),
    ("A specific example is : 20.8 - 30.0 seconds. It is at 1.0s-2.0s", (1.0, 2.0), (1.0, 2.0)),
    ("A SPECIFIC EXAMPLE IS : 20.8 - 30.0 SECONDS", NOTHING, None),
    ("at 12..5s-14s", (12.5, 14.0), (12.5, 14.0)),
    ("between 30s - 4s", (4.0, 30.0), (4.0, 30.0)),
    ("12.5S-20.0S", (12.5, 20.0), (12.5, 20.0)),
    ("3.-5.", (3.0, 5.0), (3.0, 5.0)),
    ("0s-0s", (0.0, 0.0), (0.0, 0.0)),  # parsed (official: indistinguishable from nothing)
    ("5s-5s", (5.0, 5.0), (5.0, 5.0)),  # zero length: IoU 0, no crash
    ("-5s-10s", (5.0, 10.0), (5.0, 10.0)),
    ("12.5s-20.0s\nThe video 3 shows it.", (12.5, 20.0), (12.5, 20.0)),
    ("the answer is 12.5-20.0 (video 4)", (12.5, 20.0), (12.5, 20.0)),
    ("The clip is 12 minutes long; the moment is at 65s-80s", (65.0, 80.0), (65.0, 80.0)),
    ("Time: 5-10s\nAnother: 30-40s", (5.0, 10.0), (5.0, 10.0)),
    ("In the 2nd half, 30s-40s", (30.0, 40.0), (30.0, 40.0)),
    ("video 3, 12 - 20 seconds", (12.0, 20.0), (12.0, 20.0)),
    ("video 4: 2-3", (2.0, 3.0), (2.0, 3.0)),  # a bare range is still a span
    ("１２.５s-２０s", (12.5, 20.0), (12.5, 20.0)),  # official \d takes full-width digits
    ("红色圆形出现在12.5s-20.0s。", (12.5, 20.0), (12.5, 20.0)),
    # -- official fallback: first number of each line (split at ! ? \n), paired in order --
    ("It starts at 12.5 seconds.\nIt ends at 20 seconds.", (12.5, 20.0), (12.5, 20.0)),
    ("start: 12.5\nend: 20.0", (12.5, 20.0), (12.5, 20.0)),
    ("Start 7\nEnd 3.5", (3.5, 7.0), (3.5, 7.0)),
    ("Begin 7!End 3.5", (3.5, 7.0), (3.5, 7.0)),
    ("Video 3 is the one\nIt happens at 12.5s", (3.0, 12.0), None),  # "12.5s" reads as 12
    ("Is it 20? Or 12?", (12.0, 20.0), None),
    ("Three numbers: 1\n2\n3", (1.0, 2.0), None),  # the odd last one is dropped
    ("Video 2\nVideo 7", (2.0, 7.0), None),
    ("The video is 12.5 seconds long\n", NOTHING, None),  # one number pairs with nothing
    # -- two consecutive lines of nothing but a number each are a span; a list of three is not --
    ("Sorry.\n12.5\n20.0", (12.5, 20.0), (12.5, 20.0)),
    ("12.5s\n20s", NOTHING, (12.5, 20.0)),  # official: no first number in "20s" (\\b fails)
    ("The moment:\n20.0.\n\n12.5", (12.5, 20.0), (12.5, 20.0)),  # blank line, punctuation
    ("12.5\n20.0\n30.0", (12.5, 20.0), None),
    ("Maybe:\n12.5\n20.0\nor rather 30s-40s", (30.0, 40.0), (30.0, 40.0)),
    ("2019\n2020", (2019.0, 2020.0), None),  # still a year range
    ("Video 2\n7", (2.0, 7.0), None),  # "video 2" is not alone on its line
    ("The moment starts at 12.5 seconds and ends at 20 seconds.", NOTHING, (12.5, 20.0)),
    ("The event starts at 12.5s and ends at 20s.", NOTHING, (12.5, 20.0)),
    ("start time: 12.5s, end time: 20.0s", NOTHING, (12.5, 20.0)),
    # -- clock times (the official HH:MM:SS fallback never yields anything) --
    ("0:01:05", NOTHING, None),
    ("start 00:01:05\nend 00:01:20", (0.0, 0.0), (65.0, 80.0)),  # lines' first numbers: 00, 00
    ("from 00:01:05 to 00:01:20", NOTHING, (65.0, 80.0)),
    ("00:12-00:20", (0.0, 12.0), (12.0, 20.0)),  # official pairs "12-00"
    ("1:05-1:20", (1.0, 5.0), (65.0, 80.0)),
    ("0:01:05-0:01:20", (0.0, 5.0), (65.0, 80.0)),
    ("The moment is 1:05 to 1:20.", NOTHING, (65.0, 80.0)),
    # -- the span, not an unrelated number pair --
    ("video 3 - 12.5s-20.0s", (3.0, 12.5), (12.5, 20.0)),
    ("It happened in the 2019-2020 season.", (2019.0, 2020.0), None),
    ("Between 2019 and 2020 the shape moves.", NOTHING, None),
    ("scene 1-2", (1.0, 2.0), None),
    ("scene 1-2 at 5s-8s", (1.0, 2.0), (5.0, 8.0)),
    ("scenes 1-2 and 3-4", (1.0, 2.0), None),
    ("Episode 5-6 recap: 10 - 15 seconds", (5.0, 6.0), (10.0, 15.0)),
    ("top-10 results, 12s to 20s", NOTHING, (12.0, 20.0)),
    ("1e5-2e5", (2.0, 5.0), None),
    # -- thousands separators (ASCII commas only; a full-width comma separates) --
    ("1,234.5s-1,300.0s", (1.0, 234.5), (1234.5, 1300.0)),
    ("from 1,234 to 1,300 seconds", NOTHING, (1234.0, 1300.0)),
    ("video 3,120s-130s", (120.0, 130.0), (120.0, 130.0)),  # not video 3120
    ("视频3，120秒到130秒", NOTHING, (120.0, 130.0)),
    ("12,34s-40s", (34.0, 40.0), (34.0, 40.0)),  # not a digit group of three
    # -- units, separators and leading dots --
    ("12.5 seconds - 20 seconds", NOTHING, (12.5, 20.0)),
    ("from 12.5 to 20 seconds", NOTHING, (12.5, 20.0)),
    ("from 12.5 to 20 seconds?", NOTHING, (12.5, 20.0)),
    ("The moment is from 20s to 12.5s", NOTHING, (12.5, 20.0)),
    ("between 12.5 and 20.0", NOTHING, (12.5, 20.0)),
    ("The video 3 shows it at 12.5s to 20s", NOTHING, (12.5, 20.0)),
    ("12.5 to 20.0", NOTHING, None),  # "to" between bare numbers: not enough
    ("3 to 4 shapes", NOTHING, None),
    ("12.5–20.0 s", NOTHING, (12.5, 20.0)),  # en dash
    ("12.5 ~ 20.0 s", NOTHING, (12.5, 20.0)),
    ("12.5sec-20secs", NOTHING, (12.5, 20.0)),
    (".5s-3s", (3.0, 5.0), (0.5, 3.0)),
    ("1-2 minutes", (1.0, 2.0), (60.0, 120.0)),
    ("1m5s-1m20s", (1.0, 5.0), (65.0, 80.0)),
    ("The red circle appears at 3rd second", NOTHING, None),
    # -- Chinese --
    ("在12.5秒到20秒之间", NOTHING, (12.5, 20.0)),
    ("在12.5秒和20秒之间", NOTHING, (12.5, 20.0)),
    ("视频3中，红色圆形在12.5秒至20秒出现。", NOTHING, (12.5, 20.0)),
    ("第3个视频，1分05秒到1分20秒", NOTHING, (65.0, 80.0)),
    ("12.5秒-20秒", NOTHING, (12.5, 20.0)),
    ("１２.５秒～２０秒", NOTHING, (12.5, 20.0)),
    ("开始于12.5秒，结束于20秒", NOTHING, (12.5, 20.0)),
    ("从00:12到00:20", NOTHING, (12.0, 20.0)),
    ("我找不到这个片段。", NOTHING, None),
    # -- empty and malformed outputs --
    ("", NOTHING, None),
    ("I don't know.", NOTHING, None),
    ("Sorry, I cannot find this moment.", NOTHING, None),
    ("-", NOTHING, None),
    ("s-s", NOTHING, None),
    ("12.5s", NOTHING, None),
    ("12.5s-", NOTHING, None),
    ("-20s", NOTHING, None),
    ("Video 3.\n\n", NOTHING, None),
    ("</s><s>[INST] 12.5", NOTHING, None),
    ("........", NOTHING, None),
]

INDEX_CASES = [
    # text, official, improved
    ("I understand you want to find a video. The video 3 matches your description.", 3, 3),
    ("The VIDEO 10 is it.", 10, 10),
    ("video 10", 10, 10),
    ("video 1", 1, 1),
    ("Video\t4 is the best match", 4, 4),
    ("the video\n7 shows", 7, 7),
    ("video 3.5 seconds", 3, 3),
    ("I think video 1 and video 3 are close, but video 3 matches.", 1, 1),
    ("video 0 then video 4", 0, 4),  # official 0 matches no ground truth
    ("video 11 is not an index", None, None),
    ("video 11 and video 2", 2, 2),
    ("videos 3", None, None),
    ("a video.", None, None),
    ("video 3rd", None, None),
    ("video01", None, None),
    ("video -3", None, None),
    ("The answer is 5.", None, None),
    ("", None, None),
    ("Video3 matches", None, 3),
    ("video #3", None, 3),
    ("video no. 3", None, 3),
    ("ｖｉｄｅｏ ３", None, 3),
    ("视频 3", None, 3),
    ("第三个视频符合描述", None, 3),
    ("第10个视频", None, 10),
    ("第十个视频", None, 10),
    ("的video 3", None, 3),  # official \b fails after a CJK character
    ("video 3的", None, 3),
    # -- an index stated as the answer wins over an enumeration --
    ("Among the candidates (video 1 to video 10), the best match is video 7.", 1, 7),
    ("Video 1, video 2 and video 3 show shapes; video 2 matches best.", 1, 2),
    ("Video 4 and video 9 are close; the answer is video 9.", 4, 9),
    ("I compared video 1 with video 6: video 6 is the best match.", 1, 6),
    ("The best match is not video 1; it is video 8.", 1, 1),  # a negation states nothing
    ("video 3 is not the best match, video 5 is.", 3, 3),
    ("候选视频1到视频10中，答案是视频7", None, 7),
    ("视频1和视频2里，视频2最符合", None, 2),
]


def test_enough_hand_written_answers():
  assert len(SPAN_CASES) + len(INDEX_CASES) >= 80


@pytest.mark.parametrize("text,official,improved", SPAN_CASES)
def test_official_span(text, official, improved):
  assert answers.official_extract_time(text) == (official or (0.0, 0.0))
  assert answers.predicted_span(text, official=True) == official


@pytest.mark.parametrize("text,official,improved", SPAN_CASES)
def test_improved_span(text, official, improved):
  assert answers.predicted_span(text) == improved
  assert answers.parse_span(text, lenient=True) == improved


@pytest.mark.parametrize("text,official,improved", INDEX_CASES)
def test_video_index_both_modes(text, official, improved):
  assert answers.predicted_index(text, official=True) == official
  assert answers.parse_video_index(text) == official  # the ground-truth parser is the official
  assert answers.predicted_index(text) == improved


def test_malformed_outputs_never_crash_and_spans_are_ordered():
  rng = random.Random(0)
  pieces = ["video", "Video", " ", "\n", "!", "?", "s", "sec", "秒", "-", "–", " to ", " and ",
            "between ", "from ", ".", "..", ":", "0", "3", "12", "12.5", ".5", "2019", "00:01:05",
            "1:05", "第", "视频", "到", "ends at ", "min", "#", "１２", "\u0000", "🙂"]
  for _ in range(3000):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
    for official in (True, False):
      span = answers.predicted_span(text, official=official)
      assert span is None or span[0] <= span[1], (text, span)
      index = answers.predicted_index(text, official=official)
      assert index is None or 0 <= index <= 10
    assert answers.predicted_index(text) != 0
