"""Mamba-1 selective scan as Triton-language kernels launched through `jax_triton.triton_call`: parallel along
the sequence inside a chunk, where `pallas_gpu.py` walks it token by token.

Each program owns block_d channels of one batch row, grid (Dm / block_d, B). It walks L in chunks of LC
tokens; for a chunk it forms the per-token affine state updates h -> a_t h + b_t as [LC, N, block_d] tiles,

  a_t = exp(delta_t A),   b_t = delta_t x_t B_t,   delta_t = softplus(dt_t + dt_bias) (or dt_t + dt_bias),

folds the state carried in from the previous chunk into the first token's update (b_0 + a_0 h_carry) and
composes them along the token axis with `tl.associative_scan` under (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2):
the b component is then the state after each token, and the last one is the carry to the next chunk. A tile's
tokens live in one thread, so the scan is the recurrence h_t = a_t h_{t-1} + b_t in registers, one FMA per
state element. y_t = (C_t . h_t + D x_t) silu(z_t). Tokens past L load as zeros with delta = 0, i.e. a = 1, b = 0: the
carry passes through them unchanged.

Backward, chunks in reverse, tiles [LC_bwd, N, block_d_bwd]: the forward (when differentiated) writes the
state before every LC_bwd-th token (fp32 checkpoints); the backward recomputes a chunk's states from its
checkpoint with the forward scan, then the state cotangents by a reverse scan

  dh_t = C_t dp_t + a_{t+1} dh_{t+1},   dp_t = dy_t silu(z_t),

whose elements (C_t dp_t, a_t) compose with the decay of the later token (`_combine_shifted`), so a_{t+1} is
never formed (an exp per element less). Between chunks it carries w = a_t dh_t of the chunk's first token:
tokens past L have a = 1, so the last chunk starts from w = d(final state), and after the first chunk w is
d(initial state) = a_0 dh_0. With a_t h_{t-1} = h_t - b_t (no division, no shift):

  dA     += dh_t (h_t - b_t) delta_t             ddelta_t = sum_n dh_t ((h_t - b_t) A + B_t x_t)
  dx_t    = D dp_t + delta_t sum_n dh_t B_t      dB_t = sum_d dh_t delta_t x_t,   dC_t = sum_d dp_t h_t
  dD     += dp_t x_t                             d(dt) = ddelta sigmoid(dt + dt_bias) (with softplus)

dB/dC sum over channels that live in different programs: each program writes its partial
[B, L, Dm / block_d_bwd, N] fp32 and a jnp sum finishes it (deterministic, no atomics), or with
BlockSizes.atomic_bc adds it atomically into a zeroed [B, L, G, N] fp32 (no partials to write and read back; the
order of the additions, so the last bits, vary from run to run); dA, dD and d(dt_bias) are per (batch row,
channel) partials summed over the batch.

Shapes: x/dt/z [B, L, Dm], A [Dm, N], B/C [B, L, G, N] (channel d reads group d // (Dm / G)), D/dt_bias [Dm],
states [B, Dm, N] fp32. N need not be a power of two: tiles pad it to NP and mask (A = 0, B = C = 0 there).

This module imports triton at the top: import it only where triton is installed (api.py does so for
impl="triton", after checking for jax-triton and a GPU). jax_triton is imported at launch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl
from jax.experimental import pallas as pl
from triton.language.extra import libdevice

from kernels.selective_scan.triton_config import BlockSizes

f32 = jnp.float32
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@dataclasses.dataclass(frozen=True)
class Static:
  """What the kernels specialise on besides shapes and tiles."""

  dt_softplus: bool
  has_d: bool
  has_z: bool
  has_bias: bool
  has_initial_state: bool


# ----------------------------------------------------------------------------------------------------------
# Helpers inlined into the kernels. Tiles are [LC, NP, BD] (token, state, channel), rows [LC, BD], B/C [LC, NP],
# states [NP, BD]. Triton's default layout spreads a tile's last axes over a warp's lanes and keeps the first in
# each thread: tokens in the thread make the scans along them sequential in registers (no shuffles), and the
# sums over N for y cross few lanes. (Token-last tiles compiled to ~20 shuffles per element, token-first ~1.)


@triton.jit
def _combine(a1, b1, a2, b2):
  """Composes h -> a1 h + b1 (earlier) with h -> a2 h + b2 (later). Scanned over flipped tokens it gives the
  reverse recurrence S_t = b_t + a_t S_{t+1}."""
  return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_shifted(f1, p1, a1, f2, p2, a2):
  """The reverse recurrence dh_t = c_t + a_{t+1} dh_{t+1} scanned over flipped tokens, where each token brings
  (c_t, 1, a_t) and its decay applies to the token after it in scan order. A segment (f, p, a) maps the carry
  w = a dh reaching its first token to dh = f + p w at its last, and a is its last token's decay, so segments
  compose as below; no a_{t+1} tile (an exp per element) is needed."""
  p = p2 * a1
  return f2 + p * f1, p * p1, a2


@triton.jit
def _enter(b, a, h, LC: tl.constexpr):
  """b [LC, NP, BD] with the state h [NP, BD] carried into its first token, b_0 + a_0 h: scanned with a, the b
  component is then the state after each token. The scan runs in registers, one token after the other, so its
  product of decays is dead (never read) and the chain costs one FMA per element, where composing first and
  applying the composite to h after costs three: the compiled (sm_90, default tiles) chunk loops shrank from 639
  to 571 SASS instructions (forward) and from 1481 to 1425 (backward)."""
  return b + tl.where((tl.arange(0, LC) == 0)[:, None, None], a * h[None, :, :], 0.0)


@triton.jit
def _row(v, j, LC: tl.constexpr):
  """v [LC, X, Y] at token j, as [X, Y]: a masked sum (in registers: tokens are per thread), since tiles cannot
  be indexed."""
  return tl.sum(tl.where((tl.arange(0, LC) == j)[:, None, None], v, 0.0), axis=0)


@triton.jit
def _discretize(u, SOFTPLUS: tl.constexpr):
  """delta from u = dt + dt_bias: softplus in the overflow-free form jax.nn.softplus uses, or u itself."""
  if SOFTPLUS:
    delta = tl.maximum(u, 0.0) + libdevice.log1p(tl.exp(-tl.abs(u)))
  else:
    delta = u
  return delta


@triton.jit
def _sigmoid(u):
  return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _widen(v):
  """v as fp32. Half-precision values convert through inline PTX rather than `.to(tl.float32)`: Triton moves a
  conversion's layout change in front of an extf, to shuffle half the bytes, and then widens every replica of a
  broadcast tile (B and C once per channel lane, x once per state lane), and with dt it also evaluated the softplus
  replicated over the state lanes. Opaque to that rewrite, the conversion stays in the load's layout, one shift
  per loaded element. Compiled for sm_90 at the default tiles, before prefetch and _exp2, the bf16 forward went
  from 1064 SASS instructions per chunk (fp32: 936) to 960 and the fp32 kernel's 10.2 FP32 instructions per tile
  element, the backward from 2016 (fp32: 1864) and 32 bytes of spills to 1888 and none."""
  if v.dtype.is_bf16():
    v = tl.inline_asm_elementwise("cvt.f32.bf16 $0, $1;", "=r,h", [v], dtype=tl.float32, is_pure=True, pack=1)
  elif v.dtype.is_fp16():
    v = tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [v], dtype=tl.float32, is_pure=True, pack=1)
  else:
    v = v.to(tl.float32)
  return v


@triton.jit
def _load_rows(ptr, offsets, mask):
  return _widen(tl.load(ptr + offsets, mask=mask, other=0.0))


@triton.jit
def _exp2(v):
  """2^v, flushing denormal inputs and results to zero. tl.exp and tl.exp2 compile to ex2.approx.f32, which ptxas
  wraps in a range check and two predicated multiplies for denormal results; here those are decays below 2^-126,
  as good as 0. With A pre-scaled by log2(e) (no multiply by it per element either) an element's decay is 2
  instructions instead of 6."""
  return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _decays(dt, mask, bias, A2, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
  """(u = dt + dt_bias, delta, a = exp(delta A) = 2^(delta A2)) of dt [LC, BD] (fp32), A2 = A log2(e) [NP, BD]:
  [LC, BD], [LC, BD], [LC, NP, BD]. delta is 0 where mask is off (past L), so a = 1 and b = delta x B = 0 there."""
  u = dt
  if HAS_BIAS:
    u = u + bias[None, :]
  delta = tl.where(mask, _discretize(u, SOFTPLUS), 0.0)
  return u, delta, _exp2(delta[:, None, :] * A2[None, :, :])


@triton.jit
def _write_partial(ptrs, value, mask, ATOMIC: tl.constexpr):
  """Stores value at ptrs, or adds it there atomically (fp32, relaxed: only the sum matters)."""
  if ATOMIC:
    tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
  else:
    tl.store(ptrs, value, mask=mask)


@triton.jit
def _program(BD: tl.constexpr, NP: tl.constexpr, L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr,
             N: tl.constexpr):
  """This program's channel block, batch row, channels dd [BD] and state indices nn [NP]; the int64 offsets of
  its batch row in [B, L, Dm] and of its B/C group in [B, L, G, N] (B * L * Dm passes 2^31 at long sequences:
  the kernels add these to their pointers once, so tile offsets stay int32); and the offsets and mask of its
  block of a [B, Dm, N] state, as [NP, BD] tiles."""
  block, row = tl.program_id(0), tl.program_id(1)
  dd = block * BD + tl.arange(0, BD)
  nn = tl.arange(0, NP)
  group = block * BD // (DM // G)
  seq_base = row.to(tl.int64) * L * DM
  bc_base = row.to(tl.int64) * L * G * N + group * N
  state_offsets = (row * DM + dd)[None, :].to(tl.int64) * N + nn[:, None]
  state_mask = (nn < N)[:, None] & (dd < DM)[None, :]
  return block, row, dd, nn, seq_base, bc_base, state_offsets, state_mask


@triton.jit
def _channel_params(a_ptr, bias_ptr, d_ptr, dd, nn, state_mask, N: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_D: tl.constexpr):
  """A2 = A log2(e) [NP, BD] (0 in the padded states), dt_bias and D [BD] of the channels dd, fp32 (zeros when
  absent)."""
  A2 = tl.load(a_ptr + dd[None, :] * N + nn[:, None], mask=state_mask, other=0.0).to(tl.float32) * _LOG2E
  if HAS_BIAS:
    bias = tl.load(bias_ptr + dd).to(tl.float32)
  else:
    bias = tl.zeros(dd.shape, tl.float32)
  if HAS_D:
    d_skip = tl.load(d_ptr + dd).to(tl.float32)
  else:
    d_skip = tl.zeros(dd.shape, tl.float32)
  return A2, bias, d_skip


@triton.jit
def _chunk_offsets(t, dd, nn, L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
  """Offsets and masks of the tokens t [LC] at this program's batch row: rows [LC, BD], B/C [LC, NP]."""
  tmask = t < L
  offsets = t[:, None] * DM + dd[None, :]
  mask = tmask[:, None] & (dd < DM)[None, :]
  bc_offsets = t[:, None] * (G * N) + nn[None, :]
  bc_mask = tmask[:, None] & (nn < N)[None, :]
  return offsets, mask, bc_offsets, bc_mask


