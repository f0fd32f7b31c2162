"""Linear attention (chunked prefix scan) forward and backward as Pallas kernels for GPUs (Triton lowering).

Chunks of C tokens: inside a chunk the work is quadratic (C x C scores), across chunks it is a [K, V] state.
Two ways to run the forward: one fused walk over the chunks per (batch, head, V tile) that keeps the fp32
state in registers and stores nothing per token; or a walk that writes the state entering each chunk (T / C
states of K x V: O(T) memory, the size of q when C = V) followed by one program per (batch, head, chunk)
computing its output, which keeps the GPU full however few heads there are. Training takes the second,
since the backward needs those states: a reverse walk writes the gradient of each chunk's outgoing state the
same way, and then every chunk's dq, dk, dv are independent (one program per (batch, head, chunk)).

Per chunk, with b the log decay summed from the chunk start through each token (inclusive, <= 0) and
b_tot its value at the chunk's last token:
  o     = (q * e^b) S + A v,          A[t, s] = sum_k q_t k_s e^(b_t - b_s)  for s <= t, else 0
  S_out = e^b_tot S + (k * e^(b_tot - b))^T v
Every exponent is a sum of log decays over a span that runs forward in time, so it is <= 0: strong
decays underflow to zero instead of overflowing (no exp(-b) factor is ever formed). One log rate per head
makes e^(b_t - b_s) a C x C matrix applied to the q k^T scores; one per key channel makes it C x C x K,
built tile by tile over K slices of `block_k` channels (the reason that path uses short chunks).

Backward, with S the state entering a chunk, dS the gradient of the state leaving it (walked in reverse
from the final state's cotangent) and dA = dO v^T:
  dS_in = e^b_tot dS + (q * e^b)^T dO        (at the first chunk: the initial state's gradient)
  dq = (dO S^T) * e^b + (dA . decay) k
  dk = (v dS^T) * e^(b_tot - b) + (dA . decay)^T q
  dv = (k * e^(b_tot - b)) dS + A^T dO
The log-decay gradient needs no kernel of its own; see `decay_gradient`.

Shapes below: q/k [B, T, H, K], v [B, T, H, V] with T a multiple of the chunk and K, V powers of two
(the caller pads), log decay cumulated per chunk `b` [B, T, H] or [B, T, H, K] fp32, states [B, H, K, V] fp32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32
DECAY_KINDS = ("none", "head", "channel")
# Streaming multiprocessors of an H100 SXM (the H200 has as many): below this many programs per kernel
# some sit idle, so tiles shrink until the (batch, head, tile) grid covers them.
_MIN_PROGRAMS = 132


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk length and tile sizes (all powers of two, >= 16) and Triton launch parameters."""

  chunk: int = 64  # tokens per chunk: C x C scores inside, one state update across
  block_k: int = 32  # per-channel decay only: the K slice of its C x C x K decay tiles
  block_v: int = 64  # V tile of the kernels that walk the chunks (each program carries a [K, block_v] state)
  num_warps: int = 4  # of the kernels that walk the chunks (fused forward, states, state gradients)
  num_stages: int = 2
  num_warps_chunk: int = 8  # of the chunk-parallel kernels (output; dq, dk, dv: three [C, K or V] fp32 tiles)
  # Forward without gradients: one fused walk (True) or the states walk plus the chunk-parallel output kernel.
  fused_forward: bool = True

  @classmethod
  def get_default(cls, decay_kind: str, programs: int, k: int, v: int) -> "BlockSizes":
    """Defaults for `programs` = B * H sequences of padded widths k, v.

    Per-channel decay builds C x C x block_k decay tiles in registers, so it takes 16-token chunks and
    32-channel slices (8K fp32 values per tile). Otherwise 64-token chunks feed 64-wide dots. The V tile of
    the sequential kernels halves until B * H * (tiles per head) covers the GPU's multiprocessors.
    """
    chunk = 16 if decay_kind == "channel" else 64
    return cls(chunk=chunk, block_k=min(32, k), block_v=_tile_for(programs, v, 64))

  def fitted(self, t: int, k: int, v: int) -> "BlockSizes":
    """Clamps tiles to the padded widths k, v and the chunk to a short sequence of t tokens."""
    for name in ("chunk", "block_k", "block_v"):
      size = getattr(self, name)
      if size < 16 or size & (size - 1):
        raise ValueError(f"block_sizes.{name}={size} is not valid; it must be a power of two >= 16")
    return dataclasses.replace(
        self,
        chunk=min(self.chunk, max(16, pl.next_power_of_2(t))),
        block_k=min(self.block_k, k),
        block_v=min(self.block_v, v),
    )


