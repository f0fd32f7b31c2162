"""Blocked softmax attention for local and block-sparse patterns, in O(T * keys-per-query) memory.

The sequence is cut into blocks of `block_size` positions. Each query block attends to the key blocks a
static table lists for it, gathered next to it, with an element mask for positions inside those blocks;
optionally also to extra keys every query may see (global tokens), inside the same softmax. No T x S
score matrix is ever formed: scores are [B, T / block, H, block, keys-per-row].

This is the "xla" path of the sliding-window, local, Longformer and BigBird mixers; the block tables
and element masks are the same ones a block-sparse kernel skips empty blocks with.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention.validation import check_count

# Smallest block of the band path: tiny windows would otherwise give many tiny matmuls.
MIN_BLOCK_SIZE = 16

# allowed(query_positions [..., R, 1], key_positions [..., 1, S]) -> bool [..., R, S].
ElementMask = Callable[[jax.Array, jax.Array], jax.Array]


class ExtraKeys(NamedTuple):
  """Keys every query may attend besides its table blocks: k/v [B, G, Hkv, D], mask bool [B | 1, T | 1, G]."""

  k: jax.Array
  v: jax.Array
  mask: jax.Array


def _pad_time(x: jax.Array, length: int, value=0) -> jax.Array:
  """Pads axis 1 (time) of x up to `length`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def _key_valid(key_mask: jax.Array | None, length: int) -> jax.Array:
  """bool [B | 1, length]: key_mask, or every key when there is none."""
  return jnp.ones((1, length), bool) if key_mask is None else key_mask.astype(bool)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """fp32 softmax over the last axis restricted to `mask`; rows with no allowed entry give zeros, not NaN."""
  # -inf (not a large finite value) on masked entries so exp gives exactly 0 and so does its gradient.
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.exp(scores - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention per block: q [B, N, R, Hkv, G, D], k/v [B, N, S, Hkv, D] -> fp32 [B, N, R, Hkv, G, D].

  N blocks of R query rows, G query heads per key/value head (GQA without repeating K/V); mask bool
  broadcastable to [B, N, R, S].
  """
  # Scores in dot_general's own result order (batch axes b, n, h, then q's free axes r, g, then s), so
  # no score-sized transpose is needed.
  scores = jnp.einsum("bnrhgd,bnshd->bnhrgs", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  p = _masked_softmax(scores, mask[:, :, None, :, None, :])
  return jnp.einsum("bnhrgs,bnshd->bnrhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def rows_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """A few query rows against every key: q [B, R, H, D], k/v [B, S, Hkv, D], mask [B | 1, R, S] -> [B, R, H, D].

  Global query rows (tokens that attend everywhere) go through here: O(R * S) memory for R global rows.
  """
  b, r, h, d = q.shape
  hkv = k.shape[2]
  out = _attend(q.reshape(b, 1, r, hkv, h // hkv, d), k[:, None], v[:, None], mask[:, None])
  return out.reshape(b, r, h, d).astype(q.dtype)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_size: int,
    block_table: np.ndarray,
    allowed: ElementMask | None = None,
    key_mask: jax.Array | None = None,
    extra: ExtraKeys | None = None,
) -> jax.Array:
  """Self-attention restricted to a static block table: q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D].

  block_table: int [ceil(T / block_size), M], the key blocks each query block attends; -1 marks an empty
  slot. allowed: element mask on absolute positions inside the gathered blocks (None: every element of a
  listed block). key_mask: bool [B, T], keys that may be attended at all (padding). extra: keys attended
  by every query besides the table, in the same softmax (mask [B | 1, T | 1, G]). T need not be a
  multiple of block_size (padded internally; padded keys are never attended). Query rows with no allowed
  key give zeros.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  num_blocks = -(-t // block_size)
  table = np.asarray(block_table)
  if table.ndim != 2 or table.shape[0] != num_blocks:
    raise ValueError(
        f"block_table.shape={table.shape} is not valid; expected [{num_blocks}, M] for T={t}, "
        f"block_size={block_size}"
    )
  padded = num_blocks * block_size
  width = table.shape[1] * block_size
  slots = np.maximum(table, 0)

  def gather(x):  # [B', T, ...] -> [B', num_blocks, M * block_size, ...]
    blocks = _pad_time(x, padded).reshape(x.shape[0], num_blocks, block_size, *x.shape[2:])
    return blocks[:, slots].reshape(x.shape[0], num_blocks, width, *x.shape[2:])

  key_valid = gather(_key_valid(key_mask, t))  # padding past T is False
  mask = key_valid[:, :, None, :] & jnp.repeat(jnp.asarray(table >= 0), block_size, axis=1)[:, None, :]
  if allowed is not None:
    q_pos = jnp.arange(padded).reshape(num_blocks, block_size, 1)
    k_pos = (jnp.asarray(slots)[:, :, None] * block_size + jnp.arange(block_size)).reshape(num_blocks, 1, width)
    mask = mask & allowed(q_pos, k_pos)
  k, v = gather(k), gather(v)
  if extra is not None:
    # The extra keys join every block's gathered keys, so one softmax covers both.
    per_block = lambda x: jnp.broadcast_to(x[:, None], (b, num_blocks, *x.shape[1:]))
    k = jnp.concatenate([k, per_block(extra.k)], axis=2)
    v = jnp.concatenate([v, per_block(extra.v)], axis=2)
    extra_mask = jnp.broadcast_to(extra.mask, (extra.mask.shape[0], t, extra.k.shape[1]))
    extra_mask = _pad_time(extra_mask, padded, False).reshape(-1, num_blocks, block_size, extra.k.shape[1])
    rows = (max(mask.shape[0], extra_mask.shape[0]), num_blocks, block_size)
    mask = jnp.concatenate(
        [jnp.broadcast_to(mask, (*rows, width)), jnp.broadcast_to(extra_mask, (*rows, extra.k.shape[1]))], axis=-1
    )
  qb = _pad_time(q, padded).reshape(b, num_blocks, block_size, hkv, h // hkv, d)
  out = _attend(qb, k, v, mask)
  return out.reshape(b, padded, h, d)[:, :t].astype(q.dtype)


def band_block_table(num_blocks: int, block_size: int, lo: int, hi: int) -> np.ndarray:
  """Key blocks that hold keys s with lo <= s - t <= hi for some query t of each block: int [num_blocks, M].

  Slots past either end of the sequence are -1; columns empty for every row are dropped.
  """
  offsets = np.arange(lo // block_size, (block_size - 1 + hi) // block_size + 1)
  table = np.arange(num_blocks)[:, None] + offsets[None, :]
  table = np.where((table >= 0) & (table < num_blocks), table, -1)
  return table[:, (table >= 0).any(axis=0)]


def band_block_size(lo: int, hi: int, length: int) -> int:
  """Block size of the band path: the window's reach, so a query block needs two key blocks (one-sided
  band) or three (two-sided), at least MIN_BLOCK_SIZE and at most the sequence."""
  return max(1, min(max(-lo, hi, MIN_BLOCK_SIZE), length))


def _to_residues(x: jax.Array, dilation: int) -> jax.Array:
  """[B, T, ...] -> [B * dilation, ceil(T / dilation), ...]; row b * dilation + r holds positions r, r + d, ..."""
  steps = -(-x.shape[1] // dilation)
  x = _pad_time(x, steps * dilation).reshape(x.shape[0], steps, dilation, *x.shape[2:])
  return jnp.swapaxes(x, 1, 2).reshape(x.shape[0] * dilation, steps, *x.shape[3:])


def _from_residues(x: jax.Array, dilation: int, length: int) -> jax.Array:
  """Inverse of _to_residues: [B * dilation, ceil(T / dilation), ...] -> [B, T, ...]."""
  x = x.reshape(x.shape[0] // dilation, dilation, *x.shape[1:])
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def band_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lo: int,
    hi: int,
    dilation: int = 1,
    key_mask: jax.Array | None = None,
    extra: ExtraKeys | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """Query t attends keys s = t + dilation * i for lo <= i <= hi: q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D].

  (lo, hi) = (-(w - 1), 0) is a causal sliding window of w keys; (-w, w) a bidirectional window of +-w.
  Dilation d splits the sequence into d interleaved subsequences (positions equal mod d); on each the
  dilated band is an ordinary band, so memory stays O(T * (hi - lo)) however far the dilated window reaches.
  key_mask bool [B, T] and extra (global keys, mask on original positions) as in blocked_attention.
  """
  if lo > hi:
    raise ValueError(f"lo={lo}, hi={hi} is not a valid band; it needs lo <= hi")
  check_count("dilation", dilation, 1)
  t = q.shape[1]
  if dilation > 1:
    batch = q.shape[0]
    # Residue padding (T not a multiple of d) must not be attended, so key_mask always exists here.
    key_mask = jnp.broadcast_to(_key_valid(key_mask, t), (batch, t))
    if extra is not None:
      mask = jnp.broadcast_to(extra.mask, (batch, t, extra.k.shape[1]))
      extra = ExtraKeys(
          jnp.repeat(extra.k, dilation, axis=0), jnp.repeat(extra.v, dilation, axis=0), _to_residues(mask, dilation)
      )
    out = band_attention(
        *(_to_residues(x, dilation) for x in (q, k, v)),
        lo=lo, hi=hi, key_mask=_to_residues(key_mask, dilation), extra=extra, block_size=block_size,
    )
    return _from_residues(out, dilation, t)
  block_size = band_block_size(lo, hi, t) if block_size is None else block_size
  check_count("block_size", block_size, 1)
  num_blocks = -(-t // block_size)

  def in_band(q_pos, k_pos):
    return (k_pos - q_pos >= lo) & (k_pos - q_pos <= hi)

  return blocked_attention(
      q, k, v, block_size=block_size, block_table=band_block_table(num_blocks, block_size, lo, hi),
      allowed=in_band, key_mask=key_mask, extra=extra,
  )
