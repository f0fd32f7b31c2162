"""Linear attention (chunked prefix scan) forward and backward as Triton-language kernels, launched through
`jax_triton.triton_call`: the second GPU path beside `pallas_gpu.py`, so that each checks the other.

Same algorithm, block sizes (`pallas_gpu.BlockSizes`) and per-chunk equations as `pallas_gpu.py` (its
docstring derives them): a fused forward walk over the chunks keeping the fp32 state on chip, or a walk
writing the state entering every chunk followed by one program per (batch, head, chunk) for the output; in
the backward a reverse walk writing the gradient of every chunk's outgoing state, then dq, dk, dv of every
chunk independently. Two differences, both to save XLA passes around the kernels:
  - no padding: loads past T (or past K, V channels) read zeros and stores are masked, which is exact for the
    same reason padding is (zero keys and values leave the state unchanged, zero channels add nothing);
  - the raw log decay goes in and each chunk cumulates its own (`tl.cumsum`), instead of a separate pass.

Shapes: q/k [B, T, H, K], v [B, T, H, V] (all one dtype), raw log decay g [B, T, H] or [B, T, H, K] fp32,
states [B, H, K, V] fp32. Inside the kernels K and V are padded to the powers of two BK, VP (>= 16), and the
per-chunk states are stored as [B * H, N, BK, VP] in the input dtype, N = cdiv(T, C).

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

from kernels.linear_attention import pallas_gpu
from kernels.linear_attention.pallas_gpu import BlockSizes, Static

f32 = jnp.float32
# DECAY constexpr of the kernels: how the log decay is laid out.
_DECAY_CODES = {"none": 0, "head": 1, "channel": 2}
# The gradient kernel stages [BKS, VP] slices of a chunk's two states as dot operands in shared memory. A whole
# 128 x 128 bf16 state fits beside the rest (139 KB at C = 64); twice the bytes (fp32, or K = 256) would pass
# the 227 KB of an H100/H200 (measured 288 KB), so larger states are taken in block_k slices.
_MAX_SLICE_BYTES = 128 * 128 * 2


# ----------------------------------------------------------------------------------------------------------
# Helpers inlined into the kernels. C: chunk length; t [C] the chunk's token indices, tmask = t < T.


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
  """a @ b, fp32 accumulation. IEEE (fp32 inputs): exact fp32 products, not TF32 (tests compare at 1e-5)."""
  if IEEE:
    out = tl.dot(a, b, input_precision="ieee")
  else:
    out = tl.dot(a, b)
  return out


@triton.jit
def _bases(bh, T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
  """Offsets of (batch, token 0, head) of program row bh = batch * H + head in [B, T, H, K], [B, T, H, V] and
  [B, T, H]; int64, since B * T * H * K passes 2^31 at long sequences."""
  row = (bh // H).to(tl.int64) * T * H + bh % H
  return row * K, row * V, row


@triton.jit
def _load_rows(ptr, base, t, tmask, STRIDE: tl.constexpr, cols, WIDTH: tl.constexpr):
  """[C, len(cols)] of a [B, T, H, WIDTH] array at tokens t, channels cols; zeros past T or WIDTH."""
  mask = tmask[:, None] & (cols < WIDTH)[None, :]
  return tl.load(ptr + base + t[:, None].to(tl.int64) * STRIDE + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, x, base, t, tmask, STRIDE: tl.constexpr, cols, WIDTH: tl.constexpr):
  mask = tmask[:, None] & (cols < WIDTH)[None, :]
  tl.store(ptr + base + t[:, None].to(tl.int64) * STRIDE + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_offsets(bh, rows, cols, K: tl.constexpr, V: tl.constexpr):
  """Offsets and mask of rows x cols of one (batch, head) [K, V] slice of a [B, H, K, V] state."""
  offsets = bh.to(tl.int64) * K * V + rows[:, None] * V + cols[None, :]
  return offsets, (rows < K)[:, None] & (cols < V)[None, :]


@triton.jit
def _chunk_state_offsets(bh, i, rows, cols, N: tl.constexpr, BK: tl.constexpr, VP: tl.constexpr):
  """Offsets of rows x cols of chunk i's state in the [B * H, N, BK, VP] per-chunk states."""
  return ((bh.to(tl.int64) * N + i) * BK + rows[:, None]) * VP + cols[None, :]


