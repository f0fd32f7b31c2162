"""The block-sparse kernel (kernels.block_sparse) behind the `impl="pallas"` paths of the sparse mixers.

On a GPU or TPU the kernel picks its fastest implementation for the problem (impl="auto": the Mosaic GPU kernels on
Hopper where they apply, else the Pallas ones); on CPU the Pallas kernels run in interpret mode, for tests.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from efficient_attention.parallel import shard_over_batch
from kernels import backend
from kernels.block_sparse import BlockMask, block_sparse_attention

# Largest kernel tile: the GPU kernels' best measured tile for bf16, D <= 128 (kernels/flash_attention).
MAX_TILE = 128


def kernel_tile(length: int) -> int:
  """Mask tile for a sequence of `length`: a power of two in [16, MAX_TILE], no larger than the padded length."""
  return min(MAX_TILE, max(16, pl.next_power_of_2(length)))


def block_sparse_with_padding_mask(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, key_mask: jax.Array | None
) -> jax.Array:
  """block_sparse_attention (its kernels) with a [B, S] padding mask, which must be right padding.

  The kernel takes padding as lengths; a row whose mask has a hole comes out as NaN rather than silently wrong.
  """
  impl = "auto" if backend.has_pallas_kernels() else "pallas"
  sparse = lambda q, k, v, lengths: block_sparse_attention(q, k, v, mask, kv_lengths=lengths, impl=impl)
  if key_mask is None:
    return shard_over_batch(sparse, q, k, v, None)
  lengths = key_mask.sum(axis=1, dtype=jnp.int32)
  right_padded = jnp.all(key_mask == (jnp.arange(key_mask.shape[1])[None, :] < lengths[:, None]), axis=1)
  o = shard_over_batch(sparse, q, k, v, lengths)
  return jnp.where(right_padded[:, None, None, None], o, jnp.nan)
