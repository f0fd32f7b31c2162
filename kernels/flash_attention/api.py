"""Public flash-attention op: validates inputs, picks an implementation, wires the custom VJP."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.flash_attention import pallas_gpu
from kernels.flash_attention.reference import attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    kv_lengths: jax.Array | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    block_sizes: pallas_gpu.BlockSizes | None = None,
):
  """Exact softmax attention in O(T) memory.

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, Hkv, D] keys and values, H % Hkv == 0 (GQA/MQA without repeating K/V).
    causal: query i (at key position i + S - T) attends keys j <= i + S - T.
    sm_scale: logit scale, default 1/sqrt(D).
    window: (left, right) local window around each query position; None on a side leaves it open.
    kv_lengths: int [B] valid keys per sequence (keys at or past it are padding).
    return_lse: also return the natural-log log-sum-exp [B, H, T] (fp32; -inf where a row attends nothing).
    impl: "xla" (reference), "pallas" (Pallas kernel; interpret mode off GPU), "cudnn"
      (`jax.nn.dot_product_attention`), or "auto" (Pallas on GPU, the reference elsewhere).
    block_sizes: tile sizes of the Pallas kernel (default: `BlockSizes.get_default(D)`).

  Returns:
    o [B, T, H, D] in q's dtype, and lse if return_lse. Rows that attend nothing give zeros.
  """
  _validate(q, k, v, window, kv_lengths, impl)
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  if impl == "auto":
    impl = "pallas" if _on_gpu() else "xla"
  if impl == "xla":
    return attention_reference(
        q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths, return_lse=return_lse
    )
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                            return_lse=return_lse)
  o, lse = _pallas_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                             block_sizes=block_sizes, interpret=not _on_gpu())
  return (o, lse) if return_lse else o


def _validate(q, k, v, window, kv_lengths, impl):
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  check_qkv(q, k, v)
  if window is not None:
    if len(window) != 2 or any(w is not None and (not isinstance(w, int) or w < 0) for w in window):
      raise ValueError(f"window={window!r} is not valid; expected (left, right) with ints >= 0 or None")
  check_kv_lengths(kv_lengths, q.shape[0])


def check_qkv(q, k, v) -> None:
  """q [B, T, H, D], k/v [B, S, Hkv, D] with H % Hkv == 0 and one float dtype; shared with block_sparse."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [B, T, H, D] / [B, S, Hkv, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape=}, {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree on batch and head_dim; got {q.shape=}, {k.shape=}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"q.dtype={q.dtype} is not valid; choose one of float32, bfloat16, float16")


def check_kv_lengths(kv_lengths, batch: int) -> None:
  """kv_lengths: None or int [B]; shared with block_sparse."""
  if kv_lengths is not None:
    if kv_lengths.shape != (batch,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(f"kv_lengths must be an int array of shape [B]={(batch,)}; got "
                       f"{kv_lengths.shape} {kv_lengths.dtype}")


def _cudnn_attention(q, k, v, *, causal, sm_scale, window, kv_lengths, return_lse):
  reasons = []
  if return_lse:
    reasons.append("return_lse")
  if causal and q.shape[1] != k.shape[1]:
    reasons.append("causal with T != S")
  if window is not None and (window[0] is None or (window[1] != 0 and not causal)):
    reasons.append(f"window={window} (cuDNN takes a left window with right = 0)")
  if reasons:
    raise NotImplementedError(f"impl='cudnn' does not support {', '.join(reasons)}")
  lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=sm_scale, is_causal=causal, key_value_seq_lengths=lengths,
      local_window_size=None if window is None else (window[0], 0), implementation="cudnn",
  )


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pallas_attention(q, k, v, *, causal, sm_scale, window, kv_lengths, block_sizes, interpret):
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  d_pad = max(16, pl.next_power_of_2(d))
  blocks = (block_sizes or pallas_gpu.BlockSizes.get_default(d_pad, q.dtype.itemsize)).scaled_for(t, s)
  t_pad = _round_up(t, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  s_pad = _round_up(s, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
  has_kv_length = kv_lengths is not None or s_pad != s
  lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths.astype(jnp.int32), s)
  static = pallas_gpu._Static(
      sm_scale=sm_scale, causal=causal, window=window, offset=s - t,
      has_kv_length=has_kv_length, group=h // hkv,
      precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
  )
  # Zero padding: padded head channels add nothing to q.k; padded keys are masked by kv_length; padded query
  # rows are sliced off (and, having zero cotangent, add nothing to dk/dv).
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))
  o, lse = _flash(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), lengths, static, blocks, interpret)
  return o[:, :t, :, :d], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, kv_lengths, static, blocks, interpret):
  return pallas_gpu.forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)


def _flash_fwd(q, k, v, kv_lengths, static, blocks, interpret):
  o, lse = pallas_gpu.forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)
  return (o, lse), (q, k, v, o, lse, kv_lengths)


def _flash_bwd(static, blocks, interpret, residuals, cotangents):
  q, k, v, o, lse, kv_lengths = residuals
  do, dlse = cotangents
  dq, dk, dv = pallas_gpu.backward(
      q, k, v, o, lse, do.astype(q.dtype), kv_lengths, dlse=dlse, static=static, blocks=blocks,
      interpret=interpret,
  )
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
