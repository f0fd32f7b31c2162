"""Flash-attention forward for Hopper with Pallas' Mosaic GPU lowering (FA3-style warp specialisation).

One CTA owns 2 * block_q query rows of one (batch, head) and runs three warpgroups:
- two consumer warpgroups, each holding block_q rows: S = Q K^T and O += P V on the tensor cores (wgmma) with
  fp32 accumulators in registers, and the online softmax in base 2 in between;
- one producer warpgroup that streams K/V tiles by TMA into a num_stages-deep shared-memory ring; consumers
  release a slot (K after S, V after P V) by arriving on its "consumed" barrier, which the producer waits on
  before refilling it.
A shared two-arrival "schedule" barrier makes the consumers take turns on the tensor cores: while one runs its
softmax (exp2 on the SFU), the other's matmuls run, which is what lifts the kernel to cuDNN speed. At D = 128 where
no tile needs a mask, `Config.overlap` adds FA3's intra-warpgroup pipelining on top (`_overlapped_steps`): each consumer
issues S_j = Q K_j^T together with O += P_{j-1} V_{j-1} and runs softmax(S_j) under the P V product.

Layout stays channel-last: TMA copies (block, D) slices of q/k/v [B, T|S, H|Hkv, D] directly. GQA: query head h
reads key/value head h // (H / Hkv). Causal: key tiles above the diagonal are never loaded, and only tiles that
cross the diagonal (or the padded end of the keys) pay for the element mask. The CTA's later query rows need
more key tiles than its earlier ones; the earlier consumer keeps releasing slots (without computing) until the
producer is done, so the shared ring stays in step. Causal grids run the heaviest query tiles first.

The backward is not here: `lse` has the convention of `pallas_gpu.forward` (natural log, fp32 [B, H, T]), so the
api pairs this forward with the Triton-lowering backward kernels.
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
LN_2 = math.log(2.0)
_CONSUMERS = 2  # consumer warpgroups per CTA; the producer is warpgroup _CONSUMERS
_HEAD_DIMS = (64, 128, 256)
# setmaxnreg moves registers between the warpgroups of a CTA only within its launch allocation: 64K registers
# over 3 * 128 threads, rounded down to a multiple of 8, is 168 a thread, so consumers + producer share 3 * 168.
_REGISTER_POOL = 3 * 168
_MIN_REGISTERS = 24  # setmaxnreg's floor


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and pipeline depth of the Mosaic GPU forward."""

  block_q: int = 64  # query rows per consumer warpgroup (a wgmma has M = 64); a CTA owns 2 * block_q rows
  block_k: int = 128  # keys per K/V pipeline stage
  num_stages: int = 2  # depth of the K/V shared-memory ring
  # Registers a consumer thread holds (setmaxnreg); the producer, which only issues copies, keeps the rest of the
  # pool: 40 at 232, 24 at 240 (FA3's split).
  consumer_registers: int = 232
  # FA3's intra-warpgroup pipelining: step j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together and runs
  # softmax(S_j) while the P V product is still on the tensor cores, instead of waiting for each product in turn.
  # The consumers still take turns issuing (one turn per step). Costs registers: S_j, P_{j-1} and O live at once.
  # None (the default) turns it on where it was measured faster: D = 128 and no tile needs an element mask (not
  # causal, S a multiple of block_k). On an H200 at T = 8K: D = 128 non-causal 610-620 against 582-584 TFLOP/s;
  # causal 403 against 616 (ptxas serialises the wgmmas there: C7513, and spills 80 bytes); D = 64 non-causal
  # 415 against 433 (benchmarks/results/flash_attention_overlap.md, flash_attention_d64_configs.md).
  overlap: bool | None = None
  # Launch order. False: head by head, each head's query tiles together (causal: longest first within the head).
  # True: query tile by query tile across all heads, so causally every head's longest tiles start in the first
  # waves instead of the last head's starting in the last one. Off: on an H200 it gave nothing causally (8K 580
  # vs 577, 16K 574 vs 590 TFLOP/s forward; benchmarks/results/flash_attention_mosaic_fused_bwd.md).
  heads_inner: bool = False

  def __post_init__(self):
    if self.block_q % 64:
      raise ValueError(f"block_q={self.block_q} must be a multiple of 64 (wgmma rows per warpgroup)")
    if self.block_k % 64:
      raise ValueError(f"block_k={self.block_k} must be a multiple of 64 (the 128-byte swizzle tile)")
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be at least 2 to overlap copies with compute")
    valid = range(_MIN_REGISTERS, (_REGISTER_POOL - _MIN_REGISTERS) // _CONSUMERS + 1, 8)
    if self.consumer_registers not in valid:
      raise ValueError(f"consumer_registers={self.consumer_registers} must be a multiple of 8 in "
                       f"[{valid[0]}, {valid[-1]}] (the producer keeps at least {_MIN_REGISTERS})")

  @property
  def producer_registers(self) -> int:
    return _REGISTER_POOL - _CONSUMERS * self.consumer_registers

  @classmethod
  def parse(cls, spec: str) -> "Config":
    """'block_q:block_k:num_stages[:consumer_registers[:overlap[:heads_inner]]]' (overlap and heads_inner 0 or
    1; overlap left out, None: the default), for benchmark sweeps."""
    usage = (f"spec={spec!r} must be block_q:block_k:num_stages, then optionally consumer registers (e.g. :240), "
             ":0 or :1 (overlap) and :0 or :1 (heads_inner)")
    try:
      fields = [int(x) for x in spec.split(":")]
    except ValueError:
      raise ValueError(usage) from None
    if len(fields) not in (3, 4, 5, 6) or any(x not in (0, 1) for x in fields[4:]):
      raise ValueError(usage)
    registers = fields[3] if len(fields) > 3 else cls.consumer_registers
    return cls(block_q=fields[0], block_k=fields[1], num_stages=fields[2], consumer_registers=registers,
               overlap=bool(fields[4]) if len(fields) > 4 else None,
               heads_inner=bool(fields[5]) if len(fields) > 5 else False)

  @classmethod
  def get_default(cls, head_dim: int) -> "Config":
    """128-key stages up to D = 128; D = 256 halves them so two K/V stages fit in shared memory."""
    return cls(block_k=64) if head_dim > 128 else cls()

  def resolved(self, head_dim: int, needs_mask: bool) -> "Config":
    """This config with overlap=None replaced by the choice for the problem (see `overlap`)."""
    if self.overlap is not None:
      return self
    return dataclasses.replace(self, overlap=head_dim == 128 and not needs_mask)

  @property
  def rows_per_cta(self) -> int:
    return _CONSUMERS * self.block_q

  def shared_memory_bytes(self, head_dim: int, itemsize: int) -> int:
    """Q/O tiles of both consumers plus the K and V rings (barriers and LSE rows are negligible)."""
    return (self.rows_per_cta + 2 * self.num_stages * self.block_k) * head_dim * itemsize


# Hopper gives a CTA up to 227 KiB of shared memory. The estimate above leaves out barriers and alignment, so a
# config just under it can still fail in the lowering, which has the exact count.
_SHARED_MEMORY_BYTES = 227 * 1024


def unsupported_reasons(q, k, v, causal: bool, window, kv_lengths) -> list[str]:
  """Why this kernel cannot run the problem (empty when it can); q [B, T, H, D], k/v [B, S, Hkv, D]."""
  reasons = []
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    reasons.append(f"dtype {q.dtype} (bf16/fp16 only: wgmma operands)")
  if q.shape[-1] not in _HEAD_DIMS:
    reasons.append(f"head_dim {q.shape[-1]} (one of {_HEAD_DIMS})")
  if window is not None:
    reasons.append("window")
  if kv_lengths is not None:
    reasons.append("kv_lengths")
  if causal and k.shape[1] < q.shape[1]:
    reasons.append("causal with S < T (rows that attend nothing)")
  return reasons


def supports(q, k, v, causal: bool, window, kv_lengths) -> bool:
  """Whether `forward` (after the api pads T and S to its tiles) computes this problem."""
  return not unsupported_reasons(q, k, v, causal, window, kv_lengths)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernel specialises on."""

  config: Config
  causal: bool
  scale: float  # sm_scale * log2(e): logits in base 2
  offset: int  # query i sits at key position i + offset
  kv_length: int  # keys at or past it are padding
  num_q_tiles: int  # CTAs along T
  group: int  # query heads per key/value head
  dtype: jnp.dtype
  interpret: bool

  @property
  def k_tiles_needed(self) -> int:
    """Key tiles holding any unpadded key."""
    return pl.cdiv(self.kv_length, self.config.block_k)

  def k_tiles_for_rows(self, row_end):
    """Key tiles that rows [.., row_end) attend: all unpadded ones, or up to the causal diagonal."""
    if not self.causal:
      return jnp.int32(self.k_tiles_needed)
    return jnp.minimum(pl.cdiv(row_end + self.offset, jnp.int32(self.config.block_k)), self.k_tiles_needed)

  def unmasked_k_tiles(self, row_start):
    """Leading key tiles that every row from row_start on attends entirely (no element mask)."""
    full = self.kv_length // self.config.block_k
    if not self.causal:
      return jnp.int32(full)
    return jnp.minimum(lax.div(row_start + self.offset + 1, jnp.int32(self.config.block_k)), full)

  @property
  def needs_mask(self) -> bool:
    """Whether any tile needs the element mask (the causal diagonal or a padded last tile)."""
    return self.causal or self.kv_length % self.config.block_k != 0


def _tile_softmax(s, m, *, j, row, masked: bool, static: _Static):
  """Online-softmax update for the logits s [bq, bk] of key tile j (query rows from `row`), in scaled base 2.

  Returns the new row max m_new, the factor alpha = exp2(m - m_new) that rescales what was accumulated under m,
  and the unnormalised probabilities p = exp2(s * scale - m_new) (fp32).
  """
  bk = s.shape[1]
  if masked:
    iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, s.shape, layout=plgpu.Layout.WGMMA)
    k_idx = iota(1) + j * bk
    conditions = [k_idx <= iota(0) + (row + static.offset)] if static.causal else []
    if static.kv_length % bk:  # only a padded last tile holds keys at or past kv_length
      conditions.append(k_idx < static.kv_length)
    s = jnp.where(functools.reduce(jnp.logical_and, conditions), s, -jnp.inf)
  # m is kept in scaled base-2 units so p is one FMA and an exp2 per element. Every row attends key 0 (in the
  # first tile it visits), so m is finite from the first step on and alpha never sees -inf - -inf.
  m_new = jnp.maximum(m, s.max(axis=1) * static.scale)
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s * static.scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
  return m_new, alpha, p


def pv_product(acc, p16, v_tile, *, interpret: bool):
  """acc + P V with V the tile in shared memory `v_tile`: a register-operand wgmma, awaited. Interpret mode has no
  register-operand wgmma: there a dot reads V through the generic proxy, fenced before the slot's TMA refill."""
  if interpret:
    acc = acc + lax.dot_general(p16, v_tile[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    plgpu.commit_smem()
    return acc
  return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_tile))(plgpu.ACC.init(acc))


def logits_passing_turn(q_smem, k_tile, other, pv=None):
  """S = Q K^T for a consumer's Q and a K tile in shared memory (and, on the GPU, the pending P V product `pv`
  issued behind it); passes the turn (arrives on the other consumer's barrier `other`) once both are issued, and
  returns S as soon as it alone is ready."""
  def body(s_ref):
    plgpu.wgmma(s_ref, q_smem, k_tile.transpose((1, 0)))
    if pv is not None:
      pv()
    plgpu.barrier_arrive(other)
    return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if pv is None else 1)
  return pl.run_scoped(body, plgpu.ACC((q_smem.shape[0], k_tile.shape[0]), jnp.float32))