@triton.jit
def _cum_decay(g_ptr, qk_base, h_base, t, tmask, cols, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
               DECAY: tl.constexpr):
  """Log decay summed from the chunk start through each token: [C] (per head) or [C, len(cols)] (per
  channel); zeros [C] without decay (then unused). Tokens past T have log decay 0."""
  if DECAY == 1:
    g = tl.load(g_ptr + h_base + t * H, mask=tmask, other=0.0)
    b = tl.cumsum(g, axis=0)
  elif DECAY == 2:
    b = tl.cumsum(_load_rows(g_ptr, qk_base, t, tmask, H * K, cols, K), axis=0)
  else:
    b = tl.zeros((C,), tl.float32)
  return b


@triton.jit
def _total(b, C: tl.constexpr, DECAY: tl.constexpr):
  """b at the chunk's last token: a scalar (per head) or [len(cols)] (per channel)."""
  last = tl.arange(0, C) == C - 1
  if DECAY == 1:
    total = tl.sum(tl.where(last, b, 0.0), axis=0)
  elif DECAY == 2:
    total = tl.sum(tl.where(last[:, None], b, 0.0), axis=0)
  else:
    total = 0.0
  return total


@triton.jit
def _query_scale(x, b, DECAY: tl.constexpr):
  """x [C, X] * e^b: the decay from the chunk start through each token."""
  x = x.to(tl.float32)
  if DECAY == 1:
    x = x * tl.exp(b)[:, None]
  elif DECAY == 2:
    x = x * tl.exp(b)
  return x


@triton.jit
def _key_scale(x, b, total, DECAY: tl.constexpr):
  """x [C, X] * e^(b_tot - b): the decay after each token to the chunk end (an exponent <= 0)."""
  x = x.to(tl.float32)
  if DECAY == 1:
    x = x * tl.exp(total - b)[:, None]
  elif DECAY == 2:
    x = x * tl.exp(total[None, :] - b)
  return x


@triton.jit
def _decay_state(state, total, DECAY: tl.constexpr):
  """state [X, V] * e^b_tot (a scalar per head, [X] per key channel)."""
  if DECAY == 1:
    state = state * tl.exp(total)
  elif DECAY == 2:
    state = state * tl.exp(total)[:, None]
  return state


@triton.jit
def _pair_decay(b, C: tl.constexpr, DECAY: tl.constexpr):
  """[C(t), C(s)]: 1 (no decay) or e^(b_t - b_s) (per head) for s <= t, else 0."""
  rows = tl.arange(0, C)
  causal = rows[:, None] >= rows[None, :]
  if DECAY == 1:
    # Masking the exponent before exp keeps the (positive) s > t entries from overflowing.
    out = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
  else:
    out = tl.where(causal, 1.0, 0.0)
  return out


@triton.jit
def _channel_pair_decay(b, C: tl.constexpr):
  """b [C, X] -> [C(t), C(s), X]: e^(b_t - b_s) for s <= t, else 0."""
  rows = tl.arange(0, C)
  causal = (rows[:, None] >= rows[None, :])[:, :, None]
  return tl.exp(tl.where(causal, b[:, None, :] - b[None, :, :], float("-inf")))


@triton.jit
def _scores(q_ptr, k_ptr, g_ptr, q, k, b, qk_base, h_base, t, tmask, H: tl.constexpr, K: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr):
  """A [C, C] fp32 of one chunk: causal, decayed q k^T. q, k [C, BK] and b are the chunk's tiles; with one
  decay per key channel the C x C x K decay is built in BKS-channel slices, reloaded from memory."""
  if DECAY == 2:
    scores = tl.zeros((C, C), tl.float32)
    for start in tl.static_range(0, BK, BKS):
      cols = start + tl.arange(0, BKS)
      q_s = _load_rows(q_ptr, qk_base, t, tmask, H * K, cols, K).to(tl.float32)
      k_s = _load_rows(k_ptr, qk_base, t, tmask, H * K, cols, K).to(tl.float32)
      b_s = _cum_decay(g_ptr, qk_base, h_base, t, tmask, cols, H, K, C, DECAY)
      scores += tl.sum(q_s[:, None, :] * k_s[None, :, :] * _channel_pair_decay(b_s, C), axis=2)
  else:
    scores = _dot(q, tl.trans(k), IEEE) * _pair_decay(b, C, DECAY)
  return scores


