"""The one parser of assistant answers: the video index ("video N") and the time span ("Xs-Ys").

Labels, metrics and chat all read answers through this module so that a number means the same
thing everywhere.

Ground-truth answers (labels, records), equal to the official regexes (reference §5.2):
- `parse_video_index` is `extract_video_numbers_first_only`: the first match of
  `(?i)\\bvideo\\s+(10|[0-9])\\b`. Like the official code it returns 0 for "video 0" and nothing
  for "video 11"; callers treat values outside 1..10 as invalid.
- `parse_span` / `find_span` are `extract_time_ranges`: the first `Xs-Ys`, values as written.

Generated answers, two parsers (`predicted_index`, `predicted_span`):
- `official=True` reproduces the official prediction parsers exactly, bugs included, to compare
  with the paper: `extract_video_numbers_first_only` and `extract_time` (`official_extract_time`,
  with its fallback and its [0, 0] when nothing parses).
- `official=False` (default) reads what a generated answer states and nothing else: clock times,
  units glued to numbers, word and Chinese separators, "starts at ... ends at ...", and no span
  made of a video index, a year range or the first numbers of unrelated lines (two consecutive
  lines of nothing but a number each are a span), thousands separators, and a video index stated
  as the answer over an enumeration. README "Parsing generated answers" lists every difference.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import unicodedata

VIDEO_INDEX_RE = re.compile(r"(?i)\bvideo\s+(10|[0-9])\b")
SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s")


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
      True for generated text (`predicted_span`, the improved parser, returned as (min, max)).
  """
  if lenient:
    return predicted_span(text)
  found = find_span(text)
  return None if found is None else (found[0].value, found[1].value)


def format_seconds(t: float) -> str:
  """Seconds as the answers and timestamp texts write them: `str(round(t, 1))` (official)."""
  return str(round(float(t), 1))


# --- Generated answers -----------------------------------------------------------------------

def predicted_index(text: str, *, official: bool = False) -> int | None:
  """The candidate (1..10) a generated retrieval answer names, or None.

  official: `extract_video_numbers_first_only` as is (it may return 0, which matches no ground
  truth). Otherwise a mention naming a legal candidate: "video 3", "Video3", "video #3",
  "video no. 3", "视频3", "第三个视频" ("video 0" and "video 11" are skipped). The first mention
  stated as the answer ("the best match is video 7", "video 2 matches best", "the answer is
  video 7", "答案是视频7") wins over earlier ones, which may only enumerate the candidates; else
  the first mention.
  """
  if official:
    return parse_video_index(text)
  t = _normalise(text)
  mentions = list(_INDEX_RE.finditer(t))
  if not mentions:
    return None
  m = next((m for m in mentions if _STATED_BEFORE_RE.search(t, 0, m.start())
            or _STATED_AFTER_RE.match(t, m.end())), mentions[0])
  n = m.group("en") or m.group("zh") or m.group("ord")
  return int(n) if n.isdigit() else _CHINESE_DIGITS[n]


def predicted_span(text: str, *, official: bool = False) -> tuple[float, float] | None:
  """The (start, end) seconds a generated moment answer states, ordered, or None.

  official: the span of `official_extract_time`, except that None stands for its [[0, 0]]
  "nothing parsed" result (both score IoU 0 against any ground truth 0 <= start < end, and None
  is counted as unparsed).
  """
  if official:
    spans = official_time_spans(text)
    return spans[0] if spans else None
  return _improved_span(text)


# Official `extract_time` (reference §5.2). Regexes as in the official code: they define what it
# returns.
_OFFICIAL_EXAMPLE = "a specific example is : 20.8 - 30.0 seconds"
_OFFICIAL_PAIR_RE = re.compile(r"(\d+\.*\d*)s?\s*-\s*(\d+\.*\d*)s?")
_OFFICIAL_NUMBER_RE = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")


def official_time_spans(text: str) -> list[tuple[float, float]]:
  """Every span the official `extract_time` finds before it keeps the first (each ordered).

  Main pattern: every `a - b` of the lower-cased text (its prompt's example sentence removed,
  runs of dots collapsed). Fallback, when there is none: the first number of each "sentence"
  (split at `!`, `?` and newlines, not at periods), paired in order, an odd last one dropped.
  Its second fallback (HH:MM:SS clock times) never yields anything: `findall` returns tuples
  there, whose `count(':')` is 0, and any line holding a clock time already gave the first
  fallback a number, so reaching it means at most one such line, which pairs with nothing.
  """
  paragraph = re.sub(r"\.{2,}", ".", text.lower().replace(_OFFICIAL_EXAMPLE, ""))
  pairs = [(float(a), float(b)) for a, b in _OFFICIAL_PAIR_RE.findall(paragraph)]
  if not pairs:
    firsts = [float(m.group(1)) for line in re.split(r"[!?\n]", paragraph)
              if (m := _OFFICIAL_NUMBER_RE.search(line))]
    pairs = list(zip(firsts[0::2], firsts[1::2], strict=False))  # an odd last one is dropped
  return [(a, b) if b > a else (b, a) for a, b in pairs]


