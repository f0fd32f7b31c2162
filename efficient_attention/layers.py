"""Building blocks shared by the mixers: head projections, rotary embeddings, padding masks."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.config import AttentionConfig


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates feature pairs of x [B, T, H, D] by angles positions [T] (or [B, T]) * base^(-2i/D).

  Uses the half-split pairing (i, i + D/2) of GPT-NeoX/LLaMA; D must be even.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got head_dim={d}")
  inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [T, D/2] or [B, T, D/2]
  if angles.ndim == 2:
    angles = angles[None]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class QKVProjection(nnx.Module):
  """x [B, T, C] -> q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, D] (rotary applied if configured)."""

  def __init__(self, config: AttentionConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.num_heads = config.num_heads
    self.num_kv_heads = config.kv_heads
    self.head_dim = config.head_dim_for(width)
    linear = lambda features: nnx.Linear(
        width, features, use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.query = linear(self.num_heads * self.head_dim)
    self.key = linear(self.num_kv_heads * self.head_dim)
    self.value = linear(self.num_kv_heads * self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array | None = None):
    b, t, _ = x.shape
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.config.rotary:
      positions = jnp.arange(t) if positions is None else positions
      q = rotary_embedding(q, positions, self.config.rotary_base)
      k = rotary_embedding(k, positions, self.config.rotary_base)
    return q, k, v


def output_projection(config: AttentionConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
  """[B, T, H * D] -> [B, T, C]."""
  return nnx.Linear(
      config.num_heads * config.head_dim_for(width), width, use_bias=config.use_bias,
      dtype=dtype, param_dtype=param_dtype, rngs=rngs,
  )


class HeadAttention(nnx.Module):
  """Base of the mixers shaped x -> per-head q, k, v -> `attend` -> output projection.

  Subclasses implement `attend(x, q, k, v, mask) -> [B, T, H, D]`; the projections live here so every such
  mixer has the same parameter names (`qkv`, `out`). Mixers that can decode also implement
  `init_cache(batch, max_len, *, dtype)` and `attend_cached(x, q, k, v, cache) -> ([B, T, H, D], cache)`;
  with a cache, rotary positions start at the cache's index (see efficient_attention/cache.py).
  """

  def __init__(self, config: AttentionConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.qkv = QKVProjection(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = output_projection(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, cache: Any = None):
    """x [B, T, C] -> y [B, T, C]; with a cache, (y, the cache advanced by T)."""
    mask = check_padding_mask(mask, x)
    if cache is not None:
      check_no_mask_with_cache(mask)
      q, k, v = self.qkv(x, cache.index + jnp.arange(x.shape[1]))
      y, cache = self.attend_cached(x, q, k, v, cache)
      return self.out(y.astype(q.dtype).reshape(*x.shape[:2], -1)), cache
    q, k, v = self.qkv(x)
    y = self.attend(x, q, k, v, mask)
    return self.out(y.astype(q.dtype).reshape(*x.shape[:2], -1))

  def init_cache(self, batch: int, max_len: int, *, dtype: Any = jnp.float32):
    raise ValueError(f"variant {self.config.variant!r} cannot decode token by token (it has no cache)")


def check_padding_mask(mask: jax.Array | None, x: jax.Array) -> jax.Array | None:
  """Validates a padding mask: bool [B, T], True at real tokens. Returns it as bool (or None)."""
  if mask is None:
    return None
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask.shape={mask.shape} is not valid; expected [B, T]={x.shape[:2]} (True at real tokens)")
  return mask.astype(bool)


def check_no_mask_with_cache(mask: jax.Array | None) -> None:
  """Cached (decoding) calls take whole, unpadded prompts: the cache index is shared by every row."""
  if mask is not None:
    raise ValueError("mask is not valid together with cache; decoding takes unpadded prompts of one length")
