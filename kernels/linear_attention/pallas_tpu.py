"""Linear attention (chunked prefix scan) forward and backward as Pallas kernels for TPUs (Mosaic TPU lowering).

Same chunked algebra as `pallas_gpu` (see its docstring for the formulas): inside a chunk of C tokens the work is
C x C scores, across chunks a [K, V] fp32 state. The TPU shape of it: one grid step per (batch, head, chunk),
the chunk axis last and "arbitrary" (walked in order on one core) while batch and head are "parallel" (split
across cores). The fp32 state lives in a VMEM scratch buffer that survives from one chunk's step to the next,
so the whole forward is one kernel and nothing per token but o is written; with gradients it also writes the
state entering every chunk (T / C states of K x V), the checkpoints the backward reads.

Backward: one kernel walking the chunks in reverse (the index maps reverse the chunk axis), carrying the
gradient of the state in VMEM. Each step reads its chunk's checkpoint, forms dq, dk, dv of the chunk and
moves the state gradient back over the chunk; the log-decay gradient is then a reverse cumsum outside
(`pallas_gpu.decay_gradient`).

Layout: the caller's [B, T, H, X] arrays are reshaped (free) to [B, T, H * X] with X padded to a multiple of
128, so one (batch, head, chunk) block is a [C, X] tile whose last two dims are (8, 128)-aligned: C rows
(sublanes, a multiple of 8) by X lanes. A per-head decay [B, T, H] is read as [C, H] (H is the full last dim)
and the head's column picked with a lane mask. Row <-> column moves of short vectors use an identity mask
and a reduction rather than a transpose, which Mosaic only lowers for aligned 2-D tiles.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The decay's chunk cumsum and its gradient are plain jnp on [B, T, H(, K)] arrays, shared with the GPU path.
from kernels.linear_attention.pallas_gpu import chunk_cumsum, decay_gradient

f32 = jnp.float32
LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk length (tokens per grid step) and, for per-channel decay, the K slice of its C x C x K tiles."""

  chunk: int = 128  # a multiple of 8 (16 keeps bf16 tiles whole): C x C scores per step, one state update
  block_k: int = LANES  # per-channel decay only: K lanes per C x C x block_k decay tile (a multiple of 128)

  @classmethod
  def get_default(cls, decay_kind: str) -> "BlockSizes":
    """128-token chunks fill the 128 x 128 MXU; per-channel decay builds C x C x 128 fp32 tiles in VMEM, so
    it takes 16-token chunks (128 KiB per tile)."""
    return cls(chunk=16 if decay_kind == "channel" else 128)

  def fitted(self, t: int, k: int) -> "BlockSizes":
    """Validates, then clamps the chunk to a short sequence of t tokens (rounded up to 16 rows, whole bf16
    tiles) and block_k to divide the padded K."""
    if not isinstance(self.chunk, int) or self.chunk < 8 or self.chunk % 8:
      raise ValueError(f"block_sizes.chunk={self.chunk!r} is not valid; it must be a positive multiple of 8")
    if not isinstance(self.block_k, int) or self.block_k < LANES or self.block_k % LANES:
      raise ValueError(f"block_sizes.block_k={self.block_k!r} is not valid; it must be a multiple of {LANES}")
    return dataclasses.replace(self, chunk=min(self.chunk, _round_up(t, 16)), block_k=math.gcd(self.block_k, k))


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on."""

  decay: str  # "none", "head" or "channel"
  chunk: int
  block_k: int
  heads: int
  dtype: jnp.dtype  # dot operand dtype (q, k, v are cast to it by the caller)

  @property
  def precision(self):
    # fp32 dots default to one bf16 pass on the MXU; the tests compare fp32 at 1e-5.
    return lax.Precision.HIGHEST if self.dtype == f32 else None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _mm(a, b, st: Static, contract=((1,), (0,))):
  """a @ b (default), a.T @ b or a @ b.T with operands in the input dtype and fp32 accumulation."""
  return lax.dot_general(a.astype(st.dtype), b.astype(st.dtype), (contract, ((), ())),
                         preferred_element_type=f32, precision=st.precision)


def _mm_tn(a, b, st):  # a.T @ b
  return _mm(a, b, st, ((0,), (0,)))


def _mm_nt(a, b, st):  # a @ b.T
  return _mm(a, b, st, ((1,), (1,)))


def _col_to_row(col):
  """[n, 1] -> [1, n] through an identity mask (no transpose)."""
  n = col.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _row_to_col(row):
  """[1, n] -> [n, 1] through an identity mask (no transpose)."""
  n = row.shape[1]
  eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _load_decay(b_ref, st: Static):
  """The chunk's cumulated log decay: [C, 1] (this head's column of the [C, H] block), [C, K] or None."""
  if b_ref is None:
    return None
  block = b_ref[...]
  if st.decay == "channel":
    return block
  head = lax.broadcasted_iota(jnp.int32, block.shape, 1) == pl.program_id(1)
  return jnp.sum(jnp.where(head, block, 0.0), axis=1, keepdims=True)


def _chunk_total(b):
  """b at the chunk's last token: [1, 1] (per head) or [1, K]. A masked sum, not a dynamic slice."""
  last = lax.broadcasted_iota(jnp.int32, b.shape, 0) == b.shape[0] - 1
  return jnp.sum(jnp.where(last, b, 0.0), axis=0, keepdims=True)


