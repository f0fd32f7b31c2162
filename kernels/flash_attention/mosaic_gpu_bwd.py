"""Flash-attention backward (dq and dk/dv) for Hopper GPUs, written with Pallas' Mosaic GPU lowering.

FA2/FA3 scheme, deterministic (no atomics): a small jnp preprocess computes delta = rowsum(dO * O) - dLSE and
the base-2 LSE; then two warp-specialised kernels recompute the softmax tile P = exp2(S * scale * log2(e) - lse2)
with wgmma:

- dk/dv: one CTA per (batch, kv head, key tile of `compute_wgs * block_k_dkv` rows). Each compute warpgroup owns
  `block_k_dkv` key rows and keeps dK, dV in fp32 registers; a producer warpgroup streams (Q, dO, lse2, delta)
  tiles of every query head of the GQA group through a `num_stages` TMA ring. Per tile, transposed so that the
  probabilities come out in the register layout wgmma takes as its left operand:
  S^T = K Q^T, dP^T = V dO^T, P^T = exp2(S^T * scale - lse2), dV += P^T dO, dS^T = P^T (dP^T - delta),
  dK += dS^T Q.
- dq: one CTA per (batch, head, query tile of `compute_wgs * block_q_dq` rows), each compute warpgroup owning
  `block_q_dq` rows; the producer streams (K, V) tiles: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.

Causal: tiles entirely above the diagonal are never fetched; only tiles that cross it pay for the element mask.
Both compute warpgroups of a CTA consume the same stream, so its tile range is the CTA's.

The two kernels run as two launches, or (BlockSizes.fused_launch) as one grid whose first CTAs run the dk/dv
kernel and the rest the dq kernel, over a union of their shared memory.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2_E = math.log2(math.e)
# setmaxnreg moves registers between the warpgroups of a CTA only within what it was launched with: the 64K
# registers of the SM over its threads, rounded down to a multiple of 8 (168 a thread for three warpgroups).
_REGISTER_FILE = 65536
_MIN_REGISTERS = 24  # setmaxnreg's floor


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the two backward kernels (wgmma needs multiples of 64 rows per warpgroup)."""

  block_q_dkv: int = 64  # query rows per pipeline step of the dk/dv kernel
  block_k_dkv: int = 64  # key rows per compute warpgroup of the dk/dv kernel
  block_q_dq: int = 64  # query rows per compute warpgroup of the dq kernel
  block_k_dq: int = 64  # key rows per pipeline step of the dq kernel
  compute_wgs: int = 2  # compute warpgroups per CTA (each with its own rows), plus one producer
  num_stages_dkv: int = 3  # depth of the (Q, dO) TMA ring
  num_stages_dq: int = 3  # depth of the (K, V) TMA ring
  # Leave a step's last wgmmas (dV, dK; or dQ) in flight into the next step and free its ring slot only once
  # the next step's first accumulator load has waited for them, instead of draining the tensor-core queue at
  # every step's end. Costs one slot of prefetch depth (the slot is held one step longer). Measured slower on
  # an H200 (T=8K/16K, D=128, fwd+bwd 404-434 against 462-483 TFLOP/s, benchmarks/results/
  # flash_attention_mosaic_bwd_defer.md), so off; kept as a sweep option.
  defer_release: bool = False
  # dk/dv kernel: await the dV product (and with it its bf16 P^T register operand) before forming dS^T, instead
  # of overlapping dS^T with it: there P^T, dP^T, delta and the dK/dV accumulators are live at once, and this
  # frees P^T's 16 registers a thread. At 232 compute registers ptxas reports a 12-byte spill in the dk/dv kernel
  # (MOSAIC_GPU_DUMP_PTXAS=1); at 240 none. Together 1-2% faster fwd+bwd on an H200 at D = 128 (8K/16K, causal
  # or not; benchmarks/results/flash_attention_overlap.md), so the default (see get_default).
  await_dv: bool = False
  # dk/dv kernel: issue step i's dK product (dS^T_i Q_i) in step i + 1, behind S^T and dP^T of that step, with
  # dS^T_i carried in registers, so it runs under the next step's exponentials instead of draining the tensor
  # cores at the step's end (FA3's intra-warpgroup pipelining, applied to dK). Q_i's ring slot is then freed
  # one step later. Excludes defer_release (which frees it while dK_i still reads it). Measured slower on an H200
  # (440-450 against 479 TFLOP/s fwd+bwd at T = 8K, D = 128): the carried dS^T makes ptxas spill 204-244 bytes
  # (benchmarks/results/flash_attention_mosaic_bwd_defer_dk.md), so off; kept as a sweep option.
  defer_dk: bool = False
  # Registers a thread of each compute warpgroup (setmaxnreg); the producer, which only issues TMA copies, gets
  # what is left of the CTA's launch allocation: 40 at 232 (the default), 24 at 240 (FA3's split).
  compute_registers: int = 232
  # Launch both kernels as one grid: the dk/dv CTAs first, then the dq CTAs, which fill the SMs the dk/dv
  # kernel's last wave leaves idle (each kernel alone ends on a partial wave: at B*T = 16K, H = 16 that is 15.5
  # waves of 132 SMs each) and skip the gap between two launches. On an H200 at 8K/16K (forward+backward,
  # benchmarks/results/flash_attention_mosaic_fused_bwd{,_d64}.md): D = 64 +3-5%, D = 128 -0.4 to +1.5%; the
  # default (see get_default).
  fused_launch: bool = False

  def __post_init__(self):
    if self.defer_dk and self.defer_release:
      raise ValueError("defer_dk and defer_release cannot both be set (defer_release frees Q's slot while the "
                       "deferred dK product still reads it)")
    pool = self.launch_registers * (self.compute_wgs + 1)
    valid = [r for r in range(_MIN_REGISTERS, 257, 8) if pool - self.compute_wgs * r >= _MIN_REGISTERS]
    if self.compute_registers not in valid:
      raise ValueError(f"compute_registers={self.compute_registers} must be one of {valid[0]}..{valid[-1]} in "
                       f"steps of 8 (with compute_wgs={self.compute_wgs} the producer keeps at least "
                       f"{_MIN_REGISTERS} of {pool})")

  @property
  def launch_registers(self) -> int:
    """Registers a thread at launch (before setmaxnreg) with compute_wgs + 1 warpgroups."""
    return _REGISTER_FILE // (128 * (self.compute_wgs + 1)) // 8 * 8

  @property
  def producer_registers(self) -> int:
    return self.launch_registers * (self.compute_wgs + 1) - self.compute_wgs * self.compute_registers

  @classmethod
  def get_default(cls, head_dim: int) -> "BlockSizes":
    """Defaults per head dim. At D = 128 the sweeps on an H200
    (experiments/bench/flash_attention.py --mosaic_bwd_configs; benchmarks/results/flash_attention_mosaic_bwd_*.md)
    put 64:64:64:128 with 3/2 stages within run-to-run spread of these (non-causal 465 vs 462 TFLOP/s at 8K) and
    every other tiling tried below them. await_dv with 240 compute registers adds 1-2% at D = 128 and, with a
    2-deep dq ring, 3% at D = 64 (T = 8K, causal or not; flash_attention_overlap.md,
    flash_attention_d64_configs.md); one launch for both kernels adds 3-5% at D = 64 and up to 1.5% at D = 128
    (flash_attention_mosaic_fused_bwd{,_d64}.md). With all of these, a 4-deep (Q, dO) ring for the dk/dv kernel
    (~195 KiB) adds 4-5% non-causal and about 1% causal at D = 128 (T = 8K/16K, two runs,
    flash_attention_mosaic_bwd_stages{,_2}.md); at D = 64 it was 1-4% slower, so D = 64 keeps 3."""
    if head_dim <= 64:
      return cls(block_k_dq=128, num_stages_dq=2, await_dv=True, compute_registers=240, fused_launch=True)
    return cls(num_stages_dkv=4, await_dv=True, compute_registers=240, fused_launch=True)

  @property
  def rows_q(self) -> int:
    """T must be a multiple of this."""
    return math.lcm(self.block_q_dkv, self.compute_wgs * self.block_q_dq)

  @property
  def rows_k(self) -> int:
    """S must be a multiple of this."""
    return math.lcm(self.block_k_dq, self.compute_wgs * self.block_k_dkv)

  @classmethod
  def parse(cls, spec: str) -> "BlockSizes":
    """'bq_dkv:bk_dkv:bq_dq:bk_dq:stages_dkv:stages_dq[:defer[:await_dv[:registers[:defer_dk[:fused]]]]]'
    (compute_wgs stays 2; defer, await_dv, defer_dk and fused are 0 or 1, the `defer_release`, `await_dv`,
    `defer_dk` and `fused_launch` flags; registers is `compute_registers`), for benchmark sweeps."""
    usage = (f"spec={spec!r} must be 6 ints bq_dkv:bk_dkv:bq_dq:bk_dq:stages_dkv:stages_dq, then optionally :0 or "
             ":1 (defer_release), :0 or :1 (await_dv), compute registers (e.g. :240), :0 or :1 (defer_dk) and :0 or "
             ":1 (fused_launch)")
    try:
      fields = [int(x) for x in spec.split(":")]
    except ValueError:
      raise ValueError(usage) from None
    if len(fields) not in range(6, 12) or any(flag not in (0, 1) for flag in fields[6:8] + fields[9:]):
      raise ValueError(usage)
    bq_dkv, bk_dkv, bq_dq, bk_dq, st_dkv, st_dq = fields[:6]
    defaults = [0, 0, cls.compute_registers, 0, 0]
    defer, await_dv, registers, defer_dk, fused = (fields[6:] + defaults[len(fields) - 6:])[:5]
    return cls(block_q_dkv=bq_dkv, block_k_dkv=bk_dkv, block_q_dq=bq_dq, block_k_dq=bk_dq,
               num_stages_dkv=st_dkv, num_stages_dq=st_dq, defer_release=defer == 1, await_dv=await_dv == 1,
               compute_registers=registers, defer_dk=defer_dk == 1, fused_launch=fused == 1)


