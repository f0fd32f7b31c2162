"""Flash attention (forward, dq, dk/dv) as Pallas kernels for GPUs (Triton lowering), interpretable on CPU.

Layout stays channel-last ([B, T, H, D]) end to end: BlockSpecs pick a (row tile, head) slice so no transpose is
ever materialised. GQA: query head h reads key/value head h // (H / Hkv); the dk/dv kernel loops over the query
heads of its group, so nothing is repeated in memory and the backward is deterministic (no atomics).

Online softmax in base 2 (exp2 with log2(e) folded into the scale). Tiles that are entirely attended skip the
element mask; only tiles on a causal/window/padding boundary pay for it.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.flash_attention.masking import Window, allowed, key_tiles_for_query_tile, query_tiles_for_key_tile

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters."""

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_warps_dq: int = 4
  num_stages_dq: int = 2
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2

  @classmethod
  def get_default(cls, head_dim: int, itemsize: int = 2) -> "BlockSizes":
    """Tiles by bytes per row (head_dim * itemsize), so fp32 and wide heads fit shared memory.

    Rows up to 256 bytes (bf16/fp16 with D <= 128): best measured on an H200 at T=8K
    (experiments/bench/flash_attention_tune.py). Wider rows halve the tiles and the pipeline depth.
    """
    row_bytes = head_dim * itemsize
    if row_bytes <= 256:
      return cls(block_q=128, block_k=128, num_warps=8, num_stages=3,
                 block_q_dq=128, block_k_dq=64, num_warps_dq=8, num_stages_dq=3,
                 block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2)
    if row_bytes <= 512:
      return cls(block_q=64, block_k=64, num_warps=8, num_stages=2,
                 block_q_dq=64, block_k_dq=32, num_warps_dq=4, num_stages_dq=2,
                 block_q_dkv=32, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2)
    return cls(block_q=32, block_k=32, num_warps=4, num_stages=2,
               block_q_dq=32, block_k_dq=32, num_warps_dq=4, num_stages_dq=2,
               block_q_dkv=32, block_k_dkv=32, num_warps_dkv=4, num_stages_dkv=2)

  def scaled_for(self, t: int, s: int) -> "BlockSizes":
    """Shrinks tiles for short sequences (power-of-two tiles no larger than the padded length)."""
    fit_q = lambda b: min(b, max(16, pl.next_power_of_2(t)))
    fit_k = lambda b: min(b, max(16, pl.next_power_of_2(s)))
    return dataclasses.replace(
        self,
        block_q=fit_q(self.block_q), block_k=fit_k(self.block_k),
        block_q_dq=fit_q(self.block_q_dq), block_k_dq=fit_k(self.block_k_dq),
        block_q_dkv=fit_q(self.block_q_dkv), block_k_dkv=fit_k(self.block_k_dkv),
    )


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on."""

  sm_scale: float
  causal: bool
  window: Window
  offset: int  # S - T of the unpadded problem
  has_kv_length: bool
  group: int  # query heads per key/value head
  precision: lax.Precision | None

  @property
  def scale(self) -> float:
    """Logit scale in base 2: sm_scale * log2(e)."""
    return self.sm_scale * LOG2_E


def dot(a, b, static, contract=((1,), (0,))):
  """a @ b (or another contraction) with fp32 accumulation at `static.precision`; shared with block_sparse."""
  return lax.dot_general(
      a, b, (contract, ((), ())), preferred_element_type=jnp.float32, precision=static.precision
  )


def dot_t(a, b, static):  # a @ b.T
  return dot(a, b, static, ((1,), (1,)))


def dot_tn(a, b, static):  # a.T @ b
  return dot(a, b, static, ((0,), (0,)))


def _tile_loop(tiles, body, carry):
  """Runs body(j, masked, carry) over tiles [lo, hi), masking only outside [full_lo, full_hi)."""
  carry = lax.fori_loop(tiles.lo, tiles.full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(tiles.full_lo, tiles.full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(tiles.full_hi, tiles.hi, functools.partial(body, masked=True), carry)


def _masked(x, fill, q_idx, k_idx, static: _Static, kv_length):
  """x [bq, bk] with `fill` where the pair is not attended."""
  mask = allowed(
      q_idx[:, None], k_idx[None, :], offset=static.offset, causal=static.causal, window=static.window,
      kv_length=kv_length,
  )
  return x if mask is None else jnp.where(mask, x, fill)


def _forward_kernel(q_ref, k_ref, v_ref, kv_len_ref, o_ref, lse_ref, *, static: _Static, block_k: int):
  block_q = q_ref.shape[0]
  num_k_tiles = k_ref.shape[0] // block_k
  q_tile = pl.program_id(2)
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  q = q_ref[...]
  q_idx = q_tile * block_q + lax.iota(jnp.int32, block_q)

  def body(j, carry, masked):
    acc, m, l = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    s = dot_t(q, k_ref[keys, :], static) * static.scale
    if masked:
      s = _masked(s, -jnp.inf, q_idx, j * block_k + lax.iota(jnp.int32, block_k), static, kv_length)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing attended yet stays at zero weight
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, static)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  tiles = key_tiles_for_query_tile(
      q_tile, block_q, block_k, num_k_tiles, offset=static.offset, causal=static.causal, window=static.window,
      kv_length=kv_length,
  )
  d = q_ref.shape[-1]
  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _tile_loop(tiles, body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # Natural-log LSE; -inf marks rows that attend nothing.
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2_E)


def _probabilities(q, k, lse2, q_idx, k_idx, static, kv_length, masked):
  """Recomputed softmax tile P [bq, bk] from base-2 LSE (+inf on empty rows, giving P = 0)."""
  s = dot_t(q, k, static) * static.scale
  p = jnp.exp2(s - lse2[:, None])
  if masked:
    p = _masked(p, 0.0, q_idx, k_idx, static, kv_length)
  return p


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref, dq_ref, *, static: _Static,
               block_k: int):
  block_q = q_ref.shape[0]
  num_k_tiles = k_ref.shape[0] // block_k
  q_tile = pl.program_id(2)
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...], delta_ref[...]
  q_idx = q_tile * block_q + lax.iota(jnp.int32, block_q)

  def body(j, dq, masked):
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    p = _probabilities(q, k, lse2, q_idx, j * block_k + lax.iota(jnp.int32, block_k), static, kv_length, masked)
    ds = p * (dot_t(do, v, static) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k, static)

  tiles = key_tiles_for_query_tile(
      q_tile, block_q, block_k, num_k_tiles, offset=static.offset, causal=static.causal, window=static.window,
      kv_length=kv_length,
  )
  dq = _tile_loop(tiles, body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * static.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref, dk_ref, dv_ref, *,
                static: _Static, block_q: int):
  block_k = k_ref.shape[0]
  num_q_tiles = q_ref.shape[0] // block_q
  kv_head, k_tile = pl.program_id(1), pl.program_id(2)
  kv_length = kv_len_ref[...] if static.has_kv_length else None
  k, v = k_ref[...], v_ref[...]
  k_idx = k_tile * block_k + lax.iota(jnp.int32, block_k)
  tiles = query_tiles_for_key_tile(
      k_tile, block_q, block_k, num_q_tiles, offset=static.offset, causal=static.causal, window=static.window,
      kv_length=kv_length,
  )

  def head_body(g, carry):
    head = kv_head * static.group + g

    def body(i, carry, masked):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, head, :], do_ref[rows, head, :]
      lse2, delta = lse_ref[head, rows], delta_ref[head, rows]
      p = _probabilities(q, k, lse2, i * block_q + lax.iota(jnp.int32, block_q), k_idx, static, kv_length, masked)
      dv = dv + dot_tn(p.astype(do.dtype), do, static)
      ds = p * (dot_t(do, v, static) - delta[:, None])
      return dk + dot_tn(ds.astype(q.dtype), q, static), dv

    return _tile_loop(tiles, body, carry)

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, static.group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * static.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
  """Triton launch settings, or none in interpret mode; shared with block_sparse."""
  return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def kv_length_spec():
  """BlockSpec giving a (batch, head, tile) program its row's kv length; shared with block_sparse."""
  return pl.BlockSpec((None,), lambda b, h, i: (b,))


