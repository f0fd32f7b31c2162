"""Fast differentiable ops, each with a plain-jnp reference (`kernels/<op>/reference.py`).

The public ops are re-exported here under their subpackage names, so `kernels.flash_attention` is the
function; reach an op's modules with `from kernels.flash_attention import reference`.
"""

from kernels.block_sparse import BlockMask, block_sparse_attention
from kernels.decode_attention import decode_attention
from kernels.flash_attention import flash_attention
from kernels.linear_attention import linear_attention, linear_attention_step
from kernels.selective_scan import selective_scan, selective_scan_step

__all__ = [
    "BlockMask",
    "block_sparse_attention",
    "decode_attention",
    "flash_attention",
    "linear_attention",
    "linear_attention_step",
    "selective_scan",
    "selective_scan_step",
]
