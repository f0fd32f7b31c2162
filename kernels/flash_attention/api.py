"""Public flash-attention op: validates inputs, picks an implementation, wires the custom VJP."""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import backend
from kernels.flash_attention import mosaic_gpu, mosaic_gpu_bwd, pallas_gpu, pallas_tpu
from kernels.flash_attention.reference import attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn", "mosaic", "mosaic_bwd")


# Pallas kernels per platform; both take the same padded inputs and return the same residuals (natural-log lse).
_KERNELS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


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
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    mosaic_config: mosaic_gpu.Config | None = None,
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
    impl: "xla" (reference), "pallas" (Pallas kernel: the Mosaic TPU one on a TPU, else the GPU one; interpret
      mode off its platform), "cudnn" (`jax.nn.dot_product_attention`), "mosaic" (Hopper kernels in Pallas' Mosaic
      GPU lowering: its forward, and its backward where no key padding is needed, else the "pallas" GPU backward;
      interpret mode off GPU), "mosaic_bwd" (the "pallas" GPU forward with the Mosaic GPU backward), or "auto"
      (the fastest measured that takes the problem: "mosaic" on Hopper GPUs where it applies, else "pallas" on GPU
      and TPU, the reference elsewhere).
    block_sizes: tile sizes of the Pallas kernel (default: the platform's `BlockSizes.get_default(D)`; the TPU
      kernels read only the six tile fields, so either platform's `BlockSizes` works there).
    mosaic_config: tiles of the impl="mosaic" forward (Hopper, Mosaic GPU lowering, bf16/fp16, D in 64/128/256,
      no window/kv_lengths). Default `mosaic_gpu.Config.get_default(D)`. The Mosaic backward
      (kernels/flash_attention/mosaic_gpu_bwd.py) takes bf16/fp16, D in 64/128, T and S multiples of 128.

  Returns:
    o [B, T, H, D] in q's dtype, and lse if return_lse. Rows that attend nothing give zeros.
  """
  _validate(q, k, v, window, kv_lengths, impl)
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  if impl == "auto":
    impl = _auto_impl(q, k, v, causal, window, kv_lengths, block_sizes)
  if impl == "xla":
    return attention_reference(
        q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths, return_lse=return_lse
    )
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                            return_lse=return_lse)
  if impl == "mosaic":
    o, lse = _mosaic_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                               block_sizes=block_sizes, config=mosaic_config)
    return (o, lse) if return_lse else o
  if impl == "mosaic_bwd":
    o, lse = _mosaic_bwd_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                                   block_sizes=block_sizes)
    return (o, lse) if return_lse else o
  platform = backend.pallas_platform()
  o, lse = _pallas_attention(q, k, v, causal=causal, sm_scale=scale, window=window, kv_lengths=kv_lengths,
                             block_sizes=block_sizes, interpret=jax.default_backend() != platform,
                             platform=platform)
  return (o, lse) if return_lse else o


def _hopper() -> bool:
  """Whether the default device is an sm_90 GPU (H100/H200), which the Mosaic GPU kernels (wgmma) are built for."""
  return backend.on_gpu() and getattr(jax.devices()[0], "compute_capability", "").startswith("9.")


def _auto_impl(q, k, v, causal, window, kv_lengths, block_sizes) -> str:
  """The fastest measured implementation that takes the problem (benchmarks/results/flash_attention_mosaic.md,
  one H200): the Mosaic GPU kernels on Hopper, 1.24-1.55x the Triton-lowering ones forward and 1.16-1.32x
  forward+backward; the Triton-lowering kernels on other GPUs and for what Mosaic does not take (windows, kv
  lengths, fp32, explicit Triton tiles); Mosaic TPU on TPU; the reference elsewhere."""
  if backend.on_gpu():
    if _hopper() and block_sizes is None and mosaic_gpu.supports(q, k, v, causal, window, kv_lengths):
      return "mosaic"
    return "pallas"
  return "pallas" if backend.pallas_platform() == "tpu" else "xla"


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


def _pallas_attention(q, k, v, *, causal, sm_scale, window, kv_lengths, block_sizes, interpret, platform="gpu"):
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  d_pad = max(16, pl.next_power_of_2(d))
  blocks = (block_sizes or _KERNELS[platform].BlockSizes.get_default(d_pad, q.dtype.itemsize)).scaled_for(t, s)
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
  o, lse = _flash(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), lengths, static, blocks, interpret, platform)
  return o[:, :t, :, :d], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, kv_lengths, static, blocks, interpret, platform):
  return _KERNELS[platform].forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)


def _flash_fwd(q, k, v, kv_lengths, static, blocks, interpret, platform):
  o, lse = _KERNELS[platform].forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)
  return (o, lse), (q, k, v, o, lse, kv_lengths)


def _flash_bwd(static, blocks, interpret, platform, residuals, cotangents):
  q, k, v, o, lse, kv_lengths = residuals
  do, dlse = cotangents
  dq, dk, dv = _KERNELS[platform].backward(
      q, k, v, o, lse, do.astype(q.dtype), kv_lengths, dlse=dlse, static=static, blocks=blocks,
      interpret=interpret,
  )
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _mosaic_attention(q, k, v, *, causal, sm_scale, window, kv_lengths, block_sizes, config, bwd_blocks=None):
  """Forward by the Mosaic GPU kernel (interpret mode off GPU); backward by the Mosaic GPU kernels where they
  apply (no key padding), else by the Triton-lowering ones.

  bwd_blocks: `mosaic_gpu_bwd.BlockSizes` of the Mosaic backward (default per head dim); the benchmark sweeps it.
  """
  if reasons := mosaic_gpu.unsupported_reasons(q, k, v, causal, window, kv_lengths):
    raise NotImplementedError(f"impl='mosaic' does not support {', '.join(reasons)}")
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  config = config or mosaic_gpu.Config.get_default(d)
  blocks = (block_sizes or pallas_gpu.BlockSizes.get_default(d, q.dtype.itemsize)).scaled_for(t, s)
  # Both kernels run on the same padded arrays (the backward reads the forward's o and lse).
  t_pad = _round_up(t, math.lcm(config.rows_per_cta, blocks.block_q_dq, blocks.block_q_dkv))
  s_pad = _round_up(s, math.lcm(config.block_k, blocks.block_k_dq, blocks.block_k_dkv))
  static = pallas_gpu._Static(
      sm_scale=sm_scale, causal=causal, window=None, offset=s - t, has_kv_length=s_pad != s, group=h // hkv,
      precision=None,
  )
  # Padded keys are masked (by the static length s here, by kv_lengths in the backward); padded query rows
  # attend key 0 at least, so their lse stays finite, and are sliced off.
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  lengths = jnp.full((b,), s, jnp.int32)
  o, lse = _flash_mosaic(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), lengths, static, blocks, not backend.on_gpu(),
                         config, s, bwd_blocks)
  return o[:, :t], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash_mosaic(q, k, v, kv_lengths, static, blocks, interpret, config, kv_length, bwd_blocks):
  return _flash_mosaic_fwd(q, k, v, kv_lengths, static, blocks, interpret, config, kv_length, bwd_blocks)[0]


def _flash_mosaic_fwd(q, k, v, kv_lengths, static, blocks, interpret, config, kv_length, bwd_blocks):
  o, lse = mosaic_gpu.forward(q, k, v, causal=static.causal, sm_scale=static.sm_scale, config=config,
                              kv_length=kv_length, offset=static.offset, interpret=interpret)
  return (o, lse), (q, k, v, o, lse, kv_lengths)


def _flash_mosaic_bwd(static, blocks, interpret, config, kv_length, bwd_blocks, residuals, cotangents):
  q, k, v, o, lse, kv_lengths = residuals
  # The Mosaic backward takes no key padding; with none (S a tile multiple) it runs, else the Triton one.
  if static.has_kv_length or not mosaic_gpu_bwd.supports(q.shape, k.shape, q.dtype, blocks=bwd_blocks):
    return _flash_bwd(static, blocks, interpret, "gpu", residuals, cotangents)
  return _mosaic_gradients(q, k, v, o, lse, cotangents, static, bwd_blocks, interpret)


_flash_mosaic.defvjp(_flash_mosaic_fwd, _flash_mosaic_bwd)


def _mosaic_gradients(q, k, v, o, lse, cotangents, static, bwd_blocks, interpret):
  """(dq, dk, dv, None for kv_lengths) by the Mosaic GPU backward, from the forward's o and natural-log lse."""
  do, dlse = cotangents
  dq, dk, dv = mosaic_gpu_bwd.backward(q, k, v, o, lse, do.astype(q.dtype), causal=static.causal,
                                       sm_scale=static.sm_scale, dlse=dlse, blocks=bwd_blocks, interpret=interpret)
  return dq, dk, dv, None


def _mosaic_bwd_attention(q, k, v, *, causal, sm_scale, window, kv_lengths, block_sizes, bwd_blocks=None):
  """Forward by the Triton-lowering kernel, backward by the Mosaic GPU kernels (both interpreted off GPU).

  bwd_blocks: `mosaic_gpu_bwd.BlockSizes` (default per head dim); experiments/bench/flash_attention.py sweeps it.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bwd_blocks = bwd_blocks or mosaic_gpu_bwd.BlockSizes.get_default(d)
  blocks = (block_sizes or pallas_gpu.BlockSizes.get_default(d, q.dtype.itemsize)).scaled_for(t, s)
  reason = mosaic_gpu_bwd.unsupported_reason(q.shape, k.shape, q.dtype, window=window, kv_lengths=kv_lengths,
                                             blocks=bwd_blocks)
  if reason is None and (t % blocks.block_q or s % blocks.block_k):
    reason = f"T={t}, S={s} that are not multiples of the forward tiles {blocks.block_q}, {blocks.block_k}"
  if reason:
    raise NotImplementedError(f"impl='mosaic_bwd' does not support {reason}")
  static = pallas_gpu._Static(
      sm_scale=sm_scale, causal=causal, window=None, offset=s - t, has_kv_length=False, group=h // hkv,
      precision=None,
  )
  lengths = jnp.full((b,), s, jnp.int32)
  return _flash_mosaic_backward(q, k, v, lengths, static, blocks, bwd_blocks, not backend.on_gpu())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_mosaic_backward(q, k, v, kv_lengths, static, blocks, bwd_blocks, interpret):
  return pallas_gpu.forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)


def _flash_mosaic_backward_fwd(q, k, v, kv_lengths, static, blocks, bwd_blocks, interpret):
  o, lse = pallas_gpu.forward(q, k, v, kv_lengths, static=static, blocks=blocks, interpret=interpret)
  return (o, lse), (q, k, v, o, lse)


def _flash_mosaic_backward_bwd(static, blocks, bwd_blocks, interpret, residuals, cotangents):
  return _mosaic_gradients(*residuals, cotangents, static, bwd_blocks, interpret)


_flash_mosaic_backward.defvjp(_flash_mosaic_backward_fwd, _flash_mosaic_backward_bwd)
