"""Sequence-parallel prefix scans: linear attention (linear, Performer, RWKV) and Mamba's selective scan.

Both recurrences are linear in their state, S_t = A_t S_{t-1} + U_t, so a sequence split over N devices runs in
three phases under `jax.shard_map`:
1. each device scans its own chunk from a zero state -> local outputs and its final state S_d, and the
   chunk's total decay A_d (a product of diagonal factors, kept in log space);
2. the final states are combined across the axis: device d's incoming state is the prefix
   h_d = A_{d-1} h_{d-1} + S_{d-1}, h_0 = 0, folded locally over all-gathered (S_j, log A_j) (N is small, a
   state is [B, H, K, V] or [B, Dm, N], so this moves N states instead of the sequence);
3. each device adds what its incoming state contributes to its outputs: for linear attention in closed form,
   q_t^T diag(exp(cumulative decay)) h_d; for the selective scan by a second scan of the chunk with zero
   input and h_d as initial state (its closed form would hold a [T, Dm, N] tensor for autodiff).
Gradients come from autodiff: all_gather transposes to a reduce-scatter of the state cotangents, which is
exact and stores only the states.
"""

import functools

import jax
import jax.numpy as jnp

from efficient_attention.parallel.sharding import SequenceLayout, active_layout, shard_over_batch
from kernels.linear_attention import linear_attention as kernel_linear_attention
from kernels.selective_scan import selective_scan as kernel_selective_scan

f32 = jnp.float32


def _incoming_state(final_state, log_total, axis: str, size: int):
  """Prefix over devices: h_d = exp(log A_{d-1}) * h_{d-1} + S_{d-1}, h_0 = 0, for this device d.

  final_state: this device's S, fp32 [b, ...]; log_total: its log decay, broadcastable to final_state.
  """
  states = jax.lax.all_gather(final_state, axis)  # [N, b, ...]
  totals = jax.lax.all_gather(log_total, axis)
  here = jax.lax.axis_index(axis)
  carry = jnp.zeros_like(final_state)
  for j in range(size - 1):
    carry = jnp.where(j < here, jnp.exp(totals[j]) * carry + states[j], carry)
  return carry


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: SequenceLayout,
    *,
    decay: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> jax.Array:
  """`kernels.linear_attention` with T split over `layout.axis`, from a zero initial state.

  q/k [B, T, H, K], v [B, T, H, V], decay None | [B, T, H] | [B, T, H, K] (log, <= 0) -> o [B, T, H, V] in
  v's dtype. T must divide by the number of devices on the axis.
  """
  n = layout.size
  if q.ndim != 4 or q.shape[1] % n:
    raise ValueError(f"q.shape={tuple(q.shape)} is not valid; expected [B, T, H, K] with T divisible by {n} devices")
  spec = layout.spec(*([None] * (q.ndim - 2)))
  decay_spec = None if decay is None else layout.spec(*([None] * (decay.ndim - 2)))
  local = jax.shard_map(
      functools.partial(_local_linear_attention, axis=layout.axis, size=n, impl=impl, chunk_size=chunk_size),
      mesh=layout.mesh, in_specs=(spec, spec, spec, decay_spec), out_specs=spec, check_vma=False,
  )
  return local(q, k, v, decay)


