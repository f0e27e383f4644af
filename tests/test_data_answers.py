"""The ground-truth answer parser (official `extract_video_numbers_first_only` and
`extract_time_ranges`, reference §5.2), positions and place values for the loss labels.

Generated answers, in both parsing modes, are tested in test_answer_parsing.py.
"""

import pytest

from ivcr_jax.data import answers


@pytest.mark.parametrize("text,expected", [
    ("I understand you want to find a video. The video 3 matches your description.", 3),
    ("The VIDEO 10 is it.", 10),
    ("video 0 then video 4", 0),  # official: 0 is returned, callers reject it
    ("video 11 is not an index", None),
    ("videos 3", None),
    ("a video.", None),
    ("the video\n7 shows", 7),
    ("video 3.5 seconds", 3),
    ("视频 3", None),
])
def test_video_index_cases(text, expected):
  assert answers.parse_video_index(text) == expected
  found = answers.find_video_index(text)
  assert (found is None) == (expected is None)


@pytest.mark.parametrize("text,expected", [
    ("In video 3, the red circle moves up during 12.5s-20.0s.", (12.5, 20.0)),
    ("from 5s-10s and 1.5s-3.2s", (5.0, 10.0)),
    ("at 20s-12s", (20.0, 12.0)),  # as written; records reject reversed spans
    ("at 12.5 - 20.0 seconds", None),
    ("at 12.5s - 20.0s", None),  # the ground-truth format has no spaces
    ("AT 12.5S-20S", None),  # nor capitals
    ("no span here", None),
])
def test_span_strict_cases(text, expected):
  assert answers.parse_span(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The moment is 12.5 - 20.0 seconds", (12.5, 20.0)),
    ("between 30s - 4s", (4.0, 30.0)),
    ("A specific example is : 20.8 - 30.0 seconds. It is at 1.0s-2.0s", (1.0, 2.0)),
    ("at 12..5s-14s", (12.5, 14.0)),
    ("nothing", None),
])
def test_span_lenient_cases(text, expected):  # lenient: the improved parser of generated text
  assert answers.parse_span(text, lenient=True) == expected


def test_positions_and_place_values():
  text = "In video 10, at 12.5s-120.05s."
  idx = answers.find_video_index(text)
  assert text[idx.start:idx.end] == "10" and idx.value == 10
  start, end = answers.find_span(text)
  assert text[start.start:start.end] == "12.5" and text[end.start:end.end] == "120.05"
  assert [(d, p) for _, d, p in start.digits()] == [(1, 10.0), (2, 1.0), (5, 0.1)]
  digits = end.digits()
  assert [text[c] for c, _, _ in digits] == ["1", "2", "0", "0", "5"]
  assert sum(d * p for _, d, p in digits) == pytest.approx(120.05)
  assert [p for _, _, p in idx.digits()] == [10.0, 1.0]


def test_format_seconds_is_official():
  fps = 2.9970029
  for i in range(200):
    assert answers.format_seconds(i / fps) == str(round(i / fps, 1))
  assert answers.format_seconds(3) == "3.0"  # times are floats in the official code
  assert answers.format_seconds(3.0) == "3.0"
