"""Block-sparse attention (forward, dq, dk/dv) as Pallas kernels for GPUs (Triton lowering), interpretable on CPU.

The design of kernels/flash_attention/pallas_gpu.py (channel-last layout, base-2 online softmax, separate dq and
dk/dv kernels, GQA by looping over a key/value head's query heads, no atomics), with the key loop driven by the
mask's visit lists instead of a contiguous range: a query tile visits only its listed key tiles, full ones
without an element mask and then partial ones with their [block_q, block_k] tile read from the mask's table.
The dk/dv kernel walks the transposed lists (per key tile, the query tiles that attend it).

Kernel tiles may be smaller than the mask's tiles (both are powers of two, so they divide): a program then
covers a slice of a mask tile's rows (or columns) and steps through each listed tile in sub-tiles.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.flash_attention.pallas_gpu import BlockSizes, compiler_params, dot, dot_t, dot_tn, kv_length_spec

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on."""

  sm_scale: float
  group: int  # query heads per key/value head
  per_head_mask: bool  # the mask has one pattern per query head (else one shared)
  mask_block_q: int
  mask_block_k: int
  has_kv_length: bool
  precision: lax.Precision | None

  @property
  def scale(self) -> float:
    """Logit scale in base 2: sm_scale * log2(e)."""
    return self.sm_scale * LOG2_E


def fit_blocks(blocks: BlockSizes, mask_block_q: int, mask_block_k: int) -> BlockSizes:
  """Kernel tiles no larger than the mask's tiles (powers of two, so each divides its mask tile)."""
  fit_q, fit_k = (lambda b: min(b, mask_block_q)), (lambda b: min(b, mask_block_k))
  return dataclasses.replace(
      blocks,
      block_q=fit_q(blocks.block_q), block_k=fit_k(blocks.block_k),
      block_q_dq=fit_q(blocks.block_q_dq), block_k_dq=fit_k(blocks.block_k_dq),
      block_q_dkv=fit_q(blocks.block_q_dkv), block_k_dkv=fit_k(blocks.block_k_dkv),
  )


def _visit(num_full, count, block_at, tile_at, tile_slice, *, extent: int, step: int, body, carry):
  """Runs body(start, tile, carry) over every step of every listed block.

  Entries [0, num_full) are full blocks (tile None: no element mask), [num_full, count) partial ones (tile: the
  int8 element-mask slice of this step). block_at(j) / tile_at(j) read list entry j; a block of `extent`
  positions is walked in steps of `step` starting at position `start`; tile_slice(tile_id, c) is step c's slice.

  Each kind of block is one flat loop over (entry, step) pairs rather than a loop over entries around a loop over
  steps: Triton software-pipelines only innermost loops, and an inner loop of extent / step (often 2) iterations
  would leave every block's first loads exposed.
  """
  steps = extent // step

  def one_step(i, carry, masked):
    # lax.div/lax.rem on int32 operands: jnp's floor-division helpers lower to Triton with a mistyped (i1)
    # operand, and i >= 0 makes truncation and flooring agree.
    j, c = (i, 0) if steps == 1 else (lax.div(i, jnp.int32(steps)), lax.rem(i, jnp.int32(steps)))
    start = pl.multiple_of(block_at(j) * extent + c * step, step)
    return body(start, tile_slice(tile_at(j), c) if masked else None, carry)

  carry = lax.fori_loop(0, num_full * steps, functools.partial(one_step, masked=False), carry)
  return lax.fori_loop(num_full * steps, count * steps, functools.partial(one_step, masked=True), carry)


def _masked(x, fill, tile, k_idx, kv_length):
  """x [bq, bk] with `fill` where the tile's element mask (int8, nonzero = attended) or the key length says no."""
  keep = None if tile is None else tile != 0
  if kv_length is not None:
    in_length = (k_idx < kv_length)[None, :]
    keep = in_length if keep is None else keep & in_length
  return x if keep is None else jnp.where(keep, x, fill)


def _mask_head(head, static: _Static):
  return head if static.per_head_mask else 0


