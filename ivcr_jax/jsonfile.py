"""JSON files: every writer in the project goes through `write_json` (atomic, UTF-8) and every
reader that must not fail silently through `read_json` (errors name the file)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1,
               sort_keys: bool = False) -> None:
  """Write `obj` atomically: a kill mid-write leaves the previous file or the new one, never half
  of one. Non-ASCII text is kept as is; the file ends with a newline."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=indent, sort_keys=sort_keys)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
  """The JSON at `path`; a file that is not valid JSON raises `ValueError` naming it."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