def _decay_state(state, b):
  """state [K, V] times e^b_tot: one factor per head, or one per key channel (row of the state)."""
  if b is None:
    return state
  total = _chunk_total(b)
  return state * jnp.exp(total if total.shape[1] == 1 else _row_to_col(total))


def _query_scale(x, b):
  """x [C, K] * e^b: the decay from the chunk start through each token."""
  return x.astype(f32) if b is None else x.astype(f32) * jnp.exp(b)


def _key_scale(x, b):
  """x [C, K] * e^(b_tot - b): the decay after each token to the chunk end."""
  return x.astype(f32) if b is None else x.astype(f32) * jnp.exp(_chunk_total(b) - b)


def _causal(shape):
  return lax.broadcasted_iota(jnp.int32, shape, 0) >= lax.broadcasted_iota(jnp.int32, shape, 1)


def _decayed(x, b):
  """x [C(t), C(s)] masked to s <= t and, with one rate per head (b [C, 1]), weighted by e^(b_t - b_s)."""
  causal = _causal(x.shape)
  if b is None:
    return jnp.where(causal, x, 0.0)
  # Masking the exponent before exp keeps the (positive) s > t entries from overflowing.
  return x * jnp.exp(jnp.where(causal, b - _col_to_row(b), -jnp.inf))


def _channel_decay(b):
  """b [C, Kb] -> [C(t), C(s), Kb]: e^(b_t - b_s) for s <= t, else 0."""
  c = b.shape[0]
  shape = (c, c, b.shape[1])
  return jnp.exp(jnp.where(_causal(shape), b[:, None, :] - b[None, :, :], -jnp.inf))


def _k_slices(width, st: Static):
  """Static lane slices of K: block_k wide for per-channel decay (its 3-D tiles), else all of K at once."""
  step = st.block_k if st.decay == "channel" else width
  return [slice(start, start + step) for start in range(0, width, step)]


def _scores(q, k, b, st: Static):
  """A [C, C] fp32: causal, decayed q k^T of one chunk (q, k [C, K])."""
  if st.decay != "channel":
    return _decayed(_mm_nt(q, k, st), b)
  scores = jnp.zeros((q.shape[0], q.shape[0]), f32)
  for cols in _k_slices(q.shape[1], st):
    scores += jnp.sum(q[:, None, cols].astype(f32) * k[None, :, cols].astype(f32) * _channel_decay(b[:, cols]),
                      axis=2)
  return scores