def unsupported_reason(q_shape, k_shape, dtype, *, window=None, kv_lengths=None,
                       blocks: BlockSizes | None = None) -> str | None:
  """Why this backward cannot take the problem (q [B, T, H, D], k [B, S, Hkv, D]), or None if it can."""
  t, d = q_shape[1], q_shape[3]
  s = k_shape[1]
  blocks = blocks or BlockSizes.get_default(d)
  reasons = []
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reasons.append(f"dtype {jnp.dtype(dtype).name} (bf16/fp16 only)")
  if d not in (64, 128):
    reasons.append(f"head_dim {d} (64 or 128 only)")
  if t % blocks.rows_q or s % blocks.rows_k:
    reasons.append(f"T={t}, S={s} (must be multiples of {blocks.rows_q} and {blocks.rows_k})")
  if window is not None:
    reasons.append("window")
  if kv_lengths is not None:
    reasons.append("kv_lengths")
  return ", ".join(reasons) if reasons else None


def supports(q_shape, k_shape, dtype, *, window=None, kv_lengths=None, blocks: BlockSizes | None = None) -> bool:
  """Whether `backward` takes the problem (see `unsupported_reason`)."""
  return unsupported_reason(q_shape, k_shape, dtype, window=window, kv_lengths=kv_lengths, blocks=blocks) is None


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on."""

  sm_scale: float
  causal: bool
  offset: int  # S - T: query i sits at key position i + offset
  group: int  # query heads per kv head
  num_q_tiles: int  # T // block_q of the kernel's stream or rows
  num_k_tiles: int
  head_dim: int
  dtype: jnp.dtype
  blocks: BlockSizes
  # Interpret mode's wgmma takes only SMEM operands, so there the register left operands (P^T, dS^T, dS) are
  # first stored to SMEM; on the GPU they stay in registers.
  stage_lhs: bool

  @property
  def scale2(self) -> float:
    return self.sm_scale * LOG2_E


_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _tile_smem(shape, dtype):
  """SMEM for [.., rows, D] tiles in the tiled, 128-byte-swizzled layout TMA and wgmma share."""
  return plgpu.SMEM(shape, dtype, transforms=_TRANSFORMS)


def _row_vector(ref):
  """lse2/delta slice [rows] as a per-row vector of the wgmma accumulator layout [rows, cols]."""
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vector(ref):
  """lse2/delta slice [cols] as a per-column vector of the wgmma accumulator layout [rows, cols]."""
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def _lhs(x, staging):
  """wgmma's left operand: x itself, or x stored to the SMEM `staging` buffer (interpret mode)."""
  if staging is None:
    return x
  staging[...] = x
  plgpu.commit_smem()
  return staging


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _dkv_tile_range(k_start, st: _Static):
  """Query tiles [lo, hi) the CTA's keys [k_start, k_start + rows) see; tiles from full_lo on need no mask."""
  bq = st.blocks.block_q_dkv
  hi = st.num_q_tiles
  if not st.causal:
    return 0, 0, hi
  rows = st.blocks.compute_wgs * st.blocks.block_k_dkv
  # Query i sees key j iff i + offset >= j: the first query that sees k_start is k_start - offset, and every
  # query at or past the CTA's last key (k_start + rows - 1 - offset) sees all of its keys.
  lo = jnp.minimum(lax.div(jnp.maximum(k_start - st.offset, 0), bq), hi)
  full_lo = jnp.minimum(jnp.maximum(pl.cdiv(jnp.maximum(k_start + rows - 1 - st.offset, 0), bq), lo), hi)
  return lo, full_lo, hi


