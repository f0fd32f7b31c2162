"""Decoding caches: fixed-size pytrees that a mixer reads and returns updated, one call per chunk of tokens.

A cached mixer call `mixer(x [B, T, C], cache=cache) -> (y [B, T, C], new_cache)` processes the T tokens at
positions index .. index + T - 1 (T > 1 is a prefill of a prompt, T = 1 a decoding step). Every buffer has a
size fixed when the cache is made (`mixer.init_cache(batch, max_len, dtype=...)`), updates are functional
(`dynamic_update_slice`, scatters at computed slots) and the position is a traced int32 `index`, so one jitted
step serves every position. Callers keep index + T <= max_len (the generation API checks it).
"""

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from kernels.decode_attention import decode_attention


class KVCache(NamedTuple):
  """Keys and values of positions 0 .. index - 1: k/v [B, L, Hkv, D] (GQA/MQA keep only the Hkv heads).

  On GPU, an L that is a multiple of 128 lets the decode kernel read the cache in place (no padded copy).
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


class RingCache(NamedTuple):
  """The last W positions' keys and values, position p in slot p % W: k/v [B, W, Hkv, D]."""

  k: jax.Array
  v: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


def check_decodable(config, max_len: int) -> None:
  """Raises ValueError unless a mixer with `config` can decode token by token into a cache of max_len."""
  if not config.causal:
    raise ValueError(
        f"causal=False is not valid for decoding with variant {config.variant!r}: a bidirectional mixer lets "
        "every position see later ones, which do not exist yet when generating"
    )
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"max_len={max_len!r} is not valid; it must be a positive int")


def zero_index() -> jax.Array:
  return jnp.zeros((), jnp.int32)


def empty_kv(batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
  shape = (batch, length, kv_heads, head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
  """q [B, T, H, D], k/v [B, S, Hkv, D], allowed bool [B | 1, T, S] -> [B, T, H, D] (every row allows a key)."""
  return jax.nn.dot_product_attention(q, k, v.astype(q.dtype), mask=allowed[:, None], implementation="xla")


def decode_impl(config_impl: str) -> str:
  """The decode-attention implementation for a mixer's impl: its Pallas kernel where the mixer asked for Pallas."""
  return "pallas" if config_impl == "pallas" else "auto"


def kv_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, *, impl: str = "auto"):
  """Appends k/v [B, T, Hkv, D] at cache.index and attends q [B, T, H, D] causally over the whole cache.

  Returns ([B, T, H, D], the cache advanced by T). A single token goes through the split-KV decode kernel
  (`kernels.decode_attention`); a prefill chunk through masked attention over the cache buffer.
  """
  b, t = q.shape[:2]
  start = cache.index
  new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, axis=1)
  new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, axis=1)
  if t == 1:
    lengths = jnp.full((b,), start + 1, jnp.int32)
    y = decode_attention(q[:, 0], new_k.astype(q.dtype), new_v.astype(q.dtype), lengths, impl=impl)[:, None]
  else:
    allowed = jnp.arange(new_k.shape[1])[None, :] <= start + jnp.arange(t)[:, None]
    y = masked_attention(q, new_k.astype(q.dtype), new_v, allowed[None])
  return y, KVCache(new_k, new_v, start + t)


def ring_positions(index: jax.Array, size: int) -> jax.Array:
  """Position held by each of `size` ring slots after `index` tokens (negative: never written): int32 [size]."""
  slot = jnp.arange(size, dtype=jnp.int32)
  return index - 1 - jnp.remainder(index - 1 - slot, size)


def ring_write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] (positions index .. index + T - 1) into the ring buffer [B, W, ...] at slots p % W.

  Only the last min(T, W) tokens survive, so the scatter never writes one slot twice.
  """
  size, t = buffer.shape[1], new.shape[1]
  kept = min(t, size)
  slots = jnp.remainder(index + t - kept + jnp.arange(kept), size)
  return buffer.at[:, slots].set(new[:, t - kept:].astype(buffer.dtype))


def ring_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: RingCache, *, window: int,
                         impl: str = "auto"):
  """Sliding-window attention of q [B, T, H, D] (keys t - window + 1 .. t) over a ring cache plus the new k/v.

  Returns ([B, T, H, D], the cache advanced by T).
  """
  b, t = q.shape[:2]
  start = cache.index
  size = cache.k.shape[1]
  if t == 1:
    # Written first, the ring holds exactly the window of the new token (the slots past index unwritten).
    ring_k, ring_v = ring_write(cache.k, k, start), ring_write(cache.v, v, start)
    lengths = jnp.full((b,), jnp.minimum(start + 1, size), jnp.int32)
    y = decode_attention(q[:, 0], ring_k.astype(q.dtype), ring_v.astype(q.dtype), lengths, impl=impl)[:, None]
    return y, RingCache(ring_k, ring_v, start + 1)
  held = ring_positions(start, size)
  key_pos = jnp.concatenate([held, start + jnp.arange(t, dtype=jnp.int32)])
  query_pos = start + jnp.arange(t)[:, None]
  allowed = (key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos) & (key_pos[None, :] > query_pos - window)
  keys = jnp.concatenate([cache.k.astype(q.dtype), k.astype(q.dtype)], axis=1)
  values = jnp.concatenate([cache.v.astype(q.dtype), v.astype(q.dtype)], axis=1)
  y = masked_attention(q, keys, values, allowed[None])
  return y, RingCache(ring_write(cache.k, k, start), ring_write(cache.v, v, start), start + t)


@flax.struct.dataclass
class DecoderCache:
  """A `Decoder`'s cache: one cache per layer, the shared position index, and the static max_len."""

  layers: tuple
  index: jax.Array  # int32 [], tokens seen so far
  max_len: int = flax.struct.field(pytree_node=False)


def cache_bytes(cache) -> int:
  """Bytes held by every array of a cache pytree."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