def _named(refs, names):
  """Kernel refs by name; absent inputs (no decay) are not passed to pallas_call and read as None."""
  named = dict(zip([n for n in names if n is not None], refs, strict=True))
  return lambda name: named.get(name)


def _forward_kernel(*refs, st: Static, store_states: bool):
  """One chunk: its output from the carried state, then the state moved over the chunk."""
  names = ["q", "k", "v", None if st.decay == "none" else "b", "s0", "o", "final"]
  names += ["states"] * store_states + ["state"]
  r = _named(refs, names)
  i, n = pl.program_id(2), pl.num_programs(2)

  @pl.when(i == 0)
  def _():
    r("state")[...] = r("s0")[...]

  state = r("state")[...]
  if store_states:
    r("states")[...] = state.astype(r("states").dtype)
  q, k, v = r("q")[...], r("k")[...], r("v")[...]
  b = _load_decay(r("b"), st)
  o = _mm(_scores(q, k, b, st), v, st) + _mm(_query_scale(q, b), state, st)
  r("o")[...] = o.astype(r("o").dtype)
  state = _decay_state(state, b) + _mm_tn(_key_scale(k, b), v, st)
  r("state")[...] = state

  @pl.when(i == n - 1)
  def _():
    r("final")[...] = state


def _backward_kernel(*refs, st: Static):
  """One chunk, walking in reverse: dq, dk, dv from its entering state S and the gradient dS of its
  outgoing state (carried), then dS moved back over the chunk."""
  names = ["q", "k", "v", None if st.decay == "none" else "b", "states", "do", "dfinal",
           "dq", "dk", "dv", "dinitial", "dstate"]
  r = _named(refs, names)
  j, n = pl.program_id(2), pl.num_programs(2)

  @pl.when(j == 0)
  def _():
    r("dstate")[...] = r("dfinal")[...]

  ds = r("dstate")[...]
  s = r("states")[...]
  q, k, v, do = r("q")[...], r("k")[...], r("v")[...], r("do")[...]
  b = _load_decay(r("b"), st)
  da = _mm_nt(do, v, st)  # dL/dA [C(t), C(s)]
  dq_inter = _query_scale(_mm_nt(do, s, st), b)
  dk_inter = _key_scale(_mm_nt(v, ds, st), b)
  if st.decay == "channel":
    for cols in _k_slices(q.shape[1], st):
      weights = da[:, :, None] * _channel_decay(b[:, cols])  # [C(t), C(s), Kb]
      dq_intra = jnp.sum(weights * k[None, :, cols].astype(f32), axis=1)
      dk_intra = jnp.sum(weights * q[:, None, cols].astype(f32), axis=0)
      r("dq")[:, cols] = (dq_inter[:, cols] + dq_intra).astype(r("dq").dtype)
      r("dk")[:, cols] = (dk_inter[:, cols] + dk_intra).astype(r("dk").dtype)
  else:
    weights = _decayed(da, b)
    r("dq")[...] = (dq_inter + _mm(weights, k, st)).astype(r("dq").dtype)
    r("dk")[...] = (dk_inter + _mm_tn(weights, q, st)).astype(r("dk").dtype)
  dv = _mm_tn(_scores(q, k, b, st), do, st) + _mm(_key_scale(k, b), ds, st)
  r("dv")[...] = dv.astype(r("dv").dtype)
  ds = _decay_state(ds, b) + _mm_tn(_query_scale(q, b), do, st)
  r("dstate")[...] = ds

  @pl.when(j == n - 1)
  def _():
    r("dinitial")[...] = ds