@triton.jit
def _load_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, t, dd, nn,
                 L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
  """x, dt [LC, BD] and B, C [LC, NP] of the tokens t, fp32 (zeros past L)."""
  offsets, mask, bc_offsets, bc_mask = _chunk_offsets(t, dd, nn, L, DM, G, N)
  return (_load_rows(x_ptr, offsets, mask), _load_rows(dt_ptr, offsets, mask), _load_rows(b_ptr, bc_offsets, bc_mask),
          _load_rows(c_ptr, bc_offsets, bc_mask))


@triton.jit
def _updates(x, dt, bm, mask, bias, A2, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
  """u, delta [LC, BD] and the update h -> a h + b as a, b [LC, NP, BD] of a chunk's loaded inputs."""
  u, delta, a = _decays(dt, mask, bias, A2, SOFTPLUS, HAS_BIAS)
  return u, delta, a, (delta * x)[:, None, :] * bm[:, :, None]


@triton.jit
def _load_chunk(x_ptr, dt_ptr, b_ptr, c_ptr, bias, A2, t, dd, nn,
                L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
  """A chunk's tokens t [LC], the pointers at this program's batch row: row offsets and mask [LC, BD],
  x, u, delta [LC, BD], B, C [LC, NP] and the update h -> a h + b as a, b [LC, NP, BD], all fp32 (zeros past L,
  a = 1)."""
  offsets, mask, _bc_offsets, _bc_mask = _chunk_offsets(t, dd, nn, L, DM, G, N)
  x, dt, bm, cm = _load_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, t, dd, nn, L, DM, G, N)
  u, delta, a, b = _updates(x, dt, bm, mask, bias, A2, SOFTPLUS, HAS_BIAS)
  return offsets, mask, x, u, delta, bm, cm, a, b


# ----------------------------------------------------------------------------------------------------------
# Kernels: grid (Dm / BD, B). Absent optional inputs and outputs are one-element placeholders, never touched.


@triton.jit
def _forward_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, h0_ptr,
                    y_ptr, final_ptr, states_ptr,
                    L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                    BD: tl.constexpr, LC: tl.constexpr, NC: tl.constexpr, CK: tl.constexpr, NCK: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, PREFETCH: tl.constexpr):
  """y and the final state, walking NC chunks of LC; with SAVE_STATES also states[b, k] = the state before
  token k * CK, [B, NCK, Dm, N] fp32. With PREFETCH each chunk loads the next one's inputs before its own scan."""
  # Every unpacked value gets its own name: Triton would carry a reused `_` through the loop with changing types.
  _block, row, dd, nn, seq_base, bc_base, state_offsets, state_mask = _program(BD, NP, L, DM, G, N)
  A2, bias, d_skip = _channel_params(a_ptr, bias_ptr, d_ptr, dd, nn, state_mask, N, HAS_BIAS, HAS_D)
  x_ptr, dt_ptr, z_ptr, y_ptr = x_ptr + seq_base, dt_ptr + seq_base, z_ptr + seq_base, y_ptr + seq_base
  b_ptr, c_ptr = b_ptr + bc_base, c_ptr + bc_base
  # Checkpoint k of this batch row: states_ptr + k * DM * N + d * N + n.
  states_ptr += row.to(tl.int64) * NCK * DM * N
  if HAS_H0:
    h = tl.load(h0_ptr + state_offsets, mask=state_mask, other=0.0)
  else:
    h = tl.zeros((NP, BD), tl.float32)
  ll = tl.arange(0, LC)
  state_tile = nn[:, None] + dd[None, :] * N  # [NP, BD] offsets of this block in one [Dm, N] state
  if PREFETCH:
    # Triton's pipeliner leaves these loads alone (no cp.async in the compiled loop), so each chunk would wait a
    # full memory latency for its inputs with only a few warps per scheduler (1.5-3 at B=4, Dm=1536) to cover it;
    # carried in registers they arrive while the previous chunk computes (measured at the former 4-channel tiles:
    # 1.62 -> 1.13 ms, bf16, L=8K).
    x_next, dt_next, b_next, c_next = _load_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, ll, dd, nn, L, DM, G, N)
    if HAS_Z:
      first_offsets, first_mask, _first_bc_offsets, _first_bc_mask = _chunk_offsets(ll, dd, nn, L, DM, G, N)
      z_next = _load_rows(z_ptr, first_offsets, first_mask)
  for i in range(0, NC):
    if SAVE_STATES:
      # A chunk that starts on a checkpoint (every chunk when CK <= LC) stores its carry there.
      if (i * LC) % CK == 0:
        tl.store(states_ptr + (i * LC // CK) * (DM * N) + state_tile, h, mask=state_mask)
    t = i * LC + ll
    offsets, mask, _bc_offsets, _bc_mask = _chunk_offsets(t, dd, nn, L, DM, G, N)
    if PREFETCH:
      x, dt, bm, cm = x_next, dt_next, b_next, c_next
      # Past the last chunk these are masked off (t >= L): no access.
      x_next, dt_next, b_next, c_next = _load_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, t + LC, dd, nn, L, DM, G, N)
      if HAS_Z:
        next_offsets, next_mask, _next_bc_offsets, _next_bc_mask = _chunk_offsets(t + LC, dd, nn, L, DM, G, N)
        z = z_next
        z_next = _load_rows(z_ptr, next_offsets, next_mask)
    else:
      x, dt, bm, cm = _load_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, t, dd, nn, L, DM, G, N)
      if HAS_Z:
        z = _load_rows(z_ptr, offsets, mask)
    _u, _delta, a, b = _updates(x, dt, bm, mask, bias, A2, SOFTPLUS, HAS_BIAS)
    _scan_a, states = tl.associative_scan((a, _enter(b, a, h, LC)), 0, _combine)  # the state after each token
    y = tl.sum(states * cm[:, :, None], axis=1)
    if HAS_D:
      y += d_skip[None, :] * x
    if HAS_Z:
      y = y * z * _sigmoid(z)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_STATES:
      if CK < LC:
        # Checkpoints inside the chunk: the state after its token j CK - 1 is checkpoint i LC / CK + j. Picked out
        # in registers (tokens are per thread) and stored as one [NP, BD] state each, where a masked store of every
        # token's state cost a predicated store and its address per element (the forward with checkpoints took
        # 1.24 ms against 0.97 without, on an H200 at the former default tiles).
        for j in tl.static_range(1, LC // CK):
          tl.store(states_ptr + (i * (LC // CK) + j) * (DM * N) + state_tile, _row(states, j * CK - 1, LC),
                   mask=state_mask & (i * LC + j * CK < L))
    h = _row(states, LC - 1, LC)
  tl.store(final_ptr + state_offsets, h, mask=state_mask)


@triton.jit
def _backward_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, dy_ptr, dfinal_ptr,
                     dx_ptr, ddt_ptr, dz_ptr, da_ptr, db_ptr, dc_ptr, dskip_ptr, dbias_ptr, dh0_ptr,
                     L: tl.constexpr, DM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                     BD: tl.constexpr, LC: tl.constexpr, NCK: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_H0: tl.constexpr, ATOMIC_BC: tl.constexpr, SLOTS: tl.constexpr):
  """Gradients of one channel block, chunks of LC (the checkpoint interval, NCK chunks) in reverse.

  Outputs: dx, ddt, dz [B, L, Dm]; per (batch row, channel) partials dA [B, Dm, N], dD, d(dt_bias) [B, Dm];
  dB, dC [B, L, SLOTS, N] fp32: SLOTS = Dm / BD, one slot per channel block (stored), or with ATOMIC_BC
  SLOTS = G, one per B/C group (zero-initialised, its blocks add into it atomically); d(initial state)
  [B, Dm, N].
  """
  block, row, dd, nn, seq_base, bc_base, state_offsets, state_mask = _program(BD, NP, L, DM, G, N)
  A2, bias, d_skip = _channel_params(a_ptr, bias_ptr, d_ptr, dd, nn, state_mask, N, HAS_BIAS, HAS_D)
  x_ptr, dt_ptr, z_ptr, dy_ptr = x_ptr + seq_base, dt_ptr + seq_base, z_ptr + seq_base, dy_ptr + seq_base
  dx_ptr, ddt_ptr, dz_ptr = dx_ptr + seq_base, ddt_ptr + seq_base, dz_ptr + seq_base
  b_ptr, c_ptr = b_ptr + bc_base, c_ptr + bc_base
  states_ptr += row.to(tl.int64) * NCK * DM * N
  # This program's dB/dC slot: [B, L, SLOTS, N] at (row, t, slot, n).
  if ATOMIC_BC:
    slot = block * BD // (DM // G)
  else:
    slot = block
  partial_base = row.to(tl.int64) * L * SLOTS * N + slot * N
  db_ptr, dc_ptr = db_ptr + partial_base, dc_ptr + partial_base
  ll = tl.arange(0, LC)
  # The carry between chunks: w = a_t dh_t at the first token t of the chunk after (the cotangent reaching the
  # state before t); past L a = 1, so the last chunk starts from d(final state).
  w = tl.load(dfinal_ptr + state_offsets, mask=state_mask, other=0.0)
  da = tl.zeros((NP, BD), tl.float32)
  dskip = tl.zeros((BD,), tl.float32)
  dbias = tl.zeros((BD,), tl.float32)
  for j in range(0, NCK):
    i = NCK - 1 - j
    t = i * LC + ll
    offsets, mask, x, u, delta, bm, cm, a, b = _load_chunk(x_ptr, dt_ptr, b_ptr, c_ptr, bias, A2, t, dd, nn, L,
                                                           DM, G, N, SOFTPLUS, HAS_BIAS)
    h_start = tl.load(states_ptr + i * (DM * N) + nn[:, None] + dd[None, :] * N, mask=state_mask, other=0.0)
    _scan_a, h = tl.associative_scan((a, _enter(b, a, h_start, LC)), 0, _combine)
    dy = _load_rows(dy_ptr, offsets, mask)
    if HAS_Z:
      z = _load_rows(z_ptr, offsets, mask)
      sig = _sigmoid(z)
      y_pre = tl.sum(h * cm[:, :, None], axis=1)
      if HAS_D:
        y_pre += d_skip[None, :] * x
      tl.store(dz_ptr + offsets, (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
               mask=mask)
      dp = dy * z * sig
    else:
      dp = dy
    partial_offsets = t[:, None] * (SLOTS * N) + nn[None, :]  # [LC, NP]
    partial_mask = (t < L)[:, None] & (nn < N)[None, :]
    # Everything that needs h itself first, so that only a_t h_{t-1} stays live through the reverse scan.
    _write_partial(dc_ptr + partial_offsets, tl.sum(dp[:, None, :] * h, axis=2), partial_mask, ATOMIC_BC)
    decayed = h - b  # a_t h_{t-1}
    # The reverse scan as flip, forward scan, flip: tokens are per thread, so the flips only rename registers,
    # where reverse=True compiled to ~20 shuffles per element.
    rev_f, rev_p, _rev_a = tl.associative_scan(
        (tl.flip(cm[:, :, None] * dp[:, None, :], 0), tl.full(a.shape, 1.0, tl.float32), tl.flip(a, 0)), 0,
        _combine_shifted)
    dh_all = tl.flip(rev_f, 0) + tl.flip(rev_p, 0) * w[None, :, :]  # dh_t, the cotangent of the state after t
    w = _row(a, 0, LC) * _row(dh_all, 0, LC)
    g = dh_all * decayed
    da += tl.sum(g * delta[:, None, :], axis=0)
    dh_b = tl.sum(dh_all * bm[:, :, None], axis=1)  # sum_n dh_t B_t
    ddelta = tl.sum(g * A2[None, :, :], axis=1) * _LN2 + x * dh_b  # sum_n g A: the ln 2 after the sum
    dx = delta * dh_b
    if HAS_D:
      dx += d_skip[None, :] * dp
      dskip += tl.sum(dp * x, axis=0)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if SOFTPLUS:
      du = ddelta * _sigmoid(u)
    else:
      du = ddelta
    # Past L, dh_t is the carried cotangent, not zero: keep those tokens out of the sums over t.
    du = tl.where(mask, du, 0.0)
    tl.store(ddt_ptr + offsets, du.to(ddt_ptr.dtype.element_ty), mask=mask)
    dbias += tl.sum(du, axis=0)
    _write_partial(db_ptr + partial_offsets, tl.sum(dh_all * (delta * x)[:, None, :], axis=2), partial_mask,
                   ATOMIC_BC)
  tl.store(da_ptr + state_offsets, da, mask=state_mask)
  channel_offsets = row * DM + dd
  if HAS_D:
    tl.store(dskip_ptr + channel_offsets, dskip)
  if HAS_BIAS:
    tl.store(dbias_ptr + channel_offsets, dbias)
  if HAS_H0:
    # h_0 = a_0 h_init + b_0: the initial state's cotangent is a_0 dh_0, the carry after the first chunk.
    tl.store(dh0_ptr + state_offsets, w, mask=state_mask)


# ----------------------------------------------------------------------------------------------------------
# JAX side.


def _launch(kernel, inputs, outputs, *, grid, num_warps, num_stages, zeroed_outputs=(), **constexprs):
  """jax_triton.triton_call with the inputs, then the outputs (ShapeDtypeStructs) as the kernel's pointers;
  the outputs at zeroed_outputs (indices) start as zeros, the others uninitialised."""
  import jax_triton as jt  # noqa: PLC0415 (here, not at the top: api.py checks that it is installed first)

  return jt.triton_call(*inputs, kernel=kernel, out_shape=outputs, grid=grid, num_warps=num_warps,
                        num_stages=num_stages, zeroed_outputs=zeroed_outputs, **constexprs)


# An absent optional input or output fills its pointer slot with one element the kernel never reads or writes.
_PLACEHOLDER = jax.ShapeDtypeStruct((1,), f32)


def _or_placeholder(array):
  return jnp.zeros((1,), f32) if array is None else array


def _sizes(x, b, st: Static) -> dict:
  """The constexprs both kernels take."""
  _, length, dm = x.shape
  groups, n = b.shape[2], b.shape[3]
  return dict(L=length, DM=dm, G=groups, N=n, NP=pl.next_power_of_2(n), SOFTPLUS=st.dt_softplus,
              HAS_D=st.has_d, HAS_Z=st.has_z, HAS_BIAS=st.has_bias, HAS_H0=st.has_initial_state)


def forward(x, dt, a, b, c, d, z, dt_bias, h0, *, st: Static, blocks: BlockSizes, save_states: bool):
  """x/dt/z [B, L, Dm], a [Dm, N], b/c [B, L, G, N], d/dt_bias [Dm], h0 [B, Dm, N] fp32 (absent ones None)
  -> y [B, L, Dm] (x.dtype), the final state [B, Dm, N] fp32 and, if save_states, the state before every
  blocks.chunk_bwd-th token, [B, ceil(L / chunk_bwd), Dm, N] fp32 (else None)."""
  batch, length, dm = x.shape
  n = a.shape[1]
  num_checkpoints = -(-length // blocks.chunk_bwd)
  outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, dm, n), f32),
             jax.ShapeDtypeStruct((batch, num_checkpoints, dm, n), f32) if save_states else _PLACEHOLDER]
  inputs = [x, dt, a, b, c] + [_or_placeholder(v) for v in (d, z, dt_bias, h0)]
  y, final, states = _launch(_forward_kernel, inputs, outputs, grid=(dm // blocks.block_d, batch),
                             num_warps=blocks.num_warps, num_stages=blocks.num_stages, **_sizes(x, b, st),
                             BD=blocks.block_d, LC=blocks.chunk, NC=-(-length // blocks.chunk),
                             CK=blocks.chunk_bwd, NCK=num_checkpoints, SAVE_STATES=save_states,
                             PREFETCH=blocks.prefetch)
  return y, final, (states if save_states else None)


def backward(x, dt, a, b, c, d, z, dt_bias, h0, states, dy, dfinal, *, st: Static, blocks: BlockSizes):
  """Gradients of every input of `forward` from its checkpoint states, dy [B, L, Dm] (x.dtype) and
  dfinal [B, Dm, N] fp32 -> (dx, ddt, da, db, dc, dd, dz, ddt_bias, dh0) in the primal dtypes (None for
  absent inputs); db/dc [B, L, G, N]."""
  batch, length, dm = x.shape
  groups, n = b.shape[2], b.shape[3]
  bd = blocks.block_d_bwd
  num_blocks = dm // bd
  seq_like = lambda like: jax.ShapeDtypeStruct(x.shape, like.dtype)
  per_channel = jax.ShapeDtypeStruct((batch, dm), f32)
  # dB/dC slots (see _backward_kernel): one per channel block, or one per group added into atomically.
  slots = groups if blocks.atomic_bc else num_blocks
  partial_bc = jax.ShapeDtypeStruct((batch, length, slots, n), f32)
  state = jax.ShapeDtypeStruct((batch, dm, n), f32)
  outputs = [seq_like(x), seq_like(dt), seq_like(z) if st.has_z else _PLACEHOLDER, state, partial_bc, partial_bc,
             per_channel if st.has_d else _PLACEHOLDER, per_channel if st.has_bias else _PLACEHOLDER,
             state if st.has_initial_state else _PLACEHOLDER]
  inputs = [x, dt, a, b, c] + [_or_placeholder(v) for v in (d, z, dt_bias)] + [states, dy, dfinal]
  dx, ddt, dz, da, db_part, dc_part, dd, dbias, dh0 = _launch(
      _backward_kernel, inputs, outputs, grid=(num_blocks, batch), num_warps=blocks.num_warps_bwd,
      num_stages=blocks.num_stages, zeroed_outputs=(4, 5) if blocks.atomic_bc else (), **_sizes(x, b, st),
      BD=bd, LC=blocks.chunk_bwd, NCK=states.shape[1], ATOMIC_BC=blocks.atomic_bc, SLOTS=slots)
  # Each group's B/C row was read by the Dm / G / bd blocks of that group; their partial sums add up here
  # (already added up with atomic_bc: one slot per group).
  group_sum = lambda part, like: part.reshape(batch, length, groups, slots // groups, n).sum(3).astype(like.dtype)
  batch_sum = lambda part, like: None if like is None else part.sum(0).astype(like.dtype)
  return (dx, ddt, batch_sum(da, a), group_sum(db_part, b), group_sum(dc_part, c), batch_sum(dd, d),
          dz if st.has_z else None, batch_sum(dbias, dt_bias), dh0.astype(h0.dtype) if st.has_initial_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _scan(x, dt, a, b, c, d, z, dt_bias, h0, st, blocks):
  y, final, _ = forward(x, dt, a, b, c, d, z, dt_bias, h0, st=st, blocks=blocks, save_states=False)
  return y, final


def _scan_fwd(x, dt, a, b, c, d, z, dt_bias, h0, st, blocks):
  inputs = (x, dt, a, b, c, d, z, dt_bias, h0)
  y, final, states = forward(*inputs, st=st, blocks=blocks, save_states=True)
  return (y, final), (inputs, states)


def _scan_bwd(st, blocks, residuals, cotangents):
  inputs, states = residuals
  dy, dfinal = cotangents
  return backward(*inputs, states, dy.astype(inputs[0].dtype), dfinal.astype(f32), st=st, blocks=blocks)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, initial_state, blocks: BlockSizes):
  """The op behind `api.selective_scan(..., impl="triton")` on validated inputs and tiles (blocks fitted to
  Dm / G): x/dt/z [B, L, Dm], A [Dm, N], B/C [B, L, N] or [B, L, G, N], D/dt_bias [Dm], initial_state
  [B, Dm, N] (absent ones None) -> (y [B, L, Dm] in x.dtype, final state [B, Dm, N] fp32)."""
  B = B[:, :, None, :] if B.ndim == 3 else B
  C = C[:, :, None, :] if C.ndim == 3 else C
  st = Static(dt_softplus=dt_softplus, has_d=D is not None, has_z=z is not None, has_bias=dt_bias is not None,
              has_initial_state=initial_state is not None)
  h0 = None if initial_state is None else initial_state.astype(f32)
  return _scan(x, dt, A, B, C, D, z, dt_bias, h0, st, blocks)
