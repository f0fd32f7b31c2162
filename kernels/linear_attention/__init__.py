"""Linear attention with an optional decay: `linear_attention` over a sequence, `linear_attention_step` per token."""

from kernels.linear_attention.api import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