class _Specs:
  """BlockSpecs on the grid (B, H, N chunks); `reverse` walks the chunk axis from the end."""

  def __init__(self, st: Static, num_chunks: int, dk: int, dv: int, reverse: bool):
    c = st.chunk
    chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
    self.qk = pl.BlockSpec((None, c, dk), lambda b, h, i: (b, chunk(i), h))  # of [B, T, H * K]
    self.v = pl.BlockSpec((None, c, dv), lambda b, h, i: (b, chunk(i), h))  # of [B, T, H * V]
    self.decay = {
        "none": None,
        "head": pl.BlockSpec((None, c, st.heads), lambda b, h, i: (b, chunk(i), 0)),  # of [B, T, H]
        "channel": self.qk,
    }[st.decay]
    self.state = pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, 0, 0))  # of [B, H, K, V]
    self.states = pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, chunk(i), 0))  # of [B, H, N * K, V]


def _call(kernel, inputs, outputs, scratch, num_chunks, heads, batch, interpret):
  """pallas_call over (B, H, N) with (array or ShapeDtypeStruct, BlockSpec) pairs; absent inputs are None."""
  inputs = [(x, spec) for x, spec in inputs if x is not None]
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, num_chunks),
      in_specs=[spec for _, spec in inputs],
      out_specs=[spec for _, spec in outputs],
      out_shape=[shape for shape, _ in outputs],
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*[x for x, _ in inputs])


def forward(q, k, v, b, initial_state, *, st: Static, interpret: bool, store_states: bool = False):
  """q/k [B, T, H * K], v [B, T, H * V] (T a multiple of the chunk, K and V of 128), b the chunk-cumulated log
  decay ([B, T, H] or [B, T, H * K] fp32) or None, initial_state [B, H, K, V] fp32
  -> o [B, T, H * V] in st.dtype, final state [B, H, K, V] fp32 and, if store_states, the state entering each
  of the N = T / C chunks, [B, H, N * K, V] in st.dtype.
  """
  batch, t, _ = q.shape
  _, heads, dk, dv = initial_state.shape
  n = t // st.chunk
  specs = _Specs(st, n, dk, dv, reverse=False)
  outputs = [(jax.ShapeDtypeStruct(v.shape, st.dtype), specs.v),
             (jax.ShapeDtypeStruct(initial_state.shape, f32), specs.state)]
  if store_states:
    outputs.append((jax.ShapeDtypeStruct((batch, heads, n * dk, dv), st.dtype), specs.states))
  return _call(
      functools.partial(_forward_kernel, st=st, store_states=store_states),
      [(q, specs.qk), (k, specs.qk), (v, specs.v), (b, specs.decay), (initial_state, specs.state)],
      outputs, [pltpu.VMEM((dk, dv), f32)], n, heads, batch, interpret,
  )


def backward(q, k, v, b, states, do, dfinal, *, st: Static, interpret: bool):
  """Gradients of `forward` from its stored states and the cotangents do [B, T, H * V], dfinal [B, H, K, V].

  Returns dq, dk [B, T, H * K] (fp32 with a decay, whose gradient is formed from them, else st.dtype),
  dv [B, T, H * V] in st.dtype and d initial_state [B, H, K, V] fp32.
  """
  batch, t, _ = q.shape
  _, heads, dk, dv = dfinal.shape
  n = t // st.chunk
  specs = _Specs(st, n, dk, dv, reverse=True)
  grad_dtype = st.dtype if b is None else f32
  return _call(
      functools.partial(_backward_kernel, st=st),
      [(q, specs.qk), (k, specs.qk), (v, specs.v), (b, specs.decay), (states, specs.states), (do, specs.v),
       (dfinal, specs.state)],
      [(jax.ShapeDtypeStruct(q.shape, grad_dtype), specs.qk), (jax.ShapeDtypeStruct(k.shape, grad_dtype), specs.qk),
       (jax.ShapeDtypeStruct(v.shape, st.dtype), specs.v), (jax.ShapeDtypeStruct(dfinal.shape, f32), specs.state)],
      [pltpu.VMEM((dk, dv), f32)], n, heads, batch, interpret,
  )


