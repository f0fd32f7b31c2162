"""BigBird attention (Zaheer et al. 2020, ITC form): sliding, global and random key blocks.

The sequence is cut into blocks of `block_size`. Query block i attends the `num_sliding_blocks` blocks
centred on i, the first `num_global_blocks` blocks (which in turn attend every block) and
`num_random_blocks` other blocks drawn with a seeded RNG. Causal: only blocks at or before i, with the
element-causal mask inside block i. Memory O(T * (sliding + global + random) * block_size).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention.blocked_attention import blocked_attention, rows_attention
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.registry import register
from efficient_attention.validation import check_count


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


def bigbird_block_layout(config: BigBirdConfig, length: int) -> np.ndarray:
  """bool [nb, nb] (nb = ceil(length / block_size)): which key blocks each query block attends.

  Each query block draws its random blocks from an RNG seeded by (seed, block index), so they are fixed
  for a layer and a length; causal rows (whose candidates are the blocks before them) do not even change
  with the length, so a prefix keeps its pattern as the sequence grows.
  """
  num_blocks = -(-length // config.block_size)
  layout = np.zeros((num_blocks, num_blocks), bool)
  half = config.num_sliding_blocks // 2
  for i in range(num_blocks):
    # Keys a causal query block may reach: blocks 0..i.
    reach = i + 1 if config.causal else num_blocks
    if i < config.num_global_blocks:
      layout[i, :reach] = True
      continue
    layout[i, max(i - half, 0):min(i + half + 1, reach)] = True
    layout[i, :min(config.num_global_blocks, reach)] = True
    candidates = np.flatnonzero(~layout[i, :reach])
    rng = np.random.default_rng([config.seed, i])
    chosen = rng.choice(candidates, size=min(config.num_random_blocks, len(candidates)), replace=False)
    layout[i, chosen] = True
  return layout


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

  def attend(self, x, q, k, v, mask):
    cfg = self.config
    return bigbird_attention(
        q, k, v, layout=bigbird_block_layout(cfg, x.shape[1]), block_size=cfg.block_size,
        num_global_blocks=cfg.num_global_blocks, causal=cfg.causal, key_mask=mask,
    )
