"""Block-sparse attention backward (dq and dk/dv) for Hopper with Pallas' Mosaic GPU lowering.

The kernels of kernels/flash_attention/mosaic_gpu_bwd.py (two compute warpgroups of 64 rows and a TMA producer
per CTA, P recomputed from the base-2 lse, deterministic: dq and dk/dv in separate kernels), with the streams
driven by the mask's visit lists instead of contiguous ranges. Both run a schedule of work items (schedule.py:
longest first, on one CTA per SM by default, each CTA's input ring running on from one item to the next):

- dq: an item is a (batch, head, 128-row query tile); the producer streams the key tiles of the tile's list (in
  `key_step`-key halves when a mask tile is wider than the kernel's step). S = Q K^T, dP = dO V^T,
  dS = P (dP - delta), dQ += dS K.
- dk/dv: an item is a (batch, kv head, 128-key tile: 64 keys per warpgroup); the producer streams, for every query
  head of the GQA group, the query tiles of that head's transposed list in 64-row steps. S^T = K Q^T,
  dP^T = V dO^T, P^T = exp2(S^T * scale - lse2), dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q.

Partial tiles' element masks travel with their tiles as an additive bias (0 or -inf; transposed for dk/dv), added
to S before the exponential, so masked pairs get probability exactly 0. Rows that attend nothing carry lse2 = +inf
and contribute nothing.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.block_sparse import schedule
from kernels.block_sparse.mosaic_gpu import _SHARED_MEMORY_BYTES, band_mask
# The flash backward's shared-memory layout, vector loads and register-operand staging are this file's too.
from kernels.flash_attention.mosaic_gpu_bwd import _col_vector, _lhs, _row_vector, _tile_smem

LOG2_E = math.log2(math.e)
_WGS = 2  # compute warpgroups per CTA, plus one producer
_ROWS = 64  # rows per compute warpgroup (one wgmma M)
MASK_BLOCK_Q = _WGS * _ROWS
MASK_BLOCK_K = _WGS * _ROWS  # the dk/dv CTA: one mask key tile, split between the warpgroups
HEAD_DIMS = (64, 128)
# FA3's register split (the flash backward's default): 2 * 240 + 24 = 3 * 168, the CTA's launch allocation.
_COMPUTE_REGISTERS, _PRODUCER_REGISTERS = 240, 24


@dataclasses.dataclass(frozen=True)
class Config:
  """Pipeline depths of the two kernels."""

  num_stages_dq: int = 2  # (K, V, bias) ring of the dq kernel
  num_stages_dkv: int = 3  # (Q, dO, lse, delta, bias) ring of the dk/dv kernel

  def __post_init__(self):
    for name in ("num_stages_dq", "num_stages_dkv"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 2 to overlap copies with compute")


def unsupported_reasons(q, mask_block_q: int, mask_block_k: int, kv_lengths) -> list[str]:
  """Why these kernels cannot run the problem (empty when they can); q [B, T, H, D]."""
  reasons = []
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    reasons.append(f"dtype {q.dtype} (bf16/fp16 only: wgmma operands)")
  if q.shape[-1] not in HEAD_DIMS:
    reasons.append(f"head_dim {q.shape[-1]} (one of {HEAD_DIMS})")
  if (mask_block_q, mask_block_k) != (MASK_BLOCK_Q, MASK_BLOCK_K):
    reasons.append(f"mask tiles {mask_block_q}x{mask_block_k} ({MASK_BLOCK_Q}x{MASK_BLOCK_K} only)")
  if kv_lengths is not None:
    reasons.append("kv_lengths")
  return reasons


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on."""

  sm_scale: float
  group: int  # query heads per kv head
  per_head_mask: bool
  head_dim: int
  key_step: int  # keys per step of the dq kernel (a mask tile is 128 // key_step steps)
  dtype: jnp.dtype
  config: Config
  # Interpret mode's wgmma takes only SMEM operands, so there the register left operands are staged in SMEM.
  stage_lhs: bool
  batch: int  # B: work items are numbered (head * tiles + tile) * B + batch
  num_rows: int  # query tiles (the dq kernel's items per head)
  num_key_tiles: int  # key tiles (the dk/dv kernel's items per kv head)
  band: bool  # partial tiles masked from per-entry (lo, hi) bounds on key - query instead of a loaded bias

  @property
  def scale2(self) -> float:
    return self.sm_scale * LOG2_E

  @property
  def key_steps(self) -> int:
    return MASK_BLOCK_K // self.key_step


