"""Block masks: which (query, key) pairs a block-sparse attention attends, stored per block.

A `BlockMask` covers a [T, S] grid of (query, key) pairs cut into tiles of [block_q, block_k]. Every tile is
empty (skipped), full (attended without an element mask) or partial (its [block_q, block_k] element mask is
one of a deduplicated table of tiles). The mask is one pattern shared by every head, or one per query head.

Query i sits at key position p = i + (S - T), as in `kernels.flash_attention` (a block of T queries aligned
to the end of the S keys); for T == S, p = i. Tiles that overhang T or S are partial: pairs outside the grid
are never attended, so the kernels need no separate length mask for the padding to whole tiles.

Everything here is host-side numpy, built once per pattern and length (at trace time). The kernels read the
`lists` / `transposed_lists` views: per query tile the key tiles to visit (full ones first, then partial),
and per key tile the query tiles, for the dk/dv pass.

Builders: `causal`, `local`, `dilated`, `global_tokens`, `random_blocks`, `longformer`, `bigbird`,
`from_dense`; combine masks with `|` (union) and `&` (intersection), or give each head its own with
`stack_heads`.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# Codes of `BlockMask.layout`; values >= 0 index `BlockMask.tiles` (a partial tile).
EMPTY = -1
FULL = -2

DEFAULT_BLOCK = 128
# Elements of the candidate tiles evaluated at once while building (bounds host memory to ~16 MB).
_BUILD_CHUNK = 1 << 24

# predicate(q_pos int [P, Bq, 1], k_pos int [P, 1, Bk]) -> bool [P, Bq, Bk]; q_pos are query indices i.
Predicate = Callable[[np.ndarray, np.ndarray], np.ndarray]


class BlockLists(NamedTuple):
  """Per-row visit lists of a block layout (rows are query tiles, or key tiles when transposed).

  blocks int32 [Hm, R, M]: the column tiles row r visits, full ones first; tiles int32 [Hm, R, M]: index into
  `BlockMask.tiles` of each partial entry (0 elsewhere, never read); num_full int32 [Hm, R]: entries
  [0, num_full) are full; count int32 [Hm, R]: entries [num_full, count) are partial, the rest padding.
  """

  blocks: np.ndarray
  tiles: np.ndarray
  num_full: np.ndarray
  count: np.ndarray


def _is_power_of_two(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """A block-sparse attention pattern over [T, S] (query, key) pairs.

  Attributes:
    shape: (T, S), the number of queries and keys.
    block_q, block_k: tile sizes (powers of two >= 16, as the GPU kernels need).
    layout: int32 [Hm, ceil(T / block_q), ceil(S / block_k)] with Hm = 1 (shared by all heads) or the number
      of query heads: EMPTY, FULL, or the index of the tile's element mask in `tiles`.
    tiles: bool [NT, block_q, block_k], distinct element masks of the partial tiles (none all-True or all-False).

  Identity equality and hash (eq=False), so a mask can be a static argument of a jitted function.
  """

  shape: tuple[int, int]
  block_q: int
  block_k: int
  layout: np.ndarray
  tiles: np.ndarray

  def __post_init__(self):
    t, s = self.shape
    _check_blocks(self.block_q, self.block_k)
    expected = (-(-t // self.block_q), -(-s // self.block_k))
    if self.layout.ndim != 3 or self.layout.shape[1:] != expected:
      raise ValueError(f"layout.shape={self.layout.shape} is not valid; expected [Hm, {expected[0]}, {expected[1]}]")
    if self.tiles.shape[1:] != (self.block_q, self.block_k):
      raise ValueError(f"tiles.shape={self.tiles.shape} is not valid; expected [NT, {self.block_q}, {self.block_k}]")
    self.layout.flags.writeable = False
    self.tiles.flags.writeable = False

  @property
  def num_heads(self) -> int:
    """Hm: 1 when one pattern serves every head, else the number of query heads."""
    return self.layout.shape[0]

  @property
  def grid(self) -> tuple[int, int]:
    """(query tiles, key tiles)."""
    return self.layout.shape[1:]

  def __repr__(self) -> str:
    nonempty = int((self.layout != EMPTY).sum())
    return (f"BlockMask(shape={self.shape}, blocks=({self.block_q}, {self.block_k}), heads={self.num_heads}, "
            f"nonempty={nonempty}/{self.layout.size}, full={int((self.layout == FULL).sum())}, "
            f"distinct_partial_tiles={len(self.tiles)})")

  @functools.cached_property
  def lists(self) -> BlockLists:
    """Per query tile, the key tiles to visit (for the forward and dq kernels)."""
    return _visit_lists(self.layout)

  @functools.cached_property
  def transposed_lists(self) -> BlockLists:
    """Per key tile, the query tiles that visit it (for the dk/dv kernel); tile indices as in `lists`."""
    return _visit_lists(self.layout.transpose(0, 2, 1))

  def nonempty_blocks(self) -> int:
    """Non-empty tiles summed over the Hm mask heads (the work the kernels do, in tiles)."""
    return int((self.layout != EMPTY).sum())

  def attended_pairs(self) -> int:
    """Attended (query, key) pairs summed over the Hm mask heads."""
    full = int((self.layout == FULL).sum()) * self.block_q * self.block_k
    partial = self.layout[self.layout >= 0]
    return full + int(self.tiles.sum(axis=(1, 2))[partial].sum()) if len(partial) else full

  def to_dense(self) -> np.ndarray:
    """bool [Hm, T, S]: True where query i attends key j (for tests and for drawing the pattern)."""
    hm, nq, nk = self.layout.shape
    bq, bk = self.block_q, self.block_k
    table = np.concatenate([self.tiles, np.zeros((1, bq, bk), bool), np.ones((1, bq, bk), bool)])
    index = np.where(self.layout == EMPTY, len(self.tiles), np.where(self.layout == FULL, len(self.tiles) + 1,
                                                                     self.layout))
    dense = table[index].transpose(0, 1, 3, 2, 4).reshape(hm, nq * bq, nk * bk)
    return dense[:, :self.shape[0], :self.shape[1]]

  def __or__(self, other: "BlockMask") -> "BlockMask":
    return _combine(self, other, union=True)

  def __and__(self, other: "BlockMask") -> "BlockMask":
    return _combine(self, other, union=False)


def _visit_lists(layout: np.ndarray) -> BlockLists:
  """Visit lists of a layout [Hm, R, C]: per row the non-empty columns, full ones first, each group ascending."""
  rank = np.where(layout == FULL, 0, np.where(layout == EMPTY, 2, 1))
  count = (rank < 2).sum(-1).astype(np.int32)
  width = max(1, int(count.max(initial=0)))
  blocks = np.argsort(rank, axis=-1, kind="stable")[..., :width].astype(np.int32)
  codes = np.take_along_axis(layout, blocks, axis=-1)
  return BlockLists(
      blocks=blocks,
      tiles=np.maximum(codes, 0).astype(np.int32),
      num_full=(rank == 0).sum(-1).astype(np.int32),
      count=count,
  )


def _check_blocks(block_q, block_k):
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not _is_power_of_two(value) or value < 16:
      raise ValueError(f"{name}={value!r} is not valid; it must be a power of two >= 16")


def _check_lengths(t, s):
  for name, value in (("t", t), ("s", s)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= 1")


def _from_tiles(shape, block_q, block_k, positions: np.ndarray, tiles: np.ndarray, num_heads: int,
                full: np.ndarray | None = None) -> BlockMask:
  """Mask whose tiles at positions int [P, 3] (head, q tile, k tile) hold tiles bool [P, bq, bk].

  All-True tiles become FULL, all-False ones EMPTY, and the remaining tiles are deduplicated into the table.
  Tiles elsewhere are FULL where `full` (bool [Hm, nq, nk]) says so, else EMPTY.
  """
  t, s = shape
  layout = np.full((num_heads, -(-t // block_q), -(-s // block_k)), EMPTY, np.int32)
  if full is not None:
    layout[full] = FULL
  flat = tiles.reshape(len(tiles), block_q * block_k)
  all_true, all_false = flat.all(axis=1), ~flat.any(axis=1)
  h, i, j = positions.T
  layout[h[all_true], i[all_true], j[all_true]] = FULL
  partial = np.flatnonzero(~all_true & ~all_false)
  # Deduplicate on the packed bits: a dict lookup per tile is far cheaper than sorting whole tiles.
  packed = np.packbits(flat[partial], axis=1)
  seen: dict[bytes, int] = {}
  table_rows = []
  for row, p in zip(packed, partial):
    key = row.tobytes()
    if key not in seen:
      seen[key] = len(table_rows)
      table_rows.append(p)
    layout[h[p], i[p], j[p]] = seen[key]
  table = tiles[table_rows] if table_rows else np.zeros((0, block_q, block_k), bool)
  return BlockMask(shape=(int(t), int(s)), block_q=block_q, block_k=block_k, layout=layout, tiles=table)


def _element_positions(positions: np.ndarray, block_q: int, block_k: int):
  """Query and key indices of tiles at positions [P, 2] (q tile, k tile): int [P, bq, 1], int [P, 1, bk]."""
  q_pos = positions[:, 0, None, None] * block_q + np.arange(block_q)[None, :, None]
  k_pos = positions[:, 1, None, None] * block_k + np.arange(block_k)[None, None, :]
  return q_pos, k_pos


def _build(t, s, block_q, block_k, predicate: Predicate, candidates: np.ndarray,
           head: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Evaluates `predicate` on the candidate tiles bool [nq, nk]; returns (positions [P, 3], tiles [P, bq, bk])."""
  ij = np.argwhere(candidates)
  per_chunk = max(1, _BUILD_CHUNK // (block_q * block_k))
  tiles = []
  for start in range(0, len(ij), per_chunk):
    q_pos, k_pos = _element_positions(ij[start:start + per_chunk], block_q, block_k)
    inside = (q_pos < t) & (k_pos < s)
    tiles.append(np.broadcast_to(predicate(q_pos, k_pos), inside.shape) & inside)
  tiles = np.concatenate(tiles) if tiles else np.zeros((0, block_q, block_k), bool)
  positions = np.concatenate([np.full((len(ij), 1), head), ij], axis=1)
  return positions, tiles


def _single(t, s, block_q, block_k, predicate, candidates, known_full=None) -> BlockMask:
  """Shared mask from a predicate evaluated on the candidate tiles, except those known_full (bool [nq, nk])."""
  if known_full is not None:
    candidates = candidates & ~known_full
    known_full = known_full[None]
  positions, tiles = _build(t, s, block_q, block_k, predicate, candidates)
  return _from_tiles((t, s), block_q, block_k, positions, tiles, 1, known_full)


def _per_head(t, s, block_q, block_k, parts: Sequence[tuple[Predicate, np.ndarray]]) -> BlockMask:
  """One mask head per (predicate, candidates) pair; collapses to a shared mask when all heads agree."""
  built = [_build(t, s, block_q, block_k, pred, cand, head=h) for h, (pred, cand) in enumerate(parts)]
  mask = _from_tiles((t, s), block_q, block_k, np.concatenate([p for p, _ in built]),
                     np.concatenate([x for _, x in built]), len(parts))
  return _collapse_heads(mask)


def _collapse_heads(mask: BlockMask) -> BlockMask:
  if mask.num_heads > 1 and (mask.layout == mask.layout[:1]).all():
    return dataclasses.replace(mask, layout=mask.layout[:1].copy())
  return mask


def _band_candidates(t, s, block_q, block_k, lo, hi) -> np.ndarray:
  """bool [nq, nk]: tiles holding a pair with lo <= j - i <= hi (None: unbounded on that side)."""
  nq, nk = -(-t // block_q), -(-s // block_k)
  q_first = np.arange(nq)[:, None] * block_q
  k_first = np.arange(nk)[None, :] * block_k
  ok = np.ones((nq, nk), bool)
  if hi is not None:
    ok &= k_first - (q_first + block_q - 1) <= hi  # the smallest j - i of the tile
  if lo is not None:
    ok &= (k_first + block_k - 1) - q_first >= lo  # the largest
  return ok


def _band_full(t, s, block_q, block_k, lo, hi) -> np.ndarray:
  """bool [nq, nk]: tiles inside the grid whose every pair has lo <= j - i <= hi (no need to evaluate them)."""
  nq, nk = -(-t // block_q), -(-s // block_k)
  q_first = np.arange(nq)[:, None] * block_q
  k_first = np.arange(nk)[None, :] * block_k
  full = (q_first + block_q <= t) & (k_first + block_k <= s)
  if hi is not None:
    full = full & ((k_first + block_k - 1) - q_first <= hi)
  if lo is not None:
    full = full & (k_first - (q_first + block_q - 1) >= lo)
  return full


# ---------------------------------------------------------------------------------------------------------------
# Builders


def from_dense(dense: np.ndarray, *, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Mask of an explicit bool pattern [T, S] (shared by all heads) or [H, T, S] (one per query head).

  Classifies every tile (O(H * T * S) host work); the other builders only look at tiles their pattern can touch.
  """
  dense = np.asarray(dense, bool)
  if dense.ndim not in (2, 3):
    raise ValueError(f"dense.shape={dense.shape} is not valid; expected [T, S] or [H, T, S]")
  _check_blocks(block_q, block_k)
  heads = dense[None] if dense.ndim == 2 else dense
  t, s = heads.shape[1:]
  padded = np.zeros((len(heads), -(-t // block_q) * block_q, -(-s // block_k) * block_k), bool)
  padded[:, :t, :s] = heads
  candidates = np.ones((-(-t // block_q), -(-s // block_k)), bool)
  parts = [(lambda q, k, h=h: padded[h][q, k], candidates) for h in range(len(heads))]
  return _per_head(t, s, block_q, block_k, parts)


def causal(t: int, s: int | None = None, *, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Query i attends keys j <= i + (S - T)."""
  s = t if s is None else s
  _check_lengths(t, s)
  _check_blocks(block_q, block_k)
  return _causal(t, s, block_q, block_k)


def _causal(t, s, block_q, block_k) -> BlockMask:
  offset = s - t
  return _single(t, s, block_q, block_k, lambda q, k: k <= q + offset,
                 _band_candidates(t, s, block_q, block_k, None, offset),
                 _band_full(t, s, block_q, block_k, None, offset))


def _window_bounds(window, causal_: bool) -> tuple[int, int]:
  if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
    if window < (1 if causal_ else 0):
      raise ValueError(f"window={window!r} is not valid; it must be >= {1 if causal_ else 0}")
    return (window - 1, 0) if causal_ else (window, window)
  if (isinstance(window, tuple) and len(window) == 2
      and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in window)):
    return int(window[0]), int(window[1])
  raise ValueError(f"window={window!r} is not valid; expected an int or (left, right) with ints >= 0")


def local(t: int, window: int | tuple[int, int], s: int | None = None, *, causal: bool = True,
          block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Banded attention around each query's position p = i + (S - T).

  window: an int w is a causal sliding window of w keys, p - w < j <= p (causal=True), or +-w keys,
  |j - p| <= w (causal=False); (left, right) attends p - left <= j <= p + right whatever `causal` says.
  """
  s = t if s is None else s
  _check_lengths(t, s)
  _check_blocks(block_q, block_k)
  left, right = _window_bounds(window, causal)
  lo, hi = s - t - left, s - t + right
  return _single(t, s, block_q, block_k, lambda q, k: (k - q >= lo) & (k - q <= hi),
                 _band_candidates(t, s, block_q, block_k, lo, hi), _band_full(t, s, block_q, block_k, lo, hi))


def dilated(t: int, window: int, dilation: int | Sequence[int], s: int | None = None, *, causal: bool = True,
            block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Dilated sliding window (Longformer): keys j = p + d*n for -window < n <= 0 (causal) or |n| <= window.

  dilation: d for every head, or one per query head (then the mask has one pattern per head).
  """
  s = t if s is None else s
  _check_lengths(t, s)
  _check_blocks(block_q, block_k)
  if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window={window!r} is not valid; it must be an integer >= 1")
  dilations = (dilation,) if isinstance(dilation, (int, np.integer)) else tuple(dilation)
  if not dilations or any(not _is_count(d, 1) for d in dilations):
    raise ValueError(f"dilation={dilation!r} is not valid; expected an integer >= 1 or one per head")
  offset = s - t

  def part(d):
    lo, hi = (-(window - 1) * d, 0) if causal else (-window * d, window * d)

    def predicate(q, k):
      diff = k - q - offset
      return (diff % d == 0) & (diff >= lo) & (diff <= hi)

    return predicate, _band_candidates(t, s, block_q, block_k, lo + offset, hi + offset)

  return _per_head(t, s, block_q, block_k, [part(d) for d in dilations])


def _is_count(x, minimum) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= minimum


def global_tokens(t: int, positions: Sequence[int], s: int | None = None, *, block_q: int = DEFAULT_BLOCK,
                  block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Tokens at `positions` (key positions; ignored past the sequence) attend every key and every query attends them.

  Symmetric: intersect with `causal` for the causal form (global tokens then see, and are seen from, the past).
  """
  s = t if s is None else s
  _check_lengths(t, s)
  _check_blocks(block_q, block_k)
  positions = tuple(positions)
  if any(not _is_count(p, 0) for p in positions):
    raise ValueError(f"positions={positions!r} is not valid; expected integers >= 0")
  nq, nk = -(-t // block_q), -(-s // block_k)
  offset = s - t
  is_global_key = np.zeros(nk * block_k, bool)
  is_global_key[[p for p in positions if p < s]] = True
  is_global_query = np.zeros(nq * block_q, bool)
  is_global_query[[p - offset for p in positions if 0 <= p - offset < t]] = True
  candidates = (is_global_query.reshape(nq, block_q).any(1)[:, None]
                | is_global_key.reshape(nk, block_k).any(1)[None, :])
  return _single(t, s, block_q, block_k, lambda q, k: is_global_query[q] | is_global_key[k], candidates)


def random_blocks(t: int, n: int, seed: int, s: int | None = None, *, num_heads: int | None = None,
                  block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Each query tile attends n distinct key tiles (all of them if fewer), drawn with a seeded RNG.

  num_heads: None for one draw shared by every head, else an independent draw per query head.
  """
  s = t if s is None else s
  _check_lengths(t, s)
  _check_blocks(block_q, block_k)
  if not _is_count(n, 0):
    raise ValueError(f"n={n!r} is not valid; it must be an integer >= 0")
  if not _is_count(seed, 0):
    raise ValueError(f"seed={seed!r} is not valid; it must be an integer >= 0")
  if num_heads is not None and not _is_count(num_heads, 1):
    raise ValueError(f"num_heads={num_heads!r} is not valid; it must be an integer >= 1")
  nq, nk = -(-t // block_q), -(-s // block_k)

  def draw(head):
    chosen = np.zeros((nq, nk), bool)
    for i in range(nq):
      rng = np.random.default_rng([seed, head, i])
      chosen[i, rng.choice(nk, size=min(n, nk), replace=False)] = True
    return lambda q, k: np.ones((), bool), chosen

  return _per_head(t, s, block_q, block_k, [draw(h) for h in range(num_heads or 1)])


def longformer(t: int, window: int, *, dilation: int | Sequence[int] = 1, global_positions: Sequence[int] = (0,),
               causal: bool = True, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """Longformer self-attention (T = S): a dilated window per head plus symmetric global tokens.

  The window is as in `dilated`; causal also keeps global attention to the past (the pattern of
  `efficient_attention.variants.longformer.longformer_pattern`).
  """
  mask = dilated(t, window, dilation, causal=causal, block_q=block_q, block_k=block_k)
  if any(p < t for p in global_positions):
    mask = mask | global_tokens(t, global_positions, block_q=block_q, block_k=block_k)
  if causal:
    mask = mask & _causal(t, t, block_q, block_k)
  return mask


def bigbird_block_layout(num_blocks: int, *, num_sliding_blocks: int, num_global_blocks: int,
                         num_random_blocks: int, seed: int, causal: bool) -> np.ndarray:
  """bool [nb, nb]: the key blocks each query block of BigBird (ITC) attends.

  Query block i attends the num_sliding_blocks blocks centred on it, the first num_global_blocks blocks (which
  attend every block) and num_random_blocks others drawn from an RNG seeded by (seed, i). Causal rows see only
  blocks <= i, so their draws do not depend on num_blocks and a prefix keeps its pattern as the sequence grows.
  """
  layout = np.zeros((num_blocks, num_blocks), bool)
  half = num_sliding_blocks // 2
  for i in range(num_blocks):
    reach = i + 1 if causal else num_blocks
    if i < num_global_blocks:
      layout[i, :reach] = True
      continue
    layout[i, max(i - half, 0):min(i + half + 1, reach)] = True
    layout[i, :min(num_global_blocks, reach)] = True
    candidates = np.flatnonzero(~layout[i, :reach])
    rng = np.random.default_rng([seed, i])
    layout[i, rng.choice(candidates, size=min(num_random_blocks, len(candidates)), replace=False)] = True
  return layout


def bigbird(t: int, *, block_size: int, num_sliding_blocks: int = 3, num_global_blocks: int = 1,
            num_random_blocks: int = 2, seed: int = 0, causal: bool = True, block_q: int = DEFAULT_BLOCK,
            block_k: int = DEFAULT_BLOCK) -> BlockMask:
  """BigBird self-attention (T = S) over blocks of `block_size` positions (see `bigbird_block_layout`).

  block_size is BigBird's own block and need not match the kernel tiles (block_q, block_k). Causal also masks
  keys after the query inside the diagonal block.
  """
  _check_lengths(t, t)
  _check_blocks(block_q, block_k)
  for name, value, minimum in (("block_size", block_size, 1), ("num_sliding_blocks", num_sliding_blocks, 1),
                               ("num_global_blocks", num_global_blocks, 0),
                               ("num_random_blocks", num_random_blocks, 0), ("seed", seed, 0)):
    if not _is_count(value, minimum):
      raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= {minimum}")
  nb = -(-t // block_size)
  layout = bigbird_block_layout(nb, num_sliding_blocks=num_sliding_blocks, num_global_blocks=num_global_blocks,
                                num_random_blocks=num_random_blocks, seed=seed, causal=causal)

  def predicate(q, k):
    attended = layout[np.minimum(q // block_size, nb - 1), np.minimum(k // block_size, nb - 1)]
    return attended & (k <= q) if causal else attended

  # A kernel tile is a candidate when any BigBird block it overlaps is attended (2-D prefix sums).
  nq, nk = -(-t // block_q), -(-t // block_k)
  sums = np.pad(layout.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  r0 = np.minimum(np.arange(nq) * block_q // block_size, nb)
  r1 = np.minimum(((np.arange(nq) + 1) * block_q - 1) // block_size + 1, nb)
  c0 = np.minimum(np.arange(nk) * block_k // block_size, nb)
  c1 = np.minimum(((np.arange(nk) + 1) * block_k - 1) // block_size + 1, nb)
  count = sums[r1][:, c1] - sums[r0][:, c1] - sums[r1][:, c0] + sums[r0][:, c0]
  return _single(t, t, block_q, block_k, predicate, count > 0)


def stack_heads(masks: Sequence[BlockMask]) -> BlockMask:
  """One pattern per query head: head h of the result is masks[h] (each shared across heads)."""
  masks = list(masks)
  if not masks:
    raise ValueError("masks is empty; give one shared BlockMask per query head")
  first = masks[0]
  for i, m in enumerate(masks):
    if m.num_heads != 1 or (m.shape, m.block_q, m.block_k) != (first.shape, first.block_q, first.block_k):
      raise ValueError(f"masks[{i}] is not valid; every mask must be shared (num_heads=1) with shape {first.shape} "
                       f"and blocks ({first.block_q}, {first.block_k})")
  offsets = np.cumsum([0] + [len(m.tiles) for m in masks])
  layout = np.concatenate([np.where(m.layout >= 0, m.layout + o, m.layout) for m, o in zip(masks, offsets)])
  tiles = np.concatenate([m.tiles for m in masks])
  return BlockMask(shape=first.shape, block_q=first.block_q, block_k=first.block_k, layout=layout.astype(np.int32),
                   tiles=tiles)


# ---------------------------------------------------------------------------------------------------------------
# Combination


def _tiles_at(mask: BlockMask, positions: np.ndarray) -> np.ndarray:
  """Element masks bool [P, bq, bk] of mask's tiles at positions [P, 3] (head, q tile, k tile)."""
  h = np.minimum(positions[:, 0], mask.num_heads - 1)
  codes = mask.layout[h, positions[:, 1], positions[:, 2]]
  bq, bk = mask.block_q, mask.block_k
  table = np.concatenate([mask.tiles, np.zeros((1, bq, bk), bool), np.ones((1, bq, bk), bool)])
  return table[np.where(codes == EMPTY, len(mask.tiles), np.where(codes == FULL, len(mask.tiles) + 1, codes))]


def _combine(a: BlockMask, b: BlockMask, *, union: bool) -> BlockMask:
  if not isinstance(b, BlockMask):
    return NotImplemented
  if (a.shape, a.block_q, a.block_k) != (b.shape, b.block_q, b.block_k):
    raise ValueError(f"cannot combine masks of shape {a.shape} blocks ({a.block_q}, {a.block_k}) and shape "
                     f"{b.shape} blocks ({b.block_q}, {b.block_k}); build both with the same T, S and blocks")
  if a.num_heads != b.num_heads and 1 not in (a.num_heads, b.num_heads):
    raise ValueError(f"cannot combine masks with {a.num_heads} and {b.num_heads} heads; each needs 1 or the same H")
  heads = max(a.num_heads, b.num_heads)
  la = np.broadcast_to(a.layout, (heads, *a.grid))
  lb = np.broadcast_to(b.layout, (heads, *b.grid))
  if union:
    # Full wins; two empties stay empty; anything else needs the element-wise OR.
    decided = (la == FULL) | (lb == FULL) | ((la == EMPTY) & (lb == EMPTY))
  else:
    decided = (la == EMPTY) | (lb == EMPTY) | ((la == FULL) & (lb == FULL))
  positions = np.argwhere(~decided)
  if len(positions):
    ta, tb = _tiles_at(a, positions), _tiles_at(b, positions)
    tiles = ta | tb if union else ta & tb
  else:
    tiles = np.zeros((0, a.block_q, a.block_k), bool)
  full = decided & (((la == FULL) | (lb == FULL)) if union else ((la == FULL) & (lb == FULL)))
  return _collapse_heads(_from_tiles(a.shape, a.block_q, a.block_k, positions, tiles, heads, full))
