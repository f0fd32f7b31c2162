"""Induction heads (Olsson et al. 2022; the synthetic task of Gu & Dao 2023, Mamba, section 4.1.2).

A sequence of random tokens contains a trigger token once, followed by an answer token; the last
token is the trigger again, and the target there is the answer (no other position is scored).
Token ids: 0 padding (unused), 1 trigger, 2..vocab_size-1 ordinary tokens. Mamba trains at length
256 and tests up to 2^20; train and test lengths are set separately here too.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.tasks.base import Split, TaskData, arrays_to_splits, full_length, length_splits, splits_to_arrays
from experiments.tasks.cache import cached_arrays

VERSION = 1
TRIGGER, FIRST_TOKEN = 1, 2


def generate(rng: np.random.Generator, num_examples: int, seq_len: int, *, vocab_size: int) -> Split:
  if seq_len < 4:
    raise ValueError(f"seq_len={seq_len} is not valid; induction heads needs >= 4 tokens")
  if vocab_size <= FIRST_TOKEN:
    raise ValueError(f"vocab_size={vocab_size} is not valid; it must be > {FIRST_TOKEN}")
  rows = np.arange(num_examples)
  inputs = rng.integers(FIRST_TOKEN, vocab_size, (num_examples, seq_len))
  # The answer must sit before the final trigger: trigger at p <= seq_len - 3, answer at p + 1.
  trigger_at = rng.integers(0, seq_len - 2, num_examples)
  inputs[rows, trigger_at] = TRIGGER
  inputs[:, -1] = TRIGGER
  targets = np.zeros_like(inputs)
  weights = np.zeros(inputs.shape, np.float32)
  targets[:, -1] = inputs[rows, trigger_at + 1]
  weights[:, -1] = 1.0
  return full_length(inputs, targets, weights)


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: seed, num_train/valid/test, train_seq_len, test_seq_len, vocab_size."""
  params = dict(params)

  def split(rng, name, num_examples, seq_len):
    del name  # every split has the same structure
    return generate(rng, num_examples, seq_len, vocab_size=params["vocab_size"])

  arrays = cached_arrays(cache_dir, "induction_heads", VERSION, params,
                         lambda: splits_to_arrays(length_splits(params, split)))
  return TaskData("induction_heads", "tokens", params["vocab_size"], params["vocab_size"], arrays_to_splits(arrays))
