"""Meshes, the sequence-parallel context the mixers read, and parameter shardings (replicated or FSDP).

A mesh has a `data` axis (batch rows) and optionally a `sequence` axis (time steps). Outside shard_map the
model runs under jit with Auto axes: the batch's sharding ([B over data, T over sequence]) reaches every layer
through XLA's propagation, so projections, MLPs, norms, token shifts and convolutions need no annotation
(XLA exchanges the halo a shift or convolution needs). Only the ops that mix whole sequences (softmax
attention, prefix scans) must know the layout; they read it from `sequence_parallel` at trace time and run
their ring or scan-combine under `jax.shard_map`. With a batch-only split, the Pallas kernels still go through
`shard_over_batch`, since XLA cannot partition a custom call by itself.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
SEQUENCE_AXIS = "sequence"
MESH_AXES = (DATA_AXIS, SEQUENCE_AXIS)


def parse_mesh(spec: str) -> dict[str, int]:
  """"data:2,sequence:2" -> {"data": 2, "sequence": 2}; "" -> {} (every device on `data`).

  One axis may be -1: it takes the devices the others leave.
  """
  shape: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition(":")
    if not sep or name not in MESH_AXES or name in shape:
      raise ValueError(
          f"mesh={spec!r} is not valid; expected comma-separated axis:size with axes from {MESH_AXES}, "
          "each once, e.g. 'data:2,sequence:2'"
      )
    try:
      shape[name] = int(size)
    except ValueError:
      raise ValueError(f"mesh={spec!r} is not valid; the size of axis {name!r} must be an int, got {size!r}") from None
    if shape[name] < 1 and shape[name] != -1:
      raise ValueError(f"mesh={spec!r} is not valid; the size of axis {name!r} must be >= 1 or -1")
  return shape


def make_mesh(spec: str | Mapping[str, int] = "", devices: list | None = None) -> Mesh:
  """A (data, sequence) mesh over `devices` (default: every device of every host), Auto axes.

  spec: "data:2,sequence:2" or {"data": 2, "sequence": 2}; a missing axis has size 1 except `data`, which
  takes the devices left over. The product must equal the number of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = dict(parse_mesh(spec) if isinstance(spec, str) else spec)
  shape.setdefault(SEQUENCE_AXIS, 1)
  shape.setdefault(DATA_AXIS, -1)
  free = [name for name, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh={spec!r} is not valid; at most one axis may have size -1")
  known = int(np.prod([size for size in shape.values() if size != -1]))
  if free:
    if len(devices) % known:
      raise ValueError(f"mesh={spec!r} is not valid: {len(devices)} devices do not split into groups of {known}")
    shape[free[0]] = len(devices) // known
  if int(np.prod(list(shape.values()))) != len(devices):
    raise ValueError(
        f"mesh={spec!r} is not valid: data x sequence = {shape[DATA_AXIS]} x {shape[SEQUENCE_AXIS]} must equal "
        f"the {len(devices)} devices"
    )
  sizes = (shape[DATA_AXIS], shape[SEQUENCE_AXIS])
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """How activations [B, T, ...] are laid out: rows over `batch_axis`, time steps over `axis` of `mesh`."""

  mesh: Mesh
  axis: str = SEQUENCE_AXIS
  # None when the batch is not split (a mesh with only a sequence axis).
  batch_axis: str | None = DATA_AXIS

  def __post_init__(self):
    if self.axis not in self.mesh.shape:
      raise ValueError(f"axis={self.axis!r} is not valid; the mesh has axes {tuple(self.mesh.shape)}")
    if self.batch_axis is not None and self.batch_axis not in self.mesh.shape:
      raise ValueError(f"batch_axis={self.batch_axis!r} is not valid; the mesh has axes {tuple(self.mesh.shape)}")

  @property
  def size(self) -> int:
    """Devices along the sequence axis."""
    return self.mesh.shape[self.axis]

  def spec(self, *trailing) -> PartitionSpec:
    """PartitionSpec of an array [B, T, *trailing] (trailing entries: mesh axes or None)."""
    return PartitionSpec(self.batch_axis, self.axis, *trailing)

  def batch_spec(self, *trailing) -> PartitionSpec:
    """PartitionSpec of an array [B, *trailing] with no time axis (lengths, final states)."""
    return PartitionSpec(self.batch_axis, *trailing)


_ACTIVE = threading.local()


@contextlib.contextmanager
def sequence_parallel(mesh: Mesh, axis: str = SEQUENCE_AXIS, batch_axis: str | None = DATA_AXIS) -> Iterator[None]:
  """Within this block, mixers traced under jit split whole-sequence ops over `axis` of `mesh`.

  Read at trace time: a function jitted inside the block keeps the sequence-parallel program; trace it again
  (a fresh jit) to leave it. A mesh whose `axis` has size 1 leaves every mixer on its single-device path.
  """
  if batch_axis is not None and batch_axis not in mesh.shape:
    batch_axis = None
  previous = getattr(_ACTIVE, "block", None)
  _ACTIVE.block = (mesh, axis, batch_axis)
  try:
    yield
  finally:
    _ACTIVE.block = previous


def active_layout() -> SequenceLayout | None:
  """The layout of the innermost `sequence_parallel` block whose mesh splits time, else None (the mixers'
  single-device path)."""
  block = getattr(_ACTIVE, "block", None)
  if block is None or block[0].shape.get(block[1], 1) == 1:
    return None
  return SequenceLayout(*block)


def shard_over_batch(fn: Callable[..., jax.Array], *args: jax.Array | None, replicated: tuple[int, ...] = ()
                     ) -> jax.Array:
  """fn(*args), run per `data` shard when a `sequence_parallel` block's mesh splits only the batch.

  The Pallas kernels are opaque custom calls to XLA's partitioner, which runs one on the whole batch on every
  device (all-gathering its inputs) unless it is told that the rows are independent; shard_map tells it.
  Arguments with a leading batch axis are split; positions in `replicated` (e.g. per-channel parameters) and
  None pass whole. fn returns one array with a leading batch axis. Without such a mesh this is fn(*args).
  """
  block = getattr(_ACTIVE, "block", None)
  if block is None or active_layout() is not None or block[2] is None or block[0].shape[block[2]] == 1:
    return fn(*args)
  mesh, _, axis = block
  specs = tuple(None if a is None else PartitionSpec() if i in replicated else PartitionSpec(axis)
                for i, a in enumerate(args))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(axis), check_vma=False)(*args)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch array: rows over `data`; dimension 1 (time) over `sequence` for 2-D+ arrays."""
  if ndim >= 2 and mesh.shape.get(SEQUENCE_AXIS, 1) > 1:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, SEQUENCE_AXIS))
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2**12) -> PartitionSpec:
  """FSDP: split the largest dimension over every device of the mesh (`data` and `sequence` together) where it
  divides, else over `data` alone; small or indivisible arrays stay replicated.

  Splitting over the sequence axis too matters for long sequences: a sequence-parallel mesh (data:1,
  sequence:N) otherwise keeps a full copy of the parameters, gradients and optimizer state on every device,
  memory the ring's activations could use. XLA all-gathers a parameter before each use and reduce-scatters its
  gradient; the sequence shards need the sum of their gradients anyway.
  """
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for axes in ((DATA_AXIS, SEQUENCE_AXIS), (DATA_AXIS,)):
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    candidates = [i for i, size in enumerate(shape) if size % shards == 0]
    if axes and candidates:
      axis = max(candidates, key=lambda i: shape[i])
      return PartitionSpec(*([None] * axis + [axes if len(axes) > 1 else axes[0]]))
  return PartitionSpec()


def state_shardings(state, mesh: Mesh, *, fsdp: bool):
  """NamedSharding for every array leaf of `state`: replicated, or split as `fsdp_spec` says."""

  def sharding(leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, fsdp_spec(tuple(shape), mesh) if fsdp else PartitionSpec())

  return jax.tree.map(sharding, state)