def linear_attention(q, k, v, decay, initial_state, block_sizes: BlockSizes | None, *, interpret: bool):
  """The TPU kernels behind `api.linear_attention(..., impl="pallas")` on a TPU backend.

  q/k [B, T, H, K], v [B, T, H, V], decay None | [B, T, H] | [B, T, H, K] (log), initial_state [B, H, K, V] fp32
  or None -> (o [B, T, H, V] in v.dtype, final state [B, H, K, V] fp32). Differentiable (custom VJP) in every
  argument. Pads T to a multiple of the chunk and K, V to multiples of 128 lanes; the padding is exact (zero
  key/query channels add nothing to q.k, zero value channels are sliced off, padded tokens with k = v = 0 and
  decay 0 leave the state unchanged).
  """
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  k_pad, v_pad = _round_up(dk, LANES), _round_up(dv, LANES)
  kind = "none" if decay is None else ("head" if decay.ndim == 3 else "channel")
  blocks = (block_sizes or BlockSizes.get_default(kind)).fitted(t, k_pad)
  t_pad = _round_up(t, blocks.chunk)
  dtype = jnp.result_type(q.dtype, v.dtype)

  def flat(x, width):  # [B, T, H(, X)] -> [B, t_pad, H] or [B, t_pad, H * width], zeros appended
    widths = [(0, 0), (0, t_pad - t), (0, 0)] + ([(0, width - x.shape[3])] if x.ndim == 4 else [])
    x = jnp.pad(x, widths) if any(w for _, w in widths) else x
    return x if x.ndim == 3 else x.reshape(batch, t_pad, heads * width)

  if initial_state is None:
    state = jnp.zeros((batch, heads, k_pad, v_pad), f32)
  else:
    state = jnp.pad(initial_state, ((0, 0), (0, 0), (0, k_pad - dk), (0, v_pad - dv)))
  g = None if decay is None else flat(decay.astype(f32), k_pad)
  st = Static(decay=kind, chunk=blocks.chunk, block_k=blocks.block_k, heads=heads, dtype=jnp.dtype(dtype))
  o, final = _scan(flat(q.astype(dtype), k_pad), flat(k.astype(dtype), k_pad), flat(v.astype(dtype), v_pad), g,
                   state, st, interpret)
  o = o.reshape(batch, t_pad, heads, v_pad)[:, :t, :, :dv]
  return o.astype(v.dtype), final[:, :, :dk, :dv]


def _cumulated(g, st: Static):
  """The raw log decay [B, T, H] or [B, T, H * K] -> its running sum restarted at every chunk."""
  return None if g is None else chunk_cumsum(g, st.chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _scan(q, k, v, g, initial_state, st: Static, interpret: bool):
  return forward(q, k, v, _cumulated(g, st), initial_state, st=st, interpret=interpret)


def _scan_fwd(q, k, v, g, initial_state, st: Static, interpret: bool):
  b = _cumulated(g, st)
  o, final, states = forward(q, k, v, b, initial_state, st=st, interpret=interpret, store_states=True)
  return (o, final), (q, k, v, b, states, final)


def _scan_bwd(st: Static, interpret: bool, residuals, cotangents):
  q, k, v, b, states, final = residuals
  do, dfinal = cotangents
  dq, dk, dv, dinitial = backward(q, k, v, b, states, do.astype(st.dtype), dfinal, st=st, interpret=interpret)
  dg = None
  if b is not None:
    as_heads = lambda x: x.reshape(*x.shape[:2], st.heads, -1)  # [B, T, H * K] -> [B, T, H, K]
    dg = decay_gradient(as_heads(q), as_heads(k), as_heads(dq), as_heads(dk), final, dfinal,
                        per_head=st.decay == "head")
    dg = dg if st.decay == "head" else dg.reshape(b.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, dinitial


_scan.defvjp(_scan_fwd, _scan_bwd)