def _dq_tile_range(q_start, st: _Static):
  """Key tiles [0, hi) the CTA's queries [q_start, q_start + rows) see; tiles before full_hi need no mask."""
  bk = st.blocks.block_k_dq
  hi = st.num_k_tiles
  if not st.causal:
    return hi, hi
  rows = st.blocks.compute_wgs * st.blocks.block_q_dq
  # Keys up to q_start + rows - 1 + offset are seen by the CTA's last query; keys up to q_start + offset by all.
  hi = jnp.minimum(pl.cdiv(jnp.maximum(q_start + rows + st.offset, 0), bk), hi)
  full_hi = jnp.minimum(lax.div(jnp.maximum(q_start + st.offset + 1, 0), bk), hi)
  return full_hi, hi


def _produce(fetch, steps, consumed, stages: int):
  """Runs fetch(step, None) for every step, then waits until the compute warpgroups consumed the last slots.

  The drain keeps the producer's view of every consumed barrier's phase complete when the barriers are freed.
  """
  lax.fori_loop(0, steps, fetch, None)

  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _(step):
    plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])


def _release_previous(consumed, index, stages: int):
  """Deferred release: frees the slot of stream step index - 1. Called right after step `index` waited for
  every wgmma group but its newest, so the previous step's groups (the last readers of that slot) are done."""

  @pl.when(index > 0)
  def _():
    plgpu.barrier_arrive(consumed.at[lax.rem(index + stages - 1, stages)])


