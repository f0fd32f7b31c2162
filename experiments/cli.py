"""Helpers for command-line values shared by the experiment scripts."""

from typing import Any


def literal(text: str) -> Any:
  """A command-line value as the int, float or bool it spells, else the string itself."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)
