"""Block-sparse attention (forward, dq, dk/dv) as Pallas kernels for TPUs (Mosaic TPU lowering), interpretable on CPU.

The design of kernels/flash_attention/pallas_tpu.py (2-D (rows, D) blocks of one head, reduction grid axis last
and "arbitrary" with VMEM scratch, natural-log online softmax, GQA through index_maps), with the reduction axis
walking the mask's visit lists instead of every tile: the lists are scalar-prefetched into SMEM, the reduction
axis has the lists' width (the most tiles any row visits), and step n of a row reads its n-th listed tile
through the index_maps. Steps past a row's count re-address the last listed block (no DMA) and are skipped
with `pl.when`; full tiles run without an element mask, partial ones read their element mask, itself a block
of the mask's deduplicated tile table addressed by the list's tile index.

The forward and dq kernels visit a query tile's listed key tiles (a kernel row tile may be a slice of the
mask's row tile); the dk/dv kernel visits a key tile's query tiles from the transposed lists, over every query
head of its key/value head's group, accumulating in scratch (no atomics).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_sparse.pallas_gpu import _Static, fit_blocks
from kernels.flash_attention.pallas_tpu import (LANES, BlockSizes, _compiler_params, _dot, _dot_t, _RowView,
                                                online_softmax_finalize, online_softmax_init, online_softmax_update,
                                                stat_spec)

__all__ = ["BlockSizes", "backward", "fit_blocks", "forward"]


def _mask_head(head, static: _Static):
  return head if static.per_head_mask else 0


def _last_listed(step, count):
  """List entry that step `step` addresses: itself, or the row's last entry once past its count."""
  return jnp.minimum(step, jnp.maximum(count - 1, 0))


def _run_step(step, count, num_full, first_key, block_k, lengths_ref, b, static: _Static, body):
  """Calls body(masked) for list entries [0, count); masks partial entries and key tiles crossing kv_length."""
  run = step < count
  partial = step >= num_full
  if static.has_kv_length:
    kv_length = lengths_ref[b]
    run = run & (first_key < kv_length)  # a key tile wholly past the length contributes nothing
    needs_mask = partial | (first_key + block_k > kv_length)
  else:
    needs_mask = partial
  pl.when(run & jnp.logical_not(needs_mask))(functools.partial(body, False))
  pl.when(run & needs_mask)(functools.partial(body, True))


def _masked(x, fill, tile_ref, partial, first_key, lengths_ref, b, static: _Static):
  """x [bq, bk] with `fill` where the element mask (partial entries only) or the key length says no."""
  # Full entries keep every pair whatever tile their element-mask block holds: OR in an int 1 (a scalar bool
  # broadcast to a vector is less widely supported in Mosaic than a scalar int).
  keep = (tile_ref[...] | (1 - partial.astype(jnp.int32))) != 0
  if static.has_kv_length:
    keep = keep & (first_key + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < lengths_ref[b])
  return jnp.where(keep, x, fill)


def _forward_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref, tiles_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, m_ref, l_ref, acc_ref, *, static: _Static, rows_per_mask_tile: int,
                    num_steps: int):
  b, h, i, n = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  mh, row = _mask_head(h, static), i // rows_per_mask_tile
  num_full, count = num_full_ref[mh, row], count_ref[mh, row]
  first_key = blocks_ref[mh, row, _last_listed(n, count)] * static.mask_block_k

  pl.when(n == 0)(functools.partial(online_softmax_init, m_ref, l_ref, acc_ref))

  def body(masked):
    s = _dot_t(q_ref[...], k_ref[...], static) * static.sm_scale
    if masked:
      s = _masked(s, -jnp.inf, tiles_ref, n >= num_full, first_key, lengths_ref, b, static)
    online_softmax_update(s, v_ref, m_ref, l_ref, acc_ref, static)

  _run_step(n, count, num_full, first_key, static.mask_block_k, lengths_ref, b, static, body)

  pl.when(n == num_steps - 1)(functools.partial(online_softmax_finalize, m_ref, l_ref, acc_ref, o_ref, lse_ref))


