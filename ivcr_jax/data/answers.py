"""The one parser of assistant answers: the video index ("video N") and the time span ("Xs-Ys").

Labels, metrics and chat all read answers through this module so that a number means the same
thing everywhere. Results equal the official regexes (reference §3.3, §5.2) where those are right:

- `parse_video_index` is `extract_video_numbers_first_only`: the first match of
  `(?i)\\bvideo\\s+(10|[0-9])\\b`. Like the official code it returns 0 for "video 0" and nothing
  for "video 11"; callers treat values outside 1..10 as invalid.
- `parse_span` is `extract_time_ranges` (the ground-truth parser): the first `Xs-Ys`, as written.
- `parse_span(text, lenient=True)` is the main pattern of the official prediction parser
  `extract_time` (lower-casing, removal of its example sentence, `..` collapsed to `.`, first
  `a - b` pair, ordered). Its fallbacks are left out on purpose: they pair arbitrary numbers of
  the text ("video 3 ... 2 shapes" -> [2, 3]) or HH:MM:SS clock times into a span, and when
  nothing parses the official code returns [0, 0], which scores as a real (wrong) prediction;
  here nothing parsed is `None`.
"""

from __future__ import annotations

import dataclasses
import re

VIDEO_INDEX_RE = re.compile(r"(?i)\bvideo\s+(10|[0-9])\b")
SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s")
LENIENT_SPAN_RE = re.compile(r"(\d+\.*\d*)s?\s*-\s*(\d+\.*\d*)s?")
_OFFICIAL_EXAMPLE = "A specific example is : 20.8 - 30.0 seconds".lower()


@dataclasses.dataclass(frozen=True)
class NumberText:
  """A number as written in an answer, with its character range `[start, end)` in the text."""

  text: str
  start: int
  end: int

  @property
  def value(self) -> float:
    return float(self.text)

  def digits(self) -> list[tuple[int, int, float]]:
    """`(char_offset, digit, place_value)` per digit: "12.5" -> place values 10, 1, 0.1.

    The place values let a loss rebuild the number as the sum of digit times place value.
    """
    point = self.text.find(".")
    int_len = len(self.text) if point < 0 else point
    out = []
    for i, ch in enumerate(self.text):
      if ch.isdigit():
        exponent = int_len - 1 - i if i < int_len else int_len - i
        out.append((self.start + i, int(ch), 10.0 ** exponent))
    return out


def find_video_index(text: str) -> NumberText | None:
  """The first "video N" (N in 0..10) of `text`, with the position of N."""
  m = VIDEO_INDEX_RE.search(text)
  return None if m is None else NumberText(m.group(1), m.start(1), m.end(1))


def parse_video_index(text: str) -> int | None:
  """The official `extract_video_numbers_first_only`: first "video N" as int, or None."""
  found = find_video_index(text)
  return None if found is None else int(found.text)


def find_span(text: str) -> tuple[NumberText, NumberText] | None:
  """The first `Xs-Ys` of `text` (the ground-truth format), with the positions of X and Y."""
  m = SPAN_RE.search(text)
  if m is None:
    return None
  return (NumberText(m.group(1), m.start(1), m.end(1)),
          NumberText(m.group(2), m.start(2), m.end(2)))


def parse_span(text: str, *, lenient: bool = False) -> tuple[float, float] | None:
  """The span an answer states, in seconds, or None.

  Args:
    lenient: False for ground-truth answers (official `extract_time_ranges`, values as written);
      True for generated text (official `extract_time` main pattern, returned as (min, max)).
  """
  if not lenient:
    found = find_span(text)
    return None if found is None else (found[0].value, found[1].value)
  paragraph = re.sub(r"\.{2,}", ".", text.lower().replace(_OFFICIAL_EXAMPLE, ""))
  m = LENIENT_SPAN_RE.search(paragraph)
  if m is None:
    return None
  a, b = float(m.group(1)), float(m.group(2))
  return (a, b) if b > a else (b, a)


def format_seconds(t: float) -> str:
  """Seconds as the answers and timestamp texts write them: `str(round(t, 1))` (official)."""
  return str(round(float(t), 1))
