"""Decoding caches and cached attention for the causal sparse patterns (Longformer, BigBird).

Longformer keeps what its pattern can still reach: a ring of the last max(dilation) * (window - 1) + 1
positions for the dilated windows, plus the keys and values of its global tokens, whatever their age.
BigBird's random blocks may point anywhere in the past, so it keeps every key (a KVCache) and masks each
query to its layout row. Both attend a chunk of T new queries with one masked softmax over [cache; chunk].
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention.cache import KVCache, ring_positions, ring_write


class LongformerCache(NamedTuple):
  """Ring of recent keys/values k/v [B, R, Hkv, D] (position p in slot p % R) and the global tokens'
  global_k/global_v [B, G, Hkv, D] (in the order of the sorted global positions)."""

  k: jax.Array
  v: jax.Array
  global_k: jax.Array
  global_v: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


def longformer_ring_size(window: int, dilations: tuple[int, ...], max_len: int) -> int:
  """Positions the causal dilated windows reach back, the query's own included (at most max_len)."""
  return min(max(dilations) * (window - 1) + 1, max_len)


def longformer_cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: LongformerCache, *, window: int,
    dilations: tuple[int, ...], global_positions: np.ndarray,
) -> tuple[jax.Array, LongformerCache]:
  """Causal Longformer attention of q [B, T, H, D] at positions index .. + T - 1 -> ([B, T, H, D], new cache).

  Local keys: p - d*i for 0 <= i < window (d the head's dilation), global positions excluded; global keys:
  every global position <= p; a global query row: every key <= p. That row needs the whole past, which the
  cache holds only while index <= R (the prompt's first call, in practice); later ones come out NaN, loud
  rather than silently wrong.
  """
  t = q.shape[1]
  start = cache.index
  size = cache.k.shape[1]
  g_pos = jnp.asarray(global_positions, jnp.int32)
  ring_pos = ring_positions(start, size)
  new_pos = start + jnp.arange(t, dtype=jnp.int32)
  is_global = lambda pos: jnp.isin(pos, g_pos)
  key_pos = jnp.concatenate([ring_pos, new_pos, g_pos])
  # Each position counts once: ring copies of global tokens give way to the global entries.
  key_ok = jnp.concatenate([(ring_pos >= 0) & ~is_global(ring_pos), jnp.ones((t,), bool), g_pos < start])
  key_global = jnp.concatenate([jnp.zeros((size,), bool), is_global(new_pos), jnp.ones(g_pos.shape, bool)])
  offset = new_pos[:, None] - key_pos[None, :]  # [T, S]
  dilation = jnp.asarray(dilations, jnp.int32)[:, None, None]  # [H, 1, 1]
  local = (offset % dilation == 0) & (offset // dilation < window)  # [H, T, S]
  row_global = is_global(new_pos)[:, None]
  allowed = key_ok & (offset >= 0) & (key_global | local | row_global)
  keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype), cache.global_k], axis=1).astype(q.dtype)
  values = jnp.concatenate([cache.v, v.astype(cache.v.dtype), cache.global_v], axis=1).astype(q.dtype)
  y = jax.nn.dot_product_attention(q, keys, values, mask=allowed[None], implementation="xla")
  incomplete = is_global(new_pos) & (start > size)
  y = jnp.where(incomplete[None, :, None, None], jnp.nan, y)

  chunk_index = g_pos - start
  in_chunk = ((chunk_index >= 0) & (chunk_index < t))[None, :, None, None]
  take = lambda x, old: jnp.where(in_chunk, jnp.take(x, jnp.clip(chunk_index, 0, t - 1), axis=1).astype(old.dtype),
                                  old)
  new_cache = LongformerCache(ring_write(cache.k, k, start), ring_write(cache.v, v, start),
                              take(k, cache.global_k), take(v, cache.global_v), start + t)
  return y, new_cache


def layout_rows(layout: np.ndarray) -> np.ndarray:
  """A block layout bool [nb, nb] as the key blocks of each row, int32 [nb, M] padded with -1.

  Decoding gathers one row per query from this table, O(nb * M) memory instead of the O(nb^2) layout.
  """
  counts = layout.sum(axis=1)
  table = np.full((layout.shape[0], max(1, int(counts.max(initial=0)))), -1, np.int32)
  for i, row in enumerate(layout):
    table[i, :counts[i]] = np.flatnonzero(row)
  return table


def block_layout_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, *, rows: np.ndarray, block_size: int
) -> tuple[jax.Array, KVCache]:
  """Causal attention of q [B, T, H, D] over a full KV cache restricted to a block layout given by its rows
  int [nb, M] (`layout_rows`: query block i sees the key blocks listed in row i) -> ([B, T, H, D], the cache
  advanced by T)."""
  t = q.shape[1]
  start = cache.index
  new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, axis=1)
  new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, axis=1)
  q_pos = start + jnp.arange(t)
  key_pos = jnp.arange(new_k.shape[1])
  listed = jnp.asarray(rows)[q_pos // block_size]  # [T, M]
  num_blocks = rows.shape[0]
  # -1 pads land in an extra column that is dropped.
  blocks = jnp.zeros((t, num_blocks + 1), bool).at[jnp.arange(t)[:, None], listed].set(True)[:, :num_blocks]
  allowed = blocks[:, key_pos // block_size] & (key_pos[None, :] <= q_pos[:, None])
  y = jax.nn.dot_product_attention(q, new_k.astype(q.dtype), new_v.astype(q.dtype), mask=allowed[None, None],
                                   implementation="xla")
  return y, KVCache(new_k, new_v, start + t)
