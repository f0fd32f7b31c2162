"""Which (query, key) pairs attend: one definition shared by the reference and the kernels.

Query i sits at key position p = i + (S - T): a block of T queries is aligned to the end of the S keys, as in
decoding with a cache (for T == S, p = i). A key j is attended when all of these that are set hold:
- causal: j <= p;
- window (left, right): p - left <= j <= p + right (None on a side leaves it unbounded);
- kv_length: j < kv_length (padding at the end of each sequence).

The kernels iterate over tiles, so besides the element mask this module gives, for a tile of queries (or of
keys), the range of key (query) tiles that contain any attended pair, and the sub-range whose tiles are
attended entirely and need no element mask.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Window = tuple[int | None, int | None] | None


def allowed(
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    offset: int,
    causal: bool,
    window: Window,
    kv_length: jax.Array | None,
) -> jax.Array | None:
  """Bool mask broadcast from q_index [..., T', 1] and k_index [..., 1, S'], or None when all pairs attend."""
  conditions = []
  position = q_index + offset
  left, right = _bounds(causal, window)
  if right is not None:
    conditions.append(k_index <= position + right)
  if left is not None:
    conditions.append(k_index >= position - left)
  if kv_length is not None:
    conditions.append(k_index < kv_length)
  if not conditions:
    return None
  mask = conditions[0]
  for condition in conditions[1:]:
    mask = mask & condition
  return mask


def _bounds(causal: bool, window: Window) -> tuple[int | None, int | None]:
  """(left, right) distances from p that keys may lie at; causal caps right at 0."""
  left, right = (None, None) if window is None else window
  if causal:
    right = 0 if right is None else min(right, 0)
  return left, right


class TileRange(NamedTuple):
  """Tiles [lo, hi) hold attended pairs; tiles [full_lo, full_hi) (inside it) need no element mask."""

  lo: jax.Array
  full_lo: jax.Array
  full_hi: jax.Array
  hi: jax.Array


def _tile_range(lo, full_lo, full_hi, hi, num_tiles) -> TileRange:
  clip = lambda x: jnp.clip(jnp.asarray(x, jnp.int32), 0, num_tiles)
  lo, hi = clip(lo), clip(hi)
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(clip(full_lo), lo, hi)
  full_hi = jnp.clip(clip(full_hi), full_lo, hi)
  return TileRange(lo, full_lo, full_hi, hi)


def key_tiles_for_query_tile(
    q_tile: jax.Array, block_q: int, block_k: int, num_k_tiles: int, *, offset: int, causal: bool,
    window: Window, kv_length: jax.Array | None,
) -> TileRange:
  """Key tiles that query tile `q_tile` (rows q_tile * block_q + [0, block_q)) attends."""
  first = q_tile * block_q + offset  # smallest query position in the tile
  last = first + block_q - 1
  left, right = _bounds(causal, window)
  lo, hi, full_lo, full_hi = 0, num_k_tiles, 0, num_k_tiles
  if right is not None:
    hi = (last + right) // block_k + 1
    full_hi = (first + right + 1) // block_k
  if left is not None:
    lo = (first - left) // block_k
    full_lo = -((left - last) // block_k)  # ceil((last - left) / block_k)
  if kv_length is not None:
    hi = jnp.minimum(hi, -(-kv_length // block_k))
    full_hi = jnp.minimum(full_hi, kv_length // block_k)
  return _tile_range(lo, full_lo, full_hi, hi, num_k_tiles)


def query_tiles_for_key_tile(
    k_tile: jax.Array, block_q: int, block_k: int, num_q_tiles: int, *, offset: int, causal: bool,
    window: Window, kv_length: jax.Array | None,
) -> TileRange:
  """Query tiles that attend key tile `k_tile` (keys k_tile * block_k + [0, block_k))."""
  first = k_tile * block_k
  last = first + block_k - 1
  left, right = _bounds(causal, window)
  lo, hi, full_lo, full_hi = 0, num_q_tiles, 0, num_q_tiles
  if right is not None:
    # j <= p + right for some key of the tile: p >= first - right; for all keys: p >= last - right.
    lo = (first - right - offset) // block_q
    full_lo = -((right + offset - last) // block_q)
  if left is not None:
    # j >= p - left: p <= last + left for some key; p <= first + left for all keys.
    hi = (last + left - offset) // block_q + 1
    full_hi = (first + left - offset + 1) // block_q
  if kv_length is not None:
    # No query tile sees a key tile that starts past kv_length; none sees one that ends past it unmasked.
    # (Integer arithmetic, not jnp.where: the Pallas Triton lowering mistypes a scalar select here.)
    any_valid = jnp.clip(kv_length - first, 0, 1)
    all_valid = jnp.clip(kv_length - last, 0, 1)
    hi = lo + (hi - lo) * any_valid
    full_hi = full_lo + (full_hi - full_lo) * all_valid
  return _tile_range(lo, full_lo, full_hi, hi, num_q_tiles)