def _forward_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, tiles_ref, kv_len_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, static: _Static, block_k: int):
  block_q = q_ref.shape[0]
  row = (pl.program_id(2) % (static.mask_block_q // block_q)) * block_q  # first row inside the mask tile
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  q = q_ref[...]

  def body(start, tile, carry):
    acc, m, l = carry
    keys = pl.ds(start, block_k)
    s = dot_t(q, k_ref[keys, :], static) * static.scale
    s = _masked(s, -jnp.inf, tile, start + lax.iota(jnp.int32, block_k), kv_length)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing attended yet stays at zero weight
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, static)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  d = q_ref.shape[-1]
  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _visit(
      num_full_ref[...], count_ref[...], lambda j: blocks_ref[j], lambda j: tile_ids_ref[j],
      lambda tile_id, c: tiles_ref[tile_id, pl.ds(row, block_q), pl.ds(c * block_k, block_k)],
      extent=static.mask_block_k, step=block_k, body=body, carry=init,
  )
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # Natural-log LSE; -inf marks rows that attend nothing.
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2_E)


def _dq_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, tiles_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, static: _Static, block_k: int):
  block_q = q_ref.shape[0]
  row = (pl.program_id(2) % (static.mask_block_q // block_q)) * block_q
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...], delta_ref[...]

  def body(start, tile, dq):
    keys = pl.ds(start, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    p = jnp.exp2(dot_t(q, k, static) * static.scale - lse2[:, None])
    p = _masked(p, 0.0, tile, start + lax.iota(jnp.int32, block_k), kv_length)
    ds = p * (dot_t(do, v, static) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k, static)

  dq = _visit(
      num_full_ref[...], count_ref[...], lambda j: blocks_ref[j], lambda j: tile_ids_ref[j],
      lambda tile_id, c: tiles_ref[tile_id, pl.ds(row, block_q), pl.ds(c * block_k, block_k)],
      extent=static.mask_block_k, step=block_k, body=body, carry=jnp.zeros(q_ref.shape, jnp.float32),
  )
  dq_ref[...] = (dq * static.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, tiles_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, static: _Static, block_q: int):
  block_k = k_ref.shape[0]
  kv_head, k_tile = pl.program_id(1), pl.program_id(2)
  col = (k_tile % (static.mask_block_k // block_k)) * block_k  # first key inside the mask tile
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  k, v = k_ref[...], v_ref[...]
  k_idx = k_tile * block_k + lax.iota(jnp.int32, block_k)

  def head_body(g, carry):
    head = kv_head * static.group + g
    mask_head = _mask_head(head, static)

    def body(start, tile, carry):
      dk, dv = carry
      rows = pl.ds(start, block_q)
      q, do = q_ref[rows, head, :], do_ref[rows, head, :]
      lse2, delta = lse_ref[head, rows], delta_ref[head, rows]
      p = jnp.exp2(dot_t(q, k, static) * static.scale - lse2[:, None])
      p = _masked(p, 0.0, tile, k_idx, kv_length)
      dv = dv + dot_tn(p.astype(do.dtype), do, static)
      ds = p * (dot_t(do, v, static) - delta[:, None])
      return dk + dot_tn(ds.astype(q.dtype), q, static), dv

    return _visit(
        num_full_ref[mask_head], count_ref[mask_head], lambda j: blocks_ref[mask_head, j],
        lambda j: tile_ids_ref[mask_head, j],
        lambda tile_id, c: tiles_ref[tile_id, pl.ds(c * block_q, block_q), pl.ds(col, block_k)],
        extent=static.mask_block_q, step=block_q, body=body, carry=carry,
    )

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, static.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * static.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _whole(x):
  """BlockSpec of all of x (the kernels index it with scalars read from the lists)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _row_list_specs(lists, static: _Static, tiles_per_mask_row: int):
  """Specs giving a (batch, head, query tile) program its mask row's visit list: [M] refs and scalar refs."""
  head = lambda h: h if static.per_head_mask else 0
  entries = pl.BlockSpec((None, None, lists[0].shape[-1]), lambda b, h, i: (head(h), i // tiles_per_mask_row, 0))
  scalars = pl.BlockSpec((None, None), lambda b, h, i: (head(h), i // tiles_per_mask_row))
  return [entries, entries, scalars, scalars]


def forward(q, k, v, kv_lengths, lists, tiles, *, static: _Static, blocks: BlockSizes, interpret: bool):
  """Padded inputs q [B, T, H, D], k/v [B, S, Hkv, D], kv_lengths int32 [B] -> o, lse [B, H, T] (natural log).

  lists: the mask's per-query-tile visit lists (blocks, tiles, num_full, count) as int32 arrays; tiles: int8
  [NT, mask_block_q, mask_block_k] element masks. T and S are multiples of the mask's tiles.
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi // static.group, 0))
  row_spec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, static=static, block_k=bk),
      grid=(b, h, t // bq),
      in_specs=[*_row_list_specs(lists, static, static.mask_block_q // bq), _whole(tiles), kv_length_spec(),
                row_spec, kv_spec, kv_spec],
      out_specs=[row_spec, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=compiler_params(blocks.num_warps, blocks.num_stages, interpret),
      interpret=interpret,
      name="block_sparse_attention_forward",
  )(*lists, tiles, kv_lengths, q, k, v)


def backward(q, k, v, o, lse, do, kv_lengths, lists, transposed_lists, tiles, *, static: _Static,
             blocks: BlockSizes, interpret: bool):
  """Padded inputs, the forward's o/lse and the cotangent do [B, T, H, D] -> dq, dk, dv.

  With P the softmax, dS = P * (dP - delta) where delta = rowsum(dO * O).
  """
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  # Base-2 LSE for the kernels; +inf on rows that attend nothing makes their probabilities exactly 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  args = (q, k, v, do, lse2, delta, kv_lengths)
  dq = _backward_dq(*args, lists, tiles, static=static, blocks=blocks, interpret=interpret)
  dk, dv = _backward_dkv(*args, transposed_lists, tiles, static=static, blocks=blocks, interpret=interpret)
  return dq, dk, dv


def _backward_dq(q, k, v, do, lse2, delta, kv_lengths, lists, tiles, *, static: _Static, blocks: BlockSizes,
                 interpret: bool):
  """dq [B, T, H, D]: one program per (batch, head, query tile), visiting its listed key tiles."""
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  row_spec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi // static.group, 0))
  return pl.pallas_call(
      functools.partial(_dq_kernel, static=static, block_k=bk),
      grid=(b, h, t // bq),
      in_specs=[*_row_list_specs(lists, static, static.mask_block_q // bq), _whole(tiles), kv_length_spec(),
                row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compiler_params(blocks.num_warps_dq, blocks.num_stages_dq, interpret),
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(*lists, tiles, kv_lengths, q, k, v, do, lse2, delta)


def _backward_dkv(q, k, v, do, lse2, delta, kv_lengths, transposed_lists, tiles, *, static: _Static,
                  blocks: BlockSizes, interpret: bool):
  """dk, dv [B, S, Hkv, D]: one program per (batch, kv head, key tile), over its query heads' listed query tiles."""
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  per_mask_tile = static.mask_block_k // bk
  # Every query head of the group may have its own list, so the program gets all mask heads' lists.
  hm = transposed_lists[0].shape[0]
  entries = pl.BlockSpec((hm, None, transposed_lists[0].shape[-1]), lambda bi, hi, j: (0, j // per_mask_tile, 0))
  scalars = pl.BlockSpec((hm, None), lambda bi, hi, j: (0, j // per_mask_tile))
  all_rows_spec = pl.BlockSpec((None, t, h, d), lambda bi, hi, j: (bi, 0, 0, 0))
  all_stats_spec = pl.BlockSpec((None, h, t), lambda bi, hi, j: (bi, 0, 0))
  key_tile_spec = pl.BlockSpec((None, bk, None, d), lambda bi, hi, j: (bi, j, hi, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, block_q=bq),
      grid=(b, k.shape[2], s // bk),
      in_specs=[entries, entries, scalars, scalars, _whole(tiles), kv_length_spec(), all_rows_spec,
                key_tile_spec, key_tile_spec, all_rows_spec, all_stats_spec, all_stats_spec],
      out_specs=[key_tile_spec, key_tile_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(blocks.num_warps_dkv, blocks.num_stages_dkv, interpret),
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(*transposed_lists, tiles, kv_lengths, q, k, v, do, lse2, delta)