def _tile_for(programs: int, width: int, largest: int) -> int:
  """The largest power-of-two tile <= largest giving programs * (width / tile) >= _MIN_PROGRAMS (or 16)."""
  tile = min(largest, width)
  while tile > 16 and programs * (width // tile) < _MIN_PROGRAMS:
    tile //= 2
  return tile


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on."""

  decay: str  # one of DECAY_KINDS
  chunk: int
  block_k: int  # K slice of the per-channel decay tiles
  dtype: jnp.dtype  # dot operand dtype (q, k, v are cast to it by the caller)

  @property
  def precision(self):
    # fp32 inputs get exact fp32 dots, not TF32: the tests compare fp32 at 1e-5.
    return lax.Precision.HIGHEST if self.dtype == f32 else None


def _mm(a, b, st: Static, contract=((1,), (0,))):
  """a @ b (default), a.T @ b or a @ b.T, operands cast to the input dtype, fp32 accumulation."""
  return lax.dot_general(
      a.astype(st.dtype), b.astype(st.dtype), (contract, ((), ())), preferred_element_type=f32,
      precision=st.precision,
  )


def _mm_tn(a, b, st):  # a.T @ b
  return _mm(a, b, st, ((0,), (0,)))


def _mm_nt(a, b, st):  # a @ b.T
  return _mm(a, b, st, ((1,), (1,)))


def _chunk_rows(i, c):
  return pl.ds(pl.multiple_of(i * c, c), c)


def _load_decay(b_ref, rows):
  """Cumulated log decay of one chunk: [C] (per head) or [C, Kb] (per channel); None without decay."""
  if b_ref is None:
    return None
  return b_ref[rows] if len(b_ref.shape) == 1 else b_ref[rows, :]


def _rows(x, per_row):
  """x [C, X] scaled row-wise by per_row [C] (per head) or elementwise by [C, X] (per channel)."""
  return x * (per_row[:, None] if per_row.ndim == 1 else per_row)


def _chunk_total(b):
  """b at the chunk's last token: a scalar (per head) or [Kb] (per channel). A masked sum, not a slice."""
  last = lax.broadcasted_iota(jnp.int32, b.shape, 0) == b.shape[0] - 1
  return jnp.sum(jnp.where(last, b, 0.0), axis=0)


def _decay_state(state, total):
  """state [Kb, V] times e^b_tot (a scalar, or [Kb] per key channel)."""
  a = jnp.exp(total)
  return state * (a[:, None] if a.ndim == 1 else a)


def _query_scale(x, b):
  """x [C, Kb] * e^b: the decay from the chunk start through each token."""
  return x.astype(f32) if b is None else _rows(x.astype(f32), jnp.exp(b))


def _key_scale(x, b):
  """x [C, Kb] * e^(b_tot - b): the decay after each token to the chunk end."""
  if b is None:
    return x.astype(f32)
  total = _chunk_total(b)
  return _rows(x.astype(f32), jnp.exp((total[None, :] if total.ndim == 1 else total) - b))


def _causal(c):
  return lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _decayed(x, b, c):
  """x [C(t), C(s)] masked to s <= t and, with one rate per head, weighted by e^(b_t - b_s)."""
  causal = _causal(c)
  if b is None:
    return jnp.where(causal, x, 0.0)
  # Masking the exponent before exp keeps the (positive) s > t entries from overflowing.
  return x * jnp.exp(jnp.where(causal, b[:, None] - b[None, :], -jnp.inf))


def _channel_decay(b, c):
  """b [C, Kb] -> [C(t), C(s), Kb]: e^(b_t - b_s) for s <= t, else 0."""
  shape = (c, c, b.shape[1])
  causal = lax.broadcasted_iota(jnp.int32, shape, 0) >= lax.broadcasted_iota(jnp.int32, shape, 1)
  return jnp.exp(jnp.where(causal, b[:, None, :] - b[None, :, :], -jnp.inf))


def _scores(q_ref, k_ref, b_ref, rows, st: Static):
  """A [C, C] fp32 of one chunk: causal, decayed q k^T over all K channels of the refs."""
  if st.decay != "channel":
    return _decayed(_mm_nt(q_ref[rows, :], k_ref[rows, :], st), _load_decay(b_ref, rows), st.chunk)
  scores = jnp.zeros((st.chunk, st.chunk), f32)
  for start in range(0, q_ref.shape[1], st.block_k):  # static K slices keep the 3-D tile small
    cols = pl.ds(start, st.block_k)
    q, k = q_ref[rows, cols].astype(f32), k_ref[rows, cols].astype(f32)
    scores += jnp.sum(q[:, None, :] * k[None, :, :] * _channel_decay(b_ref[rows, cols], st.chunk), axis=2)
  return scores


def _split(refs, st: Static, n_inputs: int):
  """Kernel refs -> (the n_inputs inputs, None standing in for an absent decay), the outputs.

  Absent decays are not passed to pallas_call at all; `_DECAY_POSITION` says where each kernel expects one.
  """
  position = _DECAY_POSITION[n_inputs]
  if st.decay == "none":
    refs = (*refs[:position], None, *refs[position:])
  return refs[:n_inputs], refs[n_inputs:]


# Inputs per kernel -> the decay's position: forward and output (q, k, v, b, s0 or states), states and state
# gradients (k, v, b, s0 and q, do, b, dfinal), parallel gradients (q, k, v, do, b, states, dstates).
_DECAY_POSITION = {5: 3, 4: 2, 7: 4}


def _state_rows(i, k):
  return pl.ds(pl.multiple_of(i * k, k), k)


def _forward_kernel(*refs, st: Static):
  """o and the final state in one walk over the chunks, the state kept in registers."""
  (q_ref, k_ref, v_ref, b_ref, s0_ref), (o_ref, final_ref) = _split(refs, st, 5)

  def body(i, state):
    rows = _chunk_rows(i, st.chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    b = _load_decay(b_ref, rows)
    o = _mm(_scores(q_ref, k_ref, b_ref, rows, st), v, st) + _mm(_query_scale(q, b), state, st)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    if b is not None:
      state = _decay_state(state, _chunk_total(b))
    return state + _mm_tn(_key_scale(k, b), v, st)

  final_ref[...] = lax.fori_loop(0, q_ref.shape[0] // st.chunk, body, s0_ref[...])


def _states_kernel(*refs, st: Static):
  """The state entering every chunk (walking the chunks in order) and the final state."""
  (k_ref, v_ref, b_ref, s0_ref), (states_ref, final_ref) = _split(refs, st, 4)
  dk = k_ref.shape[1]

  def body(i, state):
    states_ref[_state_rows(i, dk), :] = state.astype(states_ref.dtype)
    rows = _chunk_rows(i, st.chunk)
    k = k_ref[rows, :]
    b = _load_decay(b_ref, rows)
    if b is not None:
      state = _decay_state(state, _chunk_total(b))
    return state + _mm_tn(_key_scale(k, b), v_ref[rows, :], st)

  final_ref[...] = lax.fori_loop(0, k_ref.shape[0] // st.chunk, body, s0_ref[...])


def _output_kernel(*refs, st: Static):
  """o of one chunk from its incoming state."""
  (q_ref, k_ref, v_ref, b_ref, s_ref), (o_ref,) = _split(refs, st, 5)
  rows = pl.ds(0, st.chunk)
  b = _load_decay(b_ref, rows)
  o = _mm(_scores(q_ref, k_ref, b_ref, rows, st), v_ref[...], st) + _mm(_query_scale(q_ref[...], b), s_ref[...], st)
  o_ref[...] = o.astype(o_ref.dtype)


def _dstate_kernel(*refs, st: Static):
  """dS of every chunk's outgoing state (walking the chunks in reverse) and of the initial state."""
  (q_ref, do_ref, b_ref, dfinal_ref), (dstates_ref, dinitial_ref) = _split(refs, st, 4)
  n, dk = q_ref.shape[0] // st.chunk, q_ref.shape[1]

  def body(j, dstate):
    i = n - 1 - j
    dstates_ref[_state_rows(i, dk), :] = dstate.astype(dstates_ref.dtype)
    rows = _chunk_rows(i, st.chunk)
    b = _load_decay(b_ref, rows)
    if b is not None:
      dstate = _decay_state(dstate, _chunk_total(b))
    return dstate + _mm_tn(_query_scale(q_ref[rows, :], b), do_ref[rows, :], st)

  dinitial_ref[...] = lax.fori_loop(0, n, body, dfinal_ref[...])


def _intra_dq(da, k, b, st: Static):
  """sum_s (dA . decay)[t, s] k_s: [C, Kb]."""
  if st.decay == "channel":
    return jnp.sum(da[:, :, None] * k.astype(f32)[None, :, :] * _channel_decay(b, st.chunk), axis=1)
  return _mm(_decayed(da, b, st.chunk), k, st)


def _intra_dk(da, q, b, st: Static):
  """sum_t (dA . decay)[t, s] q_t: [C, Kb]."""
  if st.decay == "channel":
    return jnp.sum(da[:, :, None] * q.astype(f32)[:, None, :] * _channel_decay(b, st.chunk), axis=0)
  return _mm_tn(_decayed(da, b, st.chunk), q, st)


def _grads_kernel(*refs, st: Static):
  """dq, dk, dv of one chunk from its incoming state S and the gradient dS of its outgoing state."""
  (q_ref, k_ref, v_ref, do_ref, b_ref, s_ref, ds_ref), (dq_ref, dk_ref, dv_ref) = _split(refs, st, 7)
  rows = pl.ds(0, st.chunk)
  v, do = v_ref[...], do_ref[...]
  da = _mm_nt(do, v, st)
  # Per-channel decay works on K slices (its C x C x Kb tiles); otherwise one slice is all of K.
  width = st.block_k if st.decay == "channel" else q_ref.shape[1]
  for start in range(0, q_ref.shape[1], width):
    cols = pl.ds(start, width)
    b = None if b_ref is None else (b_ref[...] if len(b_ref.shape) == 1 else b_ref[:, cols])
    dq = _intra_dq(da, k_ref[:, cols], b, st) + _query_scale(_mm_nt(do, s_ref[cols, :], st), b)
    dq_ref[:, cols] = dq.astype(dq_ref.dtype)
    dk = _intra_dk(da, q_ref[:, cols], b, st) + _key_scale(_mm_nt(v, ds_ref[cols, :], st), b)
    dk_ref[:, cols] = dk.astype(dk_ref.dtype)
  b = _load_decay(b_ref, rows)
  dv = _mm_tn(_scores(q_ref, k_ref, b_ref, rows, st), do, st) + _mm(_key_scale(k_ref[...], b), ds_ref[...], st)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
  """Log decay g [B, T, H(, K)] -> its inclusive running sum restarted at every chunk of `chunk` tokens."""
  b, t = g.shape[:2]
  return jnp.cumsum(g.reshape(b, t // chunk, chunk, *g.shape[2:]), axis=2).reshape(g.shape)


def _seq_spec(t, width, tiled):
  """[B, T, H, X] -> the (T, width) slice of one (batch, head): tile j of X if tiled, else all of X."""
  if tiled:
    return pl.BlockSpec((None, t, None, width), lambda bi, hi, j: (bi, 0, hi, j))
  return pl.BlockSpec((None, t, None, width), lambda bi, hi, j: (bi, 0, hi, 0))


def _decay_spec(b):
  """None; per head [B, T, H] -> (T,) or per channel [B, T, H, K] -> (T, K), of one (batch, head)."""
  if b is None:
    return None
  if b.ndim == 3:
    return pl.BlockSpec((None, b.shape[1], None), lambda bi, hi, j: (bi, 0, hi))
  return _seq_spec(b.shape[1], b.shape[3], False)


def _state_spec(rows, cols):
  """[B, H, K or N * K, V] -> all rows of V tile j (cols wide), for one (batch, head)."""
  return pl.BlockSpec((None, None, rows, cols), lambda bi, hi, j: (bi, hi, 0, j))


def _call(kernel, *, grid, inputs, outputs, st: Static, blocks: BlockSizes, interpret: bool, name: str,
          num_warps: int | None = None):
  """pallas_call; inputs/outputs are (array or ShapeDtypeStruct, BlockSpec) pairs.

  The decay input is None without decay and is left out (the kernels' `_split` puts None in its place).
  """
  inputs = [(x, spec) for x, spec in inputs if x is not None]
  params = plgpu.CompilerParams(num_warps=num_warps or blocks.num_warps, num_stages=blocks.num_stages)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[spec for _, spec in inputs],
      out_specs=[spec for _, spec in outputs],
      out_shape=[shape for shape, _ in outputs],
      compiler_params=None if interpret else params,
      interpret=interpret,
      name=name,
  )(*[x for x, _ in inputs])


def forward(q, k, v, b, initial_state, *, st: Static, blocks: BlockSizes, interpret: bool,
            store_states: bool = False):
  """Padded q/k [B, T, H, K], v [B, T, H, V], b (cumulated per chunk) or None, initial_state fp32 [B, H, K, V]
  -> o [B, T, H, V] in st.dtype, final state fp32 [B, H, K, V] and, if store_states, the state entering each
  of the N = T / C chunks, [B, H, N * K, V] in st.dtype.

  With store_states, or blocks.fused_forward off: a walk over the chunks writing their states (one program
  per (batch, head, V tile)), then every chunk's output independently (one per (batch, head, chunk)).
  Otherwise one fused walk that keeps the state in registers and writes only o.
  """
  bsz, t, h, dk = q.shape
  dv, bv, c = v.shape[3], blocks.block_v, st.chunk
  b_full = _decay_spec(b)
  o_shape = jax.ShapeDtypeStruct(v.shape, st.dtype)
  final = (jax.ShapeDtypeStruct(initial_state.shape, f32), _state_spec(dk, bv))
  if blocks.fused_forward and not store_states:
    return _call(
        functools.partial(_forward_kernel, st=st), grid=(bsz, h, dv // bv),
        inputs=[(q, _seq_spec(t, dk, False)), (k, _seq_spec(t, dk, False)), (v, _seq_spec(t, bv, True)),
                (b, b_full), (initial_state, _state_spec(dk, bv))],
        outputs=[(o_shape, _seq_spec(t, bv, True)), final],
        st=st, blocks=blocks, interpret=interpret, name="linear_attention_forward",
    )
  n_rows = t // c * dk
  states, final_state = _call(
      functools.partial(_states_kernel, st=st), grid=(bsz, h, dv // bv),
      inputs=[(k, _seq_spec(t, dk, False)), (v, _seq_spec(t, bv, True)), (b, b_full),
              (initial_state, _state_spec(dk, bv))],
      outputs=[(jax.ShapeDtypeStruct((bsz, h, n_rows, dv), st.dtype), _state_spec(n_rows, bv)), final],
      st=st, blocks=blocks, interpret=interpret, name="linear_attention_states",
  )
  chunk_spec, b_spec, state_spec = _chunk_specs(b, c, dk, dv)
  (o,) = _call(
      functools.partial(_output_kernel, st=st), grid=(bsz, h, t // c),
      inputs=[(q, chunk_spec(dk)), (k, chunk_spec(dk)), (v, chunk_spec(dv)), (b, b_spec), (states, state_spec)],
      outputs=[(o_shape, chunk_spec(dv))],
      st=st, blocks=blocks, interpret=interpret, name="linear_attention_output", num_warps=blocks.num_warps_chunk,
  )
  return (o, final_state, states) if store_states else (o, final_state)


def _chunk_specs(b, c, dk, dv):
  """BlockSpecs of the chunk-parallel kernels (grid (B, H, N)): one chunk of [B, T, H, X] by width, of the
  decay, and one chunk's state of [B, H, N * K, V]."""
  chunk_spec = lambda width: pl.BlockSpec((None, c, None, width), lambda bi, hi, i: (bi, i, hi, 0))
  if b is None:
    b_spec = None
  elif b.ndim == 3:
    b_spec = pl.BlockSpec((None, c, None), lambda bi, hi, i: (bi, i, hi))
  else:
    b_spec = chunk_spec(dk)
  return chunk_spec, b_spec, pl.BlockSpec((None, None, dk, dv), lambda bi, hi, i: (bi, hi, i, 0))


def backward(q, k, v, b, states, do, dfinal, *, st: Static, blocks: BlockSizes, interpret: bool):
  """Gradients of `forward` from its stored states and the cotangents do [B, T, H, V], dfinal fp32 [B, H, K, V].

  Two passes: the gradient of every chunk's outgoing state, walking the chunks in reverse (one program per
  (batch, head, V tile)), then dq, dk, dv of each chunk independently (one program per (batch, head, chunk)).
  Returns (dq, dk [B, T, H, K], dv [B, T, H, V], d initial_state fp32 [B, H, K, V]); dq and dk are fp32 when
  there is a decay (its gradient is formed from them), else st.dtype, as is dv.
  """
  bsz, t, h, dk = q.shape
  dv, bv, c = v.shape[3], blocks.block_v, st.chunk
  n_rows = t // c * dk
  dstates, dinitial = _call(
      functools.partial(_dstate_kernel, st=st), grid=(bsz, h, dv // bv),
      inputs=[(q, _seq_spec(t, dk, False)), (do, _seq_spec(t, bv, True)),
              (b, _decay_spec(b)), (dfinal, _state_spec(dk, bv))],
      outputs=[(jax.ShapeDtypeStruct((bsz, h, n_rows, dv), st.dtype), _state_spec(n_rows, bv)),
               (jax.ShapeDtypeStruct(dfinal.shape, f32), _state_spec(dk, bv))],
      st=st, blocks=blocks, interpret=interpret, name="linear_attention_dstates",
  )
  chunk_spec, b_spec, state_spec = _chunk_specs(b, c, dk, dv)
  grad_dtype = st.dtype if b is None else f32
  dq, dk_, dv_ = _call(
      functools.partial(_grads_kernel, st=st), grid=(bsz, h, t // c),
      inputs=[(q, chunk_spec(dk)), (k, chunk_spec(dk)), (v, chunk_spec(dv)), (do, chunk_spec(dv)), (b, b_spec),
              (states, state_spec), (dstates, state_spec)],
      outputs=[(jax.ShapeDtypeStruct(q.shape, grad_dtype), chunk_spec(dk)),
               (jax.ShapeDtypeStruct(k.shape, grad_dtype), chunk_spec(dk)),
               (jax.ShapeDtypeStruct(v.shape, st.dtype), chunk_spec(dv))],
      st=st, blocks=blocks, interpret=interpret, name="linear_attention_grads", num_warps=blocks.num_warps_chunk,
  )
  return dq, dk_, dv_, dinitial


def decay_gradient(q, k, dq, dk, final_state, dfinal, per_head: bool):
  """Gradient of the raw log decay g [B, T, H] (per_head) or [B, T, H, K] from the other gradients.

  With G_t = sum_{j <= t} g_j, every term of o and of the final state carries e^(G_t - G_s) (query t,
  key s) or, for the final state, e^(G_T - G_s): so dL/dG_t = q_t . dq_t - k_t . dk_t, plus
  sum_V(dfinal * final) at the last token, and dL/dg_j = sum_{t >= j} dL/dG_t. Inputs q/k/dq/dk
  [B, T, H, K] (dq/dk fp32), final_state/dfinal [B, H, K, V] -> fp32.
  """
  d_cum = q.astype(f32) * dq - k.astype(f32) * dk
  at_end = jnp.sum(final_state * dfinal, axis=-1)  # [B, H, K]
  if per_head:
    d_cum, at_end = jnp.sum(d_cum, axis=-1), jnp.sum(at_end, axis=-1)
  return lax.cumsum(d_cum, axis=1, reverse=True) + at_end[:, None]
