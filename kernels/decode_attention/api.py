"""Public decode-attention op: validates inputs, picks an implementation, wires the custom VJP."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import backend
from kernels.decode_attention import pallas_gpu
from kernels.decode_attention.reference import decode_attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_sizes: pallas_gpu.BlockSizes | None = None,
) -> jax.Array:
  """Softmax attention of one query token per sequence over a KV cache.

  Args:
    q: [B, H, D] the new token's queries.
    k, v: [B, S, Hkv, D] the cache, H % Hkv == 0 (GQA/MQA read each kv head once for its G = H / Hkv queries).
    lengths: int [B] valid cache entries per row; row b attends keys 0 .. lengths[b] - 1 (clipped to S).
    sm_scale: logit scale, default 1/sqrt(D).
    impl: "xla" (reference), "pallas" (split-KV kernel; interpret mode off GPU) or "auto" (Pallas on GPU,
      the reference elsewhere).
    block_sizes: key tile, split count and launch parameters (default: `BlockSizes.get_default(D)`).

  Returns:
    o [B, H, D] in q's dtype; zeros for a row with lengths[b] == 0.
  """
  _validate(q, k, v, lengths, impl)
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  if impl == "auto":
    impl = "pallas" if backend.on_gpu() else "xla"
  if impl == "xla":
    return decode_attention_reference(q, k, v, lengths, sm_scale=scale)
  return _pallas(q, k, v, lengths.astype(jnp.int32), scale, block_sizes, not backend.on_gpu())


def _validate(q, k, v, lengths, impl):
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  if q.ndim != 3:
    raise ValueError(f"q.shape={q.shape} is not valid; expected [B, H, D]")
  if k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape}, v.shape={v.shape} are not valid; expected both [B, S, Hkv, D]")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
    raise ValueError(f"k.shape={k.shape} is not valid; it must match q.shape={q.shape} in B and D")
  if q.shape[1] % k.shape[2]:
    raise ValueError(f"num_heads={q.shape[1]} is not valid; it must be a multiple of num_kv_heads={k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an int array of shape [B]={(q.shape[0],)}; got {lengths.shape} {lengths.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _pallas(q, k, v, lengths, scale, block_sizes, interpret):
  b, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  d_pad = max(16, pl.next_power_of_2(d))
  g_pad = max(16, pl.next_power_of_2(g))
  blocks = block_sizes or pallas_gpu.BlockSizes.get_default(d_pad, q.dtype.itemsize)
  splits = blocks.splits_for(b, hkv, s)
  chunk = splits * blocks.block_k
  s_pad = -(-s // chunk) * chunk
  # Zero padding: padded channels add nothing to q.k, padded query rows are dropped, and keys past S lie past
  # every length. Caches sized to a multiple of num_splits * block_k (powers of two) are never copied.
  qg = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, g_pad - g), (0, d_pad - d)))
  pad_kv = lambda x: x if (s_pad, d_pad) == (s, d) else jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, d_pad - d)))
  o = pallas_gpu.forward(qg, pad_kv(k), pad_kv(v), jnp.minimum(lengths, s), sm_scale=scale, blocks=blocks,
                         num_splits=splits, interpret=interpret)
  return o[:, :, :g, :d].reshape(b, h, d).astype(q.dtype)


def _pallas_fwd(q, k, v, lengths, scale, block_sizes, interpret):
  return _pallas(q, k, v, lengths, scale, block_sizes, interpret), (q, k, v, lengths)


def _pallas_bwd(scale, block_sizes, interpret, residuals, do):
  # Decoding is inference; gradients (rarely wanted here) come from the reference.
  q, k, v, lengths = residuals
  _, vjp = jax.vjp(lambda q, k, v: decode_attention_reference(q, k, v, lengths, sm_scale=scale), q, k, v)
  return (*vjp(do), None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