def _release_last(consumed, steps, stages: int):
  """Deferred release: after the last of `steps` stream steps, awaits its wgmmas and frees its slot."""
  plgpu.wgmma_wait(0)
  steps = jnp.asarray(steps)  # a Python int when the loop bounds are static (non-causal dq)

  @pl.when(steps > 0)
  def _():
    plgpu.barrier_arrive(consumed.at[lax.rem(steps + stages - 1, stages)])


def _grid_coordinates():
  """(tile, head, batch) of a CTA of a separate launch (grid_names ("tiles", "heads", "batch"))."""
  return lax.axis_index("tiles"), lax.axis_index("heads"), lax.axis_index("batch")


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, barriers, *,
                st: _Static, coordinates=_grid_coordinates):
  """One CTA of the dk/dv kernel; `coordinates()` gives its (key tile, kv head, batch)."""
  k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *staging = smem
  k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, consumed = barriers
  blocks = st.blocks
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.num_stages_dkv
  tile, kv_head, batch = coordinates()
  wg = lax.axis_index("wg")
  k_start = tile * (blocks.compute_wgs * bk)
  lo, full_lo, hi = _dkv_tile_range(k_start, st)
  n = hi - lo

  @pl.when(wg < blocks.compute_wgs)
  def _compute():
    plgpu.set_max_registers(blocks.compute_registers, action="increase")
    my_k, my_v = k_smem.at[wg], v_smem.at[wg]
    my_rows = (batch, pl.ds(k_start + wg * bk, bk), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[my_rows], my_k, k_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[my_rows], my_v, v_bar.at[wg])
    plgpu.barrier_wait(k_bar.at[wg])
    plgpu.barrier_wait(v_bar.at[wg])
    p_stage, ds_stage = (staging[0].at[wg], staging[1].at[wg]) if st.stage_lhs else (None, None)

    def step(i, carry, *, g, masked, dk_ref, dv_ref):
      """One (Q, dO) tile of the stream; with defer_dk, carry is the previous step's dS^T (bf16 [bk, bq])."""
      index = g * n + i - lo  # position in the producer's stream
      slot = lax.rem(index, stages)
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      plgpu.barrier_wait(q_bar.at[slot])
      plgpu.barrier_wait(do_bar.at[slot])
      # Groups issued ahead of the ones awaited below: with defer_dk the previous step's dK sits after dP^T.
      behind = 2 if blocks.defer_dk else 1

      def tile(st_ref, dpt_ref):
        plgpu.wgmma(st_ref, my_k, q_tile.transpose((1, 0)))
        plgpu.wgmma(dpt_ref, my_v, do_tile.transpose((1, 0)))
        if blocks.defer_dk:
          # The previous step's Q is still in its slot (freed below, after this product). The first step has
          # none: its carry is zeros, multiplied into this step's Q (finite data) to the same effect.
          prev_slot = jnp.where(index > 0, lax.rem(index + stages - 1, stages), slot)
          plgpu.wgmma(dk_ref, _lhs(carry, ds_stage), q_smem.at[prev_slot])
        # wgmma groups retire in issue order, so with `behind` groups left in flight S^T is ready while dP^T still
        # runs: the exponentials overlap the tensor cores (and dS^T below overlaps the dV product).
        s_t = plgpu.wgmma_accumulator_load(st_ref, wait_n=behind)
        if blocks.defer_release:
          _release_previous(consumed, index, stages)
        plgpu.barrier_wait(lse_bar.at[slot])
        lse2 = _col_vector(lse_smem.at[slot])
        p_t = jnp.exp2(s_t * st.scale2 - lax.broadcast_in_dim(lse2, (bk, bq), [1]))
        if masked:
          # Indices only here: held across the loop they would cost registers the accumulators need.
          k_idx = k_start + wg * bk + _iota((bk, bq), 0)
          q_idx = i * bq + _iota((bk, bq), 1)
          p_t = jnp.where(q_idx + st.offset >= k_idx, p_t, 0.0)
        plgpu.wgmma(dv_ref, _lhs(p_t.astype(st.dtype), p_stage), do_tile)
        # In flight: dP^T, (the previous dK,) then dV. Waiting down to `behind` groups awaits dP^T; down to none
        # awaits dV too.
        dp_t = plgpu.wgmma_accumulator_load(dpt_ref, wait_n=0 if blocks.await_dv else behind)
        plgpu.barrier_wait(delta_bar.at[slot])
        delta = _col_vector(delta_smem.at[slot])
        ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))).astype(st.dtype)
        if blocks.defer_dk:
          return ds_t
        plgpu.wgmma(dk_ref, _lhs(ds_t, ds_stage), q_tile)
        return carry

      carry = pl.run_scoped(tile, plgpu.ACC((bk, bq), jnp.float32), plgpu.ACC((bk, bq), jnp.float32))
      if blocks.defer_dk:
        # The previous step's dK was the last reader of its slot; this step's slot waits for the next dK.
        plgpu.wgmma_wait(0)
        _release_previous(consumed, index, stages)
      elif not blocks.defer_release:
        # The slot may be refilled only once both wgmmas have read it.
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[slot])
      return carry

    def accumulate(dk_ref, dv_ref):
      def head(g, carry):
        body = functools.partial(step, g=g, dk_ref=dk_ref, dv_ref=dv_ref)
        if st.causal:
          carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
        return lax.fori_loop(full_lo, hi, functools.partial(body, masked=False), carry)

      if blocks.defer_dk:
        zeros = plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32), plgpu.Layout.WGMMA).astype(st.dtype)
        ds_last = lax.fori_loop(0, st.group, head, zeros)
        last_slot = lax.rem(st.group * n + stages - 1, stages)
        plgpu.wgmma(dk_ref, _lhs(ds_last, ds_stage), q_smem.at[last_slot])
        _release_last(consumed, st.group * n, stages)
      else:
        lax.fori_loop(0, st.group, head, None)
        if blocks.defer_release:
          _release_last(consumed, st.group * n, stages)
      return dk_ref[...], dv_ref[...]

    # Zero-initialised fp32 accumulators that live in registers across the whole loop.
    acc = plgpu.ACC((bk, st.head_dim), jnp.float32)
    dk, dv = pl.run_scoped(accumulate, acc, acc)
    # K and V are no longer read (every wgmma has been awaited), so their buffers stage the outputs.
    my_k[...] = (dk * st.sm_scale).astype(st.dtype)
    my_v[...] = dv.astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_k, dk_ref.at[my_rows], commit_group=False)
    plgpu.copy_smem_to_gmem(my_v, dv_ref.at[my_rows], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == blocks.compute_wgs)
  def _producer():
    plgpu.set_max_registers(blocks.producer_registers, action="decrease")

    def fetch(step, carry):
      slot = lax.rem(step, stages)
      head = kv_head * st.group + lax.div(step, n)
      rows = pl.ds((lo + lax.rem(step, n)) * bq, bq)

      @pl.when(step >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], delta_bar.at[slot])
      return carry

    _produce(fetch, st.group * n, consumed, stages)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, barriers, *, st: _Static,
               coordinates=_grid_coordinates):
  """One CTA of the dq kernel; `coordinates()` gives its (query tile, head, batch)."""
  q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, *staging = smem
  q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, consumed = barriers
  blocks = st.blocks
  bq, bk, stages = blocks.block_q_dq, blocks.block_k_dq, blocks.num_stages_dq
  tile, head, batch = coordinates()
  if st.causal:
    # Causal work grows with the query tile; CTAs launch in tile order, so the longest ones go first and the
    # short ones fill the tail of the last wave.
    tile = st.num_q_tiles // blocks.compute_wgs - 1 - tile
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, st.group)
  q_start = tile * (blocks.compute_wgs * bq)
  full_hi, hi = _dq_tile_range(q_start, st)

  @pl.when(wg < blocks.compute_wgs)
  def _compute():
    plgpu.set_max_registers(blocks.compute_registers, action="increase")
    my_q, my_do = q_smem.at[wg], do_smem.at[wg]
    my_rows = pl.ds(q_start + wg * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, my_rows, head], my_q, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, my_rows, head], my_do, do_bar.at[wg])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, my_rows], lse_smem.at[wg], lse_bar.at[wg])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, my_rows], delta_smem.at[wg], delta_bar.at[wg])
    for bar in (q_bar, do_bar, lse_bar, delta_bar):
      plgpu.barrier_wait(bar.at[wg])
    lse2, delta = _row_vector(lse_smem.at[wg]), _row_vector(delta_smem.at[wg])
    ds_stage = staging[0].at[wg] if st.stage_lhs else None

    def step(j, carry, *, masked, dq_ref):
      slot = lax.rem(j, stages)
      k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])

      def tile(s_ref, dp_ref):
        plgpu.wgmma(s_ref, my_q, k_tile.transpose((1, 0)))
        plgpu.wgmma(dp_ref, my_do, v_tile.transpose((1, 0)))
        # S is ready while dP still runs (groups retire in issue order): the exponentials overlap it.
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        if blocks.defer_release:
          _release_previous(consumed, j, stages)
        p = jnp.exp2(s * st.scale2 - lax.broadcast_in_dim(lse2, (bq, bk), [0]))
        if masked:
          q_idx = q_start + wg * bq + _iota((bq, bk), 0)
          k_idx = j * bk + _iota((bq, bk), 1)
          p = jnp.where(q_idx + st.offset >= k_idx, p, 0.0)
        ds = p * (dp_ref[...] - lax.broadcast_in_dim(delta, (bq, bk), [0]))
        plgpu.wgmma(dq_ref, _lhs(ds.astype(st.dtype), ds_stage), k_tile)

      pl.run_scoped(tile, plgpu.ACC((bq, bk), jnp.float32), plgpu.ACC((bq, bk), jnp.float32))
      if not blocks.defer_release:
        # The slot may be refilled only once the wgmma has read it.
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[slot])
      return carry

    def accumulate(dq_ref):
      lax.fori_loop(0, full_hi, functools.partial(step, masked=False, dq_ref=dq_ref), None)
      if st.causal:
        lax.fori_loop(full_hi, hi, functools.partial(step, masked=True, dq_ref=dq_ref), None)
      if blocks.defer_release:
        _release_last(consumed, hi, stages)
      return dq_ref[...]

    dq = pl.run_scoped(accumulate, plgpu.ACC((bq, st.head_dim), jnp.float32))
    # Q is no longer read, so its buffer stages the output.
    my_q[...] = (dq * st.sm_scale).astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, dq_ref.at[batch, my_rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == blocks.compute_wgs)
  def _producer():
    plgpu.set_max_registers(blocks.producer_registers, action="decrease")

    def fetch(j, carry):
      slot = lax.rem(j, stages)
      rows = (batch, pl.ds(j * bk, bk), kv_head)

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])
      return carry

    _produce(fetch, hi, consumed, stages)


