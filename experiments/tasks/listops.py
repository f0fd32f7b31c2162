"""ListOps (Nangia & Bowman 2018) with the Long Range Arena generator's parameters.

An example is a nested prefix expression over the digits 0-9, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]`, and
its label is the expression's value (10 classes). Trees are drawn as in LRA's
`lra_benchmarks/data/listops.py`: a node below `max_depth` is an operator with probability
VALUE_P, with 2..max_args arguments; operators MIN, MAX, MED (the integer part of the median) and
SM (sum mod 10); accepted when min_length < tokens < max_length; duplicates dropped; then split
into train/valid/test in order. Tokens are the generator's own (operators, digits and `]`); the
parentheses of LRA's TSV strings carry no information and are not tokens.
"""

import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.tasks.base import Split, TaskData, pad_sequences
from experiments.tasks.cache import cached_arrays

VERSION = 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10
# Probability that a node above the depth limit is an operator rather than a digit (LRA's VALUE_P).
VALUE_P = 0.25

# A tree is a digit, or (operator, (argument trees...)).
Tree = int | tuple[str, tuple["Tree", ...]]


class _TooLong(Exception):
  """Raised to abandon a tree once it can no longer be accepted."""


def generate_tree(rng: random.Random, max_depth: int, max_args: int, max_length: int) -> tuple[Tree, int]:
  """Draws one tree -> (tree, token count), or raises _TooLong once the count reaches max_length.

  Abandoning an over-long tree early leaves the distribution of accepted trees unchanged (each
  draw is independent and would be rejected anyway), and saves most of LRA's generation time.
  """
  count = 0

  def node(depth: int) -> Tree:
    nonlocal count
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
      count += 1
      if count >= max_length:
        raise _TooLong
      return rng.choice(range(10))
    count += 2
    num_args = rng.randint(2, max_args)
    args = tuple(node(depth + 1) for _ in range(num_args))
    return rng.choice(OPERATORS), args

  tree = node(1)
  return tree, count


def evaluate(tree: Tree) -> int:
  if isinstance(tree, int):
    return tree
  op, args = tree
  values = [evaluate(arg) for arg in args]
  if op == "[MIN":
    return min(values)
  if op == "[MAX":
    return max(values)
  if op == "[MED":
    return int(np.median(values))
  return sum(values) % 10


def to_tokens(tree: Tree) -> list[str]:
  if isinstance(tree, int):
    return [str(tree)]
  op, args = tree
  return [op, *(token for arg in args for token in to_tokens(arg)), END]


def generate(
    *, seed: int, num_examples: int, max_depth: int, max_args: int, min_length: int, max_length: int
) -> tuple[list[list[str]], list[int]]:
  """`num_examples` distinct expressions (token lists) and their values, in generation order."""
  rng = random.Random(seed)
  # Draws since the last new expression: many in a row mean the parameters allow too few distinct ones.
  seen: set[tuple[str, ...]] = set()
  expressions, labels = [], []
  misses = 0
  while len(expressions) < num_examples:
    misses += 1
    if misses > 200_000:
      raise ValueError(
          f"ListOps found only {len(expressions)} of {num_examples} distinct expressions with "
          f"min_length={min_length}, max_length={max_length}, max_depth={max_depth}, max_args={max_args}; "
          "widen the length range or raise max_depth/max_args"
      )
    try:
      tree, length = generate_tree(rng, max_depth, max_args, max_length)
    except _TooLong:
      continue
    if not min_length < length < max_length:
      continue
    tokens = tuple(to_tokens(tree))
    if tokens in seen:
      continue
    seen.add(tokens)
    misses = 0
    expressions.append(list(tokens))
    labels.append(evaluate(tree))
  return expressions, labels


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: seed, num_train, num_valid, num_test, max_depth, max_args, min_length, max_length."""
  sizes = {name: int(params[f"num_{name}"]) for name in ("train", "valid", "test")}
  generator = dict(
      seed=int(params["seed"]), max_depth=int(params["max_depth"]), max_args=int(params["max_args"]),
      min_length=int(params["min_length"]), max_length=int(params["max_length"]),
  )

  def make() -> dict[str, np.ndarray]:
    expressions, labels = generate(num_examples=sum(sizes.values()), **generator)
    ids = [np.array([TOKEN_ID[token] for token in tokens], np.int32) for tokens in expressions]
    inputs, lengths = pad_sequences(ids, generator["max_length"])
    return {"inputs": inputs, "lengths": lengths, "targets": np.array(labels, np.int32)}

  arrays = cached_arrays(cache_dir, "listops", VERSION, {**generator, **sizes}, make)
  splits, start = {}, 0
  for name, size in sizes.items():
    part = slice(start, start + size)
    splits[name] = Split(arrays["inputs"][part], arrays["lengths"][part], arrays["targets"][part])
    start += size
  return TaskData("listops", "classification", len(VOCAB), NUM_CLASSES, splits)