def _dq_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_acc_ref, *, static: _Static, rows_per_mask_tile: int, num_steps: int):
  b, h, i, n = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  mh, row = _mask_head(h, static), i // rows_per_mask_tile
  num_full, count = num_full_ref[mh, row], count_ref[mh, row]
  first_key = blocks_ref[mh, row, _last_listed(n, count)] * static.mask_block_k

  @pl.when(n == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  def body(masked):
    k, v = k_ref[...], v_ref[...]
    # lse is +inf on rows that attend nothing, so their probabilities are exactly 0.
    p = jnp.exp(_dot_t(q_ref[...], k, static) * static.sm_scale - lse_ref[...])
    if masked:
      p = _masked(p, 0.0, tiles_ref, n >= num_full, first_key, lengths_ref, b, static)
    ds = p * (_dot_t(do_ref[...], v, static) - delta_ref[...])
    dq_acc_ref[...] += _dot(ds.astype(k.dtype), k, static)

  _run_step(n, count, num_full, first_key, static.mask_block_k, lengths_ref, b, static, body)

  @pl.when(n == num_steps - 1)
  def _finalize():
    dq_ref[...] = (dq_acc_ref[...] * static.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref, tiles_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, static: _Static,
                cols_per_mask_tile: int, num_steps: int):
  b, kv_head, j, g, n = (pl.program_id(a) for a in range(5))
  block_k = k_ref.shape[0]
  mh, col = _mask_head(kv_head * static.group + g, static), j // cols_per_mask_tile
  num_full, count = num_full_ref[mh, col], count_ref[mh, col]
  first_key = j * block_k

  @pl.when((g == 0) & (n == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def body(masked):
    q, do = q_ref[...], do_ref[...]
    p = jnp.exp(_dot_t(q, k_ref[...], static) * static.sm_scale - lse_ref[...])
    if masked:
      p = _masked(p, 0.0, tiles_ref, n >= num_full, first_key, lengths_ref, b, static)
    # Transposed-LHS products as an explicit transpose then a plain matmul: the form Mosaic lowers everywhere.
    dv_acc_ref[...] += _dot(p.astype(do.dtype).T, do, static)
    ds = p * (_dot_t(do, v_ref[...], static) - delta_ref[...])
    dk_acc_ref[...] += _dot(ds.astype(q.dtype).T, q, static)

  _run_step(n, count, num_full, first_key, block_k, lengths_ref, b, static, body)

  @pl.when((g == static.group - 1) & (n == num_steps - 1))
  def _finalize():
    dk_ref[...] = (dk_acc_ref[...] * static.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _row_pass(kernel, q, k, v, do, stats, kv_lengths, lists, tiles, *, dims, view: _RowView, static: _Static,
              block_q: int, out_shape, scratch_shapes, interpret, name: str):
  """pallas_call over (batch, head, query tile, list step) for the forward (do None) and dq kernels.

  q/do [B, T, H, D] and k/v [B, S, Hkv, D] in `view`; stats: [B, H, T, 1] row statistics; dims = (B, T, H, D).
  Outputs: a row output in `view`, then [B, H, T, 1] statistics for the rest of out_shape.
  """
  b, t, h, d = dims
  mbk = static.mask_block_k
  rows_per_mask_tile = static.mask_block_q // block_q
  num_steps = lists[0].shape[-1]

  def kv_index(bi, hi, i, n, blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref):
    mh, row = _mask_head(hi, static), i // rows_per_mask_tile
    return bi, hi // static.group, blocks_ref[mh, row, _last_listed(n, count_ref[mh, row])]

  def tile_index(bi, hi, i, n, blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref):
    mh, row = _mask_head(hi, static), i // rows_per_mask_tile
    return tile_ids_ref[mh, row, _last_listed(n, count_ref[mh, row])], i % rows_per_mask_tile, 0

  row_index = lambda bi, hi, i, n, *_: (bi, hi, i)
  row_spec, stat = view.spec(block_q, d, row_index), stat_spec(block_q, row_index)
  kv_spec = view.spec(mbk, d, kv_index)
  rows = () if do is None else (do,)
  return pl.pallas_call(
      functools.partial(kernel, static=static, rows_per_mask_tile=rows_per_mask_tile, num_steps=num_steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, h, t // block_q, num_steps),
          in_specs=[pl.BlockSpec((None, block_q, mbk), tile_index), row_spec, kv_spec, kv_spec,
                    *[row_spec] * len(rows), *[stat] * len(stats)],
          out_specs=[row_spec] + [stat] * (len(out_shape) - 1),
          scratch_shapes=scratch_shapes,
      ),
      out_shape=out_shape,
      compiler_params=_compiler_params(3, 1, interpret),
      interpret=interpret,
      name=name,
  )(*lists, kv_lengths, tiles, q, k, v, *rows, *stats)


def _element_tiles(tiles):
  # int32, not the api's int8: 8-bit vectors need (32, 128) tiles on TPU, wider than a 16-row kernel tile.
  return tiles.astype(jnp.int32)


def forward(q, k, v, kv_lengths, lists, tiles, *, static: _Static, blocks: BlockSizes, interpret):
  """Padded inputs q [B, T, H, D], k/v [B, S, Hkv, D], kv_lengths int32 [B] -> o, lse [B, H, T] (natural log).

  lists: the mask's per-query-tile visit lists (blocks, tiles, num_full, count) as int32 arrays; tiles: int8
  [NT, mask_block_q, mask_block_k] element masks. T and S are multiples of the mask's tiles. The kernel's row
  tile is blocks.block_q (a divisor of the mask's); its key tile is the mask's.
  """
  b, t, h, d = q.shape
  bq = blocks.block_q
  view = _RowView.for_head_dim(d)
  o, lse = _row_pass(
      _forward_kernel, view.to_kernel(q), view.to_kernel(k), view.to_kernel(v), None, (), kv_lengths, lists,
      _element_tiles(tiles), dims=(b, t, h, d), view=view, static=static, block_q=bq,
      out_shape=[jax.ShapeDtypeStruct(view.shape(b, t, h, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      interpret=interpret, name="block_sparse_attention_forward_tpu",
  )
  return view.from_kernel(o, h), lse[..., 0]


def backward(q, k, v, o, lse, do, kv_lengths, lists, transposed_lists, tiles, *, static: _Static,
             blocks: BlockSizes, interpret):
  """Padded inputs, the forward's o/lse and the cotangent do [B, T, H, D] -> dq, dk, dv.

  With P the softmax, dS = P * (dP - delta) where delta = rowsum(dO * O).
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  view = _RowView.for_head_dim(d)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  # +inf on rows that attend nothing makes their recomputed probabilities exactly 0.
  stats = (jnp.where(lse == -jnp.inf, jnp.inf, lse)[..., None], delta[..., None])
  qv, kv, vv, dov = (view.to_kernel(x) for x in (q, k, v, do))
  tiles = _element_tiles(tiles)
  bq = blocks.block_q_dq
  dq = _row_pass(
      _dq_kernel, qv, kv, vv, dov, stats, kv_lengths, lists, tiles, dims=(b, t, h, d), view=view, static=static,
      block_q=bq, out_shape=[jax.ShapeDtypeStruct(qv.shape, q.dtype)],
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)], interpret=interpret,
      name="block_sparse_attention_dq_tpu",
  )[0]
  dk, dv = _backward_dkv(qv, kv, vv, dov, *stats, kv_lengths, transposed_lists, tiles, dims=(b, k.shape[1], hkv, d),
                         view=view, static=static, blocks=blocks, interpret=interpret)
  return view.from_kernel(dq, h), view.from_kernel(dk, hkv), view.from_kernel(dv, hkv)


def _backward_dkv(q, k, v, do, lse, delta, kv_lengths, transposed_lists, tiles, *, dims, view: _RowView,
                  static: _Static, blocks: BlockSizes, interpret):
  """q/do, k/v in `view`, lse/delta [B, H, T, 1] -> dk, dv in `view`; dims = (B, S, Hkv, D)."""
  b, s, hkv, d = dims
  mbq, mbk = static.mask_block_q, static.mask_block_k
  # The key tile is the last dimension of the element-mask block, so it splits a mask tile only by whole lanes.
  bk = blocks.block_k_dkv if blocks.block_k_dkv % LANES == 0 and mbk % blocks.block_k_dkv == 0 else mbk
  cols_per_mask_tile = mbk // bk
  num_steps = transposed_lists[0].shape[-1]

  def listed(hi, j, g, n, count_ref):
    mh, col = _mask_head(hi * static.group + g, static), j // cols_per_mask_tile
    return mh, col, _last_listed(n, count_ref[mh, col])

  def q_index(bi, hi, j, g, n, blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref):
    mh, col, entry = listed(hi, j, g, n, count_ref)
    return bi, hi * static.group + g, blocks_ref[mh, col, entry]

  def tile_index(bi, hi, j, g, n, blocks_ref, tile_ids_ref, num_full_ref, count_ref, lengths_ref):
    mh, col, entry = listed(hi, j, g, n, count_ref)
    return tile_ids_ref[mh, col, entry], 0, j % cols_per_mask_tile

  row_spec, stat = view.spec(mbq, d, q_index), stat_spec(mbq, q_index)
  kv_spec = view.spec(bk, d, lambda bi, hi, j, g, n, *_: (bi, hi, j))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, cols_per_mask_tile=cols_per_mask_tile, num_steps=num_steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(b, hkv, s // bk, static.group, num_steps),
          in_specs=[pl.BlockSpec((None, mbq, bk), tile_index), row_spec, kv_spec, kv_spec, row_spec, stat, stat],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(3, 2, interpret),
      interpret=interpret,
      name="block_sparse_attention_dkv_tpu",
  )(*transposed_lists, kv_lengths, tiles, q, k, v, do, lse, delta)
