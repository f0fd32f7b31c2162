"""Public linear-attention ops: validate arguments, pick an implementation.

Gradients come from autodiff of the reference until a Pallas kernel with its own backward lands.
"""

import jax
import jax.numpy as jnp

from kernels.linear_attention import reference

# "xla": the chunked jnp reference. "auto": the fastest available for the platform, today the reference.
IMPLEMENTATIONS = ("xla", "auto")
DEFAULT_CHUNK_SIZE = 64


def _check_floating(name: str, array: jax.Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={array.dtype} is not valid; it must be a floating-point dtype")


def _check_shape(name: str, array: jax.Array, expected: tuple[int, ...], letters: str) -> None:
  if tuple(array.shape) != tuple(expected):
    raise ValueError(f"{name}.shape={tuple(array.shape)} is not valid; expected {letters}={tuple(expected)}")


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, lead_letters: str) -> None:
  """q/k [*lead, K], v [*lead, V] with lead = [B, T, H] (sequence) or [B, H] (one step)."""
  rank = len(lead_letters.split(",")) + 1
  if q.ndim != rank:
    raise ValueError(f"q.shape={tuple(q.shape)} is not valid; expected [{lead_letters}, K]")
  _check_shape("k", k, q.shape, f"[{lead_letters}, K]")
  if v.ndim != rank or v.shape[:-1] != q.shape[:-1]:
    raise ValueError(
        f"v.shape={tuple(v.shape)} is not valid; expected [{lead_letters}, V] with "
        f"[{lead_letters}]={tuple(q.shape[:-1])}"
    )
  for name, array in (("q", q), ("k", k), ("v", v)):
    _check_floating(name, array)
  if q.dtype != k.dtype:
    raise ValueError(f"k.dtype={k.dtype} is not valid; it must match q.dtype={q.dtype}")


def _check_decay(decay: jax.Array | None, q: jax.Array, lead_letters: str) -> None:
  """decay: None, [*lead] (one log rate per head) or [*lead, K] (one per key channel)."""
  if decay is None:
    return
  if tuple(decay.shape) not in (tuple(q.shape[:-1]), tuple(q.shape)):
    raise ValueError(
        f"decay.shape={tuple(decay.shape)} is not valid; expected [{lead_letters}]={tuple(q.shape[:-1])} "
        f"or [{lead_letters}, K]={tuple(q.shape)} (log decay, <= 0)"
    )
  _check_floating("decay", decay)


def _check_state(name: str, state: jax.Array | None, expected: tuple[int, ...]) -> None:
  if state is None:
    return
  _check_shape(name, state, expected, "[B, H, K, V]")
  if state.dtype != jnp.float32:
    raise ValueError(f"{name}.dtype={state.dtype} is not valid; recurrent states are float32")


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal linear attention with an optional data-dependent decay, as a prefix scan.

  S_t = diag(exp(decay_t)) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t, starting from S_0 = initial_state.
  Feature maps, normalisers and scaling belong to the caller; this op is the scan only.

  Args:
    q, k: [B, T, H, K] (same dtype). v: [B, T, H, V].
    decay: None (no decay), [B, T, H] (one log rate per head, RetNet/GLA-style) or [B, T, H, K]
      (one per key channel, RWKV-6-style); log space, every entry <= 0.
    initial_state: optional [B, H, K, V] float32; zeros when None.
    return_final_state: also return the state after the last token, [B, H, K, V] float32.
    impl: one of IMPLEMENTATIONS.
    chunk_size: tokens per chunk of the reference; see `reference.linear_attention_chunked` for memory.

  Returns:
    o [B, T, H, V] in v.dtype, or (o, final_state) if return_final_state.
  """
  _check_qkv(q, k, v, "B, T, H")
  _check_decay(decay, q, "B, T, H")
  _check_state("initial_state", initial_state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} is not valid; it must be a positive int")
  o, state = reference.linear_attention_chunked(
      q, k, v, decay=decay, initial_state=initial_state, chunk_size=chunk_size
  )
  return (o, state) if return_final_state else o


def linear_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    decay: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `linear_attention`.

  q/k [B, H, K], v [B, H, V], state [B, H, K, V] float32, decay None | [B, H] | [B, H, K]
  -> (o [B, H, V] in v.dtype, new state [B, H, K, V] float32).
  """
  _check_qkv(q, k, v, "B, H")
  _check_decay(decay, q, "B, H")
  if state is None:
    raise ValueError("state=None is not valid; pass the [B, H, K, V] float32 state (zeros to start)")
  _check_state("state", state, (*q.shape, v.shape[-1]))
  return reference.linear_attention_step(q, k, v, state, decay=decay)