def _unravel(index, grid):
  """(tile, head, batch) of CTA `index` of a (tiles, heads, batch) grid launched tiles fastest, as CUDA does."""
  tiles, heads, _ = grid
  return lax.rem(index, tiles), lax.rem(lax.div(index, tiles), heads), lax.div(index, tiles * heads)


def _fused_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, smem, dkv_barriers,
                  dq_barriers, *, st_dkv, st_dq, dkv_grid, dq_grid):
  """Both backward kernels in one launch: CTAs [0, dk/dv CTAs) run the dk/dv kernel (the longer ones, launched
  first), the rest the dq kernel; `smem` is a union of the two kernels' shared memory. The dq CTAs then fill the
  SMs that the dk/dv kernel's last, partial wave leaves idle, where two launches would leave each kernel's last
  wave partly empty and put a launch gap between them."""
  cta = lax.axis_index("ctas")
  num_dkv = math.prod(dkv_grid)
  dkv_smem, dq_smem = smem
  inputs = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref)

  @pl.when(cta < num_dkv)
  def _():
    _dkv_kernel(*inputs, dk_ref, dv_ref, dkv_smem, dkv_barriers, st=st_dkv,
                coordinates=lambda: _unravel(cta, dkv_grid))

  @pl.when(cta >= num_dkv)
  def _():
    _dq_kernel(*inputs, dq_ref, dq_smem, dq_barriers, st=st_dq, coordinates=lambda: _unravel(cta - num_dkv, dq_grid))


