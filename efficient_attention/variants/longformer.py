"""Longformer attention (Beltagy et al. 2020): sliding window, per-head dilation, and global tokens.

Local part: query t attends keys t - d*i for 0 <= i < window (causal) or t + d*i for |i| <= window
(bidirectional), d the head's dilation. Global tokens attend every key and are attended by every query
(causal: only from and to the past). Memory O(T * window + T * G) for G global tokens.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attention.block_sparse import block_sparse_with_padding_mask, kernel_tile
from efficient_attention.blocked_attention import ExtraKeys, band_attention, rows_attention
from efficient_attention.cache import check_decodable, empty_kv, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention, QKVProjection
from efficient_attention.registry import register
from efficient_attention.sparse_decoding import LongformerCache, longformer_cached_attention, longformer_ring_size
from efficient_attention.validation import check_choice, check_count
from kernels import block_sparse

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongformerConfig(AttentionConfig):
  variant = "longformer"
  # Causal: the last `window` keys (itself included) at stride d. Bidirectional: `window` keys on each side.
  window: int = 64
  # Dilation d of each head's window (keys t - d*i): one value for all heads, or one per head.
  dilation: tuple[int, ...] = (1,)
  # Positions of the global tokens (default: the first token, e.g. CLS); positions >= T are ignored.
  global_tokens: tuple[int, ...] = (0,)
  # The paper's Q_g, K_g, V_g: global tokens' rows use their own projections instead of the local ones.
  separate_global_projections: bool = False
  # "xla": blocked jnp attention (O(T * (window + G)) memory). "pallas": the block-sparse kernel
  # (kernels.block_sparse), which visits only the key tiles the pattern touches; right padding only.
  impl: str = "xla"

  def __post_init__(self):
    # Flags and ml_collections hand sequences over as lists; tuples keep the config hashable.
    object.__setattr__(self, "dilation", tuple(self.dilation))
    object.__setattr__(self, "global_tokens", tuple(self.global_tokens))
    super().__post_init__()
    check_count("window", self.window, 1)
    if len(self.dilation) not in (1, self.num_heads):
      raise ValueError(
          f"dilation={self.dilation} is not valid; give one value for all heads or num_heads={self.num_heads} values"
      )
    for d in self.dilation:
      check_count("dilation", d, 1)
    for p in self.global_tokens:
      check_count("global_tokens", p, 0)
    if len(set(self.global_tokens)) != len(self.global_tokens):
      raise ValueError(f"global_tokens={self.global_tokens} is not valid; positions must be distinct")
    check_choice("impl", self.impl, IMPLEMENTATIONS)

  def head_dilations(self) -> tuple[int, ...]:
    """Dilation of every query head (length num_heads)."""
    return self.dilation * self.num_heads if len(self.dilation) == 1 else self.dilation


def _global_positions(global_tokens: tuple[int, ...], length: int) -> np.ndarray:
  """Sorted global positions that exist in a sequence of `length` (int [G])."""
  return np.array(sorted(p for p in global_tokens if p < length), dtype=np.int32)


def longformer_pattern(config: LongformerConfig, length: int) -> np.ndarray:
  """Dense bool [H, T, S] (T = S = length) of the (query, key) pairs each head attends."""
  t = np.arange(length)[:, None]
  s = np.arange(length)[None, :]
  is_global = np.zeros(length, bool)
  is_global[_global_positions(config.global_tokens, length)] = True
  heads = []
  for d in config.head_dilations():
    steps, on_stride = np.divmod(s - t, d)
    reach = (steps > -config.window) & (steps <= 0) if config.causal else np.abs(steps) <= config.window
    heads.append((reach & (on_stride == 0)) | is_global[:, None] | is_global[None, :])
  pattern = np.stack(heads)
  return pattern & (s <= t) if config.causal else pattern


def _kv_heads_for(k: jax.Array, v: jax.Array, heads: np.ndarray, num_heads: int):
  """k/v [B, S, Hkv, D] for the query heads `heads` (sorted): kept grouped when they are whole GQA groups."""
  group = num_heads // k.shape[2]
  kv = heads // group
  whole = np.unique(kv)
  # Whole groups keep GQA's shared K/V; a group split across dilations needs K/V per query head.
  index = whole if len(heads) == len(whole) * group else kv
  return k[:, :, index], v[:, :, index]


def longformer_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    dilations: tuple[int, ...],
    global_tokens: tuple[int, ...],
    causal: bool,
    key_mask: jax.Array | None = None,
    global_qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; the pattern of `longformer_pattern`.

  dilations: one per query head. key_mask bool [B, T]: padded keys are never attended. global_qkv:
  (q, k, v) shaped like (q, k, v) used for the global tokens' rows (the paper's separate projections).
  """
  t, h = q.shape[1], q.shape[2]
  positions = np.arange(t)
  g_pos = _global_positions(global_tokens, t)
  key_ok = jnp.ones((1, t), bool) if key_mask is None else key_mask
  is_global = np.zeros(t, bool)
  is_global[g_pos] = True
  # Global keys enter every row once, as extra keys; the band skips them so none is counted twice.
  local_keys = key_ok & ~is_global
  extra_mask = key_ok[:, None, g_pos]
  if causal:
    extra_mask = extra_mask & (g_pos[None, :] <= positions[:, None])
  lo, hi = (-(window - 1), 0) if causal else (-window, window)

  heads_by_dilation = {d: np.flatnonzero(np.array(dilations) == d) for d in sorted(set(dilations))}
  outs = []
  for d, heads in heads_by_dilation.items():
    if len(heads_by_dilation) == 1:
      q_h, k_h, v_h = q, k, v
    else:
      q_h, (k_h, v_h) = q[:, :, heads], _kv_heads_for(k, v, heads, h)
    extra = ExtraKeys(k_h[:, g_pos], v_h[:, g_pos], extra_mask) if len(g_pos) else None
    outs.append(band_attention(q_h, k_h, v_h, lo=lo, hi=hi, dilation=d, key_mask=local_keys, extra=extra))
  y = outs[0]
  if len(outs) > 1:
    y = jnp.concatenate(outs, axis=2)[:, :, np.argsort(np.concatenate(list(heads_by_dilation.values())))]

  if len(g_pos):
    q_g, k_g, v_g = (q, k, v) if global_qkv is None else global_qkv
    row_mask = key_ok[:, None, :]
    if causal:
      row_mask = row_mask & (positions[None, :] <= g_pos[:, None])
    y = y.at[:, g_pos].set(rows_attention(q_g[:, g_pos], k_g, v_g, row_mask).astype(y.dtype))
  return y