def pipelined_step(acc, m, l, p16, *, v_prev, logits, softmax, dtype, interpret: bool):
  """One overlapped step (FA3's intra-warpgroup pipelining), shared with the block-sparse forward.

  logits(pv) issues S_j = Q K_j^T, calls pv() to issue O += P_{j-1} V_{j-1} (V from `v_prev`) behind it, and
  returns S_j once it alone is ready; softmax(s, m) -> (m_new, alpha, p) then runs while the P V product is on the
  tensor cores, and run_state's exit awaits it. Returns (acc, m, l, p16, alpha), acc not yet rescaled by alpha.
  """
  if interpret:
    # Interpret mode has neither register-operand wgmma nor pl.run_state over plain values: the products in turn.
    s = logits(None)
    acc = pv_product(acc, p16, v_prev, interpret=True)
    m, alpha, p = softmax(s, m)
    return acc, m, l * alpha + p.sum(axis=1), p.astype(dtype), alpha

  def pipelined(refs):
    acc_ref, m_ref, l_ref, p16_ref, alpha_ref = refs
    s = logits(lambda: plgpu.wgmma(acc_ref, p16_ref[...], v_prev))
    m_new, alpha, p = softmax(s, m_ref[...])
    m_ref[...], alpha_ref[...] = m_new, alpha
    l_ref[...] = l_ref[...] * alpha + p.sum(axis=1)
    p16_ref[...] = p.astype(dtype)

  return pl.run_state(pipelined)((plgpu.ACC.init(acc), m, l, p16, m))


