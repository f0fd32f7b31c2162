"""Pure-jnp linear attention: a chunked scan for use, and a token-by-token loop as the test oracle.

Recurrence, per batch row and head (state S [K, V], fp32):
  S_t = diag(a_t) S_{t-1} + k_t v_t^T,    a_t = exp(decay_t)   (decay_t <= 0, log space)
  o_t = q_t^T S_t

Shapes: q/k [B, T, H, K], v [B, T, H, V], decay [B, T, H] (one rate per head) or [B, T, H, K] (one
per key channel) or None (a_t = 1), state [B, H, K, V]. Arguments are assumed valid; `api.py` checks them.

Stability: decays only ever enter as exp of a sum of log decays over a span (s, t] with s <= t, which
is <= 0, so strong decays underflow to zero instead of overflowing. The tempting factorisation
exp(g_t - g_s) = exp(g_t) * exp(-g_s) is avoided because exp(-g_s) overflows after a few strong steps.
"""

import jax
import jax.numpy as jnp

f32 = jnp.float32
# The oracle must not depend on the platform's default matmul precision (TF32 on recent GPUs).
_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=_HIGHEST, preferred_element_type=f32)


def _log_decay(decay: jax.Array | None, like: jax.Array) -> jax.Array:
  """Log decay as fp32 [..., 1] (per head) or [..., K] (per channel); zeros (no decay) when None.

  `like` is q or k, [..., K]; decay is [...] or [..., K].
  """
  if decay is None:
    return jnp.zeros((*like.shape[:-1], 1), f32)
  decay = decay.astype(f32)
  return decay[..., None] if decay.ndim == like.ndim - 1 else decay


def linear_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    decay: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One token: q/k [B, H, K], v [B, H, V], state [B, H, K, V], decay None | [B, H] | [B, H, K].

  Returns (o [B, H, V] in v.dtype, new state [B, H, K, V] fp32).
  """
  a = jnp.exp(_log_decay(decay, k))[..., None]  # [B, H, 1 or K, 1]
  kv = k.astype(f32)[..., :, None] * v.astype(f32)[..., None, :]
  state = a * state.astype(f32) + kv
  o = _einsum("bhk,bhkv->bhv", q.astype(f32), state)
  return o.astype(v.dtype), state


def linear_attention_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The recurrence one token at a time (the test oracle): returns (o [B, T, H, V] in v.dtype, final state)."""
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  state = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
  log_a = _log_decay(decay, k)

  def step(state, inputs):
    q_t, k_t, v_t, log_a_t = inputs
    o_t, state = linear_attention_step(q_t, k_t, v_t, state, decay=log_a_t)
    return state, o_t.astype(f32)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, log_a))))
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def _span_log_decay(log_a: jax.Array) -> jax.Array:
  """log_a [..., C, Kd] -> [..., C(t), C(s), Kd]: sum of log_a over (s, t] for s <= t, -inf for s > t.

  Summing each span directly (a cumulative sum over t of the terms with index > s) instead of
  subtracting two running totals keeps full precision when the totals grow large under strong decay.
  """
  c = log_a.shape[-2]
  after_s = jnp.tril(jnp.ones((c, c), bool), -1)  # [j, s]: j > s
  terms = jnp.where(after_s[:, :, None], log_a[..., :, None, :], 0.0)
  spans = jnp.cumsum(terms, axis=-3)
  causal = jnp.tril(jnp.ones((c, c), bool))
  return jnp.where(causal[:, :, None], spans, -jnp.inf)


def linear_attention_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Chunked form: quadratic inside each chunk of C = chunk_size tokens, a recurrent state across chunks.

  Returns (o [B, T, H, V] in v.dtype, final state [B, H, K, V] fp32). Any T: the sequence is padded
  to a multiple of C with k = v = 0 and decay 0, steps that leave the state unchanged.
  Memory is O(B * T * H * (K + V) + B * T * H * C * Kd) with Kd = K for per-channel decay and 1 otherwise,
  plus the state at each chunk boundary, O(B * H * K * V * T / C).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  n = -(-t // c)
  out_dtype = v.dtype
  log_a = _log_decay(decay, k)
  state = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)

  def chunks(x):  # [B, T, H, X] -> [B, H, N, C, X] in fp32, zero-padded to N * C tokens
    x = jnp.pad(x.astype(f32), ((0, 0), (0, n * c - t), (0, 0), (0, 0)))
    return x.reshape(b, n, c, h, x.shape[-1]).transpose(0, 3, 1, 2, 4)

  q, k, v, log_a = chunks(q), chunks(k), chunks(v), chunks(log_a)
  causal = jnp.tril(jnp.ones((c, c), bool))

  # Within a chunk: o_t = sum_{s <= t} (q_t . (a_{s+1..t} * k_s)) v_s.
  if decay is None:
    # No decay: plain causal scores. Building the decay spans from constant zeros instead would leave XLA
    # constant-folding [B, H, N, C, C] arrays at compile time (minutes at T = 4K on a GPU).
    scores = jnp.where(causal, _einsum("bhntk,bhnsk->bhnts", q, k), 0.0)
  else:
    span = jnp.exp(_span_log_decay(log_a))  # [B, H, N, C, C, Kd]
    if log_a.shape[-1] == 1:
      scores = _einsum("bhntk,bhnsk->bhnts", q, k) * span[..., 0]
    else:
      scores = _einsum("bhntk,bhnsk,bhntsk->bhnts", q, k, span)
  o = _einsum("bhnts,bhnsv->bhntv", scores, v)

  # Across chunks: the state entering each chunk, decayed to each query, read by q.
  if decay is None:
    chunk_kv = _einsum("bhnsk,bhnsv->bhnkv", k, v)  # [B, H, N, K, V]
    chunk_a = jnp.ones((b, h, n, 1, 1), f32)
    q_read = q
  else:
    from_start = jnp.cumsum(log_a, axis=-2)  # log decay from the chunk start through t (inclusive)
    # Log decay after s to the chunk end: a reverse cumulative sum shifted by one, not total - from_start.
    to_end = jnp.flip(jnp.cumsum(jnp.flip(log_a, axis=-2), axis=-2), axis=-2)
    to_end = jnp.concatenate([to_end[..., 1:, :], jnp.zeros_like(to_end[..., :1, :])], axis=-2)
    chunk_kv = _einsum("bhnsk,bhnsv->bhnkv", k * jnp.exp(to_end), v)  # [B, H, N, K, V]
    chunk_a = jnp.exp(from_start[..., -1, :])[..., None]  # [B, H, N, Kd, 1]
    q_read = q * jnp.exp(from_start)

  def carry_state(state, inputs):
    a, kv = inputs
    return a * state + kv, state

  state, entering = jax.lax.scan(carry_state, state, (jnp.moveaxis(chunk_a, 2, 0), jnp.moveaxis(chunk_kv, 2, 0)))
  entering = jnp.moveaxis(entering, 0, 2)  # [B, H, N, K, V]
  o = o + _einsum("bhntk,bhnkv->bhntv", q_read, entering)

  o = o.transpose(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
  return o.astype(out_dtype), state