def official_extract_time(text: str) -> tuple[float, float]:
  """The official `extract_time(text)[0]` exactly: its first span, or (0, 0) when none."""
  spans = official_time_spans(text)
  return spans[0] if spans else (0.0, 0.0)


# Improved parser. Text is NFKC-normalised (full-width digits and punctuation become ASCII) and
# lower-cased first.
_CHINESE_DIGITS = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
                   "九": 9, "十": 10}
_INDEX_RE = re.compile(
    r"(?<![a-z])video\s*(?:#|no\.?|number)?\s*(?P<en>10|[1-9])(?![0-9a-z_])"
    r"|视频\s*(?P<zh>10|[1-9])(?![0-9])"
    r"|第\s*(?P<ord>10|[1-9]|[一二两三四五六七八九十])(?![0-9])\s*(?:个|部|段)?\s*视频")
# A mention stated as the answer: what precedes it, or what follows it.
_STATED_BEFORE_RE = re.compile(
    r"(?:(?<![a-z])(?:best\s+(?:match|fit|one)|answer)\s*(?:is|:|would\s+be)"
    r"|答案\s*(?:是|为|:)|最(?:符合|匹配|相关)的(?:视频)?\s*(?:是|为))\s*(?:the\s+)?$")
_STATED_AFTER_RE = re.compile(
    r"\s*(?:matches\s+best|fits\s+best|best\s+matches|is\s+the\s+(?:best|answer)(?![a-z])"
    r"|最(?:符合|匹配|相关))")

_SECONDS = r"(?:s|secs?|seconds?|秒钟?)(?![a-z])"
_MINUTES = r"(?:mins?|minutes?|分钟)(?![a-z])"
_TOKEN_RE = re.compile(
    r"(?<![a-z0-9_])(?:"
    r"(?P<h>\d{1,2}):(?P<hm>[0-5]\d):(?P<hs>[0-5]\d(?:\.\d+)?)(?![0-9:a-z])"  # h:mm:ss
    r"|(?P<m>\d{1,3}):(?P<ms>[0-5]\d(?:\.\d+)?)(?![0-9:a-z])"  # m:ss
    r"|(?P<cm>\d+)\s*(?:m|mins?|minutes?|分钟?)\s*(?P<cs>\d+(?:\.\d+)?)\s*" + _SECONDS  # 1 min 5 s
    + r"|(?P<num>\d+(?:\.\d*)?|\.\d+)(?:\s*(?P<unit>" + _SECONDS + "|" + _MINUTES + "))?"
    r")")
# A bare number right after one of these words counts things (video 3, scene 1-2), not seconds.
_COUNTED_RE = re.compile(
    r"(?:(?<![a-z])(?:videos?|clips?|scenes?|candidates?|episodes?|seasons?|parts?|steps?|"
    r"chapters?|shots?|turns?|rounds?|top|rank|number|no\.?)|#|视频|第|片段|候选)\s*"
    r"(?:#|no\.?|number)?\s*$")
_RANGE_SEP_RE = re.compile(r"\s*(?:-{1,2}|[–—−~]|至|到)\s*")
_WORD_SEP_RE = re.compile(r"\s*(?:to|till|until|through|thru)\s*")
_AND_SEP_RE = re.compile(r"\s*(?:and|和|与|及)\s*")
_LIST_SEP_RE = re.compile(r"\s*(?:、|&|and|or|和|或)\s*")  # not ",": "video 3, 12 - 20 seconds"
_END_SEP_RE = re.compile(
    r"[\s,;.!?]*(?:(?:and|then)\s+)?(?:(?:it|the\s+\w+)\s+)?"
    r"(?:ends?|ending|ended|finish(?:es|ed)?|stops?)(?:\s+(?:at|time|timestamp))?"
    r"(?:\s*(?:is|at|of))?\s*:?\s*"
    r"|[\s,;.!?]*(?:并且?|然后)?\s*(?:在|于)?\s*(?:结束|终止|停止)(?:时间)?(?:于|在|是|为)?\s*:?\s*")
_FROM_BEFORE_RE = re.compile(
    r"(?:(?<![a-z])(?:from|between|starting at|starts at)|从|自|在|于)\s*$")
_BETWEEN_BEFORE_RE = re.compile(r"(?:(?<![a-z])between|在)\s*$")
_BETWEEN_AFTER_RE = re.compile(r"\s*(?:之间|中间)")
_LOOK_BEHIND = 24  # characters of context read before a number
_LINE_BREAK_RE = re.compile(r"[ \t.,;:!?]*\n\s*")  # the end of a line, the next non-blank one


@dataclasses.dataclass
class _Time:
  start: int
  end: int
  seconds: float
  unit: str | None  # "s", "min", "clock" or None (a bare number)
  integer_digits: int  # digits of a bare integer (years), else 0
  counted: bool = False  # a bare number that counts things


def _normalise(text: str) -> str:
  return unicodedata.normalize("NFKC", text).lower()