def _fetch_bias(mask_ref, tile, part, rows: int, cols: int, bias_smem, bias_bar, slot):
  """Producer: each compute warpgroup's [rows, cols] block of partial tile `tile`'s bias (the `part`-th block of
  columns; warpgroup w's rows from w * rows) into ring slot `slot`, arriving on bias_bar[slot * _WGS + w]."""
  for w in range(_WGS):
    plgpu.copy_gmem_to_smem(mask_ref.at[tile, pl.ds(w * rows, rows), pl.ds(part * cols, cols)],
                            bias_smem.at[slot, w], bias_bar.at[slot * _WGS + w])


def _bias(ref):
  """An additive [rows, cols] element mask from SMEM in the wgmma accumulator layout, in fp32."""
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)


def _dq_kernel(items_ref, num_items_ref, blocks_ref, tile_ids_ref, num_full_ref, count_ref, mask_ref, q_ref, k_ref,
               v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, barriers, *, st: _Static):
  """One CTA: its scheduled (query tile, head, batch) items in turn, the K/V ring running on across them.

  mask_ref: the partial tiles' bias [NT, 128, 128], or with st.band the list entries' bounds [Hm, R, M, 2]."""
  if st.band:
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, *staging), bias_smem = smem, None
    (q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, consumed), bias_bar = barriers, None
  else:
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, bias_smem, *staging = smem
    q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, bias_bar, consumed = barriers
  bq, bk, stages, steps = _ROWS, st.key_step, st.config.num_stages_dq, st.key_steps
  cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
  num_items = num_items_ref[cta]

  def work(i):
    """(batch, head, row tile, mask head, full steps, all steps) of item i; a listed key tile is `steps` steps."""
    batch, head, row_tile = schedule.item_coordinates(items_ref, cta, i, batch=st.batch, rows=st.num_rows)
    mask_head = head if st.per_head_mask else 0
    return (batch, head, row_tile, mask_head, num_full_ref[mask_head, row_tile] * steps,
            count_ref[mask_head, row_tile] * steps)

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
    my_q, my_do = q_smem.at[wg], do_smem.at[wg]
    ds_stage = staging[0].at[wg] if st.stage_lhs else None

    def item(i, start):
      batch, head, row_tile, mask_head, num_full, count = work(i)
      my_rows = pl.ds(row_tile * MASK_BLOCK_Q + wg * bq, bq)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's dQ leaves through Q's buffer
      plgpu.copy_gmem_to_smem(q_ref.at[batch, my_rows, head], my_q, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, my_rows, head], my_do, do_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, my_rows], lse_smem.at[wg], lse_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, my_rows], delta_smem.at[wg], delta_bar.at[wg])
      for bar in (q_bar, do_bar, lse_bar, delta_bar):
        plgpu.barrier_wait(bar.at[wg])
      lse2, delta = _row_vector(lse_smem.at[wg]), _row_vector(delta_smem.at[wg])

      def step(n, carry, *, masked, dq_ref):
        slot = lax.rem(start + n, stages)
        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
        if masked and st.band:  # read before the waits, so the loads' latency hides behind them
          entry, part = lax.div(n, steps), lax.rem(n, steps)
          lo, hi = mask_ref[mask_head, row_tile, entry, 0], mask_ref[mask_head, row_tile, entry, 1]
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])

        def tile(s_ref, dp_ref):
          plgpu.wgmma(s_ref, my_q, k_tile.transpose((1, 0)))
          plgpu.wgmma(dp_ref, my_do, v_tile.transpose((1, 0)))
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # dP still runs under the exponentials
          if masked and st.band:  # rows: queries wg * 64 + i; columns: keys part * bk + j
            s = band_mask(s, lo, hi, row_offset=wg * bq, col_offset=part * bk)
          elif masked:
            plgpu.barrier_wait(bias_bar.at[slot * _WGS + wg])
            s = s + _bias(bias_smem.at[slot, wg])
          p = jnp.exp2(s * st.scale2 - lax.broadcast_in_dim(lse2, (bq, bk), [0]))
          ds = p * (dp_ref[...] - lax.broadcast_in_dim(delta, (bq, bk), [0]))
          plgpu.wgmma(dq_ref, _lhs(ds.astype(st.dtype), ds_stage), k_tile)

        pl.run_scoped(tile, plgpu.ACC((bq, bk), jnp.float32), plgpu.ACC((bq, bk), jnp.float32))
        plgpu.wgmma_wait(0)  # the slot may be refilled only once every wgmma has read it
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

      def accumulate(dq_ref):
        lax.fori_loop(0, num_full, functools.partial(step, masked=False, dq_ref=dq_ref), None)
        lax.fori_loop(num_full, count, functools.partial(step, masked=True, dq_ref=dq_ref), None)
        return dq_ref[...]

      dq = pl.run_scoped(accumulate, plgpu.ACC((bq, st.head_dim), jnp.float32))
      my_q[...] = (dq * st.sm_scale).astype(st.dtype)  # Q is no longer read: its buffer stages the output
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, dq_ref.at[batch, my_rows, head])
      return start + count

    lax.fori_loop(0, num_items, item, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _producer():
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

    def item(i, start):
      batch, head, row_tile, mask_head, num_full, count = work(i)
      kv_head = lax.div(head, st.group)

      @pl.loop(0, count)
      def _(n):
        position = start + n
        slot = lax.rem(position, stages)
        entry, part = lax.div(n, steps), lax.rem(n, steps)
        keys = (batch, pl.ds(blocks_ref[mask_head, row_tile, entry] * MASK_BLOCK_K + part * bk, bk), kv_head)

        @pl.when(position >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

        if not st.band:
          @pl.when(n >= num_full)
          def _():
            _fetch_bias(mask_ref, tile_ids_ref[mask_head, row_tile, entry], part, bq, bk, bias_smem, bias_bar, slot)

      return start + count

    total = lax.fori_loop(0, num_items, item, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(n):  # observe the last releases, so the producer ends having seen every phase of `consumed`
      plgpu.barrier_wait(consumed.at[lax.rem(n, stages)])


def _dkv_kernel(items_ref, num_items_ref, blocks_ref, tile_ids_ref, num_full_ref, count_ref, mask_ref, q_ref, k_ref,
                v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, barriers, *, st: _Static):
  """One CTA: its scheduled (key tile, kv head, batch) items in turn, the Q/dO ring running on across them.

  mask_ref: the partial tiles' transposed bias [NT, 128 keys, 128 queries], or with st.band the transposed list
  entries' bounds [Hm, C, M, 2] (still on key - query)."""
  if st.band:
    (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *staging), bias_smem = smem, None
    (k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, consumed), bias_bar = barriers, None
  else:
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, bias_smem, *staging = smem
    k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, bias_bar, consumed = barriers
  bq, bk, stages = _ROWS, _ROWS, st.config.num_stages_dkv
  row_steps = MASK_BLOCK_Q // bq  # a listed query tile is this many stream steps
  cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
  num_items = num_items_ref[cta]

  def work(i):
    return schedule.item_coordinates(items_ref, cta, i, batch=st.batch, rows=st.num_key_tiles)

  def head_list(kv_head, key_tile, g):
    """(query head, mask head, full steps, all steps) of the group's g-th query head."""
    head = kv_head * st.group + g
    mask_head = head if st.per_head_mask else 0
    return (head, mask_head, num_full_ref[mask_head, key_tile] * row_steps,
            count_ref[mask_head, key_tile] * row_steps)

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
    my_k, my_v = k_smem.at[wg], v_smem.at[wg]
    p_stage, ds_stage = (staging[0].at[wg], staging[1].at[wg]) if st.stage_lhs else (None, None)

    def step(n, index, *, masked, dk_ref, dv_ref, list_row):
      """Stream step `index` (the n-th of the current head's list row (mask head, key tile)); returns index + 1."""
      slot = lax.rem(index, stages)
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      if masked and st.band:  # read before the waits, so the loads' latency hides behind them
        entry, part = lax.div(n, row_steps), lax.rem(n, row_steps)
        lo, hi = mask_ref[list_row[0], list_row[1], entry, 0], mask_ref[list_row[0], list_row[1], entry, 1]
      plgpu.barrier_wait(q_bar.at[slot])
      plgpu.barrier_wait(do_bar.at[slot])

      def tile(st_ref, dpt_ref):
        plgpu.wgmma(st_ref, my_k, q_tile.transpose((1, 0)))
        plgpu.wgmma(dpt_ref, my_v, do_tile.transpose((1, 0)))
        s_t = plgpu.wgmma_accumulator_load(st_ref, wait_n=1)  # dP^T still runs under the exponentials
        if masked and st.band:
          # Rows: keys wg * 64 + i; columns: queries part * 64 + j. key - query = -(column - row) here, so the
          # bounds flip: lo <= key - query <= hi  <=>  -hi <= (j + part * 64) - (i + wg * 64) <= -lo.
          s_t = band_mask(s_t, -hi, -lo, row_offset=wg * bk, col_offset=part * bq)
        elif masked:
          plgpu.barrier_wait(bias_bar.at[slot * _WGS + wg])
          s_t = s_t + _bias(bias_smem.at[slot, wg])
        plgpu.barrier_wait(lse_bar.at[slot])
        lse2 = _col_vector(lse_smem.at[slot])
        p_t = jnp.exp2(s_t * st.scale2 - lax.broadcast_in_dim(lse2, (bk, bq), [1]))
        plgpu.wgmma(dv_ref, _lhs(p_t.astype(st.dtype), p_stage), do_tile)
        # Awaiting dV with dP^T frees P^T's registers before dS^T (the flash backward's await_dv).
        dp_t = plgpu.wgmma_accumulator_load(dpt_ref, wait_n=0)
        plgpu.barrier_wait(delta_bar.at[slot])
        delta = _col_vector(delta_smem.at[slot])
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))
        plgpu.wgmma(dk_ref, _lhs(ds_t.astype(st.dtype), ds_stage), q_tile)

      pl.run_scoped(tile, plgpu.ACC((bk, bq), jnp.float32), plgpu.ACC((bk, bq), jnp.float32))
      plgpu.wgmma_wait(0)  # the slot may be refilled only once every wgmma has read it
      plgpu.barrier_arrive(consumed.at[slot])
      return index + 1

    def item(i, index):
      batch, kv_head, key_tile = work(i)
      my_rows = (batch, pl.ds(key_tile * MASK_BLOCK_K + wg * bk, bk), kv_head)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's dK/dV leave through these buffers
      plgpu.copy_gmem_to_smem(k_ref.at[my_rows], my_k, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[my_rows], my_v, v_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])

      def accumulate(dk_ref, dv_ref):
        def per_head(g, index):
          _, mask_head, num_full, count = head_list(kv_head, key_tile, g)
          body = functools.partial(step, dk_ref=dk_ref, dv_ref=dv_ref, list_row=(mask_head, key_tile))
          index = lax.fori_loop(0, num_full, functools.partial(body, masked=False), index)
          return lax.fori_loop(num_full, count, functools.partial(body, masked=True), index)

        return lax.fori_loop(0, st.group, per_head, index), dk_ref[...], dv_ref[...]

      acc = plgpu.ACC((bk, st.head_dim), jnp.float32)
      index, dk, dv = pl.run_scoped(accumulate, acc, acc)
      # K and V are no longer read (every wgmma has been awaited), so their buffers stage the outputs.
      my_k[...] = (dk * st.sm_scale).astype(st.dtype)
      my_v[...] = dv.astype(st.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_k, dk_ref.at[my_rows], commit_group=False)
      plgpu.copy_smem_to_gmem(my_v, dv_ref.at[my_rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      return index

    lax.fori_loop(0, num_items, item, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _producer():
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

    def item(i, index):
      batch, kv_head, key_tile = work(i)

      def per_head(g, index):
        head, mask_head, num_full, count = head_list(kv_head, key_tile, g)

        def fetch(n, index):
          slot = lax.rem(index, stages)
          entry, part = lax.div(n, row_steps), lax.rem(n, row_steps)
          rows = pl.ds(blocks_ref[mask_head, key_tile, entry] * MASK_BLOCK_Q + part * bq, bq)

          @pl.when(index >= stages)
          def _():
            plgpu.barrier_wait(consumed.at[slot])

          plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_bar.at[slot])
          plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_bar.at[slot])
          plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_bar.at[slot])
          plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], delta_bar.at[slot])

          if not st.band:
            @pl.when(n >= num_full)
            def _():
              _fetch_bias(mask_ref, tile_ids_ref[mask_head, key_tile, entry], part, bk, bq, bias_smem, bias_bar,
                          slot)
          return index + 1

        return lax.fori_loop(0, count, fetch, index)

      return lax.fori_loop(0, st.group, per_head, index)

    total = lax.fori_loop(0, num_items, item, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(index):  # observe the last releases, so the producer ends having seen every phase of `consumed`
      plgpu.barrier_wait(consumed.at[lax.rem(index, stages)])


def _barriers(count: int, num: int):
  return tuple(plgpu.Barrier(num_barriers=num) for _ in range(count))


def dkv_work_schedule(transposed_lists, num_heads: int, num_kv_heads: int, batch: int, *, persistent: bool = True,
                      num_ctas: int | None = None, interpret: bool = False):
  """(items, lengths) of the dk/dv kernel (schedule.work_schedule): an item is a (key tile, kv head, batch), and
  costs the lists of every query head of its GQA group; the counts must be concrete (numpy)."""
  count_t = np.asarray(transposed_lists[3])
  group = num_heads // num_kv_heads
  count_t = np.broadcast_to(count_t, (num_heads, count_t.shape[-1])).reshape(num_kv_heads, group, -1).sum(1)
  return schedule.work_schedule(count_t, num_kv_heads, batch, persistent=persistent, num_ctas=num_ctas,
                                interpret=interpret)


def work_schedules(lists, transposed_lists, num_heads: int, num_kv_heads: int, batch: int, *, persistent: bool = True,
                   num_ctas: int | None = None, interpret: bool = False):
  """(dq items, dq lengths, dk/dv items, dk/dv lengths) for `backward`: the dq kernel's items are (query tile,
  head, batch), scheduled as the forward's rows are; the dk/dv kernel's as `dkv_work_schedule`."""
  kwargs = dict(persistent=persistent, num_ctas=num_ctas, interpret=interpret)
  return (*schedule.work_schedule(np.asarray(lists[3]), num_heads, batch, **kwargs),
          *dkv_work_schedule(transposed_lists, num_heads, num_kv_heads, batch, **kwargs))


def backward(q, k, v, o, lse, do, lists, transposed_lists, bias, *, sm_scale: float, per_head_mask: bool,
             config: Config | None = None, interpret: bool = False, work=None, bands=None):
  """Gradients of block-sparse attention from the forward's residuals.

  Args:
    q, o, do: [B, T, H, D] bf16/fp16; k, v: [B, S, Hkv, D]; T and S multiples of 128.
    lse: [B, H, T] fp32 natural-log log-sum-exp (-inf on rows that attend nothing).
    lists, transposed_lists: the mask's visit lists as int32 arrays (`BlockMask.lists`, `.transposed_lists`).
    bias: [NT, 128, 128] additive element masks in q's dtype (`mosaic_gpu.bias_tiles`).
    interpret: run the kernels in Mosaic GPU interpret mode (CPU).
    work: `work_schedules(...)` for these lists (which CTA runs which tile), or None for the default persistent
      schedule (then the lists' counts must be concrete).
    bands: None, or (`mosaic_gpu.band_bounds` of the lists, of the transposed lists) to mask the partial tiles from
      bounds on key - query instead of `bias` (every partial tile a band).

  Returns:
    dq [B, T, H, D], dk, dv [B, S, Hkv, D] in q's dtype.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  config = config or Config()
  if reasons := unsupported_reasons(q, bias.shape[1], bias.shape[2], None):
    raise ValueError(f"mosaic_gpu_bwd.backward does not support {', '.join(reasons)}")
  if t % MASK_BLOCK_Q or s % MASK_BLOCK_K:
    raise ValueError(f"T={t} and S={s} must be multiples of {MASK_BLOCK_Q}")
  band = bands is not None
  key_step = 128 if d <= 64 else 64  # at D = 128, S and dP of 128 keys next to dQ would not fit the registers
  # Each kernel's shared-memory tiles: its CTA's own rows, then the ring of the setting that sizes it (with the
  # partial tiles' masks unless they are bands). Interpret mode adds staging buffers beside them (no real limit).
  stages, bk = config.num_stages_dq, key_step
  dq_tiles = (_tile_smem((_WGS, _ROWS, d), q.dtype), _tile_smem((_WGS, _ROWS, d), q.dtype),
              plgpu.SMEM((_WGS, _ROWS), jnp.float32), plgpu.SMEM((_WGS, _ROWS), jnp.float32),
              _tile_smem((stages, bk, d), q.dtype), _tile_smem((stages, bk, d), q.dtype),
              *(() if band else (_tile_smem((stages, _WGS, _ROWS, bk), q.dtype),)))
  stages = config.num_stages_dkv
  dkv_tiles = (_tile_smem((_WGS, _ROWS, d), q.dtype), _tile_smem((_WGS, _ROWS, d), q.dtype),
               _tile_smem((stages, _ROWS, d), q.dtype), _tile_smem((stages, _ROWS, d), q.dtype),
               plgpu.SMEM((stages, _ROWS), jnp.float32), plgpu.SMEM((stages, _ROWS), jnp.float32),
               *(() if band else (_tile_smem((stages, _WGS, _ROWS, _ROWS), q.dtype),)))
  for name, tiles in (("num_stages_dq", dq_tiles), ("num_stages_dkv", dkv_tiles)):
    size = sum(math.prod(tile.shape) * jnp.dtype(tile.dtype).itemsize for tile in tiles)
    if size > _SHARED_MEMORY_BYTES:
      raise ValueError(f"{name}={getattr(config, name)} needs {size} bytes of shared memory at D = {d} "
                       f"{'with band masks' if band else 'with the bias ring'} (limit {_SHARED_MEMORY_BYTES}); "
                       "lower it")
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  # Base 2 for the kernels; +inf on rows that attend nothing makes their probabilities exactly 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E).astype(jnp.float32)
  st = _Static(sm_scale=sm_scale, group=h // hkv, per_head_mask=per_head_mask, head_dim=d,
               key_step=key_step, dtype=jnp.dtype(q.dtype), config=config, stage_lhs=interpret,
               batch=b, num_rows=t // MASK_BLOCK_Q, num_key_tiles=s // MASK_BLOCK_K, band=band)
  if work is None:
    work = work_schedules(lists, transposed_lists, h, hkv, b, interpret=interpret)
  dq_items, dq_lengths, dkv_items, dkv_lengths = (jnp.asarray(x, jnp.int32) for x in work)
  params = dict(num_threads=_WGS + 1, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=plgpu.InterpretGPUParams() if interpret else None)
  args = (q, k, v, do, lse2, delta)

  stages = config.num_stages_dq
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, st=st),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=[
          (*dq_tiles, *((_tile_smem((_WGS, _ROWS, bk), q.dtype),) if interpret else ())),
          (*_barriers(4, _WGS), *_barriers(2, stages),
           *(() if band else (plgpu.Barrier(num_barriers=stages * _WGS),)),
           plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages)),
      ],
      grid=(dq_items.shape[0],),
      grid_names=("ctas",),
      **params,
  )(dq_items, dq_lengths, *lists, bands[0] if band else bias, *args)

  stages = config.num_stages_dkv
  # The transposed lists' bounds, or the bias as [NT, keys, queries]: the dk/dv kernel's S^T orientation.
  mask_t = bands[1] if band else jnp.swapaxes(bias, 1, 2)
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, st=st),
      out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_types=[
          (*dkv_tiles, *((_tile_smem((_WGS, _ROWS, _ROWS), q.dtype),) * 2 if interpret else ())),
          (*_barriers(2, _WGS), *_barriers(4, stages),
           *(() if band else (plgpu.Barrier(num_barriers=stages * _WGS),)),
           plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages)),
      ],
      grid=(dkv_items.shape[0],),
      grid_names=("ctas",),
      **params,
  )(dkv_items, dkv_lengths, *transposed_lists, mask_t, *args)
  return dq, dk, dv