# ----------------------------------------------------------------------------------------------------------
# Kernels. Walks over the chunks: grid (B * H, VP / BV), each program one V tile of BV columns. Chunk-parallel
# kernels: grid (N, B * H), each program all of K and V of one chunk.


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, g_ptr, s0_ptr, o_ptr, final_ptr,
                    T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr, DECAY: tl.constexpr,
                    IEEE: tl.constexpr):
  """o and the final state in one walk over the chunks, the state kept on chip."""
  bh = tl.program_id(0)
  kk, vv = tl.arange(0, BK), tl.program_id(1) * BV + tl.arange(0, BV)
  qk_base, v_base, h_base = _bases(bh, T, H, K, V)
  dt = q_ptr.dtype.element_ty
  s_offsets, s_mask = _state_offsets(bh, kk, vv, K, V)
  state = tl.load(s0_ptr + s_offsets, mask=s_mask, other=0.0)
  for i in range(0, N):
    t = i * C + tl.arange(0, C)
    tmask = t < T
    q = _load_rows(q_ptr, qk_base, t, tmask, H * K, kk, K)
    k = _load_rows(k_ptr, qk_base, t, tmask, H * K, kk, K)
    v = _load_rows(v_ptr, v_base, t, tmask, H * V, vv, V)
    b = _cum_decay(g_ptr, qk_base, h_base, t, tmask, kk, H, K, C, DECAY)
    scores = _scores(q_ptr, k_ptr, g_ptr, q, k, b, qk_base, h_base, t, tmask, H, K, C, BK, BKS, DECAY, IEEE)
    o = _dot(scores.to(dt), v, IEEE) + _dot(_query_scale(q, b, DECAY).to(dt), state.to(dt), IEEE)
    _store_rows(o_ptr, o, v_base, t, tmask, H * V, vv, V)
    total = _total(b, C, DECAY)
    state = _decay_state(state, total, DECAY)
    state += _dot(tl.trans(_key_scale(k, b, total, DECAY).to(dt)), v, IEEE)
  tl.store(final_ptr + s_offsets, state, mask=s_mask)


@triton.jit
def _states_kernel(k_ptr, v_ptr, g_ptr, s0_ptr, states_ptr, final_ptr,
                   T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VP: tl.constexpr, DECAY: tl.constexpr,
                   IEEE: tl.constexpr):
  """The state entering every chunk (walking the chunks in order) and the final state."""
  bh = tl.program_id(0)
  kk, vv = tl.arange(0, BK), tl.program_id(1) * BV + tl.arange(0, BV)
  qk_base, v_base, h_base = _bases(bh, T, H, K, V)
  dt = k_ptr.dtype.element_ty
  s_offsets, s_mask = _state_offsets(bh, kk, vv, K, V)
  state = tl.load(s0_ptr + s_offsets, mask=s_mask, other=0.0)
  for i in range(0, N):
    tl.store(states_ptr + _chunk_state_offsets(bh, i, kk, vv, N, BK, VP), state.to(dt))
    t = i * C + tl.arange(0, C)
    tmask = t < T
    k = _load_rows(k_ptr, qk_base, t, tmask, H * K, kk, K)
    v = _load_rows(v_ptr, v_base, t, tmask, H * V, vv, V)
    b = _cum_decay(g_ptr, qk_base, h_base, t, tmask, kk, H, K, C, DECAY)
    total = _total(b, C, DECAY)
    state = _decay_state(state, total, DECAY)
    state += _dot(tl.trans(_key_scale(k, b, total, DECAY).to(dt)), v, IEEE)
  tl.store(final_ptr + s_offsets, state, mask=s_mask)


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, g_ptr, states_ptr, o_ptr,
                   T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, VP: tl.constexpr, BKS: tl.constexpr, DECAY: tl.constexpr,
                   IEEE: tl.constexpr):
  """o of one chunk from its incoming state."""
  i, bh = tl.program_id(0), tl.program_id(1)
  kk, vv = tl.arange(0, BK), tl.arange(0, VP)
  qk_base, v_base, h_base = _bases(bh, T, H, K, V)
  dt = q_ptr.dtype.element_ty
  t = i * C + tl.arange(0, C)
  tmask = t < T
  q = _load_rows(q_ptr, qk_base, t, tmask, H * K, kk, K)
  k = _load_rows(k_ptr, qk_base, t, tmask, H * K, kk, K)
  v = _load_rows(v_ptr, v_base, t, tmask, H * V, vv, V)
  state = tl.load(states_ptr + _chunk_state_offsets(bh, i, kk, vv, N, BK, VP))
  b = _cum_decay(g_ptr, qk_base, h_base, t, tmask, kk, H, K, C, DECAY)
  scores = _scores(q_ptr, k_ptr, g_ptr, q, k, b, qk_base, h_base, t, tmask, H, K, C, BK, BKS, DECAY, IEEE)
  o = _dot(scores.to(dt), v, IEEE) + _dot(_query_scale(q, b, DECAY).to(dt), state, IEEE)
  _store_rows(o_ptr, o, v_base, t, tmask, H * V, vv, V)