def _local_linear_attention(q, k, v, decay, *, axis, size, impl, chunk_size):
  o, final_state = kernel_linear_attention(q, k, v, decay=decay, return_final_state=True, impl=impl,
                                           chunk_size=chunk_size)
  if decay is None:
    incoming = _incoming_state(final_state, jnp.zeros((1, 1, 1, 1), f32), axis, size)
    q_decayed = q.astype(f32)
  else:
    # Per head [b, c, H] or per key channel [b, c, H, K], broadcast over K from here on.
    cumulative = jnp.cumsum(decay.astype(f32), axis=1)
    cumulative = cumulative if decay.ndim == 4 else cumulative[..., None]
    incoming = _incoming_state(final_state, cumulative[:, -1, :, :, None], axis, size)
    # S_t = diag(exp(cumulative_t)) h + (local part), so h reaches o_t through q_t * exp(cumulative_t).
    q_decayed = q.astype(f32) * jnp.exp(cumulative)
  correction = jnp.einsum("bthk,bhkv->bthv", q_decayed, incoming, precision=jax.lax.Precision.HIGHEST)
  return (o.astype(f32) + correction).astype(o.dtype)


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    layout: SequenceLayout,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    impl: str = "auto",
    chunk_size: int = 64,
) -> jax.Array:
  """`kernels.selective_scan` with L split over `layout.axis`, from a zero initial state.

  x/dt/z [B, L, Dm], A [Dm, N], B/C [B, L, N] or [B, L, G, N], D/dt_bias [Dm] -> y [B, L, Dm] in x's dtype.
  L must divide by the number of devices on the axis.
  """
  n = layout.size
  if x.ndim != 3 or x.shape[1] % n:
    raise ValueError(f"x.shape={tuple(x.shape)} is not valid; expected [B, L, Dm] with L divisible by {n} devices")
  seq = lambda a: None if a is None else layout.spec(*([None] * (a.ndim - 2)))
  replicated = lambda a: None if a is None else jax.sharding.PartitionSpec()
  local = jax.shard_map(
      functools.partial(_local_selective_scan, axis=layout.axis, size=n, dt_softplus=dt_softplus, impl=impl,
                        chunk_size=chunk_size),
      mesh=layout.mesh,
      in_specs=(seq(x), seq(dt), replicated(A), seq(B), seq(C), replicated(D), seq(z), replicated(dt_bias)),
      out_specs=seq(x), check_vma=False,
  )
  return local(x, dt, A, B, C, D, z, dt_bias)


def _local_selective_scan(x, dt, A, B, C, D, z, dt_bias, *, axis, size, dt_softplus, impl, chunk_size):
  common = dict(A=A, B=B, C=C, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, impl=impl, chunk_size=chunk_size)
  y, final_state = kernel_selective_scan(x, dt, D=D, return_final_state=True, **common)
  delta = dt.astype(f32) + (0.0 if dt_bias is None else dt_bias.astype(f32))
  delta = jax.nn.softplus(delta) if dt_softplus else delta
  # The chunk decays state row (d, n) by exp(A[d, n] * sum_t delta_t[d]).
  log_total = jnp.sum(delta, axis=1)[..., None] * A.astype(f32)  # [b, Dm, N]
  incoming = _incoming_state(final_state, log_total, axis, size)
  # Zero input: the scan then carries only the incoming state, and y gets C_t . h_t * silu(z_t) from it.
  correction = kernel_selective_scan(jnp.zeros_like(x), dt, initial_state=incoming, **common)
  return (y.astype(f32) + correction.astype(f32)).astype(y.dtype)


def sequence_linear_attention(q, k, v, *, decay=None, impl="auto", chunk_size=64):
  """`kernels.linear_attention` from a zero state (same shapes), split over the active sequence layout if any."""
  layout = active_layout()
  if layout is None:
    scan = lambda q, k, v, decay: kernel_linear_attention(q, k, v, decay=decay, impl=impl, chunk_size=chunk_size)
    return shard_over_batch(scan, q, k, v, decay)
  return linear_attention(q, k, v, layout, decay=decay, impl=impl, chunk_size=chunk_size)


def sequence_selective_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, impl="auto",
                            chunk_size=64):
  """`kernels.selective_scan` from a zero state (same shapes), split over the active sequence layout if any."""
  layout = active_layout()
  common = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, impl=impl, chunk_size=chunk_size)
  if layout is None:
    scan = lambda x, dt, A, B, C, D, z, dt_bias: kernel_selective_scan(
        x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, impl=impl, chunk_size=chunk_size)
    return shard_over_batch(scan, x, dt, A, B, C, D, z, dt_bias, replicated=(2, 5, 7))
  return selective_scan(x, dt, A, B, C, layout, **common)