@functools.lru_cache(maxsize=64)
def longformer_block_mask(config: LongformerConfig, length: int) -> block_sparse.BlockMask:
  """The pattern of `longformer_pattern` as a BlockMask (per head when dilations differ), built once per length."""
  tile = kernel_tile(length)
  return block_sparse.longformer(
      length, config.window, dilation=config.head_dilations(), global_positions=config.global_tokens,
      causal=config.causal, block_q=tile, block_k=tile,
  )


@register(LongformerConfig)
class Longformer(HeadAttention):
  """Multi-head Longformer attention: dilated sliding windows plus symmetric global tokens."""

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> LongformerCache:
    """A ring of the positions the dilated windows reach plus one entry per global token (causal only)."""
    cfg = self.config
    check_decodable(cfg, max_len)
    if cfg.separate_global_projections:
      raise ValueError("separate_global_projections=True is not valid for decoding: the global rows would need "
                       "every past position under their own projections")
    size = longformer_ring_size(cfg.window, cfg.head_dilations(), max_len)
    globals_ = len(_global_positions(cfg.global_tokens, max_len))
    return LongformerCache(*empty_kv(batch, size, self.qkv.num_kv_heads, self.qkv.head_dim, dtype),
                           *empty_kv(batch, globals_, self.qkv.num_kv_heads, self.qkv.head_dim, dtype), zero_index())

  def attend_cached(self, x, q, k, v, cache):
    cfg = self.config
    # The cache holds the global tokens below its max_len: the first of the sorted positions.
    positions = np.sort(np.array(cfg.global_tokens, np.int32))[:cache.global_k.shape[1]]
    return longformer_cached_attention(q, k, v, cache, window=cfg.window, dilations=cfg.head_dilations(),
                                       global_positions=positions)

  def __init__(self, config: LongformerConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The paper's separate Q_g, K_g, V_g for global attention.
    self.global_qkv = (
        QKVProjection(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.separate_global_projections else None
    )

  def attend(self, x, q, k, v, mask):
    cfg = self.config
    if cfg.impl == "pallas":
      y = block_sparse_with_padding_mask(q, k, v, longformer_block_mask(cfg, x.shape[1]), mask)
      g_pos = _global_positions(cfg.global_tokens, x.shape[1])
      if self.global_qkv is None or not len(g_pos):
        return y
      # Separate projections change only the global rows: G rows against all keys, as in the xla path.
      q_g, k_g, v_g = self.global_qkv(x)
      row_mask = jnp.ones((1, 1, x.shape[1]), bool) if mask is None else mask[:, None, :]
      if cfg.causal:
        row_mask = row_mask & (np.arange(x.shape[1])[None, :] <= g_pos[:, None])
      return y.at[:, g_pos].set(rows_attention(q_g[:, g_pos], k_g, v_g, row_mask).astype(y.dtype))
    return longformer_attention(
        q, k, v, window=cfg.window, dilations=cfg.head_dilations(), global_tokens=cfg.global_tokens,
        causal=cfg.causal, key_mask=mask, global_qkv=None if self.global_qkv is None else self.global_qkv(x),
    )
