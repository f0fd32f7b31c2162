"""Selective copying (Gu & Dao 2023, Mamba, section 4.1.1).

A context of `seq_len` tokens holds `num_tokens` data tokens at random positions (kept in order)
among noise tokens; `num_tokens` copy markers follow, and at the i-th marker the target is the i-th
data token. Solving it needs content-aware selection: the spacing of the data tokens varies per
example. Token ids: 0 padding (unused), 1 noise, 2 marker, 3..vocab_size-1 data.
Train and test context lengths are set separately (length extrapolation).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.tasks.base import (
    Split, TaskData, arrays_to_splits, full_length, length_splits, sample_without_replacement, splits_to_arrays,
)
from experiments.tasks.cache import cached_arrays

VERSION = 1
NOISE, MARKER, FIRST_DATA = 1, 2, 3


def generate(rng: np.random.Generator, num_examples: int, seq_len: int, *, vocab_size: int, num_tokens: int) -> Split:
  """-> sequences of seq_len + num_tokens tokens (context, then markers)."""
  if num_tokens > seq_len:
    raise ValueError(f"num_tokens={num_tokens} data tokens do not fit a context of seq_len={seq_len}")
  if vocab_size <= FIRST_DATA:
    raise ValueError(f"vocab_size={vocab_size} is not valid; it must be > {FIRST_DATA} (noise, marker, data)")
  rows = np.arange(num_examples)[:, None]
  positions = np.sort(sample_without_replacement(rng, np.zeros((num_examples, seq_len)), num_tokens), axis=1)
  data = rng.integers(FIRST_DATA, vocab_size, (num_examples, num_tokens))
  inputs = np.full((num_examples, seq_len + num_tokens), NOISE)
  inputs[rows, positions] = data
  inputs[:, seq_len:] = MARKER
  targets = np.zeros_like(inputs)
  weights = np.zeros(inputs.shape, np.float32)
  targets[:, seq_len:] = data
  weights[:, seq_len:] = 1.0
  return full_length(inputs, targets, weights)


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: seed, num_train/valid/test, train_seq_len, test_seq_len, vocab_size, num_tokens."""
  params = dict(params)

  def split(rng, name, num_examples, seq_len):
    del name  # every split has the same structure
    return generate(rng, num_examples, seq_len, vocab_size=params["vocab_size"], num_tokens=params["num_tokens"])

  arrays = cached_arrays(cache_dir, "selective_copy", VERSION, params,
                         lambda: splits_to_arrays(length_splits(params, split)))
  return TaskData("selective_copy", "tokens", params["vocab_size"], params["vocab_size"], arrays_to_splits(arrays))
