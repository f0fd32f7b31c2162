"""Block-sparse attention forward for Hopper with Pallas' Mosaic GPU lowering.

The warp-specialised design of kernels/flash_attention/mosaic_gpu.py (two consumer warpgroups of 64 query rows
taking turns on the tensor cores, one producer streaming K/V tiles by TMA through a ring), with the key loop
driven by the mask's visit lists: a work item is one 128-row mask tile row of one (batch, head), and the producer
reads the row's list entry by entry (key tile index, and for a partial tile the index of its element mask) from
global memory. Full tiles come first and run without a mask; each partial tile's element mask travels beside its
K/V tile as an additive bf16/fp16 bias (0 attended, -inf not), loaded into the wgmma accumulator layout and added
to S.

Which CTA runs which items is a longest-first schedule (schedule.py). By default one CTA per SM runs its share of
the rows in turn with one K/V ring across them (Config.persistent), so a CTA's start-up and the ring's first fill
are paid once rather than per row.

Rows may attend nothing (in a partial tile, or with an empty list): the softmax keeps such rows at zero weight
and they give o = 0 and lse = -inf, as the Triton kernel. The backward (mosaic_gpu_bwd.py, or the Triton
pallas_gpu.backward) takes this forward's o and natural-log lse.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.block_sparse import schedule
from kernels.flash_attention.mosaic_gpu import _SHARED_MEMORY_BYTES, logits_passing_turn, pipelined_step, pv_product

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
_CONSUMERS = 2  # consumer warpgroups per CTA; the producer is warpgroup _CONSUMERS
_ROWS = 64  # query rows per consumer (one wgmma M)
MASK_BLOCK_Q = _CONSUMERS * _ROWS  # the mask's query tile: one CTA
MASK_BLOCK_KS = (64, 128)
HEAD_DIMS = (64, 128)
# 128-byte swizzled (8, 64) tiles: the shared-memory layout TMA writes and wgmma reads without bank conflicts.
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class Config:
  """Pipelining of the Mosaic GPU block-sparse forward (the tiles are the mask's)."""

  num_stages: int = 2  # depth of the K/V shared-memory ring
  # False: one CTA per (mask row, head, batch), launched longest row first. True: a persistent grid of `num_ctas`
  # CTAs, each running a longest-first share of the rows with one K/V ring across them, so a CTA's start-up (and
  # the ring's first fill) is paid once instead of per row: short rows (narrow windows) are otherwise dominated
  # by it. The Mosaic backward's two kernels follow the same choice.
  persistent: bool = True
  # Depth of the ring of partial tiles' element masks (None: 1 with two Q buffers, else num_stages). A slot is
  # released as soon as both consumers have added it to S, so one slot mostly keeps up, and frees shared memory
  # for a second Q buffer (two Q buffers and a 2-deep bias ring do not fit beside the K/V ring at D = 128).
  bias_stages: int | None = None
  # 2: each consumer double-buffers Q, loading the next row's while it works on this one (O leaves through the
  # row's own Q buffer); 1: the next row's Q loads only after this row's O has left, and the consumer waits for it.
  # None: 2 when persistent (a one-row CTA has no next row). Two buffers with one bias slot were 3-14% faster
  # forward than one buffer with two bias slots on windows 256 and 1024 in two H200 runs and within noise on
  # window 4096 and BigBird (benchmarks/results/block_sparse_mosaic_qbuf.md, block_sparse_mosaic_band.md).
  # (Storing O straight from registers instead, to free the one buffer early, was 0-28% slower on an H200:
  # benchmarks/results/block_sparse_mosaic_persistent.md.)
  q_buffers: int | None = None
  # True: where every partial tile's element mask is a diagonal band (sliding windows, causal edges), mask them in
  # the kernels (forward and the Mosaic backward) from two per-tile bounds on key - query instead of loading a
  # bias; that frees the bias ring's shared memory (for q_buffers=2 or a third stage). Masks with other partial
  # tiles keep the bias. Off: on an H200 its forward was within noise of the bias ring's (with two Q buffers, or
  # with three K/V stages), and its backward 2-5% slower (benchmarks/results/block_sparse_mosaic_band.md).
  band_masks: bool = False
  # With two Q buffers: wait for the previous row's O store and load the next row's Q after this row's first step
  # instead of at its start, so a row does not begin by waiting for the store just issued. Off: within noise of
  # the default on an H200 (-5% to +4% forward; benchmarks/results/block_sparse_mosaic.md).
  late_q_prefetch: bool = False
  # FA3's intra-warpgroup pipelining, as the dense flash forward's Config.overlap: step j issues S_j = Q K_j^T
  # with O += P_{j-1} V_{j-1} and runs softmax(S_j) while the P V product is on the tensor cores; the consumers
  # pass a token to take turns issuing. The dense flash gains about 5% from it at D = 128 without masks, but here
  # it was 20-45% slower forward on an H200 (all four patterns at 8K-32K except window 256: within 0-17%;
  # benchmarks/results/block_sparse_mosaic_overlap.md), so off; kept as a sweep option. ptxas serialises its
  # wgmmas (C7513) while a row runs two loops (full tiles, then masked), even both unmasked; one unmasked loop
  # clears that, yet on BigBird (no partial tiles) such a kernel was still 30-42% slower
  # (block_sparse_mosaic_overlap_whole_tiles.md, commit d1a7442), so that variant was not kept.
  overlap: bool = False
  num_ctas: int | None = None  # CTAs of the persistent grid; default the GPU's SM count (4 in interpret mode)
  # "mosaic": the Mosaic GPU backward (kernels/block_sparse/mosaic_gpu_bwd.py) where it takes the problem (mask
  # tiles 128 x 128), else the Triton one; "pallas": always the Triton one.
  backward: str = "mosaic"
  # The Mosaic backward's ring depths, a `mosaic_gpu_bwd.Config` (None: its defaults), e.g. a 4-deep dk/dv ring,
  # which fits at D = 128 only with band_masks (no bias ring). A sweep option: not yet measured.
  # (Typed loosely: mosaic_gpu_bwd imports this module.)
  backward_config: Any = None

  def __post_init__(self):
    if self.backward not in ("mosaic", "pallas"):
      raise ValueError(f"backward={self.backward!r} is not valid; choose 'mosaic' or 'pallas'")
    if self.backward_config is not None and self.backward != "mosaic":
      raise ValueError(f"backward_config={self.backward_config!r} configures the Mosaic backward; it needs "
                       f"backward='mosaic', not {self.backward!r}")
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be at least 2 to overlap copies with compute")
    if self.num_ctas is not None and self.num_ctas < 1:
      raise ValueError(f"num_ctas={self.num_ctas} must be at least 1 (or None: the GPU's SM count)")
    if self.bias_stages is not None and self.bias_stages < 1:
      raise ValueError(f"bias_stages={self.bias_stages} must be at least 1 (or None: num_stages)")
    if self.q_buffers not in (None, 1, 2):
      raise ValueError(f"q_buffers={self.q_buffers} is not valid; choose 1, 2 or None (2 when persistent)")
    if self.q_buffers == 2 and not self.persistent:
      raise ValueError("q_buffers=2 needs persistent=True (a CTA per row has no next row to load)")
    if self.late_q_prefetch and self.resolved_q_buffers != 2:
      raise ValueError("late_q_prefetch needs two Q buffers (q_buffers=2, or None with persistent=True)")

  @property
  def resolved_q_buffers(self) -> int:
    if self.q_buffers is None:
      return 2 if self.persistent else 1
    return self.q_buffers

  @property
  def resolved_bias_stages(self) -> int:
    if self.bias_stages is None:
      return 1 if self.resolved_q_buffers == 2 else self.num_stages
    return self.bias_stages

  def shared_memory_bytes(self, head_dim: int, block_k: int, itemsize: int, band: bool = False) -> int:
    """Q/O tiles of both consumers, the K and V rings and (unless the masks are bands) the bias ring."""
    bias = 0 if band else self.resolved_bias_stages * MASK_BLOCK_Q * block_k
    q = self.resolved_q_buffers * MASK_BLOCK_Q * head_dim
    return (q + self.num_stages * block_k * 2 * head_dim + bias) * itemsize


def unsupported_reasons(q, mask_block_q: int, mask_block_k: int, kv_lengths, config: Config | None = None,
                        band: bool = False) -> list[str]:
  """Why this kernel cannot run the problem (empty when it can); q [B, T, H, D]."""
  reasons = []
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    reasons.append(f"dtype {q.dtype} (bf16/fp16 only: wgmma operands)")
  if q.shape[-1] not in HEAD_DIMS:
    reasons.append(f"head_dim {q.shape[-1]} (one of {HEAD_DIMS})")
  if mask_block_q != MASK_BLOCK_Q or mask_block_k not in MASK_BLOCK_KS:
    reasons.append(f"mask tiles {mask_block_q}x{mask_block_k} (block_q {MASK_BLOCK_Q}, block_k one of "
                   f"{MASK_BLOCK_KS})")
  if kv_lengths is not None:
    reasons.append("kv_lengths")
  if not reasons:
    smem = (config or Config()).shared_memory_bytes(q.shape[-1], mask_block_k, q.dtype.itemsize, band)
    if smem > _SHARED_MEMORY_BYTES:
      reasons.append(f"{smem} bytes of shared memory (limit {_SHARED_MEMORY_BYTES}; lower num_stages, bias_stages "
                     "or q_buffers)")
  return reasons


def bias_tiles(tiles: jax.Array, dtype) -> jax.Array:
  """int8 element masks [NT, bq, bk] (nonzero = attended) -> additive logit bias (0 or -inf) in `dtype`."""
  return jnp.where(tiles != 0, 0.0, -jnp.inf).astype(dtype)


def band_bounds(tiles: np.ndarray, tile_ids: np.ndarray) -> np.ndarray | None:
  """Per visit-list entry, (lo, hi) with a partial tile attending exactly lo <= key - query <= hi (tile-local
  indices), as int32 [Hm, R, M, 2]; None when some partial tile is not such a band.

  tiles: bool [NT, bq, bk], the mask's distinct partial tiles; tile_ids: int [Hm, R, M], each list entry's tile
  (`BlockLists.tiles`; entries that are not partial get the bounds of tile 0 and are never read).
  """
  tiles = np.asarray(tiles, bool)
  if not len(tiles):
    return np.zeros((*tile_ids.shape, 2), np.int32)
  _, bq, bk = tiles.shape
  diagonal = np.arange(bk)[None, :] - np.arange(bq)[:, None]  # key - query
  lo = np.where(tiles, diagonal, bk).min(axis=(1, 2))
  hi = np.where(tiles, diagonal, -bq).max(axis=(1, 2))
  if not np.array_equal((diagonal >= lo[:, None, None]) & (diagonal <= hi[:, None, None]), tiles):
    return None
  return np.stack([lo, hi], axis=-1).astype(np.int32)[tile_ids]


def band_mask(s, lo, hi, *, row_offset, col_offset):
  """In a kernel: s [rows, cols] (wgmma layout) kept where lo <= (column + col_offset) - (row + row_offset) <= hi,
  else -inf; the offsets place the block within its mask tile, so (lo, hi) are `band_bounds` on key - query (or,
  for S^T, their negation swapped)."""
  iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, s.shape, layout=plgpu.Layout.WGMMA)
  diagonal = (iota(1) + col_offset) - (iota(0) + row_offset)
  return jnp.where((diagonal >= lo) & (diagonal <= hi), s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernel specialises on."""

  config: Config
  scale: float  # sm_scale * log2(e): logits in base 2
  group: int  # query heads per key/value head
  per_head_mask: bool
  block_k: int
  dtype: jnp.dtype
  interpret: bool
  batch: int  # B: a work item is (head * rows + row_tile) * B + batch
  num_rows: int  # mask rows (query tiles of 128)
  band: bool  # partial tiles masked from per-entry (lo, hi) bounds instead of a loaded bias


def _kernel(items_ref, num_items_ref, blocks_ref, tile_ids_ref, num_full_ref, count_ref, mask_ref, q_ref, k_ref,
            v_ref, o_ref, lse_ref, *scratch, static: _Static):
  """One CTA: the work items (mask row of 128 query rows, head, batch) `items_ref` lists for it, in turn; the K/V
  ring runs on across items, so the producer streams the next row's tiles while the consumers finish a row.

  mask_ref: the partial tiles' bias [NT, 128, bk], or with static.band the list entries' bounds [Hm, R, M, 2]."""
  if static.band:
    qo_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_consumed, v_consumed, turn = scratch
    bias_smem = bias_ready = bias_consumed = None
  else:
    (qo_smem, k_smem, v_smem, bias_smem, q_ready, k_ready, v_ready, bias_ready, k_consumed, v_consumed,
     bias_consumed, turn) = scratch
  # The consumers' turns on the tensor cores: one two-arrival barrier met at every step, or with overlap a token
  # passed through two one-arrival barriers (turns[wg] is consumer wg's).
  turns = turn if static.config.overlap else None
  bq, bk, stages = _ROWS, static.block_k, static.config.num_stages
  bias_stages, q_buffers = static.config.resolved_bias_stages, static.config.resolved_q_buffers
  cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
  num_items = num_items_ref[cta]

  def work(i):
    """(batch, head, row_tile, mask_head, num_full, count) of this CTA's i-th item."""
    batch, head, row_tile = schedule.item_coordinates(items_ref, cta, i, batch=static.batch, rows=static.num_rows)
    mask_head = head if static.per_head_mask else 0
    return batch, head, row_tile, mask_head, num_full_ref[mask_head, row_tile], count_ref[mask_head, row_tile]

  def take_turn():
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")

    def read_bounds(j, list_row):
      """A band-masked entry's (lo, hi); read before a step's waits, so the loads' latency hides behind them."""
      return mask_ref[list_row[0], list_row[1], j, 0], mask_ref[list_row[0], list_row[1], j, 1]

    def mask_logits(s, j, bounds, bias_start):
      """S of a partial tile with its element mask: -inf where the band bounds exclude, or the loaded bias."""
      if static.band:  # rows: queries wg * 64 + i of the 128 x bk mask tile; columns: its keys
        return band_mask(s, *bounds, row_offset=wg * bq, col_offset=0)
      bias_slot = lax.rem(bias_start + j, jnp.int32(bias_stages))
      plgpu.barrier_wait(bias_ready.at[bias_slot * _CONSUMERS + wg])
      s = s + plgpu.load(bias_smem.at[bias_slot, wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      if static.interpret:
        plgpu.commit_smem()  # the generic-proxy read before the slot's TMA refill
      plgpu.barrier_arrive(bias_consumed.at[bias_slot])
      return s

    def softmax_update(s, m, masked):
      """Online softmax in scaled base 2: (new row max, alpha rescaling what was summed under m, probabilities)."""
      m_new = jnp.maximum(m, s.max(axis=1) * static.scale)
      if masked:
        # A row that has attended nothing yet (all -inf so far) keeps zero weight instead of exp2(-inf + inf).
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      else:
        m_use = m_new  # a full tile gives every row a finite maximum
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s * static.scale - lax.broadcast_in_dim(m_use, s.shape, [0]))
      return m_new, alpha, p

    def step(j, carry, q_smem, start, bias_start, list_row, masked, after_first=None):
      acc, m, l = carry
      slot = lax.rem(start + j, jnp.int32(stages))
      bounds = read_bounds(j, list_row) if masked and static.band else None
      plgpu.barrier_wait(k_ready.at[slot])

      def logits(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()  # the other consumer's P V runs while this S = Q K^T is in flight
        return s_ref[...]

      s = pl.run_scoped(logits, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(k_consumed.at[slot])
      if masked:
        s = mask_logits(s, j, bounds, bias_start)
      m_new, alpha, p = softmax_update(s, m, masked)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(static.dtype)
      # Keeps the compiler from sinking the softmax past the barriers below (it would then stall the turn).
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_arrive(turn)  # softmax done: the other consumer may issue its matmuls
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(turn)  # tensor cores are free again
      acc = pv_product(acc, p16, v_smem.at[slot], interpret=static.interpret)
      plgpu.barrier_arrive(v_consumed.at[slot])
      if after_first is not None:
        pl.when(j == 0)(after_first)
      return acc, m_new, l

    def overlapped_row(carry, q_smem, start, bias_start, list_row, num_full, count):
      """A row with Config.overlap (FA3's intra-warpgroup pipelining, as kernels/flash_attention/mosaic_gpu.py's
      `_overlapped_steps`): step 0 issues S_0; step j >= 1 issues S_j = Q K_j^T with O += P_{j-1} V_{j-1}, waits
      for S_j only and runs softmax(S_j) under the P V product; a last step issues P V of the final tile. Issuing
      is a turn passed between the consumers through turns[wg] (one per step, so both take `count` turns a row
      and the token runs on across rows). Returns (acc, m, l)."""
      mine, other = turns.at[wg], turns.at[1 - wg]
      position = lambda j: lax.rem(start + j, jnp.int32(stages))

      def logits(slot, pv=None):
        return logits_passing_turn(q_smem, k_smem.at[slot], other, pv)

      def first_step(carry, masked):
        acc, m, l = carry
        bounds = read_bounds(0, list_row) if masked and static.band else None
        plgpu.barrier_wait(k_ready.at[position(0)])
        plgpu.barrier_wait(mine)
        s = logits(position(0))
        plgpu.barrier_arrive(k_consumed.at[position(0)])
        if masked:
          s = mask_logits(s, 0, bounds, bias_start)
        m, _, p = softmax_update(s, m, masked)  # acc and l are still zero: nothing to rescale
        return acc, m, p.sum(axis=1), p.astype(static.dtype)

      def overlapped_step(j, carry, masked):
        acc, m, l, p16 = carry
        slot, prev = position(j), position(j - 1)
        bounds = read_bounds(j, list_row) if masked and static.band else None
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[prev])
        plgpu.barrier_wait(mine)

        def softmax(s, m):
          s = mask_logits(s, j, bounds, bias_start) if masked else s
          return softmax_update(s, m, masked)

        def issue(pv):
          s = logits(slot, pv=pv)
          plgpu.barrier_arrive(k_consumed.at[slot])
          return s

        acc, m, l, p16, alpha = pipelined_step(acc, m, l, p16, v_prev=v_smem.at[prev], logits=issue, softmax=softmax,
                                               dtype=static.dtype, interpret=static.interpret)
        plgpu.barrier_arrive(v_consumed.at[prev])
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m, l, p16

      def last_product(carry):
        acc, m, l, p16 = carry
        slot = position(count - 1)
        plgpu.barrier_wait(v_ready.at[slot])
        acc = pv_product(acc, p16, v_smem.at[slot], interpret=static.interpret)
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m, l

      def row(carry):
        carry = lax.cond(num_full > 0, functools.partial(first_step, masked=False),
                         functools.partial(first_step, masked=True), carry)
        first_masked = jnp.maximum(num_full, 1)
        carry = lax.fori_loop(1, first_masked, functools.partial(overlapped_step, masked=False), carry)
        carry = lax.fori_loop(first_masked, count, functools.partial(overlapped_step, masked=True), carry)
        return last_product(carry)

      return lax.cond(count > 0, row, lambda carry: carry, carry)

    def load_q(i, buffer):
      batch, head, row_tile, *_ = work(i)
      row = row_tile * MASK_BLOCK_Q + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row, bq), head], qo_smem.at[buffer, wg],
                              q_ready.at[buffer * _CONSUMERS + wg])

    def item(i, carry):
      """Runs item i, whose K/V tiles begin at ring position `start` (its partial tiles' masks at `bias_start`);
      returns where the next item's begin."""
      start, bias_start = carry
      batch, head, row_tile, mask_head, num_full, count = work(i)
      row = row_tile * MASK_BLOCK_Q + wg * bq
      buffer = lax.rem(i, jnp.int32(q_buffers))
      q_smem = qo_smem.at[buffer, wg]

      def refill():
        """The previous item's O leaves from its Q buffer: wait until the copy has read it, then refill that
        buffer (with this row's Q when there is one buffer, with the next row's when there are two)."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if q_buffers == 1:
          load_q(i, 0)
        else:
          pl.when(i + 1 < num_items)(lambda: load_q(i + 1, 1 - buffer))

      late = q_buffers == 2 and static.config.late_q_prefetch
      if not late:
        refill()
      d = q_smem.shape[-1]
      m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
      plgpu.barrier_wait(q_ready.at[buffer * _CONSUMERS + wg])
      if static.config.overlap:
        acc, m, l = overlapped_row((acc, m, l), q_smem, start, bias_start - num_full, (mask_head, row_tile),
                                   num_full, count)
        if late:
          refill()  # with overlap, after the whole row (its steps are not broken out one by one)
      else:
        pl.when(wg == 1)(take_turn)  # consumer 0 goes first
        body = functools.partial(step, q_smem=q_smem, start=start, bias_start=bias_start - num_full,
                                 list_row=(mask_head, row_tile), after_first=refill if late else None)
        carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(num_full, count, functools.partial(body, masked=True), carry)
        if late:
          pl.when(count == 0)(refill)  # a row with nothing to visit has no first step
        pl.when(wg == 0)(take_turn)  # balances consumer 1's opening turn

      empty = l == 0.0
      safe_l = jnp.where(empty, 1.0, l)
      q_smem[...] = (acc * lax.broadcast_in_dim(1.0 / safe_l, acc.shape, [0])).astype(static.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(row, bq), head])
      # Straight from registers: a shared-memory staging buffer for it would not fit beside the rings at D = 128.
      lse_ref.at[batch, head, pl.ds(row, bq)][...] = jnp.where(empty, -jnp.inf, m * LN_2 + jnp.log(safe_l))
      return start + count, bias_start + count - num_full

    if q_buffers == 2:
      pl.when(num_items > 0)(lambda: load_q(0, 0))
    if static.config.overlap:
      pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turns.at[0]))  # consumer 0 takes the first turn
    lax.fori_loop(0, num_items, item, (jnp.int32(0), jnp.int32(0)))
    if static.config.overlap:
      pl.when(wg == 0)(lambda: plgpu.barrier_wait(turns.at[0]))  # consumer 1's last pass
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def item(i, carry):
      start, bias_start = carry
      batch, head, row_tile, mask_head, num_full, count = work(i)
      kv_head = lax.div(head, jnp.int32(static.group))

      @pl.loop(0, count)
      def _(j):
        position = start + j
        slot = lax.rem(position, jnp.int32(stages))
        keys = (batch, pl.ds(blocks_ref[mask_head, row_tile, j] * bk, bk), kv_head)

        @pl.when(position >= stages)
        def _():
          plgpu.barrier_wait(k_consumed.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])

        @pl.when(position >= stages)
        def _():
          plgpu.barrier_wait(v_consumed.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

        if not static.band:
          @pl.when(j >= num_full)
          def _():
            bias_position = bias_start + j - num_full
            bias_slot = lax.rem(bias_position, jnp.int32(bias_stages))

            @pl.when(bias_position >= bias_stages)
            def _():
              plgpu.barrier_wait(bias_consumed.at[bias_slot])

            tile = tile_ids_ref[mask_head, row_tile, j]
            for c in range(_CONSUMERS):
              plgpu.copy_gmem_to_smem(mask_ref.at[tile, pl.ds(c * bq, bq)], bias_smem.at[bias_slot, c],
                                      bias_ready.at[bias_slot * _CONSUMERS + c])

      return start + count, bias_start + count - num_full

    total, bias_total = lax.fori_loop(0, num_items, item, (jnp.int32(0), jnp.int32(0)))

    # Observe the release of the last slots too, so every warpgroup ends having seen every barrier phase.
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(position):
      slot = lax.rem(position, jnp.int32(stages))
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])

    if not static.band:
      @pl.loop(jnp.maximum(bias_total - bias_stages, 0), bias_total)
      def _(position):
        plgpu.barrier_wait(bias_consumed.at[lax.rem(position, jnp.int32(bias_stages))])


def work_schedule(count: np.ndarray, num_heads: int, batch: int, config: Config, interpret: bool = False):
  """Which CTA runs which (mask row, head, batch) item: (items int32 [CTAs, L], lengths int32 [CTAs]), longest
  rows first. count: the visit lists' int [Hm, R] entries per row (Hm = 1 when the heads share the mask)."""
  return schedule.work_schedule(count, num_heads, batch, persistent=config.persistent, num_ctas=config.num_ctas,
                                interpret=interpret)