@triton.jit
def _dstates_kernel(q_ptr, do_ptr, g_ptr, dfinal_ptr, dstates_ptr, dinitial_ptr,
                    T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VP: tl.constexpr, DECAY: tl.constexpr,
                    IEEE: tl.constexpr):
  """dS of every chunk's outgoing state (walking the chunks in reverse) and of the initial state."""
  bh = tl.program_id(0)
  kk, vv = tl.arange(0, BK), tl.program_id(1) * BV + tl.arange(0, BV)
  qk_base, v_base, h_base = _bases(bh, T, H, K, V)
  dt = q_ptr.dtype.element_ty
  s_offsets, s_mask = _state_offsets(bh, kk, vv, K, V)
  dstate = tl.load(dfinal_ptr + s_offsets, mask=s_mask, other=0.0)
  for j in range(0, N):
    i = N - 1 - j
    tl.store(dstates_ptr + _chunk_state_offsets(bh, i, kk, vv, N, BK, VP), dstate.to(dt))
    t = i * C + tl.arange(0, C)
    tmask = t < T
    q = _load_rows(q_ptr, qk_base, t, tmask, H * K, kk, K)
    do = _load_rows(do_ptr, v_base, t, tmask, H * V, vv, V)
    b = _cum_decay(g_ptr, qk_base, h_base, t, tmask, kk, H, K, C, DECAY)
    dstate = _decay_state(dstate, _total(b, C, DECAY), DECAY)
    dstate += _dot(tl.trans(_query_scale(q, b, DECAY).to(dt)), do, IEEE)
  tl.store(dinitial_ptr + s_offsets, dstate, mask=s_mask)


@triton.jit
def _grads_kernel(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, states_ptr, dstates_ptr, dq_ptr, dk_ptr, dv_ptr,
                  T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, VP: tl.constexpr, BKS: tl.constexpr, DECAY: tl.constexpr,
                  IEEE: tl.constexpr):
  """dq, dk, dv of one chunk from its incoming state S and the gradient dS of its outgoing state.

  K is walked in slices of BKS channels (see `_slice`; BKS = BK takes all of K at once): dq and dk of a slice
  need only that slice, and its contributions to the scores and to dv add up over the slices.
  """
  i, bh = tl.program_id(0), tl.program_id(1)
  vv = tl.arange(0, VP)
  qk_base, v_base, h_base = _bases(bh, T, H, K, V)
  dt = q_ptr.dtype.element_ty
  t = i * C + tl.arange(0, C)
  tmask = t < T
  v = _load_rows(v_ptr, v_base, t, tmask, H * V, vv, V)
  do = _load_rows(do_ptr, v_base, t, tmask, H * V, vv, V)
  da = _dot(do, tl.trans(v), IEEE)  # [C, C]: dO v^T
  scores = tl.zeros((C, C), tl.float32)
  dv = tl.zeros((C, VP), tl.float32)
  for start in tl.static_range(0, BK, BKS):
    cols = start + tl.arange(0, BKS)
    q = _load_rows(q_ptr, qk_base, t, tmask, H * K, cols, K)
    k = _load_rows(k_ptr, qk_base, t, tmask, H * K, cols, K)
    state = tl.load(states_ptr + _chunk_state_offsets(bh, i, cols, vv, N, BK, VP))  # [BKS, VP]
    dstate = tl.load(dstates_ptr + _chunk_state_offsets(bh, i, cols, vv, N, BK, VP))
    b = _cum_decay(g_ptr, qk_base, h_base, t, tmask, cols, H, K, C, DECAY)
    total = _total(b, C, DECAY)
    if DECAY == 2:
      pair = _channel_pair_decay(b, C)  # [C(t), C(s), BKS]
      qf, kf = q.to(tl.float32), k.to(tl.float32)
      scores += tl.sum(qf[:, None, :] * kf[None, :, :] * pair, axis=2)
      dq = tl.sum(da[:, :, None] * kf[None, :, :] * pair, axis=1)
      dk = tl.sum(da[:, :, None] * qf[:, None, :] * pair, axis=0)
    else:
      pair = _pair_decay(b, C, DECAY)
      scores += _dot(q, tl.trans(k), IEEE) * pair
      da_pair = (da * pair).to(dt)
      dq = _dot(da_pair, k, IEEE)
      dk = _dot(tl.trans(da_pair), q, IEEE)
    dq += _query_scale(_dot(do, tl.trans(state), IEEE), b, DECAY)
    dk += _key_scale(_dot(v, tl.trans(dstate), IEEE), b, total, DECAY)
    _store_rows(dq_ptr, dq, qk_base, t, tmask, H * K, cols, K)
    _store_rows(dk_ptr, dk, qk_base, t, tmask, H * K, cols, K)
    dv += _dot(_key_scale(k, b, total, DECAY).to(dt), dstate, IEEE)
  dv += _dot(tl.trans(scores.to(dt)), do, IEEE)
  _store_rows(dv_ptr, dv, v_base, t, tmask, H * V, vv, V)


