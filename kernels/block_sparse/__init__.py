"""Block-sparse attention: softmax attention over a `BlockMask`, forward and backward as Pallas kernels."""

from kernels.block_sparse.api import block_sparse_attention
from kernels.block_sparse.mask import (
    BlockMask,
    bigbird,
    causal,
    dilated,
    from_dense,
    global_tokens,
    local,
    longformer,
    random_blocks,
    stack_heads,
)
from kernels.block_sparse.pallas_gpu import BlockSizes

__all__ = [
    "BlockMask",
    "BlockSizes",
    "bigbird",
    "block_sparse_attention",
    "causal",
    "dilated",
    "from_dense",
    "global_tokens",
    "local",
    "longformer",
    "random_blocks",
    "stack_heads",
]