def forward(q, k, v, kv_lengths, *, static: _Static, blocks: BlockSizes, interpret: bool):
  """Padded inputs q [B, T, H, D], k/v [B, S, Hkv, D], kv_lengths int32 [B] -> o, lse [B, H, T] (natural log)."""
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi // static.group, 0))
  o, lse = pl.pallas_call(
      functools.partial(_forward_kernel, static=static, block_k=bk),
      grid=(b, h, t // bq),
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
          kv_spec,
          kv_spec,
          kv_length_spec(),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
          pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=compiler_params(blocks.num_warps, blocks.num_stages, interpret),
      interpret=interpret,
      name="flash_attention_forward",
  )(q, k, v, kv_lengths)
  return o, lse


def backward(q, k, v, o, lse, do, kv_lengths, *, dlse, static: _Static, blocks: BlockSizes, interpret: bool):
  """Padded inputs, the forward's o/lse and the cotangents do [B, T, H, D], dlse [B, H, T] -> dq, dk, dv.

  With P the softmax, dS = P * (dP - delta) where delta = rowsum(dO * O) - dLSE (LSE's gradient is P).
  """
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  # Base-2 LSE for the kernels; +inf on rows that attend nothing makes their probabilities exactly 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  args = (q, k, v, do, lse2, delta, kv_lengths)
  dq = backward_dq(*args, static=static, blocks=blocks, interpret=interpret)
  dk, dv = backward_dkv(*args, static=static, blocks=blocks, interpret=interpret)
  return dq, dk, dv


def backward_dq(q, k, v, do, lse2, delta, kv_lengths, *, static: _Static, blocks: BlockSizes, interpret: bool):
  """dq [B, T, H, D]: one program per (batch, head, query tile), looping over key tiles."""
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  row_spec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  stat_spec = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi // static.group, 0))
  return pl.pallas_call(
      functools.partial(_dq_kernel, static=static, block_k=bk),
      grid=(b, h, t // bq),
      in_specs=[row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec, kv_length_spec()],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compiler_params(blocks.num_warps_dq, blocks.num_stages_dq, interpret),
      interpret=interpret,
      name="flash_attention_dq",
  )(q, k, v, do, lse2, delta, kv_lengths)


def backward_dkv(q, k, v, do, lse2, delta, kv_lengths, *, static: _Static, blocks: BlockSizes, interpret: bool):
  """dk, dv [B, S, Hkv, D]: one program per (batch, kv head, key tile), looping over its query heads and tiles."""
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  all_rows_spec = pl.BlockSpec((None, t, h, d), lambda bi, hi, j: (bi, 0, 0, 0))
  all_stats_spec = pl.BlockSpec((None, h, t), lambda bi, hi, j: (bi, 0, 0))
  key_tile_spec = pl.BlockSpec((None, bk, None, d), lambda bi, hi, j: (bi, j, hi, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, block_q=bq),
      grid=(b, hkv, s // bk),
      in_specs=[all_rows_spec, key_tile_spec, key_tile_spec, all_rows_spec, all_stats_spec, all_stats_spec,
                kv_length_spec()],
      out_specs=[key_tile_spec, key_tile_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(blocks.num_warps_dkv, blocks.num_stages_dkv, interpret),
      interpret=interpret,
      name="flash_attention_dkv",
  )(q, k, v, do, lse2, delta, kv_lengths)
