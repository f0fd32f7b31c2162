"""Banded softmax attention: `sliding_window` (causal, the last w keys) and `local` (bidirectional, +-w).

Both run blockwise (efficient_attention.blocked_attention): memory O(T * w), never a T x T matrix.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention.blocked_attention import band_attention
from efficient_attention.cache import (
    RingCache, check_decodable, decode_impl, empty_kv, ring_cache_attention, zero_index,
)
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.parallel import active_layout
from efficient_attention.registry import register
from efficient_attention.validation import check_choice, check_count
from efficient_attention.variants.full import flash_with_padding_mask, ring_with_padding_mask


IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _BandConfig(AttentionConfig):
  # "xla": blocked jnp attention (O(T * w) memory). "pallas": the flash-attention kernel with a window
  # (right padding only), which skips the key tiles outside the band.
  impl: str = "xla"

  def __post_init__(self):
    super().__post_init__()
    check_count("window", self.window, 1)
    check_choice("impl", self.impl, IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlidingWindowConfig(_BandConfig):
  variant = "sliding_window"
  supports_bidirectional = False
  # Keys each query sees, itself included: query t attends [t - window + 1, t].
  window: int = 128

  def band(self) -> tuple[int, int]:
    """(lo, hi): query t attends keys t + i for lo <= i <= hi."""
    return -(self.window - 1), 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalConfig(_BandConfig):
  variant = "local"
  supports_causal = False
  # Local attention is bidirectional; its causal form is the sliding_window variant.
  causal: bool = False
  # Reach on each side: query t attends [t - window, t + window].
  window: int = 64

  def causal_unsupported_reason(self) -> str:
    return "its causal form is variant 'sliding_window' (window = keys up to and including t)"

  def band(self) -> tuple[int, int]:
    """(lo, hi): query t attends keys t + i for lo <= i <= hi."""
    return -self.window, self.window


def sliding_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, key_mask: jax.Array | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """Causal: q [B, T, H, D] attends k/v [B, T, Hkv, D] at [t - window + 1, t] -> [B, T, H, D]."""
  return band_attention(q, k, v, lo=-(window - 1), hi=0, key_mask=key_mask, block_size=block_size)


def local_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, key_mask: jax.Array | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """Bidirectional: q [B, T, H, D] attends k/v [B, T, Hkv, D] at [t - window, t + window] -> [B, T, H, D]."""
  return band_attention(q, k, v, lo=-window, hi=window, key_mask=key_mask, block_size=block_size)


def band_pattern(config: SlidingWindowConfig | LocalConfig, length: int) -> np.ndarray:
  """Dense bool [T, S] (T = S = length) of the (query, key) pairs the config's variant attends."""
  lo, hi = config.band()
  offset = np.arange(length)[None, :] - np.arange(length)[:, None]  # s - t
  return (offset >= lo) & (offset <= hi)


sliding_window_pattern = band_pattern
local_pattern = band_pattern


@register(LocalConfig)
@register(SlidingWindowConfig)
class BandAttention(HeadAttention):
  """Multi-head softmax attention restricted to a window of keys around each query."""

  def attend(self, x, q, k, v, mask):
    lo, hi = self.config.band()
    if active_layout() is not None:
      # Ring attention visits only the neighbouring blocks the band reaches.
      return ring_with_padding_mask(q, k, v, causal=self.config.causal, key_mask=mask, window=(-lo, hi),
                                    impl=self.config.impl)
    if self.config.impl == "pallas":
      return flash_with_padding_mask(q, k, v, causal=self.config.causal, key_mask=mask, window=(-lo, hi))
    return band_attention(q, k, v, lo=lo, hi=hi, key_mask=mask)

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> RingCache:
    """A ring of the last min(window, max_len) positions' keys and values: k/v [B, W, Hkv, D]."""
    check_decodable(self.config, max_len)
    size = min(self.config.window, max_len)
    return RingCache(*empty_kv(batch, size, self.qkv.num_kv_heads, self.qkv.head_dim, dtype), zero_index())

  def attend_cached(self, x, q, k, v, cache):
    return ring_cache_attention(q, k, v, cache, window=self.config.window, impl=decode_impl(self.config.impl))