def _barriers(count: int, num: int):
  return tuple(plgpu.Barrier(num_barriers=num) for _ in range(count))


def backward(q, k, v, o, lse, do, *, causal: bool, sm_scale: float, dlse=None, blocks: BlockSizes | None = None,
             interpret: bool = False):
  """Gradients of softmax attention from the forward's residuals.

  Args:
    q, o, do: [B, T, H, D] bf16/fp16; k, v: [B, S, Hkv, D]; H % Hkv == 0.
    lse: [B, H, T] fp32 natural-log log-sum-exp as `pallas_gpu.forward` returns it (-inf on empty rows).
    causal: query i attends keys j <= i + S - T.
    sm_scale: logit scale.
    dlse: optional [B, H, T] cotangent of lse.
    blocks: tile sizes (default `BlockSizes.get_default(D)`); T, S must be multiples of its rows_q, rows_k.
    interpret: run the kernels in Mosaic GPU interpret mode (CPU).

  Returns:
    dq [B, T, H, D], dk, dv [B, S, Hkv, D] in q's dtype.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  blocks = blocks or BlockSizes.get_default(d)
  reason = unsupported_reason(q.shape, k.shape, q.dtype, blocks=blocks)
  if reason:
    raise NotImplementedError(f"mosaic_gpu_bwd.backward does not support {reason}")
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  # Base 2 for the kernels; +inf on rows that attend nothing makes their probabilities exactly 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E).astype(jnp.float32)
  common = dict(sm_scale=sm_scale, causal=causal, offset=s - t, group=h // hkv, head_dim=d,
                dtype=jnp.dtype(q.dtype), blocks=blocks, stage_lhs=interpret)
  params = dict(num_threads=blocks.compute_wgs + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=plgpu.InterpretGPUParams() if interpret else None)
  wgs = blocks.compute_wgs
  args = (q, k, v, do, lse2, delta)

  st_dkv = _Static(num_q_tiles=t // blocks.block_q_dkv, num_k_tiles=s // blocks.block_k_dkv, **common)
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.num_stages_dkv
  dkv_grid = (s // (wgs * bk), hkv, b)
  dkv_scratch = [
      (_tile_smem((wgs, bk, d), q.dtype), _tile_smem((wgs, bk, d), q.dtype),
       _tile_smem((stages, bq, d), q.dtype), _tile_smem((stages, bq, d), q.dtype),
       plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
       *((_tile_smem((wgs, bk, bq), q.dtype),) * 2 if interpret else ())),
      (*_barriers(2, wgs), *_barriers(4, stages), plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)),
  ]
  st_dq = _Static(num_q_tiles=t // blocks.block_q_dq, num_k_tiles=s // blocks.block_k_dq, **common)
  bq, bk, stages = blocks.block_q_dq, blocks.block_k_dq, blocks.num_stages_dq
  dq_grid = (t // (wgs * bq), h, b)
  dq_scratch = [
      (_tile_smem((wgs, bq, d), q.dtype), _tile_smem((wgs, bq, d), q.dtype),
       plgpu.SMEM((wgs, bq), jnp.float32), plgpu.SMEM((wgs, bq), jnp.float32),
       _tile_smem((stages, bk, d), q.dtype), _tile_smem((stages, bk, d), q.dtype),
       *((_tile_smem((wgs, bq, bk), q.dtype),) if interpret else ())),
      (*_barriers(4, wgs), *_barriers(2, stages), plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)),
  ]
  dq_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dkv_types = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]

  if blocks.fused_launch:
    dq, dk, dv = plgpu.kernel(
        functools.partial(_fused_kernel, st_dkv=st_dkv, st_dq=st_dq, dkv_grid=dkv_grid, dq_grid=dq_grid),
        out_type=[dq_type, *dkv_types],
        scratch_types=[plgpu.RefUnion(dkv_scratch[0], dq_scratch[0]), dkv_scratch[1], dq_scratch[1]],
        grid=(math.prod(dkv_grid) + math.prod(dq_grid),),
        grid_names=("ctas",),
        **params,
    )(*args)
    return dq, dk, dv

  grid_names = ("tiles", "heads", "batch")
  dk, dv = plgpu.kernel(functools.partial(_dkv_kernel, st=st_dkv), out_type=dkv_types, scratch_types=dkv_scratch,
                        grid=dkv_grid, grid_names=grid_names, **params)(*args)
  dq = plgpu.kernel(functools.partial(_dq_kernel, st=st_dq), out_type=dq_type, scratch_types=dq_scratch,
                    grid=dq_grid, grid_names=grid_names, **params)(*args)
  return dq, dk, dv
