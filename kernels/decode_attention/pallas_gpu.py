"""Split-KV decode attention (flash-decoding) as a Pallas kernel for GPUs (Triton lowering), interpretable on CPU.

One query token per sequence reads the whole cache, so decoding is bound by memory bandwidth, and one program
per (batch, head) leaves most of the GPU idle at small batch. The keys are therefore cut into `num_splits`
contiguous splits, one program each; every program writes a partial output and its base-2 log-sum-exp, and a
cheap jnp reduction merges the splits (the softmax is associative given each part's max and sum).

GQA: one program serves all G query heads of its key/value head, as the rows of one [G, D] query tile, so each
cached key is read once per kv head rather than once per query head. Rows are padded to 16 (the smallest
Triton dot) with zero queries whose outputs are dropped.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2_E = math.log2(math.e)
# Programs worth having in flight: about two waves of an H100's 132 SMs.
TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Key tile, split count and Triton launch parameters."""

  # Keys per loop iteration inside a program (a power of two >= 16).
  block_k: int = 64
  # Splits of the key axis; None chooses enough to fill the GPU (see `splits_for`).
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls, head_dim: int, itemsize: int = 2) -> "BlockSizes":
    """Tiles by bytes per key row, so a [block_k, D] K and V tile pair stays well inside shared memory."""
    row_bytes = head_dim * itemsize
    if row_bytes <= 256:
      return cls(block_k=128, num_warps=4, num_stages=3)
    return cls(block_k=64, num_warps=4, num_stages=2)

  def splits_for(self, batch: int, kv_heads: int, length: int) -> int:
    """Split count: enough programs for the GPU, at most one split per key tile, a power of two.

    When the length is a whole number of tiles, the count is lowered until it divides them, so the cache is
    read in place instead of through a padded copy (which would cost a full cache copy per decoding step).
    """
    if self.num_splits is not None:
      return self.num_splits
    tiles = max(1, -(-length // self.block_k))
    wanted = max(1, -(-TARGET_PROGRAMS // (batch * kv_heads)))
    splits = min(pl.next_power_of_2(wanted), pl.next_power_of_2(tiles))
    if length % self.block_k == 0:
      while tiles % splits:
        splits //= 2
    return splits


def _decode_kernel(q_ref, k_ref, v_ref, len_ref, o_ref, lse_ref, *, scale: float, block_k: int,
                   precision: lax.Precision | None):
  split_len = k_ref.shape[0]
  start = pl.program_id(2) * split_len
  length = len_ref[...]
  q = q_ref[...]  # [G, D]
  # Only tiles holding a valid key are visited; a split wholly past the length does no work.
  valid_here = jnp.clip(length - start, 0, split_len)
  num_tiles = (valid_here + block_k - 1) // block_k

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=precision) * scale
    index = start + j * block_k + lax.iota(jnp.int32, block_k)
    s = jnp.where(index[None, :] < length, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=precision)
    return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)

  rows, d = q_ref.shape
  init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, num_tiles, body, init)
  empty = l == 0.0
  o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
  # Base-2 log-sum-exp of the split; -inf marks a split with no valid key, which the merge gives zero weight.
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def forward(q, k, v, lengths, *, sm_scale: float, blocks: BlockSizes, num_splits: int, interpret: bool):
  """Padded inputs -> o [B, Hkv, G, D] fp32.

  q [B, Hkv, G, D] (G and D powers of two >= 16), k/v [B, S, Hkv, D] with S a multiple of
  num_splits * block_k, lengths int32 [B].
  """
  b, hkv, g, d = q.shape
  split_len = k.shape[1] // num_splits
  kv_spec = pl.BlockSpec((None, split_len, None, d), lambda bi, hi, si: (bi, si, hi, 0))
  o, lse = pl.pallas_call(
      functools.partial(
          _decode_kernel, scale=sm_scale * LOG2_E, block_k=blocks.block_k,
          precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
      ),
      grid=(b, hkv, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, g, d), lambda bi, hi, si: (bi, hi, 0, 0)),
          kv_spec,
          kv_spec,
          pl.BlockSpec((None,), lambda bi, hi, si: (bi,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, g, d), lambda bi, hi, si: (bi, hi, si, 0, 0)),
          pl.BlockSpec((None, None, None, g), lambda bi, hi, si: (bi, hi, si, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, g, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, g), jnp.float32)],
      compiler_params=None if interpret else plgpu.CompilerParams(
          num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="decode_attention_split_kv",
  )(q, k, v, lengths)
  return merge_splits(o, lse)


def merge_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
  """Partial outputs o [..., P, G, D] with base-2 LSEs [..., P, G] -> the softmax over all P splits [..., G, D]."""
  top = jnp.max(lse, axis=-2, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp2(lse - top)  # 0 for empty splits
  total = jnp.sum(weight, axis=-2)
  merged = jnp.sum(weight[..., None] * o, axis=-3)
  return merged / jnp.where(total == 0, 1.0, total)[..., None]