def _overlapped_steps(carry, *, q_smem, k_smem, v_smem, k_ready, v_ready, k_consumed, v_consumed, turns, wg, row,
                      k_tiles, unmasked, cta_k_tiles, static: _Static):
  """The consumer loop of `Config.overlap`: FA3's intra-warpgroup pipelining. Returns (acc, m, l).

  Step 0 issues S_0; step j >= 1 issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}, waits for S_j only, and runs
  softmax(S_j) while the P V product is still on the tensor cores; a last step issues P V of the final tile.
  Issuing is a turn: consumer wg waits on turns[wg] and passes to the other on turns[1 - wg] (consumer 1 gave
  consumer 0 the first turn), so the two interleave their products on the tensor cores while the other runs
  its softmax. Each consumer takes cta_k_tiles turns (the earlier one passes its last turns without computing),
  so the token never waits on a finished consumer.
  """
  cfg = static.config
  stages = cfg.num_stages
  mine, other = turns.at[wg], turns.at[1 - wg]

  def logits(slot, pv=None):
    return logits_passing_turn(q_smem, k_smem.at[slot], other, pv)

  def first_step(carry):
    acc, m, l = carry
    plgpu.barrier_wait(k_ready.at[0])
    plgpu.barrier_wait(mine)
    s = logits(0)
    plgpu.barrier_arrive(k_consumed.at[0])
    # The first tile is masked whenever any is: masking a tile every row sees whole is a no-op.
    m, _, p = _tile_softmax(s, m, j=0, row=row, masked=static.needs_mask, static=static)
    return acc, m, p.sum(axis=1), p.astype(static.dtype)

  def step(j, carry, masked):
    acc, m, l, p16 = carry
    slot, prev = lax.rem(j, jnp.int32(stages)), lax.rem(j - 1, jnp.int32(stages))
    plgpu.barrier_wait(k_ready.at[slot])
    plgpu.barrier_wait(v_ready.at[prev])
    plgpu.barrier_wait(mine)

    def issue(pv):
      s = logits(slot, pv=pv)
      plgpu.barrier_arrive(k_consumed.at[slot])
      return s

    acc, m, l, p16, alpha = pipelined_step(
        acc, m, l, p16, v_prev=v_smem.at[prev], logits=issue, dtype=static.dtype, interpret=static.interpret,
        softmax=functools.partial(_tile_softmax, j=j, row=row, masked=masked, static=static))
    plgpu.barrier_arrive(v_consumed.at[prev])
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m, l, p16

  def last_product(carry):
    acc, m, l, p16 = carry
    slot = lax.rem(k_tiles - 1, jnp.int32(stages))
    plgpu.barrier_wait(v_ready.at[slot])
    acc = pv_product(acc, p16, v_smem.at[slot], interpret=static.interpret)
    plgpu.barrier_arrive(v_consumed.at[slot])
    return acc, m, l

  def pass_turn(j, _):
    """A step the CTA's later rows still need: free the slots and keep the turns in step."""
    slot = lax.rem(j, jnp.int32(stages))
    plgpu.barrier_wait(k_ready.at[slot])
    plgpu.barrier_arrive(k_consumed.at[slot])
    plgpu.barrier_wait(v_ready.at[slot])
    plgpu.barrier_arrive(v_consumed.at[slot])
    plgpu.barrier_wait(mine)
    plgpu.barrier_arrive(other)

  pl.when(wg == 1)(lambda: plgpu.barrier_arrive(other))  # consumer 0 goes first
  carry = first_step(carry)
  first_masked = jnp.maximum(unmasked, 1)
  carry = lax.fori_loop(1, first_masked, functools.partial(step, masked=False), carry)
  if static.needs_mask:
    carry = lax.fori_loop(first_masked, k_tiles, functools.partial(step, masked=True), carry)
  carry = last_product(carry)
  if static.causal:
    lax.fori_loop(k_tiles, cta_k_tiles, pass_turn, None)
  pl.when(wg == 0)(lambda: plgpu.barrier_wait(mine))  # consumer 1's last pass
  return carry


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready,
            k_consumed, v_consumed, schedule, *, static: _Static):
  """One CTA: q_ref [B, T, H, D] etc. in global memory; *_smem and barriers shared by the three warpgroups."""
  cfg = static.config
  bq, bk, stages = cfg.block_q, cfg.block_k, cfg.num_stages
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  q_tile = lax.axis_index("q_tiles")
  if static.causal:  # later query tiles attend more keys: start them first so the tail of the grid is short
    q_tile = static.num_q_tiles - 1 - q_tile
  cta_row = q_tile * cfg.rows_per_cta
  # The producer streams what the CTA's last row needs; the earlier consumer may need fewer tiles.
  cta_k_tiles = static.k_tiles_for_rows(cta_row + cfg.rows_per_cta)

  def take_turn():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(cfg.consumer_registers, action="increase")
    q_smem, row_lse_smem = qo_smem.at[wg], lse_smem.at[wg]
    row = cta_row + wg * bq
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row, bq), head], q_smem, q_ready.at[wg])
    k_tiles = static.k_tiles_for_rows(row + bq)
    unmasked = static.unmasked_k_tiles(row)

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j, jnp.int32(stages))

      def logits(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()  # the other consumer's P V runs while this S = Q K^T is in flight
        return s_ref[...]

      s = pl.run_scoped(logits, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(k_consumed.at[slot])
      m_new, alpha, p = _tile_softmax(s, m, j=j, row=row, masked=masked, static=static)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(static.dtype)
      # Keeps the compiler from sinking the softmax past the barriers below (it would then stall the turn).
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_arrive(schedule)  # softmax done: the other consumer may issue its matmuls
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(schedule)  # tensor cores are free again

      # Computed out here: pl.run_state below may capture traced values but not array constants.
      has_next, next_slot = j + 1 < k_tiles, lax.rem(j + 1, jnp.int32(stages))

      def wait_next_k():
        @pl.when(has_next)
        def _():
          plgpu.barrier_wait(k_ready.at[next_slot])

      if static.interpret:
        # Interpret mode has neither register-operand wgmma nor pl.run_state; the product is the same. This
        # reads V through the generic proxy (wgmma reads it through the async one), so fence before the TMA
        # refill of the slot may overwrite it.
        acc = acc + lax.dot_general(p16, v_smem.at[slot][...], (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        plgpu.commit_smem()
        wait_next_k()
      else:
        def accumulate(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_next_k()  # overlaps with the P V wgmma; run_state's exit waits for the wgmma

        acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m_new, l

    def release(j, _):
      """Steps the CTA's later rows still need: free the slot and keep the turn-taking in step.

      Waiting for the copies (which the other consumer waits for anyway) keeps every consumer's view of the
      barrier phases complete, as interpret mode checks.
      """
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_arrive(k_consumed.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_arrive(v_consumed.at[slot])
      take_turn()
      take_turn()

    d = q_smem.shape[-1]
    m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_ready.at[wg])
    if cfg.overlap:
      acc, m, l = _overlapped_steps(
          (acc, m, l), q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready,
          k_consumed=k_consumed, v_consumed=v_consumed, turns=schedule, wg=wg, row=row, k_tiles=k_tiles,
          unmasked=unmasked, cta_k_tiles=cta_k_tiles, static=static)
    else:
      plgpu.barrier_wait(k_ready.at[0])
      pl.when(wg == 1)(take_turn)  # consumer 0 goes first
      carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), (acc, m, l))
      if static.needs_mask:
        carry = lax.fori_loop(unmasked, k_tiles, functools.partial(step, masked=True), carry)
      if static.causal:
        lax.fori_loop(k_tiles, cta_k_tiles, release, None)
      pl.when(wg == 0)(take_turn)  # balances consumer 1's opening turn
      acc, m, l = carry

    q_smem[...] = (acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])).astype(static.dtype)
    row_lse_smem[...] = m * LN_2 + jnp.log(l)  # natural log, as pallas_gpu.forward
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(row, bq), head])
    plgpu.copy_smem_to_gmem(row_lse_smem, lse_ref.at[batch, head, pl.ds(row, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(cfg.producer_registers, action="decrease")
    kv_head = lax.div(head, jnp.int32(static.group))

    def load(j, slot):
      keys = (batch, pl.ds(j * bk, bk), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    # Static bound too: a static slice past S fails when traced, even under a false pl.when.
    for j in range(min(stages, k_ref.shape[1] // bk)):
      pl.when(j < cta_k_tiles)(functools.partial(load, j, j))

    @pl.loop(stages, cta_k_tiles)
    def _(j):
      slot = lax.rem(j, jnp.int32(stages))
      keys = (batch, pl.ds(j * bk, bk), kv_head)
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    # Observe the release of the last tiles too (the CTA outlives them anyway), so every warpgroup ends having
    # seen every barrier phase, as interpret mode checks.
    @pl.loop(jnp.maximum(cta_k_tiles - stages, 0), cta_k_tiles)
    def _(j):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])


def forward(q, k, v, *, causal: bool, sm_scale: float, config: Config | None = None, kv_length: int | None = None,
            offset: int | None = None, interpret: bool | plgpu.InterpretGPUParams = False):
  """q [B, T, H, D], k/v [B, S, Hkv, D] -> o [B, T, H, D], lse [B, H, T] (fp32, natural log).

  T must be a multiple of 2 * config.block_q and S of config.block_k (the api pads). Static extras for padded
  inputs: kv_length (keys at or past it are masked; default S) and offset (query i sits at key position
  i + offset for the causal mask; default S - T). Every row must attend at least one key.
  interpret: run in Mosaic GPU interpret mode (CPU), for tests; an InterpretGPUParams sets its options (e.g.
    detect_races).
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  config = config or Config.get_default(d)
  kv_length = s if kv_length is None else kv_length
  offset = s - t if offset is None else offset
  if reasons := unsupported_reasons(q, k, v, causal, None, None):
    raise NotImplementedError(f"mosaic_gpu.forward does not support {', '.join(reasons)}")
  if t % config.rows_per_cta or s % config.block_k:
    raise ValueError(f"T={t} must be a multiple of {config.rows_per_cta} and S={s} of {config.block_k} "
                     f"(config={config})")
  if not 0 < kv_length <= s:
    raise ValueError(f"kv_length={kv_length} must be in (0, S={s}]")
  if causal and offset < 0:
    raise ValueError(f"offset={offset} must be >= 0 when causal (query 0 must attend key 0)")
  if sm_scale <= 0:
    raise ValueError(f"sm_scale={sm_scale} must be positive (the row max is taken before scaling)")
  smem = config.shared_memory_bytes(d, q.dtype.itemsize)
  if smem > _SHARED_MEMORY_BYTES:
    raise ValueError(f"config={config} needs {smem} bytes of shared memory at D={d}; the limit is "
                     f"{_SHARED_MEMORY_BYTES}")
  static = _Static(
      config=config, causal=causal, scale=sm_scale * LOG2_E, offset=offset, kv_length=kv_length,
      num_q_tiles=t // config.rows_per_cta, group=h // hkv,
      dtype=q.dtype, interpret=bool(interpret),
  )
  if config.overlap is None:
    static = dataclasses.replace(static, config=config.resolved(d, static.needs_mask))
    config = static.config
  # 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma reads without bank conflicts.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  stages = config.num_stages
  scratch = (
      plgpu.SMEM((_CONSUMERS, config.block_q, d), q.dtype, transforms=transforms),  # Q, then O, per consumer
      plgpu.SMEM((stages, config.block_k, d), q.dtype, transforms=transforms),
      plgpu.SMEM((stages, config.block_k, d), q.dtype, transforms=transforms),
      plgpu.SMEM((_CONSUMERS, config.block_q), jnp.float32),  # LSE rows on their way out
      plgpu.Barrier(num_barriers=_CONSUMERS),  # Q landed
      plgpu.Barrier(num_barriers=stages),  # K landed
      plgpu.Barrier(num_barriers=stages),  # V landed
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),  # K slot free
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),  # V slot free
      # Tensor-core turns: one rendezvous of both consumers, or (overlap) a token per consumer.
      plgpu.Barrier(num_barriers=_CONSUMERS) if config.overlap else plgpu.Barrier(num_arrivals=_CONSUMERS),
  )
  return plgpu.kernel(
      functools.partial(_kernel, static=static),
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      scratch_types=scratch,
      # The last grid axis varies fastest in launch order (then the middle one).
      grid=(static.num_q_tiles, h, b) if config.heads_inner else (h, static.num_q_tiles, b),
      grid_names=("q_tiles", "heads", "batch") if config.heads_inner else ("heads", "q_tiles", "batch"),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )(q, k, v)
