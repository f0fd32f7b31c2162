"""What every task hands the trainer: token arrays per split, and how to score them."""

import dataclasses
from collections.abc import Mapping

import numpy as np

# Token id of padding in every task (the mask marks real tokens; padding never reaches the loss).
PAD_ID = 0
TASK_KINDS = ("classification", "tokens")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split as arrays.

  inputs: integer [N, T] (int32, or uint8 for byte tasks), right-padded with PAD_ID after `lengths` real tokens.
  lengths: int32 [N], real tokens per example.
  targets: integer [N] (classification) or [N, T] (per-token targets).
  weights: [N, T] (any numeric dtype): 1 where a per-token target is scored, 0 elsewhere. None scores
    every example (classification) or every real token (per-token tasks).
  """

  inputs: np.ndarray
  lengths: np.ndarray
  targets: np.ndarray
  weights: np.ndarray | None = None

  def __post_init__(self):
    n, t = self.inputs.shape
    if self.lengths.shape != (n,) or self.targets.shape[0] != n:
      raise ValueError(
          f"split arrays disagree: inputs {self.inputs.shape}, lengths {self.lengths.shape}, "
          f"targets {self.targets.shape}"
      )
    if self.weights is not None and self.weights.shape != (n, t):
      raise ValueError(f"weights.shape={self.weights.shape} is not valid; expected {(n, t)}")

  def __len__(self) -> int:
    return self.inputs.shape[0]

  @property
  def seq_len(self) -> int:
    return self.inputs.shape[1]


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A generated (or loaded) task, ready to batch."""

  # Registry name of the task.
  name: str
  # "classification": one label per sequence. "tokens": a target at every weighted position.
  kind: str
  # Input vocabulary (embedding rows), PAD_ID included.
  vocab_size: int
  # Classes of a classification task; output vocabulary of a tokens task.
  num_classes: int
  # "train", "valid" and "test" splits; their lengths may differ (length extrapolation).
  splits: Mapping[str, Split]
  # True when a target is the next input token (language modelling): only a causal model may see the inputs.
  requires_causal: bool = False
  # What one token is, for the bits-per-token metric (bytes_lm: "byte").
  token_unit: str = "token"

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f"kind={self.kind!r} is not valid; choose one of {TASK_KINDS}")
    missing = [name for name in SPLITS if name not in self.splits]
    if missing:
      raise ValueError(f"task {self.name!r} lacks the splits {missing}")

  @property
  def max_seq_len(self) -> int:
    return max(split.seq_len for split in self.splits.values())


def pad_sequences(sequences: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads 1-D int sequences to `length` -> (inputs int32 [N, length], lengths int32 [N])."""
  inputs = np.full((len(sequences), length), PAD_ID, np.int32)
  lengths = np.zeros(len(sequences), np.int32)
  for i, sequence in enumerate(sequences):
    if len(sequence) > length:
      raise ValueError(f"sequence {i} has {len(sequence)} tokens, more than length={length}")
    inputs[i, : len(sequence)] = sequence
    lengths[i] = len(sequence)
  return inputs, lengths


def majority_fraction(train: Split, test: Split) -> float:
  """Accuracy on `test` of always predicting the most frequent training class (classification tasks)."""
  classes, counts = np.unique(train.targets, return_counts=True)
  return float(np.mean(test.targets == classes[np.argmax(counts)]))


def sample_without_replacement(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
  """k distinct indices per row of logits [N, M], drawn one after another with probability ∝ exp(logits).

  The Gumbel-top-k trick: the k largest of logits + Gumbel noise are distributed exactly like k
  successive draws without replacement, so all rows are sampled at once.
  """
  keys = logits + rng.gumbel(size=logits.shape)
  return np.argsort(-keys, axis=-1)[:, :k]


def full_length(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> Split:
  """A per-token split whose sequences all fill the whole length (no padding).

  Token ids below 256 are stored as uint8 and the 0/1 weights as uint8: long synthetic sequences
  then take 3 bytes per position in memory and in the cache (batches are cast when taken).
  """
  lengths = np.full(inputs.shape[0], inputs.shape[1], np.int32)
  small = max(int(inputs.max(initial=0)), int(targets.max(initial=0))) < 256
  dtype = np.uint8 if small else np.int32
  return Split(inputs.astype(dtype), lengths, targets.astype(dtype), weights.astype(np.uint8))


def length_splits(params, generate) -> dict[str, Split]:
  """train/valid at params["train_seq_len"], test at params["test_seq_len"] (length extrapolation).

  generate(rng, split_name, num_examples, seq_len) -> Split; each split draws from its own stream,
  seeded by (seed, split index), so changing one split's size leaves the others unchanged.
  """
  lengths = {"train": params["train_seq_len"], "valid": params["train_seq_len"], "test": params["test_seq_len"]}
  return {
      name: generate(np.random.default_rng([int(params["seed"]), i]), name, int(params[f"num_{name}"]),
                     int(lengths[name]))
      for i, name in enumerate(SPLITS)
  }


_FIELDS = ("inputs", "lengths", "targets", "weights")


def splits_to_arrays(splits: Mapping[str, Split]) -> dict[str, np.ndarray]:
  """{"train/inputs": ..., ...}: the flat form the cache stores."""
  return {f"{name}/{field}": getattr(split, field) for name, split in splits.items() for field in _FIELDS
          if getattr(split, field) is not None}


def arrays_to_splits(arrays: Mapping[str, np.ndarray]) -> dict[str, Split]:
  names = sorted({key.split("/")[0] for key in arrays})
  return {name: Split(*(arrays.get(f"{name}/{field}") for field in _FIELDS)) for name in names}
