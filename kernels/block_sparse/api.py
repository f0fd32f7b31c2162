"""Public block-sparse attention op: validates inputs, picks an implementation, wires the custom VJP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels import backend
from kernels.block_sparse import mosaic_gpu, mosaic_gpu_bwd, pallas_gpu, pallas_tpu
from kernels.block_sparse.mask import BlockMask
from kernels.block_sparse.reference import block_sparse_reference
from kernels.flash_attention import api as flash_api
from kernels.flash_attention.api import check_kv_lengths, check_qkv

IMPLEMENTATIONS = ("auto", "xla", "pallas", "mosaic")


# Pallas kernels per platform; both take the same padded inputs, mask arrays and residuals.
_KERNELS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: BlockMask,
    *,
    sm_scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    impl: str = "auto",
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    mosaic_config: mosaic_gpu.Config | None = None,
) -> jax.Array:
  """Softmax attention restricted to a block-sparse pattern; work scales with the mask's non-empty tiles.

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, Hkv, D] keys and values, H % Hkv == 0 (GQA/MQA without repeating K/V).
    mask: a `BlockMask` over [T, S], shared by all heads or one pattern per query head (num_heads == H).
    sm_scale: logit scale, default 1/sqrt(D).
    kv_lengths: int [B] valid keys per sequence (right padding: keys at or past it are never attended).
    impl: "xla" (dense masked reference, O(T * S) memory), "pallas" (Pallas kernels: the Mosaic TPU ones on a
      TPU, else the GPU ones; interpret mode off their platform), "mosaic" (Hopper kernels in Pallas' Mosaic GPU
      lowering, kernels/block_sparse/mosaic_gpu.py and mosaic_gpu_bwd.py; bf16/fp16, D 64 or 128, mask tiles
      128 x 64 or 128 x 128, no kv_lengths; the backward is the "pallas" one for 128 x 64 tiles or when
      mosaic_config.backward says so; interpret mode off GPU), or "auto" ("mosaic" on Hopper where it takes the
      problem and block_sizes is None, else "pallas" on GPU and TPU, the reference elsewhere).
    block_sizes: kernel tiles (default: the platform's `BlockSizes.get_default(D)`), capped at the mask's tiles.
      The TPU kernels take the row tiles (block_q, block_q_dq, block_k_dkv; the last only in whole multiples of
      128) and visit whole mask tiles along the reduction. With impl="mosaic" they are the backward's.
    mosaic_config: pipeline depth and backward of impl="mosaic" (default `mosaic_gpu.Config()`).

  Returns:
    o [B, T, H, D] in q's dtype. Rows that attend no key give zeros.
  """
  _validate(q, k, v, mask, kv_lengths, impl)
  scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
  if impl == "auto":
    impl = _auto_impl(q, mask, kv_lengths, block_sizes, mosaic_config)
  if impl == "xla":
    return block_sparse_reference(q, k, v, mask, sm_scale=scale, kv_lengths=kv_lengths)
  if impl == "mosaic":
    bands = _mosaic_bands(mask, mosaic_config)
    if reasons := mosaic_gpu.unsupported_reasons(q, mask.block_q, mask.block_k, kv_lengths, mosaic_config,
                                                 bands is not None):
      raise ValueError(f"impl='mosaic' does not support {'; '.join(reasons)}; impl='pallas' takes every problem")
    return _mosaic_attention(q, k, v, mask, sm_scale=scale, block_sizes=block_sizes, config=mosaic_config,
                             bands=bands, interpret=not backend.on_gpu())
  platform = backend.pallas_platform()
  return _pallas_attention(q, k, v, mask, sm_scale=scale, kv_lengths=kv_lengths, block_sizes=block_sizes,
                           interpret=jax.default_backend() != platform, platform=platform)


def _mosaic_bands(mask: BlockMask, config) -> np.ndarray | None:
  """The Mosaic forward's band bounds of the mask's partial tiles, when config.band_masks asks for them and every
  partial tile is a band; else None (the forward loads their bias)."""
  if config is None or not config.band_masks:
    return None
  return mosaic_gpu.band_bounds(mask.tiles, mask.lists.tiles)


def _auto_impl(q, mask: BlockMask, kv_lengths, block_sizes, mosaic_config) -> str:
  """The fastest measured implementation that takes the problem: on Hopper the Mosaic GPU kernels (one H200,
  benchmarks/results/block_sparse_mosaic.md: 1.8-2.2x the Triton-lowering forward, 1.4-1.6x its forward+backward
  on sliding windows and BigBird at 8K-32K), the Triton-lowering kernels on other GPUs and for what Mosaic does not
  take (fp32, kv_lengths, mask tiles other than 128 x 64 / 128 x 128, explicit Triton tiles); Mosaic TPU on TPU;
  the reference elsewhere."""
  if backend.on_gpu():
    band = _mosaic_bands(mask, mosaic_config) is not None
    if (flash_api._hopper() and block_sizes is None
        and not mosaic_gpu.unsupported_reasons(q, mask.block_q, mask.block_k, kv_lengths, mosaic_config, band)):
      return "mosaic"
    return "pallas"
  return "pallas" if backend.pallas_platform() == "tpu" else "xla"


def _validate(q, k, v, mask, kv_lengths, impl):
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  check_qkv(q, k, v)
  if not isinstance(mask, BlockMask):
    raise ValueError(f"mask must be a BlockMask (kernels.block_sparse.mask); got {type(mask).__name__}")
  if mask.shape != (q.shape[1], k.shape[1]):
    raise ValueError(f"mask.shape={mask.shape} is not valid; expected (T, S)={(q.shape[1], k.shape[1])}")
  if mask.num_heads not in (1, q.shape[2]):
    raise ValueError(f"mask.num_heads={mask.num_heads} is not valid; expected 1 or num_heads={q.shape[2]}")
  check_kv_lengths(kv_lengths, q.shape[0])


def _pallas_attention(q, k, v, mask: BlockMask, *, sm_scale, kv_lengths, block_sizes, interpret, platform="gpu"):
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  d_pad = max(16, pl.next_power_of_2(d))
  kernels = _KERNELS[platform]
  blocks = kernels.fit_blocks(block_sizes or kernels.BlockSizes.get_default(d_pad, q.dtype.itemsize),
                              mask.block_q, mask.block_k)
  nq, nk = mask.grid
  static = pallas_gpu._Static(
      sm_scale=sm_scale, group=h // hkv, per_head_mask=mask.num_heads > 1, mask_block_q=mask.block_q,
      mask_block_k=mask.block_k, has_kv_length=kv_lengths is not None,
      precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
  )
  lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths.astype(jnp.int32), s)
  # The mask's element tiles already exclude pairs past T or S, so zero padding to whole mask tiles adds nothing;
  # padded head channels add nothing to q.k.
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))
  index = _mask_arrays(mask)
  o = _attention(pad(q, nq * mask.block_q), pad(k, nk * mask.block_k), pad(v, nk * mask.block_k), lengths, *index,
                 static=static, blocks=blocks, interpret=interpret, platform=platform)
  return o[:, :t, :, :d]


def _mask_arrays(mask: BlockMask):
  """(visit lists, transposed lists, int8 tiles) as device arrays; one dummy tile when the mask has none."""
  as_jnp = lambda lists: tuple(jnp.asarray(x, jnp.int32) for x in lists)
  tiles = mask.tiles if len(mask.tiles) else jnp.zeros((1, mask.block_q, mask.block_k), bool)
  return as_jnp(mask.lists), as_jnp(mask.transposed_lists), jnp.asarray(tiles, jnp.int8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, kv_lengths, lists, transposed_lists, tiles, static, blocks, interpret, platform):
  o, _ = _KERNELS[platform].forward(q, k, v, kv_lengths, lists, tiles, static=static, blocks=blocks,
                                    interpret=interpret)
  return o


def _attention_fwd(q, k, v, kv_lengths, lists, transposed_lists, tiles, static, blocks, interpret, platform):
  o, lse = _KERNELS[platform].forward(q, k, v, kv_lengths, lists, tiles, static=static, blocks=blocks,
                                      interpret=interpret)
  return o, (q, k, v, o, lse, kv_lengths, lists, transposed_lists, tiles)


def _attention_bwd(static, blocks, interpret, platform, residuals, do):
  q, k, v, o, lse, kv_lengths, lists, transposed_lists, tiles = residuals
  dq, dk, dv = _KERNELS[platform].backward(
      q, k, v, o, lse, do.astype(q.dtype), kv_lengths, lists, transposed_lists, tiles, static=static,
      blocks=blocks, interpret=interpret,
  )
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _mosaic_attention(q, k, v, mask: BlockMask, *, sm_scale, block_sizes, config, bands, interpret):
  """The Mosaic GPU forward and backward (the Triton-lowering backward where the Mosaic one does not apply or
  config.backward asks for it), on inputs padded to whole mask tiles; bands: `_mosaic_bands(mask, config)`."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  blocks = pallas_gpu.fit_blocks(block_sizes or pallas_gpu.BlockSizes.get_default(d, q.dtype.itemsize),
                                 mask.block_q, mask.block_k)
  nq, nk = mask.grid
  static = pallas_gpu._Static(
      sm_scale=sm_scale, group=h // hkv, per_head_mask=mask.num_heads > 1, mask_block_q=mask.block_q,
      mask_block_k=mask.block_k, has_kv_length=False, precision=None,
  )
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  lists, transposed_lists, tiles = _mask_arrays(mask)
  config = config or mosaic_gpu.Config()
  mosaic_backward = config.backward == "mosaic" and not mosaic_gpu_bwd.unsupported_reasons(
      q, mask.block_q, mask.block_k, None)
  # Which CTA runs which row (and which key tile, for dk/dv), from the mask's host counts: longest first.
  work = mosaic_gpu.work_schedule(mask.lists.count, h, b, config, interpret)
  if mosaic_backward:
    # The dq kernel's items are the forward's rows with the same costs, so they take the forward's schedule.
    work += work + mosaic_gpu_bwd.dkv_work_schedule(mask.transposed_lists, h, hkv, b, persistent=config.persistent,
                                                    num_ctas=config.num_ctas, interpret=interpret)
  work = tuple(jnp.asarray(x) for x in work)
  # Partial tiles as band bounds (`_mosaic_bands`), for the lists and the transposed lists, or None: the bias.
  if bands is not None:
    bands = (jnp.asarray(bands), jnp.asarray(mosaic_gpu.band_bounds(mask.tiles, mask.transposed_lists.tiles)))
  o = _mosaic(pad(q, nq * mask.block_q), pad(k, nk * mask.block_k), pad(v, nk * mask.block_k), lists,
              transposed_lists, tiles, work, bands, static, blocks, config, interpret, mosaic_backward)
  return o[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _mosaic(q, k, v, lists, transposed_lists, tiles, work, bands, static, blocks, config, interpret, mosaic_backward):
  return _mosaic_fwd(q, k, v, lists, transposed_lists, tiles, work, bands, static, blocks, config, interpret,
                     mosaic_backward)[0]


def _mosaic_fwd(q, k, v, lists, transposed_lists, tiles, work, bands, static, blocks, config, interpret,
                mosaic_backward):
  o, lse = mosaic_gpu.forward(q, k, v, lists, mosaic_gpu.bias_tiles(tiles, q.dtype), sm_scale=static.sm_scale,
                              per_head_mask=static.per_head_mask, config=config, interpret=interpret, work=work[:2],
                              bands=None if bands is None else bands[0])
  return o, (q, k, v, o, lse, lists, transposed_lists, tiles, work[2:], bands)


def _mosaic_bwd(static, blocks, config, interpret, mosaic_backward, residuals, do):
  q, k, v, o, lse, lists, transposed_lists, tiles, backward_work, bands = residuals
  do = do.astype(q.dtype)
  if mosaic_backward:
    dq, dk, dv = mosaic_gpu_bwd.backward(q, k, v, o, lse, do, lists, transposed_lists,
                                         mosaic_gpu.bias_tiles(tiles, q.dtype), sm_scale=static.sm_scale,
                                         per_head_mask=static.per_head_mask, config=config.backward_config,
                                         interpret=interpret, work=backward_work, bands=bands)
  else:
    lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    dq, dk, dv = pallas_gpu.backward(q, k, v, o, lse, do, lengths, lists, transposed_lists, tiles, static=static,
                                     blocks=blocks, interpret=interpret)
  return dq, dk, dv, None, None, None, None, None


_mosaic.defvjp(_mosaic_fwd, _mosaic_bwd)
