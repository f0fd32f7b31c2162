"""Batches from in-memory splits: a resumable shuffled training stream and padded eval passes.

Batches are numpy dicts with
  inputs int32 [B, T], mask bool [B, T] (True at real tokens),
  targets int32 [B] or [B, T], weights float32 [B] or [B, T] (0 for padding rows and unscored tokens).
The training order is a pure function of (seed, epoch), so the stream's position (epoch, index)
is all a checkpoint needs to continue it exactly.
"""

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from efficient_attention import parallel

from experiments.tasks.base import Split

DATA_AXIS = "data"


def take(split: Split, indices: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Rows `indices` of `split` as a batch; rows where `valid` is False get weight 0."""
  inputs = split.inputs[indices].astype(np.int32)
  targets = split.targets[indices].astype(np.int32)
  mask = np.arange(split.seq_len)[None, :] < split.lengths[indices][:, None]
  row_weight = np.ones(len(indices), np.float32) if valid is None else valid.astype(np.float32)
  if targets.ndim == 1:
    weights = row_weight
  elif split.weights is None:
    weights = mask * row_weight[:, None]
  else:
    weights = split.weights[indices] * row_weight[:, None]
  return {"inputs": inputs, "mask": mask, "targets": targets, "weights": weights.astype(np.float32)}


@dataclasses.dataclass
class DataPosition:
  """Where the training stream is: `index` examples into the permutation of `epoch`."""

  epoch: int = 0
  index: int = 0

  def to_json(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: dict[str, int]) -> "DataPosition":
    return cls(epoch=int(value["epoch"]), index=int(value["index"]))


class TrainStream:
  """Endless shuffled batches of `split`; each epoch is a fresh permutation seeded by (seed, epoch).

  A batch never straddles two epochs: the tail of an epoch shorter than a batch is skipped, so
  every batch has exactly `batch_size` rows.
  """

  def __init__(self, split: Split, batch_size: int, seed: int, position: DataPosition | None = None):
    if batch_size > len(split):
      raise ValueError(f"batch_size={batch_size} is not valid; the training split has only {len(split)} examples")
    self.split = split
    self.batch_size = batch_size
    self.seed = seed
    self.position = position or DataPosition()
    self._order_epoch, self._order = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._order, self._order_epoch = rng.permutation(len(self.split)), epoch
    return self._order

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position.index + self.batch_size > len(self.split):
      self.position = DataPosition(self.position.epoch + 1, 0)
    order = self._permutation(self.position.epoch)
    rows = order[self.position.index : self.position.index + self.batch_size]
    self.position = DataPosition(self.position.epoch, self.position.index + self.batch_size)
    return take(self.split, rows)


def eval_batches(split: Split, batch_size: int, max_batches: int = -1) -> Iterator[dict[str, np.ndarray]]:
  """The first `max_batches` batches of `split` in order (all when -1); the last is padded with weight-0 rows."""
  num_batches = -(-len(split) // batch_size)
  if max_batches >= 0:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    rows = np.arange(b * batch_size, (b + 1) * batch_size)
    valid = rows < len(split)
    yield take(split, np.where(valid, rows, 0), valid)


def make_mesh(spec: str = "") -> Mesh:
  """A (data, sequence) mesh over every visible device (all hosts); spec as `--mesh`, e.g. "data:2,sequence:2".

  The default puts every device on `data` (data parallelism). Auto axes: the batch's sharding reaches the
  model through XLA's propagation, so the model code needs no sharding annotations (explicit axes would
  demand them on every gather); only ring attention and the sequence-parallel scans map over the mesh.
  """
  return parallel.make_mesh(spec)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global numpy batch -> jax arrays split along the batch axis over the mesh's data axis, and along time
  (axis 1 of 2-D+ arrays) over its sequence axis.

  Every process holds the same global batch (the stream is deterministic) and contributes only the
  blocks of its own devices, so the same code runs on one host or many.
  """
  num_shards = mesh.shape[DATA_AXIS]
  sequence_shards = mesh.shape.get(parallel.SEQUENCE_AXIS, 1)

  def put(array: np.ndarray) -> jax.Array:
    if array.shape[0] % num_shards:
      raise ValueError(
          f"batch of {array.shape[0]} rows does not split over {num_shards} devices; "
          f"choose a batch size divisible by {num_shards}"
      )
    if array.ndim >= 2 and array.shape[1] % sequence_shards:
      raise ValueError(
          f"sequences of {array.shape[1]} tokens do not split over the mesh's {sequence_shards} sequence devices; "
          f"choose a task length divisible by {sequence_shards}"
      )
    return jax.make_array_from_callback(array.shape, parallel.batch_sharding(mesh, array.ndim),
                                        lambda index: array[index])

  return {key: put(value) for key, value in batch.items()}
