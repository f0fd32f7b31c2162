"""BigBird attention (Zaheer et al. 2020, ITC form): sliding, global and random key blocks.

The sequence is cut into blocks of `block_size`. Query block i attends the `num_sliding_blocks` blocks
centred on i, the first `num_global_blocks` blocks (which in turn attend every block) and
`num_random_blocks` other blocks drawn with a seeded RNG. Causal: only blocks at or before i, with the
element-causal mask inside block i. Memory O(T * (sliding + global + random) * block_size).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention.block_sparse import block_sparse_with_padding_mask, kernel_tile
from efficient_attention.blocked_attention import blocked_attention, rows_attention
from efficient_attention.cache import KVCache, check_decodable, empty_kv, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.registry import register
from efficient_attention.sparse_decoding import block_layout_attention, layout_rows
from efficient_attention.validation import check_choice, check_count
from kernels import block_sparse

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BigBirdConfig(AttentionConfig):
  variant = "bigbird"
  # Positions per block; sequences that are not a multiple are padded internally.
  block_size: int = 16
  # Blocks of the sliding window, centred on the query block (odd; causal keeps the half up to i).
  num_sliding_blocks: int = 3
  # Leading blocks that attend, and are attended by, every block.
  num_global_blocks: int = 1
  # Extra key blocks per query block, drawn from those it does not attend already.
  num_random_blocks: int = 2
  # Seeds the random blocks; the decoder passes a different seed per layer.
  seed: int = 0
  # "xla": blocked jnp attention (gathered key blocks). "pallas": the block-sparse kernel (kernels.block_sparse),
  # which visits only the attended key tiles; right padding only.
  impl: str = "xla"

  def __post_init__(self):
    super().__post_init__()
    check_count("block_size", self.block_size, 1)
    check_count("num_sliding_blocks", self.num_sliding_blocks, 1)
    if self.num_sliding_blocks % 2 == 0:
      raise ValueError(
          f"num_sliding_blocks={self.num_sliding_blocks} is not valid; it must be odd (centred on the query block)"
      )
    check_count("num_global_blocks", self.num_global_blocks, 0)
    check_count("num_random_blocks", self.num_random_blocks, 0)
    check_count("seed", self.seed, 0)
    check_choice("impl", self.impl, IMPLEMENTATIONS)


def bigbird_block_layout(config: BigBirdConfig, length: int) -> np.ndarray:
  """bool [nb, nb] (nb = ceil(length / block_size)): which key blocks each query block attends.

  Each query block draws its random blocks from an RNG seeded by (seed, block index), so they are fixed
  for a layer and a length; causal rows (whose candidates are the blocks before them) do not even change
  with the length, so a prefix keeps its pattern as the sequence grows. One definition with the kernel's
  `kernels.block_sparse.bigbird` mask builder.
  """
  return block_sparse.mask.bigbird_block_layout(
      -(-length // config.block_size), num_sliding_blocks=config.num_sliding_blocks,
      num_global_blocks=config.num_global_blocks, num_random_blocks=config.num_random_blocks, seed=config.seed,
      causal=config.causal,
  )


@functools.lru_cache(maxsize=64)
def bigbird_block_mask(config: BigBirdConfig, length: int) -> block_sparse.BlockMask:
  """The pattern of `bigbird_pattern` as a BlockMask on kernel tiles, built once per length.

  Tiles no larger than the largest power of two dividing block_size, so BigBird's blocks fall on whole tiles
  (empty or full) instead of splitting many tiles into partial ones.
  """
  tile = min(kernel_tile(length), max(16, config.block_size & -config.block_size))
  return block_sparse.bigbird(
      length, block_size=config.block_size, num_sliding_blocks=config.num_sliding_blocks,
      num_global_blocks=config.num_global_blocks, num_random_blocks=config.num_random_blocks, seed=config.seed,
      causal=config.causal, block_q=tile, block_k=tile,
  )


def bigbird_pattern(config: BigBirdConfig, length: int) -> np.ndarray:
  """Dense bool [T, S] (T = S = length) of the (query, key) pairs BigBird attends."""
  blocks = np.kron(bigbird_block_layout(config, length), np.ones((config.block_size,) * 2, bool))
  pattern = blocks[:length, :length]
  return pattern & np.tri(length, dtype=bool) if config.causal else pattern


def _block_table(layout: np.ndarray, num_global_blocks: int) -> np.ndarray:
  """Layout rows as key-block lists int [nb, M] (-1 padded). Global rows are left empty: they go dense."""
  rows = [np.flatnonzero(row) if i >= num_global_blocks else np.zeros(0, int) for i, row in enumerate(layout)]
  table = np.full((len(rows), max(1, max(len(r) for r in rows))), -1)
  for i, row in enumerate(rows):
    table[i, :len(row)] = row
  return table


def bigbird_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layout: np.ndarray,
    block_size: int,
    num_global_blocks: int,
    causal: bool,
    key_mask: jax.Array | None = None,
) -> jax.Array:
  """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D] over the block `layout` [nb, nb].

  Non-global query blocks gather their listed key blocks; global query rows (the first
  num_global_blocks * block_size positions) attend every key directly.
  """
  t = q.shape[1]
  causal_mask = (lambda q_pos, k_pos: k_pos <= q_pos) if causal else None
  y = blocked_attention(
      q, k, v, block_size=block_size, block_table=_block_table(layout, num_global_blocks),
      allowed=causal_mask, key_mask=key_mask,
  )
  rows = min(num_global_blocks * block_size, t)
  if rows:
    row_mask = jnp.ones((1, t), bool)[:, None, :] if key_mask is None else key_mask[:, None, :]
    if causal:
      row_mask = row_mask & np.tri(rows, t, dtype=bool)
    y = y.at[:, :rows].set(rows_attention(q[:, :rows], k, v, row_mask))
  return y


@register(BigBirdConfig)
class BigBird(HeadAttention):
  """Multi-head BigBird attention (ITC): sliding + global + random key blocks."""

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> KVCache:
    """Every position's keys and values (random blocks reach anywhere in the past); causal only."""
    check_decodable(self.config, max_len)
    return KVCache(*empty_kv(batch, max_len, self.qkv.num_kv_heads, self.qkv.head_dim, dtype), zero_index())

  def attend_cached(self, x, q, k, v, cache):
    # Causal layout rows do not depend on the length, so the cache's max_len gives the same pattern.
    rows = layout_rows(bigbird_block_layout(self.config, cache.k.shape[1]))
    return block_layout_attention(q, k, v, cache, rows=rows, block_size=self.config.block_size)

  def attend(self, x, q, k, v, mask):
    cfg = self.config
    if cfg.impl == "pallas":
      return block_sparse_with_padding_mask(q, k, v, bigbird_block_mask(cfg, x.shape[1]), mask)
    return bigbird_attention(
        q, k, v, layout=bigbird_block_layout(cfg, x.shape[1]), block_size=cfg.block_size,
        num_global_blocks=cfg.num_global_blocks, causal=cfg.causal, key_mask=mask,
    )