def forward(q, k, v, lists, bias, *, sm_scale: float, per_head_mask: bool, config: Config | None = None,
            interpret: bool | plgpu.InterpretGPUParams = False, work=None, bands=None):
  """q [B, T, H, D], k/v [B, S, Hkv, D] -> o [B, T, H, D], lse [B, H, T] (fp32, natural log; -inf: nothing seen).

  lists: the mask's visit lists (blocks, tiles, num_full, count) as int32 arrays (`BlockMask.lists`); bias:
  [NT, 128, block_k] additive element masks in q's dtype (`bias_tiles`). T must be a multiple of 128 and S of
  block_k (the mask's tiles). interpret: Mosaic GPU interpret mode (CPU), for tests. work: `work_schedule(...)`
  for these lists and config, or None to compute it here (then the lists' counts must be concrete). bands:
  `band_bounds(...)` of the mask, int32 [Hm, R, M, 2], to mask the partial tiles from bounds instead of `bias`.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  config = config or Config()
  block_k = bias.shape[-1]
  band = bands is not None
  if reasons := unsupported_reasons(q, bias.shape[1], block_k, None, config, band):
    raise ValueError(f"mosaic_gpu.forward does not support {', '.join(reasons)}")
  if t % MASK_BLOCK_Q or s % block_k:
    raise ValueError(f"T={t} must be a multiple of {MASK_BLOCK_Q} and S={s} of block_k={block_k}")
  num_rows = t // MASK_BLOCK_Q
  if work is None:
    work = work_schedule(np.asarray(lists[3]), h, b, config, bool(interpret))
  items, num_items = (jnp.asarray(x, jnp.int32) for x in work)
  static = _Static(config=config, scale=sm_scale * LOG2_E, group=h // hkv, per_head_mask=per_head_mask,
                   block_k=block_k, dtype=q.dtype, interpret=bool(interpret), batch=b, num_rows=num_rows, band=band)
  stages, bias_stages, q_buffers = config.num_stages, config.resolved_bias_stages, config.resolved_q_buffers
  bias_scratch = (
      plgpu.SMEM((bias_stages, _CONSUMERS, _ROWS, block_k), q.dtype, transforms=_TRANSFORMS),  # bias rows
      plgpu.Barrier(num_barriers=bias_stages * _CONSUMERS),  # bias rows landed, per slot and consumer
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=bias_stages),  # bias slot free
  )
  scratch = (
      plgpu.SMEM((q_buffers, _CONSUMERS, _ROWS, d), q.dtype, transforms=_TRANSFORMS),  # Q, then O, per consumer
      plgpu.SMEM((stages, block_k, d), q.dtype, transforms=_TRANSFORMS),
      plgpu.SMEM((stages, block_k, d), q.dtype, transforms=_TRANSFORMS),
      *(() if band else bias_scratch[:1]),
      plgpu.Barrier(num_barriers=q_buffers * _CONSUMERS),  # Q landed, per buffer and consumer
      plgpu.Barrier(num_barriers=stages),  # K landed
      plgpu.Barrier(num_barriers=stages),  # V landed
      *(() if band else bias_scratch[1:2]),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),  # K slot free
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),  # V slot free
      *(() if band else bias_scratch[2:]),
      # Tensor-core turns: met by both consumers, or (overlap) passed from one to the other.
      plgpu.Barrier(num_arrivals=1, num_barriers=2) if config.overlap else plgpu.Barrier(num_arrivals=_CONSUMERS),
  )
  return plgpu.kernel(
      functools.partial(_kernel, static=static),
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      scratch_types=scratch,
      grid=(items.shape[0],),
      grid_names=("ctas",),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )(items, num_items, *lists, bands if band else bias, q, k, v)
