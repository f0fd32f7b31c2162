"""Argument checks that fail early with a message naming the argument and what would be valid."""

from collections.abc import Iterable
from typing import Any

import numpy as np


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_positive(name: str, value: int | float) -> None:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name}={value!r} is not valid; it must be positive")


def check_at_least(name: str, value: int | float, minimum: int | float) -> None:
  if not value >= minimum:  # written so that NaN fails too
    raise ValueError(f"{name}={value!r} is not valid; it must be >= {minimum}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
  if divisor < 1 or value % divisor:
    raise ValueError(
        f"{name}={value} is not valid; it must be divisible by {divisor_name}={divisor} "
        f"(valid {divisor_name}: {[d for d in range(1, value + 1) if value % d == 0]})"
    )


def check_count(name: str, value: int, minimum: int) -> None:
  """Raises ValueError unless value is an int >= minimum (bools are not counts)."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= {minimum}")
