"""Pure-jnp selective scan (Mamba-1): a chunked scan for use, and a token-by-token loop as the test oracle.

Recurrence, per channel d of Dm and state index n of N:
  delta_t = softplus(dt_t + dt_bias)                      (or dt_t + dt_bias without the softplus)
  h_t     = exp(delta_t A) h_{t-1} + delta_t B_t x_t      (state [B, Dm, N], fp32)
  y_t     = (C_t . h_t + D x_t) * silu(z_t)

Shapes: x/dt/z [B, L, Dm], A [Dm, N], B/C [B, L, N] or grouped [B, L, G, N] (channel d reads group
d // (Dm / G)), D/dt_bias [Dm]. Arguments are assumed valid; `api.py` checks them.
"""

import jax
import jax.numpy as jnp

f32 = jnp.float32


def discretize_dt(dt: jax.Array, dt_bias: jax.Array | None, dt_softplus: bool) -> jax.Array:
  """Step sizes delta = softplus(dt + dt_bias) in fp32, same shape as dt."""
  delta = dt.astype(f32)
  if dt_bias is not None:
    delta = delta + dt_bias.astype(f32)
  return jax.nn.softplus(delta) if dt_softplus else delta


def skip_and_gate(y: jax.Array, x: jax.Array, D: jax.Array | None, z: jax.Array | None) -> jax.Array:
  """(y + D x) * silu(z) in fp32; y/x/z [..., Dm], D [Dm]."""
  y = y.astype(f32)
  if D is not None:
    y = y + D.astype(f32) * x.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return y


def as_grouped(bc: jax.Array, token_axes: int) -> jax.Array:
  """B or C with `token_axes` leading axes ([B] or [B, L]) and an explicit group axis: [..., G, N]."""
  return bc[..., None, :] if bc.ndim == token_axes + 1 else bc


def selective_scan_step(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    state: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """One token: x/dt/z [B, Dm], B/C [B, N] or [B, G, N], state [B, Dm, N] -> (y [B, Dm] in x.dtype, state fp32)."""
  dm = x.shape[-1]
  B, C = as_grouped(B, 1), as_grouped(C, 1)
  # Each group's B/C row is shared by Dm / G consecutive channels.
  b = jnp.repeat(B.astype(f32), dm // B.shape[-2], axis=-2)
  c = jnp.repeat(C.astype(f32), dm // C.shape[-2], axis=-2)
  delta = discretize_dt(dt, dt_bias, dt_softplus)[..., None]
  state = jnp.exp(delta * A.astype(f32)) * state.astype(f32) + delta * x.astype(f32)[..., None] * b
  # Elementwise product and sum rather than a dot, so GPUs cannot drop to TF32 precision.
  y = jnp.sum(state * c, axis=-1)
  return skip_and_gate(y, x, D, z).astype(x.dtype), state


def selective_scan_naive(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The oracle: one `selective_scan_step` per token, all in fp32. Returns (y [B, L, Dm] fp32, state [B, Dm, N])."""
  batch, _, dm = x.shape
  x, dt, z = (None if a is None else a.astype(f32) for a in (x, dt, z))
  B, C = as_grouped(B, 2), as_grouped(C, 2)
  state = jnp.zeros((batch, dm, A.shape[-1]), f32) if initial_state is None else initial_state.astype(f32)

  def step(state, token):
    x_t, dt_t, b_t, c_t, z_t = token
    y_t, state = selective_scan_step(
        x_t, dt_t, A, b_t, c_t, state, D=D, z=z_t, dt_bias=dt_bias, dt_softplus=dt_softplus
    )
    return state, y_t

  time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (x, dt, B, C, z))
  state, y = jax.lax.scan(step, state, time_major)
  return jnp.moveaxis(y, 0, 1), state


def _compose(earlier, later):
  """Composes two affine state updates h -> a h + b (earlier first) for the associative scan."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def selective_scan_chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Chunked scan. Returns (y [B, L, Dm] in x.dtype, final state [B, Dm, N] fp32).

  A `lax.scan` over chunks of Q tokens carries the fp32 state; inside a chunk an associative scan
  composes the per-token affine updates, so the largest array is [B, Q, Dm, N], never [B, L, Dm, N].
  The chunk body is rematerialised in the backward pass, so autodiff keeps only the chunk-boundary
  states ([L / Q, B, Dm, N]) instead of every per-token state.
  """
  batch, length, dm = x.shape
  n = A.shape[-1]
  B, C = as_grouped(B, 2), as_grouped(C, 2)
  groups = B.shape[2]
  per_group = dm // groups
  q = min(chunk_size, length)
  num_chunks = -(-length // q)
  pad = num_chunks * q - length

  def to_chunks(a):
    """[B, L, ...] -> [L / Q, B, Q, ...], zero-padded at the end to whole chunks."""
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(batch, num_chunks, q, *a.shape[2:]), 1, 0)

  # Zero delta in the padded tail gives exp(0 * A) = 1 and delta B x = 0: the state passes through,
  # so the last chunk's final state is the state after the last real token.
  delta = discretize_dt(dt, dt_bias, dt_softplus).reshape(batch, length, groups, per_group)
  inputs = (
      to_chunks(delta),
      to_chunks(x.astype(f32).reshape(batch, length, groups, per_group)),
      to_chunks(B.astype(f32)),
      to_chunks(C.astype(f32)),
  )
  a = A.astype(f32).reshape(groups, per_group, n)
  if initial_state is None:
    state = jnp.zeros((batch, groups, per_group, n), f32)
  else:
    state = initial_state.astype(f32).reshape(batch, groups, per_group, n)

  @jax.checkpoint
  def chunk(state, chunk_inputs):
    delta_c, x_c, b_c, c_c = chunk_inputs  # [B, Q, G, P] x2, [B, Q, G, N] x2 with P = Dm / G
    decay = jnp.exp(delta_c[..., None] * a)  # [B, Q, G, P, N]
    inject = (delta_c * x_c)[..., None] * b_c[:, :, :, None, :]
    decay, inject = jax.lax.associative_scan(_compose, (decay, inject), axis=1)
    states = decay * state[:, None] + inject
    y = jnp.sum(states * c_c[:, :, :, None, :], axis=-1)  # [B, Q, G, P]
    return states[:, -1], y

  state, y = jax.lax.scan(chunk, state, inputs)
  y = jnp.moveaxis(y, 0, 1).reshape(batch, num_chunks * q, dm)[:, :length]
  return skip_and_gate(y, x, D, z).astype(x.dtype), state.reshape(batch, dm, n)
