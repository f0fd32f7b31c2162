"""Frozen dataclass configs shared by every sequence mixer.

Each variant subclasses `MixerConfig` (or `AttentionConfig` for softmax-style mixers with heads) and
adds its own fields; validation runs in `__post_init__` so a bad config fails where it is written,
not deep inside a jitted forward pass.
"""

import dataclasses
from typing import ClassVar

from efficient_attention.validation import check_at_least, check_divisible, check_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixerConfig:
  """Fields every sequence mixer has."""

  # Registry name of the variant this config builds; set by each subclass.
  variant: ClassVar[str] = ""
  # True: position t sees only positions <= t (language modelling). False: bidirectional (encoders).
  causal: bool = True
  # Variants that only make sense in one direction override this with the one they support.
  supports_causal: ClassVar[bool] = True
  supports_bidirectional: ClassVar[bool] = True

  def __post_init__(self):
    if self.causal and not self.supports_causal:
      raise ValueError(
          f"causal=True is not valid for variant {self.variant!r}: {self.causal_unsupported_reason()}"
      )
    if not self.causal and not self.supports_bidirectional:
      raise ValueError(f"causal=False is not valid for variant {self.variant!r}; it is causal only")

  def causal_unsupported_reason(self) -> str:
    return "it has no causal form"

  def check_width(self, width: int) -> None:
    """Checks the config against the model width it is built at."""
    check_positive("width", width)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(MixerConfig):
  """Fields of mixers that project the input to per-head queries, keys and values."""

  # Query heads.
  num_heads: int = 4
  # Key/value heads: None means num_heads (MHA); 1 is MQA; anything dividing num_heads is GQA.
  num_kv_heads: int | None = None
  # Per-head width; None means width // num_heads.
  head_dim: int | None = None
  # Rotary position embedding on queries and keys (set by the decoder when position="rope").
  rotary: bool = False
  rotary_base: float = 10_000.0
  # Bias terms on the q/k/v/output projections.
  use_bias: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_positive("num_heads", self.num_heads)
    if self.num_kv_heads is not None:
      check_positive("num_kv_heads", self.num_kv_heads)
      check_divisible("num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
    if self.head_dim is not None:
      check_positive("head_dim", self.head_dim)
    check_positive("rotary_base", self.rotary_base)

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def head_dim_for(self, width: int) -> int:
    return self.head_dim if self.head_dim is not None else width // self.num_heads

  def check_width(self, width: int) -> None:
    super().check_width(width)
    if self.head_dim is None:
      check_divisible("width", width, "num_heads", self.num_heads)
    check_at_least("head_dim", self.head_dim_for(width), 1)