# ----------------------------------------------------------------------------------------------------------
# JAX side.


def _launch(kernel, inputs, outputs, *, grid, num_warps, num_stages, **constexprs):
  """jax_triton.triton_call with the inputs, then the outputs (ShapeDtypeStructs) as the kernel's pointers."""
  import jax_triton as jt  # noqa: PLC0415 (here, not at the top: api.py checks that it is installed first)

  return jt.triton_call(*inputs, kernel=kernel, out_shape=outputs, grid=grid, num_warps=num_warps,
                        num_stages=num_stages, **constexprs)


def _sizes(q, v, st: Static) -> dict:
  """The constexprs every kernel takes."""
  _, t, h, dk = q.shape
  return dict(T=t, N=-(-t // st.chunk), H=h, K=dk, V=v.shape[3], C=st.chunk, BK=_padded(dk),
              DECAY=_DECAY_CODES[st.decay], IEEE=st.dtype == f32)


def _padded(width: int) -> int:
  return max(16, pl.next_power_of_2(width))


def _slice(st: Static, k: int, v: int) -> int:
  """BKS, the K slice of the chunk kernels: block_k with one decay per key channel (C x C x BKS decay tiles) or
  where a [BK, VP] state in the input dtype passes _MAX_SLICE_BYTES, else all of K at once."""
  bk = _padded(k)
  if st.decay == "channel" or bk * _padded(v) * st.dtype.itemsize > _MAX_SLICE_BYTES:
    return st.block_k
  return bk


def _decay_arg(g):
  # Without a decay the kernels never read their decay pointer; a one-element buffer fills the slot.
  return jnp.zeros((1,), f32) if g is None else g


def forward(q, k, v, g, initial_state, *, st: Static, blocks: BlockSizes, store_states: bool = False):
  """q/k [B, T, H, K], v [B, T, H, V] in st.dtype, raw log decay g (fp32) or None, initial_state fp32
  [B, H, K, V] -> o [B, T, H, V] in st.dtype, the final state fp32 and, if store_states, the state entering
  each chunk, [B * H, N, BK, VP] in st.dtype.

  Fused walk unless store_states or blocks.fused_forward is off (then the states walk and the
  chunk-parallel output kernel, as in `pallas_gpu.forward`).
  """
  bsz, _, h, _ = q.shape
  sizes = _sizes(q, v, st)
  vp, bv, bks = _padded(v.shape[3]), blocks.block_v, _slice(st, q.shape[3], v.shape[3])
  walk = dict(grid=(bsz * h, vp // bv), num_warps=blocks.num_warps, num_stages=blocks.num_stages)
  o_shape = jax.ShapeDtypeStruct(v.shape, st.dtype)
  final_shape = jax.ShapeDtypeStruct(initial_state.shape, f32)
  g = _decay_arg(g)
  if blocks.fused_forward and not store_states:
    return tuple(_launch(_forward_kernel, [q, k, v, g, initial_state], [o_shape, final_shape], **walk, **sizes,
                         BV=bv, BKS=bks))
  states_shape = jax.ShapeDtypeStruct((bsz * h, sizes["N"], sizes["BK"], vp), st.dtype)
  states, final = _launch(_states_kernel, [k, v, g, initial_state], [states_shape, final_shape], **walk, **sizes,
                          BV=bv, VP=vp)
  (o,) = _launch(_output_kernel, [q, k, v, g, states], [o_shape], grid=(sizes["N"], bsz * h),
                 num_warps=blocks.num_warps_chunk, num_stages=blocks.num_stages, **sizes, VP=vp, BKS=bks)
  return (o, final, states) if store_states else (o, final)


def backward(q, k, v, g, states, do, dfinal, *, st: Static, blocks: BlockSizes):
  """Gradients of `forward` from its per-chunk states and the cotangents do [B, T, H, V] (st.dtype) and dfinal
  fp32 [B, H, K, V] -> (dq, dk [B, T, H, K], dv [B, T, H, V], d initial_state fp32 [B, H, K, V]); dq and dk
  are fp32 when there is a decay (its gradient is formed from them), else st.dtype, as is dv."""
  bsz, _, h, _ = q.shape
  sizes = _sizes(q, v, st)
  vp, bv = _padded(v.shape[3]), blocks.block_v
  g = _decay_arg(g)
  dstates, dinitial = _launch(
      _dstates_kernel, [q, do, g, dfinal],
      [jax.ShapeDtypeStruct(states.shape, st.dtype), jax.ShapeDtypeStruct(dfinal.shape, f32)],
      grid=(bsz * h, vp // bv), num_warps=blocks.num_warps, num_stages=blocks.num_stages, **sizes, BV=bv, VP=vp)
  grad_dtype = st.dtype if st.decay == "none" else f32
  dq, dk, dv = _launch(
      _grads_kernel, [q, k, v, do, g, states, dstates],
      [jax.ShapeDtypeStruct(q.shape, grad_dtype), jax.ShapeDtypeStruct(k.shape, grad_dtype),
       jax.ShapeDtypeStruct(v.shape, st.dtype)],
      grid=(sizes["N"], bsz * h), num_warps=blocks.num_warps_chunk, num_stages=blocks.num_stages, **sizes, VP=vp,
      BKS=_slice(st, q.shape[3], v.shape[3]))
  return dq, dk, dv, dinitial


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _scan(q, k, v, g, initial_state, st, blocks):
  return forward(q, k, v, g, initial_state, st=st, blocks=blocks)


def _scan_fwd(q, k, v, g, initial_state, st, blocks):
  o, final, states = forward(q, k, v, g, initial_state, st=st, blocks=blocks, store_states=True)
  return (o, final), (q, k, v, g, states, final)


def _scan_bwd(st, blocks, residuals, cotangents):
  q, k, v, g, states, final = residuals
  do, dfinal = cotangents
  dq, dk, dv, dinitial = backward(q, k, v, g, states, do.astype(st.dtype), dfinal, st=st, blocks=blocks)
  dg = None if g is None else pallas_gpu.decay_gradient(q, k, dq, dk, final, dfinal, per_head=g.ndim == 3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, dinitial


_scan.defvjp(_scan_fwd, _scan_bwd)


def _default_blocks(kind: str, programs: int, k: int, v: int, dtype) -> BlockSizes:
  """`BlockSizes.get_default`, with chunks of at most 32 tokens for fp32 inputs: exact fp32 dots stage twice
  the bytes of bf16 in shared memory, and the fused forward's [64, K] tiles at K = 256 (Performer's features)
  would not fit in an H100/H200's 227 KB."""
  blocks = BlockSizes.get_default(kind, programs, k, v)
  return dataclasses.replace(blocks, chunk=min(blocks.chunk, 32)) if dtype == f32 else blocks


def linear_attention(q, k, v, decay, initial_state, block_sizes: BlockSizes | None):
  """The op behind `api.linear_attention(..., impl="triton")` on validated inputs (float32/bfloat16/float16):
  q/k [B, T, H, K], v [B, T, H, V], decay None | [B, T, H] | [B, T, H, K], initial_state fp32 [B, H, K, V]
  or None -> (o [B, T, H, V] in v.dtype, final state fp32 [B, H, K, V])."""
  b, t, h, dk = q.shape
  dv = v.shape[3]
  kind = "none" if decay is None else ("head" if decay.ndim == 3 else "channel")
  k_pad, v_pad = _padded(dk), _padded(dv)
  dtype = jnp.result_type(q.dtype, v.dtype)
  blocks = (block_sizes or _default_blocks(kind, b * h, k_pad, v_pad, dtype)).fitted(t, k_pad, v_pad)
  st = Static(decay=kind, chunk=blocks.chunk, block_k=blocks.block_k, dtype=jnp.dtype(dtype))
  state = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state
  g = None if decay is None else decay.astype(f32)
  o, final = _scan(q.astype(dtype), k.astype(dtype), v.astype(dtype), g, state, st, blocks)
  return o.astype(v.dtype), final
