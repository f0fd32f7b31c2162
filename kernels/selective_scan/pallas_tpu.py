"""Mamba-1 selective scan as Pallas kernels for TPUs (Mosaic TPU lowering), interpretable on CPU.

One grid step per (batch row, block of bd channels, chunk of C tokens); the chunk axis is last and "arbitrary"
(walked in order on one core), the others "parallel". The fp32 state of the block, [N, bd] with the channels
on the 128 lanes and the state index on sublanes, lives in a VMEM scratch buffer carried from one chunk's
step to the next; nothing of size [B, L, Dm, N] ever reaches HBM. Per chunk the elementwise work (softplus,
delta * x, the D skip and the silu gate) is done on whole [C, bd] tiles; only the recurrence itself steps
token by token, reading its rows from VMEM.

Layout: x/dt/z stay [B, L, Dm] (blocks [C, bd]); the small operands are transposed by the caller so that
every block's last two dims are (8, 128)-aligned or full: A as [N, Dm], B/C as [B, G, L, N], states as
[B, N, Dm]. B_t arrives as a [1, N] row and is turned into the [N, 1] column the state update broadcasts
with an identity mask and a reduction (Mosaic lowers transposes only for aligned 2-D tiles).

Backward: the forward (when differentiated) writes the state entering every chunk, [B, L / C, N, Dm] fp32.
The backward walks the chunks in reverse carrying dh [N, bd] in VMEM; each step recomputes the chunk's C + 1
states from its checkpoint into a [C + 1, N, bd] VMEM scratch, then runs the reverse recurrence (formulas in
`pallas_gpu`). dB/dC are sums over channels, so each channel block writes a partial sum [B, Dm / bd, L, N]
that a jnp sum finishes; dA, dD and d(dt_bias) accumulate in VMEM over the chunks and are summed over the
batch the same way.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32
LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the TPU kernels. VMEM per backward step is about (chunk + 1) * N * block_d fp32 recomputed states:
  1 MiB at the defaults with N = 16, well inside the default scoped VMEM limit."""

  # Channels per grid step: a multiple of 128 lanes dividing Dm / G (or all of Dm when G = 1 and Dm is not a
  # multiple of 128). The recurrence is elementwise over [N, block_d], so wider blocks amortise each step.
  block_d: int = 256
  # Tokens per grid step (a multiple of 8) and the interval between the backward's checkpoints.
  chunk: int = 64

  def fitted(self, dm: int, channels_per_group: int, length: int) -> "BlockSizes":
    """Validates; shrinks block_d to divide Dm / G (all of Dm when Dm / G is not a multiple of 128, which
    `unsupported` allows only for G = 1) and clamps the chunk to L rounded up to 16 (whole bf16 tiles)."""
    if not isinstance(self.chunk, int) or self.chunk < 8 or self.chunk % 8:
      raise ValueError(f"block_sizes.chunk={self.chunk!r} is not valid; it must be a positive multiple of 8")
    if not isinstance(self.block_d, int) or self.block_d < LANES or self.block_d % LANES:
      raise ValueError(f"block_sizes.block_d={self.block_d!r} is not valid; it must be a multiple of {LANES}")
    block_d = math.gcd(self.block_d, channels_per_group) if channels_per_group % LANES == 0 else dm
    return dataclasses.replace(self, block_d=block_d, chunk=min(self.chunk, -(-length // 16) * 16))


def unsupported(dm: int, groups: int) -> str | None:
  """Why the kernels cannot take Dm channels in G groups, or None."""
  if groups > 1 and (dm // groups) % LANES:
    return (f"the TPU kernels need Dm / G to be a multiple of {LANES} with grouped B/C (one group per channel "
            f"block); got Dm={dm}, G={groups}")
  return None


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on."""

  length: int  # L before padding to whole chunks
  chunk: int
  block_d: int
  channels_per_group: int
  dt_softplus: bool
  has_d: bool
  has_z: bool
  has_bias: bool
  has_initial_state: bool


def _softplus(u):
  # The overflow-free form jax.nn.softplus uses: max(u, 0) + log1p(exp(-|u|)).
  return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


def _sigmoid(u):
  return 1.0 / (1.0 + jnp.exp(-u))


def _eye(n):
  return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _row_to_col(row):
  """[1, n] -> [n, 1] through an identity mask (no transpose)."""
  return jnp.sum(jnp.where(_eye(row.shape[1]), row, 0.0), axis=1, keepdims=True)


def _col_to_row(col):
  """[n, 1] -> [1, n] through an identity mask (no transpose)."""
  return jnp.sum(jnp.where(_eye(col.shape[0]), col, 0.0), axis=0, keepdims=True)


def _row(ref, t):
  """Row t of a [C, X] ref as a [1, X] fp32 array."""
  return ref[pl.ds(t, 1), :].astype(f32)


def _named(refs, names):
  named = dict(zip(names, refs, strict=True))
  return lambda name: named.get(name)


def _input_names(st: Static) -> list[str]:
  names = ["x", "dt", "a", "b", "c"] + ["d"] * st.has_d + ["z"] * st.has_z + ["bias"] * st.has_bias
  return names + ["h0"] * st.has_initial_state


def _discretize(r, st: Static, chunk_index):
  """u = dt + dt_bias and delta [C, bd] fp32 of this chunk; delta is 0 on the padding past L, where the
  state then passes through unchanged (padded dt would otherwise give delta = softplus(dt_bias))."""
  u = r("dt")[...].astype(f32)
  if st.has_bias:
    u = u + r("bias")[...].astype(f32)
  delta = _softplus(u) if st.dt_softplus else u
  token = chunk_index * st.chunk + lax.broadcasted_iota(jnp.int32, u.shape, 0)
  valid = token < st.length
  return u, jnp.where(valid, delta, 0.0), valid


def _step(a, h, delta_t, inject_t, b_col):
  """h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t on [N, bd]; returns (h_t, exp(delta_t A))."""
  decay = jnp.exp(delta_t * a)
  return decay * h + inject_t * b_col, decay


def _forward_kernel(*refs, st: Static, save_states: bool):
  names = _input_names(st) + ["y", "h_final"] + ["states"] * save_states + ["h", "delta", "inject", "p"]
  r = _named(refs, names)
  i, n = pl.program_id(2), pl.num_programs(2)

  @pl.when(i == 0)
  def _():
    r("h")[...] = r("h0")[...].astype(f32) if st.has_initial_state else jnp.zeros(r("h").shape, f32)

  h = r("h")[...]
  if save_states:
    r("states")[...] = h
  x = r("x")[...].astype(f32)
  _, delta, _ = _discretize(r, st, i)
  r("delta")[...] = delta
  r("inject")[...] = delta * x
  a = r("a")[...].astype(f32)

  def token(t, h):
    h, _ = _step(a, h, _row(r("delta"), t), _row(r("inject"), t), _row_to_col(_row(r("b"), t)))
    r("p")[pl.ds(t, 1), :] = jnp.sum(_row_to_col(_row(r("c"), t)) * h, axis=0, keepdims=True)
    return h

  h = lax.fori_loop(0, st.chunk, token, h)
  r("h")[...] = h
  y = r("p")[...]
  if st.has_d:
    y = y + r("d")[...].astype(f32) * x
  if st.has_z:
    z = r("z")[...].astype(f32)
    y = y * (z * _sigmoid(z))
  r("y")[...] = y.astype(r("y").dtype)

  @pl.when(i == n - 1)
  def _():
    r("h_final")[...] = h


def _backward_kernel(*refs, st: Static):
  names = _input_names(st) + ["states", "dy", "dh_final"]
  names += ["dx", "ddt"] + ["dz"] * st.has_z + ["da", "db", "dc"] + ["dd"] * st.has_d + ["dbias"] * st.has_bias
  names += ["dh0"] * st.has_initial_state
  names += ["dh", "da_acc", "dd_acc", "dbias_acc", "hs", "delta", "inject", "dp", "p", "ddelta", "dx_state"]
  r = _named(refs, names)
  j, n = pl.program_id(2), pl.num_programs(2)
  chunk_index = n - 1 - j  # the index maps walk the chunks in reverse

  @pl.when(j == 0)
  def _():
    r("dh")[...] = r("dh_final")[...]
    for name in ("da_acc", "dd_acc", "dbias_acc"):
      r(name)[...] = jnp.zeros(r(name).shape, f32)

  x = r("x")[...].astype(f32)
  dy = r("dy")[...].astype(f32)
  u, delta, valid = _discretize(r, st, chunk_index)
  r("delta")[...] = delta
  r("inject")[...] = delta * x
  z = r("z")[...].astype(f32) if st.has_z else None
  dp = dy * (z * _sigmoid(z)) if st.has_z else dy  # gradient of C_t . h_t + D x_t
  r("dp")[...] = dp
  a = r("a")[...].astype(f32)

  # The chunk's states from its checkpoint: hs[t] is the state before token t, hs[C] the state after the chunk.
  r("hs")[0] = r("states")[...]

  def recompute(t, h):
    h, _ = _step(a, h, _row(r("delta"), t), _row(r("inject"), t), _row_to_col(_row(r("b"), t)))
    r("hs")[t + 1] = h
    if st.has_z:
      r("p")[pl.ds(t, 1), :] = jnp.sum(_row_to_col(_row(r("c"), t)) * h, axis=0, keepdims=True)
    return h

  lax.fori_loop(0, st.chunk, recompute, r("hs")[0])

  def reverse(k, carry):
    dh, da = carry
    t = st.chunk - 1 - k
    delta_t, inject_t, dp_t = _row(r("delta"), t), _row(r("inject"), t), _row(r("dp"), t)
    b_col, c_col = _row_to_col(_row(r("b"), t)), _row_to_col(_row(r("c"), t))
    h_prev, h_t = r("hs")[t], r("hs")[t + 1]
    dh = dh + c_col * dp_t
    decay = jnp.exp(delta_t * a)
    decayed = decay * h_prev
    da = da + dh * decayed * delta_t
    x_t = _row(r("x"), t)
    r("ddelta")[pl.ds(t, 1), :] = jnp.sum(dh * (decayed * a + b_col * x_t), axis=0, keepdims=True)
    r("dx_state")[pl.ds(t, 1), :] = delta_t * jnp.sum(dh * b_col, axis=0, keepdims=True)
    r("db")[pl.ds(t, 1), :] = _col_to_row(jnp.sum(dh * inject_t, axis=1, keepdims=True))
    r("dc")[pl.ds(t, 1), :] = _col_to_row(jnp.sum(dp_t * h_t, axis=1, keepdims=True))
    return dh * decay, da

  dh, da = lax.fori_loop(0, st.chunk, reverse, (r("dh")[...], r("da_acc")[...]))
  r("dh")[...] = dh
  r("da_acc")[...] = da

  dx = r("dx_state")[...]
  if st.has_d:
    d_skip = r("d")[...].astype(f32)
    dx = dx + d_skip * dp
    r("dd_acc")[...] += jnp.sum(dp * x, axis=0, keepdims=True)
  r("dx")[...] = dx.astype(r("dx").dtype)
  ddelta = r("ddelta")[...]
  du = jnp.where(valid, ddelta * _sigmoid(u) if st.dt_softplus else ddelta, 0.0)
  r("ddt")[...] = du.astype(r("ddt").dtype)
  if st.has_bias:
    r("dbias_acc")[...] += jnp.sum(du, axis=0, keepdims=True)
  if st.has_z:
    out = r("p")[...]
    if st.has_d:
      out = out + d_skip * x
    sig = _sigmoid(z)
    r("dz")[...] = (dy * out * sig * (1.0 + z * (1.0 - sig))).astype(r("dz").dtype)

  @pl.when(j == n - 1)
  def _():
    r("da")[...] = r("da_acc")[...]
    if st.has_d:
      r("dd")[...] = r("dd_acc")[...]
    if st.has_bias:
      r("dbias")[...] = r("dbias_acc")[...]
    if st.has_initial_state:
      r("dh0")[...] = dh


class _Specs:
  """BlockSpecs on the grid (B, Dm / bd, chunks); `reverse` walks the chunk axis from the end."""

  def __init__(self, st: Static, num_chunks: int, n: int, reverse: bool):
    c, bd, per_group = st.chunk, st.block_d, st.channels_per_group
    chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
    self.seq = pl.BlockSpec((None, c, bd), lambda b, j, i: (b, chunk(i), j))  # of [B, L, Dm]
    # The block's group is its first channel's (bd divides Dm / G, or G = 1).
    self.bc = pl.BlockSpec((None, None, c, n), lambda b, j, i: (b, j * bd // per_group, chunk(i), 0))  # [B, G, L, N]
    self.a = pl.BlockSpec((n, bd), lambda b, j, i: (0, j))  # of [N, Dm]
    self.channel = pl.BlockSpec((1, bd), lambda b, j, i: (0, j))  # of [1, Dm]
    self.state = pl.BlockSpec((None, n, bd), lambda b, j, i: (b, 0, j))  # of [B, N, Dm]
    self.states = pl.BlockSpec((None, None, n, bd), lambda b, j, i: (b, chunk(i), 0, j))  # of [B, L / C, N, Dm]
    self.partial_bc = pl.BlockSpec((None, None, c, n), lambda b, j, i: (b, j, chunk(i), 0))  # [B, Dm / bd, L, N]
    self.per_batch_channel = pl.BlockSpec((None, 1, bd), lambda b, j, i: (b, 0, j))  # of [B, 1, Dm]

  def inputs(self, st: Static) -> list[pl.BlockSpec]:
    specs = [self.seq, self.seq, self.a, self.bc, self.bc]
    specs += [self.channel] * st.has_d + [self.seq] * st.has_z + [self.channel] * st.has_bias
    return specs + [self.state] * st.has_initial_state


def _call(kernel, grid, inputs, in_specs, outputs, scratch, interpret):
  """pallas_call with the chunk axis (last) sequential; outputs are (ShapeDtypeStruct, BlockSpec) pairs."""
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[spec for _, spec in outputs],
      out_shape=[shape for shape, _ in outputs],
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*inputs)


def _present(*arrays):
  return [a for a in arrays if a is not None]


def forward(x, dt, a, b, c, d, z, dt_bias, h0, *, st: Static, save_states: bool, interpret: bool):
  """x/dt/z [B, L, Dm] (L a multiple of the chunk), a [N, Dm], b/c [B, G, L, N], d/dt_bias [1, Dm],
  h0 [B, N, Dm] (absent ones None) -> y [B, L, Dm] in x.dtype, final state [B, N, Dm] fp32 and, when
  save_states, the chunk-start states [B, L / C, N, Dm] fp32 (else None).
  """
  batch, length, dm = x.shape
  n = a.shape[0]
  num_chunks, bd, ch = length // st.chunk, st.block_d, st.chunk
  specs = _Specs(st, num_chunks, n, reverse=False)
  outputs = [(jax.ShapeDtypeStruct(x.shape, x.dtype), specs.seq), (jax.ShapeDtypeStruct((batch, n, dm), f32),
                                                                    specs.state)]
  if save_states:
    outputs.append((jax.ShapeDtypeStruct((batch, num_chunks, n, dm), f32), specs.states))
  scratch = [pltpu.VMEM((n, bd), f32)] + [pltpu.VMEM((ch, bd), f32)] * 3
  outs = _call(functools.partial(_forward_kernel, st=st, save_states=save_states), (batch, dm // bd, num_chunks),
               _present(x, dt, a, b, c, d, z, dt_bias, h0), specs.inputs(st), outputs, scratch, interpret)
  return outs[0], outs[1], (outs[2] if save_states else None)


def backward(x, dt, a, b, c, d, z, dt_bias, h0, states, dy, dh_final, *, st: Static, interpret: bool):
  """Gradients of every input of `forward` (same layouts) given dy [B, L, Dm] and dh_final [B, N, Dm] fp32.

  Returns (dx, ddt, da [N, Dm], db, dc [B, G, L, N], dd [1, Dm], dz, ddt_bias [1, Dm], dh0 [B, N, Dm]) in the
  primal dtypes, None for absent inputs.
  """
  batch, length, dm = x.shape
  groups, n = b.shape[1], a.shape[0]
  num_chunks, bd, ch = length // st.chunk, st.block_d, st.chunk
  num_blocks = dm // bd
  specs = _Specs(st, num_chunks, n, reverse=True)
  seq_like = lambda like: (jax.ShapeDtypeStruct(x.shape, like.dtype), specs.seq)
  partial_bc = (jax.ShapeDtypeStruct((batch, num_blocks, length, n), f32), specs.partial_bc)
  per_batch_channel = (jax.ShapeDtypeStruct((batch, 1, dm), f32), specs.per_batch_channel)
  outputs = [seq_like(x), seq_like(dt)] + ([seq_like(z)] if st.has_z else [])
  outputs += [(jax.ShapeDtypeStruct((batch, n, dm), f32), specs.state), partial_bc, partial_bc]
  outputs += [per_batch_channel] * st.has_d + [per_batch_channel] * st.has_bias
  outputs += [(jax.ShapeDtypeStruct((batch, n, dm), f32), specs.state)] * st.has_initial_state
  scratch = [pltpu.VMEM((n, bd), f32)] * 2 + [pltpu.VMEM((1, bd), f32)] * 2 + [pltpu.VMEM((ch + 1, n, bd), f32)]
  scratch += [pltpu.VMEM((ch, bd), f32)] * 6
  outs = iter(_call(
      functools.partial(_backward_kernel, st=st), (batch, num_blocks, num_chunks),
      _present(x, dt, a, b, c, d, z, dt_bias, h0) + [states, dy, dh_final.astype(f32)],
      specs.inputs(st) + [specs.states, specs.seq, specs.state], outputs, scratch, interpret))
  dx, ddt = next(outs), next(outs)
  dz = next(outs) if st.has_z else None
  da, db_part, dc_part = next(outs), next(outs), next(outs)
  dd = next(outs) if st.has_d else None
  dbias = next(outs) if st.has_bias else None
  dh0 = next(outs) if st.has_initial_state else None
  # Each group's B/C rows were read by the Dm / G / bd blocks of that group; their partial sums add up here.
  group_sum = lambda part, like: part.reshape(batch, groups, num_blocks // groups, length, n).sum(2).astype(
      like.dtype)
  cast = lambda grad, like: None if like is None else grad.sum(0).astype(like.dtype)
  return (dx, ddt, da.sum(0).astype(a.dtype), group_sum(db_part, b), group_sum(dc_part, c), cast(dd, d), dz,
          cast(dbias, dt_bias), None if h0 is None else dh0.astype(h0.dtype))


@dataclasses.dataclass(frozen=True)
class _Config:
  static: Static
  interpret: bool


def selective_scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, initial_state, block_sizes, interpret):
  """The TPU kernels behind `api.selective_scan(..., impl="pallas")` on a TPU backend.

  x/dt/z [B, L, Dm], A [Dm, N], B/C [B, L, N] or [B, L, G, N], D/dt_bias [Dm], initial_state [B, Dm, N]
  (optional ones None) -> (y [B, L, Dm] in x.dtype, final state [B, Dm, N] fp32), differentiable (custom VJP)
  in every array. Pads L to whole chunks (masked inside) and moves the small operands into the kernels'
  layout; raises NotImplementedError for the group layouts `unsupported` names.
  """
  batch, length, dm = x.shape
  B = B[:, :, None, :] if B.ndim == 3 else B
  C = C[:, :, None, :] if C.ndim == 3 else C
  groups = B.shape[2]
  reason = unsupported(dm, groups)
  if reason:
    raise NotImplementedError(reason)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(
        f"block_sizes={block_sizes!r} is not valid; pass a kernels.selective_scan.pallas_tpu.BlockSizes")
  blocks = (block_sizes or BlockSizes()).fitted(dm, dm // groups, length)
  padded = -(-length // blocks.chunk) * blocks.chunk
  pad_time = lambda v: v if v is None or padded == length else jnp.pad(
      v, [(0, 0), (0, padded - length)] + [(0, 0)] * (v.ndim - 2))
  as_row = lambda v: None if v is None else v.reshape(1, dm)
  st = Static(length=length, chunk=blocks.chunk, block_d=blocks.block_d, channels_per_group=dm // groups,
              dt_softplus=dt_softplus, has_d=D is not None, has_z=z is not None, has_bias=dt_bias is not None,
              has_initial_state=initial_state is not None)
  y, state = _scan(
      pad_time(x), pad_time(dt), A.T, pad_time(B).transpose(0, 2, 1, 3),
      pad_time(C).transpose(0, 2, 1, 3), as_row(D), pad_time(z), as_row(dt_bias),
      None if initial_state is None else initial_state.transpose(0, 2, 1), _Config(st, interpret),
  )
  return y[:, :length], state.transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _scan(x, dt, a, b, c, d, z, dt_bias, h0, config: _Config):
  y, state, _ = forward(x, dt, a, b, c, d, z, dt_bias, h0, st=config.static, save_states=False,
                        interpret=config.interpret)
  return y, state


def _scan_fwd(x, dt, a, b, c, d, z, dt_bias, h0, config: _Config):
  inputs = (x, dt, a, b, c, d, z, dt_bias, h0)
  y, state, states = forward(*inputs, st=config.static, save_states=True, interpret=config.interpret)
  return (y, state), (inputs, states)


def _scan_bwd(config: _Config, residuals, cotangents):
  inputs, states = residuals
  dy, dstate = cotangents
  return backward(*inputs, states, dy, dstate, st=config.static, interpret=config.interpret)


_scan.defvjp(_scan_fwd, _scan_bwd)
