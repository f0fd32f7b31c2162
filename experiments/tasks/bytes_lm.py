"""Byte-level language modelling on the Python standard library's sources found on this machine.

The corpus is every `.py` file under the running interpreter's stdlib directory (site-packages
excluded), each file assigned to train/valid/test by a hash of its relative path, so the split is
fixed per file and does not move when files are added. A split's files are concatenated (sorted by
path) and cut into consecutive windows of seq_len bytes; the targets are the same windows shifted by
one byte (the next byte at every position). The metric is bits per byte. Different Python
versions ship different sources, so the cache key includes the stdlib path and version.
"""

import hashlib
import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tasks.base import SPLITS, Split, TaskData
from experiments.tasks.cache import cached_arrays

VERSION = 1
VOCAB_SIZE = 256
# Percent of files (by path hash) in valid and test; the rest train.
VALID_PERCENT, TEST_PERCENT = 5, 5


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"] or os.path.dirname(os.__file__))


def source_files(root: Path) -> list[Path]:
  """Every .py file under root outside site-packages, sorted by relative path."""
  return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())


def split_of(relative_path: str) -> str:
  bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100
  if bucket < TEST_PERCENT:
    return "test"
  if bucket < TEST_PERCENT + VALID_PERCENT:
    return "valid"
  return "train"


def corpus(root: Path, max_bytes: Mapping[str, int]) -> dict[str, np.ndarray]:
  """{split: uint8 [bytes]}: each split's files concatenated, cut at max_bytes[split] (0: no limit)."""
  parts: dict[str, list[bytes]] = {name: [] for name in SPLITS}
  for path in source_files(root):
    parts[split_of(path.relative_to(root).as_posix())].append(path.read_bytes())
  streams = {}
  for name, chunks in parts.items():
    stream = np.frombuffer(b"".join(chunks), np.uint8)
    streams[name] = stream[: max_bytes[name]] if max_bytes[name] else stream
  return streams


def windows(stream: np.ndarray, seq_len: int) -> Split:
  """Consecutive windows -> inputs/targets uint8 [N, seq_len] (views of the stream, no copy).

  Window i predicts bytes i*seq_len + 1 .. (i+1)*seq_len from the bytes before them in the window,
  so every byte after the first is a target exactly once.
  """
  count = (len(stream) - 1) // seq_len
  if count < 1:
    raise ValueError(f"a split of {len(stream)} bytes is shorter than one window of seq_len={seq_len} + 1")
  inputs = stream[: count * seq_len].reshape(count, seq_len)
  targets = stream[1 : count * seq_len + 1].reshape(count, seq_len)
  return Split(inputs, np.full(count, seq_len, np.int32), targets)


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: seq_len, max_train_bytes, max_valid_bytes, max_test_bytes (0 = the whole split), root ("" = stdlib)."""
  root = Path(params["root"]) if params["root"] else stdlib_dir()
  limits = {name: int(params[f"max_{name}_bytes"]) for name in SPLITS}
  key = {"root": str(root), "python": sys.version.split()[0], **{f"max_{n}_bytes": v for n, v in limits.items()}}
  streams = cached_arrays(cache_dir, "bytes_lm", VERSION, key, lambda: corpus(root, limits))
  splits = {name: windows(streams[name], int(params["seq_len"])) for name in SPLITS}
  return TaskData("bytes_lm", "tokens", VOCAB_SIZE, VOCAB_SIZE, splits, requires_causal=True, token_unit="byte")
