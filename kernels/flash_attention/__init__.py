"""Flash attention: exact softmax attention in O(T) memory, forward and backward as Pallas kernels."""

from kernels.flash_attention.api import flash_attention
from kernels.flash_attention.pallas_gpu import BlockSizes

__all__ = ["BlockSizes", "flash_attention"]
