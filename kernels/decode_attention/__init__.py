"""Decode attention: one new query per sequence against a long KV cache (flash-decoding, split over the keys)."""

from kernels.decode_attention.api import decode_attention
from kernels.decode_attention.pallas_gpu import BlockSizes

__all__ = ["BlockSizes", "decode_attention"]