# "1,234.5": ASCII commas between digit groups of three. Joined before NFKC, which would turn the
# full-width comma of "视频3，120秒" into one; not after a counting word ("videos 3,120s").
_THOUSANDS_RE = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d])(?!,\d)")


def _join_thousands(text: str) -> str:
  lower = text.lower()

  def join(m: re.Match) -> str:
    counted = _COUNTED_RE.search(lower[max(0, m.start() - _LOOK_BEHIND):m.start()])
    return m.group(0) if counted else m.group(0).replace(",", "")

  return _THOUSANDS_RE.sub(join, text)


def _times(t: str) -> list[_Time]:
  out: list[_Time] = []
  for m in _TOKEN_RE.finditer(t):
    if m.group("h") is not None:
      seconds = int(m.group("h")) * 3600 + int(m.group("hm")) * 60 + float(m.group("hs"))
      out.append(_Time(m.start(), m.end(), seconds, "clock", 0))
    elif m.group("m") is not None:
      out.append(_Time(m.start(), m.end(), int(m.group("m")) * 60 + float(m.group("ms")), "clock",
                       0))
    elif m.group("cm") is not None:
      out.append(_Time(m.start(), m.end(), int(m.group("cm")) * 60 + float(m.group("cs")), "s", 0))
    else:
      num, unit = m.group("num"), m.group("unit")
      if unit is None:
        if re.match(r"[a-z]", t[m.end():m.end() + 1]):
          continue  # glued to a word: 3rd, 4k, mp4
        before = t[max(0, m.start() - _LOOK_BEHIND):m.start()]
        out.append(_Time(m.start(), m.end(), float(num), None,
                         len(num) if num.isdigit() else 0, bool(_COUNTED_RE.search(before))))
      else:
        minutes = unit.startswith("m") or unit.startswith("分")
        out.append(_Time(m.start(), m.end(), float(num) * (60 if minutes else 1),
                         "min" if minutes else "s", 0))
  # "scenes 1-2 and 3": a bare number ranged after a counted one, or a bare integer listed after
  # it, is counted too.
  for a, b in itertools.pairwise(out):
    sep = t[a.end:b.start]
    if a.counted and b.unit is None and (_RANGE_SEP_RE.fullmatch(sep) or (
        b.integer_digits and _LIST_SEP_RE.fullmatch(sep))):
      b.counted = True
  return out


def _alone_on_line(t: str, x: _Time) -> bool:
  """Whether the line holding `x` holds nothing else (trailing punctuation aside)."""
  line_start = t.rfind("\n", 0, x.start) + 1
  line_end = t.find("\n", x.end)
  return (not t[line_start:x.start].strip()
          and not t[x.end:len(t) if line_end < 0 else line_end].strip(" \t.,;:!?"))


def _number_lines(t: str, times: list[_Time], i: int) -> bool:
  """Whether times i and i+1 are two consecutive (non-blank) lines of nothing but a number each,
  and no number line or line-final number joins them (a list of three is not a span)."""
  a, b = times[i], times[i + 1]
  if not (_LINE_BREAK_RE.fullmatch(t[a.end:b.start]) and _alone_on_line(t, a)
          and _alone_on_line(t, b)):
    return False
  before = i > 0 and _LINE_BREAK_RE.fullmatch(t[times[i - 1].end:a.start])
  after = i + 2 < len(times) and _LINE_BREAK_RE.fullmatch(t[b.end:times[i + 2].start])
  return not (before or after)


def _improved_span(text: str) -> tuple[float, float] | None:
  t = _normalise(_join_thousands(text)).replace(_OFFICIAL_EXAMPLE, "")
  t = re.sub(r"\.{2,}", ".", t)
  times = _times(t)
  first_bare = None
  for i, (a, b) in enumerate(itertools.pairwise(times)):
    if a.counted or b.counted:
      continue
    if a.unit is None and b.unit is None and a.integer_digits == b.integer_digits == 4:
      continue  # a year range (2019-2020)
    sep = t[a.end:b.start]
    before = t[max(0, a.start - _LOOK_BEHIND):a.start]
    keyword = bool(_FROM_BEFORE_RE.search(before))
    unit = a.unit is not None or b.unit is not None
    if _END_SEP_RE.fullmatch(sep):
      evidence = True
    elif _RANGE_SEP_RE.fullmatch(sep):
      evidence = unit or keyword
    elif _WORD_SEP_RE.fullmatch(sep):
      if not (unit or keyword):
        continue  # "3 to 4 shapes"
      evidence = True
    elif _AND_SEP_RE.fullmatch(sep):
      if not (_BETWEEN_BEFORE_RE.search(before) or _BETWEEN_AFTER_RE.match(t, b.end)):
        continue
      evidence = True
    elif _number_lines(t, times, i):
      evidence = unit or keyword
    else:
      continue
    start = a.seconds * 60 if a.unit is None and b.unit == "min" else a.seconds  # "1-2 minutes"
    span = (start, b.seconds) if b.seconds >= start else (b.seconds, start)
    if evidence:
      return span
    first_bare = first_bare or span
  return first_bare
