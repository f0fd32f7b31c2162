"""Beyond one device: meshes and parameter shardings, ring attention, sequence-parallel scans.

Mixers call `active_layout()` at trace time; inside a `sequence_parallel(mesh)` block whose `sequence` axis
has more than one device they take the ring / scan-combine path, otherwise their single-device path.
"""

from efficient_attention.parallel.ring_attention import ring_attention
from efficient_attention.parallel.sequence_parallel import (
    linear_attention,
    selective_scan,
    sequence_linear_attention,
    sequence_selective_scan,
)
from efficient_attention.parallel.sharding import (
    DATA_AXIS,
    SEQUENCE_AXIS,
    SequenceLayout,
    active_layout,
    batch_sharding,
    fsdp_spec,
    make_mesh,
    parse_mesh,
    sequence_parallel,
    shard_over_batch,
    state_shardings,
)

__all__ = [
    "DATA_AXIS",
    "SEQUENCE_AXIS",
    "SequenceLayout",
    "active_layout",
    "batch_sharding",
    "fsdp_spec",
    "linear_attention",
    "make_mesh",
    "parse_mesh",
    "ring_attention",
    "selective_scan",
    "sequence_linear_attention",
    "sequence_parallel",
    "sequence_selective_scan",
    "shard_over_batch",
    "state_shardings",
]
