"""Mamba-1 selective scan as Pallas kernels for GPUs (Triton lowering), interpretable on CPU.

One program per (batch row, block of Dm channels) holds its fp32 state [block_d, N] in registers and walks the
sequence in order; nothing of size [B, L, Dm, N] ever reaches HBM. The Dm channels of a block share one group of
B/C, so block_d divides Dm / G.

Time is walked in chunks of `chunk` tokens, each unrolled in Python: every token's x/dt/z/B/C row of a chunk is
loaded before the first recurrence step, so those loads (which do not depend on the state) are in flight
together and the unrolled steps leave the compiler room to overlap one token's C contraction with the next
token's update. A length that is not a multiple of the chunk ends with a shorter, statically sized tail chunk,
so no load or store is ever masked.

Backward: the forward (when differentiated) also writes the state at the start of every chunk,
[B, ceil(L / chunk), Dm, N] fp32. The backward walks the chunks in reverse; for each it recomputes the chunk's
states from that checkpoint (in registers), then runs the reverse recurrence through the chunk:

  dh_t   = dp_t C_t + exp(delta_{t+1} A) dh_{t+1}          (dh_L = cotangent of the final state)
  dp_t   = dy_t silu(z_t),   p_t = C_t . h_t
  dA    += dh_t exp(delta_t A) h_{t-1} delta_t
  ddelta = sum_n dh_t (exp(delta_t A) h_{t-1} A + B_t x_t)
  dx     = D dp_t + delta_t sum_n dh_t B_t,   dB_t = sum_d dh_t delta_t x_t,   dC_t = sum_d dp_t h_t

dB/dC are sums over channels, which live in different programs: each program writes its partial sum
[B, L, Dm / block_d, N] and a jnp sum finishes it (deterministic, no atomics). dA, dD and d(dt_bias) are
accumulated in registers over the sequence and summed over the batch the same way.

Segments (BlockSizes.segment): the single walk above has only B * Dm / block_d programs, each latency-bound
through all L tokens. With `segment` set, time is cut into S = ceil(L / segment) segments and every pass has one
program per (batch row, channel block, segment), using that the state is affine in the state it starts from:

  forward  1. each segment scans from a zero state: its end state e_s [B, S, Dm, N] and sum of delta Σ_s [B, S, Dm]
           2. (jnp, S steps) entry states h_{s+1} = exp(A Σ_s) h_s + e_s, h_0 = initial state; the last one is
              the final state
           3. each segment re-runs the single-walk forward body from its entry state: y and chunk checkpoints.
              A re-scan rather than adding C_t . (exp(A cumsum delta) h_s) to pass-1 outputs: that correction costs
              the same exp per state element as a step of the scan, and would make pass 1 compute and write a
              pre-gate y in fp32 for pass 3 to read back; this way pass 1 reads only x, dt and B.
  backward A. each segment runs the reverse recurrence from dh = 0; it needs only dy, z, C and delta (dp_t does not
              depend on the state), giving the segment's own contribution g_s to the cotangent of its entry state
           B. (jnp, S steps) cotangents k_s at each segment's exit: k_{S-1} = d(final state),
              k_s = exp(A Σ_{s+1}) k_{s+1} + g_{s+1}; d(initial state) = exp(A Σ_0) k_0 + g_0
           C. each segment runs the single-walk backward body over its chunks from k_s (recomputing states from the
              checkpoints pass 3 wrote), writing dx, ddt, dz, the dB/dC partials and per-program dA, dD, d(dt_bias)
              partials that a jnp sum finishes.
A segment is a whole number of chunks; a length that is not a multiple of the chunk puts the tail chunk in the
last segment, which a `lax.cond` on the segment index runs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters.

  block_d: channels per program (a power of two dividing Dm / G). Small, so that B * Dm / block_d programs
    fill the GPU's SMs (the scan has no parallelism along L within a program).
  chunk: tokens per unrolled chunk, and the interval between the state checkpoints the backward recomputes from.
  block_d_bwd, num_warps_bwd: the backward kernel's; None takes the forward's.
  segment: tokens per independently scanned segment (a multiple of chunk), giving B * Dm / block_d * ceil(L /
    segment) programs per pass (see the module docstring); None walks the whole sequence in one program.
  """

  block_d: int = 16
  chunk: int = 16
  num_warps: int = 4
  num_stages: int = 1
  block_d_bwd: int | None = None
  num_warps_bwd: int | None = None
  segment: int | None = None

  @classmethod
  def get_default(cls, state_size: int = 16) -> "BlockSizes":
    """At most 256 state elements [block_d, N] per program: the backward keeps a chunk's states in registers."""
    return cls(block_d=max(1, min(16, 256 // state_size)))

  @property
  def backward_block_d(self) -> int:
    return self.block_d if self.block_d_bwd is None else self.block_d_bwd

  @property
  def backward_num_warps(self) -> int:
    return self.num_warps if self.num_warps_bwd is None else self.num_warps_bwd

  def fitted(self, channels_per_group: int) -> "BlockSizes":
    """Halves block_d (forward and backward) until it divides Dm / G, so a block never spans two groups."""
    fit = lambda b: b if channels_per_group % b == 0 else fit(b // 2)
    return dataclasses.replace(self, block_d=fit(self.block_d), block_d_bwd=fit(self.backward_block_d))

  def validate(self, channels_per_group: int) -> None:
    for name in ("block_d", "block_d_bwd", "chunk", "num_warps", "num_stages", "num_warps_bwd", "segment"):
      value = getattr(self, name)
      optional = name.endswith("_bwd") or name == "segment"
      if (value is not None or not optional) and (not isinstance(value, int) or value < 1):
        raise ValueError(f"block_sizes.{name}={value!r} is not valid; it must be a positive int")
    if self.segment is not None and self.segment % self.chunk:
      raise ValueError(f"block_sizes.segment={self.segment} is not valid; it must be a multiple of "
                       f"block_sizes.chunk={self.chunk}")
    for name, value in (("block_d", self.block_d), ("block_d_bwd", self.backward_block_d)):
      if value & (value - 1) or channels_per_group % value:
        raise ValueError(f"block_sizes.{name}={value} is not valid; it must be a power of two dividing "
                         f"Dm / G = {channels_per_group}")


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialise on."""

  length: int
  chunk: int
  channels_per_group: int
  dt_softplus: bool
  has_d: bool
  has_z: bool
  has_bias: bool
  has_initial_state: bool
  segment: int | None = None

  @property
  def num_chunks(self) -> int:
    return -(-self.length // self.chunk)

  @property
  def segmented(self) -> bool:
    return self.segment is not None

  @property
  def num_segments(self) -> int:
    return -(-self.length // self.segment) if self.segmented else 1


def _softplus(u):
  # The overflow-free form jax.nn.softplus uses: max(u, 0) + log1p(exp(-|u|)).
  return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


def _sigmoid(u):
  return 1.0 / (1.0 + jnp.exp(-u))


def _chunks(static: Static):
  """(number of full chunks, tail length) of the sequence; the tail is 0 when chunk divides L."""
  return static.length // static.chunk, static.length % static.chunk


def _program_chunks(static: Static):
  """This program's tokens: (first chunk, number of full chunks, tail length, whether it runs the tail chunk).

  Without segments, the whole sequence (all static). With them, segment program_id(2)'s chunks; the count and
  the flag are traced then, and the tail chunk (when chunk does not divide L) belongs to the last segment, where
  it follows the full chunks: its index is always first + count.
  """
  full, tail = _chunks(static)
  if not static.segmented:
    return 0, full, tail, True
  per_segment = static.segment // static.chunk
  segment = pl.program_id(2)
  first = segment * per_segment
  return first, jnp.minimum(per_segment, full - first), tail, segment == static.num_segments - 1


def _run_tail(runs_tail, run, carry):
  """run(carry) where this program owns the tail chunk (always without segments), else carry unchanged."""
  if runs_tail is True:
    return run(carry)
  return lax.cond(runs_tail, run, lambda carry: carry, carry)


class _Refs:
  """Names the kernel's positional refs; the optional inputs (D, z, dt_bias, initial state) may be absent."""

  def __init__(self, refs, names):
    for name, ref in zip(names, refs, strict=True):
      setattr(self, name, ref)


def _input_names(static: Static, with_state: bool) -> list[str]:
  names = ["x", "dt", "a", "b", "c"]
  names += ["d"] * static.has_d + ["z"] * static.has_z + ["bias"] * static.has_bias
  return names + ["h0"] * with_state


def _delta(r: _Refs, static: Static, t, bias):
  """Row t of u = dt + dt_bias and of delta (softplus(u), or u) as fp32 [bd]."""
  u = r.dt[t, :].astype(f32)
  if bias is not None:
    u = u + bias
  return u, (_softplus(u) if static.dt_softplus else u)


def _load_token(r: _Refs, static: Static, t, bias, with_dy=False):
  """Row t of every per-token input as fp32: x, u (= dt + dt_bias), delta, B, C [N], z (or None), dy (or None)."""
  x = r.x[t, :].astype(f32)
  u, delta = _delta(r, static, t, bias)
  z = r.z[t, :].astype(f32) if static.has_z else None
  dy = r.dy[t, :].astype(f32) if with_dy else None
  return x, u, delta, r.b[t, :].astype(f32), r.c[t, :].astype(f32), z, dy


def _forward_kernel(*refs, static: Static, save_states: bool):
  # With segments h0 is the segment's entry state and the final state comes from the combine instead.
  with_state = static.has_initial_state or static.segmented
  names = _input_names(static, with_state) + ["y"] + ["h_final"] * (not static.segmented)
  r = _Refs(refs, names + ["states"] * save_states)
  a = r.a[...].astype(f32)  # [bd, N]
  d_skip = r.d[...].astype(f32) if static.has_d else None
  bias = r.bias[...].astype(f32) if static.has_bias else None
  h = r.h0[...].astype(f32) if with_state else jnp.zeros(a.shape, f32)

  def run_chunk(index, size, h):
    start = index * static.chunk
    if save_states:
      r.states[index] = h
    tokens = [_load_token(r, static, start + i, bias) for i in range(size)]
    for i, (x, _, delta, b, c, z, _) in enumerate(tokens):
      h = jnp.exp(delta[:, None] * a) * h + (delta * x)[:, None] * b[None, :]
      y = jnp.sum(h * c[None, :], axis=1)
      if d_skip is not None:
        y = y + d_skip * x
      if z is not None:
        y = y * (z * _sigmoid(z))
      r.y[start + i] = y.astype(r.y.dtype)
    return h

  first, count, tail, runs_tail = _program_chunks(static)
  h = lax.fori_loop(0, count, lambda k, h: run_chunk(first + k, static.chunk, h), h)
  if tail:
    h = _run_tail(runs_tail, lambda h: run_chunk(first + count, tail, h), h)
  if not static.segmented:
    r.h_final[...] = h


def _segment_end_kernel(*refs, static: Static):
  """Forward pass 1: the segment's end state from a zero entry state [bd, N], and its sum of delta [bd]."""
  r = _Refs(refs, ["x", "dt", "a", "b"] + ["bias"] * static.has_bias + ["h_end", "delta_sum"])
  a = r.a[...].astype(f32)
  bias = r.bias[...].astype(f32) if static.has_bias else None

  def run_chunk(index, size, carry):
    h, delta_sum = carry
    start = index * static.chunk
    tokens = [(r.x[start + i, :].astype(f32), _delta(r, static, start + i, bias)[1],
               r.b[start + i, :].astype(f32)) for i in range(size)]
    for x, delta, b in tokens:
      h = jnp.exp(delta[:, None] * a) * h + (delta * x)[:, None] * b[None, :]
      delta_sum = delta_sum + delta
    return h, delta_sum

  first, count, tail, runs_tail = _program_chunks(static)
  carry = (jnp.zeros(a.shape, f32), jnp.zeros(a.shape[:1], f32))
  carry = lax.fori_loop(0, count, lambda k, carry: run_chunk(first + k, static.chunk, carry), carry)
  if tail:
    carry = _run_tail(runs_tail, lambda carry: run_chunk(first + count, tail, carry), carry)
  r.h_end[...], r.delta_sum[...] = carry


def _segment_dh_kernel(*refs, static: Static):
  """Backward pass A: the segment's own contribution to the cotangent of its entry state [bd, N].

  The reverse recurrence dh_{t-1} = exp(delta_t A) (dh_t + dp_t C_t) from dh = 0 at the segment's exit; dp_t =
  dy_t silu(z_t) does not depend on the state, so no state is recomputed here.
  """
  names = ["dt", "a", "c"] + ["z"] * static.has_z + ["bias"] * static.has_bias + ["dy", "dh_local"]
  r = _Refs(refs, names)
  a = r.a[...].astype(f32)
  bias = r.bias[...].astype(f32) if static.has_bias else None

  def run_chunk(index, size, dh):
    start = index * static.chunk
    tokens = []
    for t in (start + i for i in range(size)):
      dp = r.dy[t, :].astype(f32)
      if static.has_z:
        z = r.z[t, :].astype(f32)
        dp = dp * (z * _sigmoid(z))
      tokens.append((_delta(r, static, t, bias)[1], r.c[t, :].astype(f32), dp))
    for delta, c, dp in reversed(tokens):
      dh = (dh + dp[:, None] * c[None, :]) * jnp.exp(delta[:, None] * a)
    return dh

  first, count, tail, runs_tail = _program_chunks(static)
  dh = jnp.zeros(a.shape, f32)
  if tail:
    dh = _run_tail(runs_tail, lambda dh: run_chunk(first + count, tail, dh), dh)
  r.dh_local[...] = lax.fori_loop(0, count, lambda k, dh: run_chunk(first + count - 1 - k, static.chunk, dh), dh)


def _backward_kernel(*refs, static: Static):
  # With segments dh_final is the cotangent at the segment's exit, and dA/dD/d(dt_bias) are per segment.
  names = _input_names(static, with_state=False) + ["states", "dy", "dh_final"]
  names += ["dx", "ddt"] + ["dz"] * static.has_z + ["da", "db", "dc"] + ["dd"] * static.has_d
  names += ["dbias"] * static.has_bias + ["dh0"] * (static.has_initial_state and not static.segmented)
  r = _Refs(refs, names)
  a = r.a[...].astype(f32)
  d_skip = r.d[...].astype(f32) if static.has_d else None
  bias = r.bias[...].astype(f32) if static.has_bias else None
  bd = a.shape[0]

  def run_chunk(index, size, carry):
    dh, da, dd, dbias = carry
    start = index * static.chunk
    tokens = [_load_token(r, static, start + i, bias, with_dy=True) for i in range(size)]
    # Recompute the chunk's states from its checkpoint; states[i] is the state before token i.
    states, decays = [r.states[index]], []
    for x, _, delta, b, _, _, _ in tokens:
      decays.append(jnp.exp(delta[:, None] * a))
      states.append(decays[-1] * states[-1] + (delta * x)[:, None] * b[None, :])
    for i in reversed(range(size)):
      x, u, delta, b, c, z, dy = tokens[i]
      t = start + i
      dp = dy
      if z is not None:
        sig = _sigmoid(z)
        out = jnp.sum(states[i + 1] * c[None, :], axis=1)
        if d_skip is not None:
          out = out + d_skip * x
        r.dz[t] = (dy * out * sig * (1.0 + z * (1.0 - sig))).astype(r.dz.dtype)
        dp = dy * (z * sig)
      r.dc[t] = jnp.sum(dp[:, None] * states[i + 1], axis=0)
      dh = dh + dp[:, None] * c[None, :]
      decayed = decays[i] * states[i]
      da = da + dh * decayed * delta[:, None]
      ddelta = jnp.sum(dh * (decayed * a + x[:, None] * b[None, :]), axis=1)
      r.db[t] = jnp.sum(dh * (delta * x)[:, None], axis=0)
      dx = delta * jnp.sum(dh * b[None, :], axis=1)
      if d_skip is not None:
        dx = dx + d_skip * dp
        dd = dd + dp * x
      r.dx[t] = dx.astype(r.dx.dtype)
      du = ddelta * _sigmoid(u) if static.dt_softplus else ddelta
      r.ddt[t] = du.astype(r.ddt.dtype)
      dbias = dbias + du
      dh = dh * decays[i]
    return dh, da, dd, dbias

  zeros = jnp.zeros((bd,), f32)
  carry = (r.dh_final[...].astype(f32), jnp.zeros(a.shape, f32), zeros, zeros)
  first, count, tail, runs_tail = _program_chunks(static)
  if tail:
    carry = _run_tail(runs_tail, lambda carry: run_chunk(first + count, tail, carry), carry)
  carry = lax.fori_loop(0, count, lambda k, carry: run_chunk(first + count - 1 - k, static.chunk, carry), carry)
  dh, da, dd, dbias = carry
  r.da[...] = da
  if static.has_d:
    r.dd[...] = dd
  if static.has_bias:
    r.dbias[...] = dbias
  if static.has_initial_state and not static.segmented:
    r.dh0[...] = dh


def _compiler_params(num_warps: int, num_stages: int, interpret: bool):
  return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


class _Specs:
  """BlockSpecs for a grid (batch, Dm block), or (batch, Dm block, segment) with segments; blocks of bd channels."""

  def __init__(self, static: Static, bd: int, n: int):
    self.segmented, self.num_segments = static.segmented, static.num_segments
    length, per_group, spec = static.length, static.channels_per_group, self._spec
    # Sequence blocks span all of L: a segment's program addresses its own rows inside them.
    self.seq = spec((None, length, bd), lambda b, j, s: (b, 0, j))  # x, dt, z, y, dx, ...
    # The block's group is its first channel's: j * bd // (Dm / G) (bd divides Dm / G).
    self.bc = spec((None, length, None, n), lambda b, j, s: (b, 0, j * bd // per_group, 0))
    self.a = spec((bd, n), lambda b, j, s: (j, 0))
    self.channel = spec((bd,), lambda b, j, s: (j,))
    # One per program: a state, its cotangent or a dA partial [B, Dm, N] (with segments [B, S, Dm, N]), and a
    # dD or d(dt_bias) partial or a sum of delta [B, Dm] ([B, S, Dm]).
    if self.segmented:
      self.state = spec((None, None, bd, n), lambda b, j, s: (b, s, j, 0))
      self.per_program_channel = spec((None, None, bd), lambda b, j, s: (b, s, j))
    else:
      self.state = spec((None, bd, n), lambda b, j, s: (b, j, 0))
      self.per_program_channel = spec((None, bd), lambda b, j, s: (b, j))
    self.states = spec((None, static.num_chunks, bd, n), lambda b, j, s: (b, 0, j, 0))
    self.partial_bc = spec((None, length, None, n), lambda b, j, s: (b, 0, j, 0))

  def _spec(self, block_shape, index_map) -> pl.BlockSpec:
    """index_map(b, j, s) -> block indices; without segments the grid has no segment axis and s is 0."""
    if self.segmented:
      return pl.BlockSpec(block_shape, index_map)
    return pl.BlockSpec(block_shape, lambda b, j: index_map(b, j, 0))

  def grid(self, batch: int, num_blocks: int) -> tuple[int, ...]:
    return (batch, num_blocks, self.num_segments) if self.segmented else (batch, num_blocks)

  def inputs(self, static: Static, with_state: bool) -> list[pl.BlockSpec]:
    specs = [self.seq, self.seq, self.a, self.bc, self.bc]
    specs += [self.channel] * static.has_d + [self.seq] * static.has_z + [self.channel] * static.has_bias
    return specs + [self.state] * with_state


def _present(*arrays):
  return [a for a in arrays if a is not None]


def _segment_decays(delta_sum, a):
  """exp(A * sum of delta over each segment) [B, S, Dm, N]: the segment's decay of the state it starts from."""
  return jnp.exp(delta_sum[..., None] * a.astype(f32))


def _combine_entries(h_end, delta_sum, a, h0):
  """Forward pass 2: entry states [B, S, Dm, N] and the final state [B, Dm, N] from pass 1's h_end, delta_sum."""
  time_major = lambda v: jnp.moveaxis(v, 1, 0)

  def step(h, segment):
    decay, end = segment
    return decay * h + end, h

  h = jnp.zeros(h_end.shape[:1] + h_end.shape[2:], f32) if h0 is None else h0.astype(f32)
  final, entries = lax.scan(step, h, (time_major(_segment_decays(delta_sum, a)), time_major(h_end)))
  return jnp.moveaxis(entries, 0, 1), final


def _combine_exit_cotangents(dh_local, delta_sum, a, dh_final):
  """Backward pass B: cotangents at every segment's exit [B, S, Dm, N] and of the initial state [B, Dm, N]."""
  time_major = lambda v: jnp.moveaxis(v, 1, 0)

  def step(dh, segment):
    decay, local = segment
    return decay * dh + local, dh

  dh0, exits = lax.scan(step, dh_final.astype(f32),
                        (time_major(_segment_decays(delta_sum, a)), time_major(dh_local)), reverse=True)
  return jnp.moveaxis(exits, 0, 1), dh0


def forward(x, dt, a, b, c, d, z, dt_bias, h0, *, static: Static, blocks: BlockSizes, save_states: bool,
            interpret: bool):
  """x/dt/z [B, L, Dm], a [Dm, N], b/c [B, L, G, N], d/dt_bias [Dm], h0 [B, Dm, N] (absent ones None).

  Returns y [B, L, Dm] (x.dtype), final state [B, Dm, N] fp32, and when save_states what `backward` takes as
  `saved`: (chunk-start states [B, ceil(L / chunk), Dm, N] fp32, sums of delta per segment [B, S, Dm] fp32 or
  None without segments); else None.
  """
  batch, length, dm = x.shape
  n = a.shape[1]
  bd = blocks.block_d
  specs = _Specs(static, bd, n)
  grid = specs.grid(batch, dm // bd)
  params = _compiler_params(blocks.num_warps, blocks.num_stages, interpret)
  entry, delta_sum = h0, None
  if static.segmented:
    per_segment = (batch, static.num_segments, dm)
    h_end, delta_sum = pl.pallas_call(
        functools.partial(_segment_end_kernel, static=static),
        grid=grid,
        in_specs=[specs.seq, specs.seq, specs.a, specs.bc] + [specs.channel] * static.has_bias,
        out_specs=[specs.state, specs.per_program_channel],
        out_shape=[jax.ShapeDtypeStruct((*per_segment, n), f32), jax.ShapeDtypeStruct(per_segment, f32)],
        compiler_params=params,
        interpret=interpret,
        name="selective_scan_segment_ends",
    )(*_present(x, dt, a, b, dt_bias))
    entry, h_final = _combine_entries(h_end, delta_sum, a, h0)
  out_specs = [specs.seq] + [specs.state] * (not static.segmented)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_shape += [] if static.segmented else [jax.ShapeDtypeStruct((batch, dm, n), f32)]
  if save_states:
    out_specs.append(specs.states)
    out_shape.append(jax.ShapeDtypeStruct((batch, static.num_chunks, dm, n), f32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, static=static, save_states=save_states),
      grid=grid,
      in_specs=specs.inputs(static, with_state=entry is not None),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="selective_scan_forward",
  )(*_present(x, dt, a, b, c, d, z, dt_bias, entry))
  if not static.segmented:
    h_final = outs[1]
  return outs[0], h_final, ((outs[-1], delta_sum) if save_states else None)


def backward(x, dt, a, b, c, d, z, dt_bias, h0, saved, dy, dh_final, *, static: Static, blocks: BlockSizes,
             interpret: bool):
  """Gradients of every input of `forward` given its `saved`, dy [B, L, Dm] and dh_final [B, Dm, N].

  Returns (dx, ddt, da, db, dc, dd, dz, ddt_bias, dh0) in the primal dtypes (None for absent inputs);
  db/dc [B, L, G, N].
  """
  states, delta_sum = saved
  batch, length, dm = x.shape
  groups, n = b.shape[2], b.shape[3]
  bd = blocks.backward_block_d
  num_blocks = dm // bd
  specs = _Specs(static, bd, n)
  grid = specs.grid(batch, num_blocks)
  params = _compiler_params(blocks.backward_num_warps, blocks.num_stages, interpret)
  dh_exit, dh0 = dh_final.astype(f32), None
  if static.segmented:
    dh_local = pl.pallas_call(
        functools.partial(_segment_dh_kernel, static=static),
        grid=grid,
        in_specs=[specs.seq, specs.a, specs.bc] + [specs.seq] * static.has_z + [specs.channel] * static.has_bias
        + [specs.seq],
        out_specs=specs.state,
        out_shape=jax.ShapeDtypeStruct((batch, static.num_segments, dm, n), f32),
        compiler_params=params,
        interpret=interpret,
        name="selective_scan_segment_dh",
    )(*_present(dt, a, c, z, dt_bias), dy)
    dh_exit, dh0 = _combine_exit_cotangents(dh_local, delta_sum, a, dh_final)
  per_program = (batch, static.num_segments, dm) if static.segmented else (batch, dm)
  seq_like = lambda ref: jax.ShapeDtypeStruct(x.shape, ref.dtype)
  partial_bc = jax.ShapeDtypeStruct((batch, length, num_blocks, n), f32)
  out_specs = [specs.seq, specs.seq] + [specs.seq] * static.has_z + [specs.state, specs.partial_bc,
                                                                      specs.partial_bc]
  out_shape = [seq_like(x), seq_like(dt)] + ([seq_like(z)] if static.has_z else [])
  out_shape += [jax.ShapeDtypeStruct((*per_program, n), f32), partial_bc, partial_bc]
  for present in (static.has_d, static.has_bias):
    if present:
      out_specs.append(specs.per_program_channel)
      out_shape.append(jax.ShapeDtypeStruct(per_program, f32))
  if static.has_initial_state and not static.segmented:
    out_specs.append(specs.state)
    out_shape.append(jax.ShapeDtypeStruct((batch, dm, n), f32))
  outs = iter(pl.pallas_call(
      functools.partial(_backward_kernel, static=static),
      grid=grid,
      in_specs=specs.inputs(static, with_state=False) + [specs.states, specs.seq, specs.state],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="selective_scan_backward",
  )(*_present(x, dt, a, b, c, d, z, dt_bias), states, dy, dh_exit))
  dx, ddt = next(outs), next(outs)
  dz = next(outs) if static.has_z else None
  da, db_part, dc_part = next(outs), next(outs), next(outs)
  dd = next(outs) if static.has_d else None
  dbias = next(outs) if static.has_bias else None
  if static.has_initial_state and not static.segmented:
    dh0 = next(outs)

  # Each group's B/C row was read by the Dm / G / bd blocks of that group; their partial sums add up here.
  group_sum = lambda part, like: part.reshape(batch, length, groups, num_blocks // groups, n).sum(3).astype(
      like.dtype)
  # Per-program partials: over the batch, and over the segments when there are any.
  program_sum = lambda part, like: None if like is None else part.reshape(-1, *like.shape).sum(0).astype(
      like.dtype)
  cast = lambda grad, like: None if like is None else grad.astype(like.dtype)
  return (
      dx, ddt, program_sum(da, a), group_sum(db_part, b), group_sum(dc_part, c), program_sum(dd, d), dz,
      program_sum(dbias, dt_bias), cast(dh0, h0),
  )
