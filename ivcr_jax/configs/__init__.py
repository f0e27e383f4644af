"""The packaged config files and the `--config` flag of the entry points.

`--config=configs/interllava.py[:PRESET]` is the documented spelling. Run from a checkout it is
the repository's file; anywhere else (an installed package, another working directory) a path
`configs/<name>.py` that does not exist there means this package's `<name>.py`, and the default
is this package's `interllava.py`, so no command depends on the repository root.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def resolve(argument: str) -> str:
  """`file[:preset]` with a missing relative `configs/<name>.py` (or `<name>.py`) replaced by
  the packaged file of that name; any other argument is returned unchanged."""
  path, colon, preset = argument.partition(":")
  if os.path.exists(path) or os.path.isabs(path):
    return argument
  head, name = os.path.split(os.path.normpath(path))
  packaged = os.path.join(PACKAGE_DIR, name)
  if head in ("", "configs") and name.endswith(".py") and os.path.exists(packaged):
    return packaged + colon + preset
  return argument


class _ResolvingParser(flags.ArgumentParser):
  """The config-file parser of a flag, given the `resolve`d path."""

  def __init__(self, inner: flags.ArgumentParser):
    self.inner = inner

  def parse(self, argument):
    return self.inner.parse(resolve(argument))

  def flag_type(self):
    return self.inner.flag_type()


def define_config_flag(name: str, help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None, *,
                       default: str = "interllava.py") -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` (locked, with `--name.a.b=value` overrides read from
  `sys_argv`, default `sys.argv`) whose value is resolved by `resolve` and whose default is the
  packaged `default` (`file.py[:preset]`)."""
  holder = config_flags.DEFINE_config_file(name, os.path.join(PACKAGE_DIR, default), help_string,
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=sys_argv)
  flag_values[name].parser = _ResolvingParser(flag_values[name].parser)
  return holder
