"""Full softmax attention (MHA / GQA / MQA), causal or bidirectional, with a padding mask."""

import dataclasses

import jax
import jax.numpy as jnp

from efficient_attention.cache import KVCache, check_decodable, decode_impl, empty_kv, kv_cache_attention, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.parallel import active_layout, ring_attention, shard_over_batch
from efficient_attention.registry import register
from efficient_attention.validation import check_choice
from kernels import backend
from kernels.flash_attention import flash_attention

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullAttentionConfig(AttentionConfig):
  variant = "full"
  # "xla": jnp softmax attention (the reference). "cudnn": cuDNN fused attention (NVIDIA GPUs; right
  # padding only). "pallas": the Pallas flash-attention kernel (kernels.flash_attention; right padding only).
  impl: str = "xla"

  def __post_init__(self):
    super().__post_init__()
    check_choice("impl", self.impl, IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlashAttentionConfig(FullAttentionConfig):
  """`full` on the Pallas flash-attention kernel (interpret mode off GPU)."""

  variant = "flash"
  impl: str = "pallas"


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
  """q [B, T, H, D], k/v [B, S, Hkv, D], key_mask bool [B, S] -> [B, T, H, D].

  GQA never repeats K/V. Causal masking is aligned to the end when T != S (the last query sees every key),
  as in decoding. impl="pallas" and impl="cudnn" (with T == S) take padding as lengths, so key_mask must be
  right padding there (a row with a hole in its mask comes out as NaN rather than silently wrong).
  Under `efficient_attention.parallel.sequence_parallel` (T == S) it runs as ring attention, right padding only.
  """
  layout = active_layout()
  if layout is not None and q.shape[1] == k.shape[1]:
    return ring_with_padding_mask(q, k, v, causal=causal, key_mask=key_mask, impl=impl)
  if impl == "pallas":
    return flash_with_padding_mask(q, k, v, causal=causal, key_mask=key_mask)
  if impl == "cudnn" and key_mask is not None and q.shape[1] == k.shape[1]:
    # cuDNN takes padding as sequence lengths (a [B, 1, 1, S] bias is rejected).
    lengths, right_padded = _right_padding_lengths(key_mask)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
    return jnp.where(right_padded[:, None, None, None], o, jnp.nan)
  allowed = None if key_mask is None else key_mask[:, None, None, :]
  if causal and q.shape[1] != k.shape[1]:
    offset = k.shape[1] - q.shape[1]
    causal_allowed = jnp.arange(k.shape[1])[None, :] <= jnp.arange(q.shape[1])[:, None] + offset
    allowed = causal_allowed[None, None] if allowed is None else allowed & causal_allowed[None, None]
    causal = False
  return jax.nn.dot_product_attention(q, k, v, mask=allowed, is_causal=causal, implementation=impl)


def _right_padding_lengths(key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """key_mask bool [B, S] -> (valid lengths int32 [B], whether each row is pure right padding [B])."""
  lengths = key_mask.sum(axis=1, dtype=jnp.int32)
  right_padded = jnp.all(key_mask == (jnp.arange(key_mask.shape[1])[None, :] < lengths[:, None]), axis=1)
  return lengths, right_padded


def flash_with_padding_mask(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_mask: jax.Array | None,
    window: tuple[int, int] | None = None,
) -> jax.Array:
  """The Pallas flash kernel with a [B, S] padding mask, which must be right padding.

  The kernel takes padding as lengths; a row whose mask has a hole comes out as NaN rather than silently wrong.
  On a GPU the op picks its fastest kernel for the problem (the Mosaic GPU kernels on Hopper without padding or a
  window, else the Triton-lowering ones); elsewhere the Triton-lowering kernel runs in interpret mode, so CPU
  tests exercise a kernel body rather than the jnp reference.
  """
  impl = "auto" if backend.on_gpu() else "pallas"
  flash = lambda q, k, v, lengths: flash_attention(q, k, v, causal=causal, window=window, kv_lengths=lengths,
                                                   impl=impl)
  if key_mask is None:
    return shard_over_batch(flash, q, k, v, None)
  lengths, right_padded = _right_padding_lengths(key_mask)
  o = shard_over_batch(flash, q, k, v, lengths)
  return jnp.where(right_padded[:, None, None, None], o, jnp.nan)


def ring_with_padding_mask(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_mask: jax.Array | None,
    window: tuple[int, int] | None = None, impl: str = "auto",
) -> jax.Array:
  """Ring attention over the active sequence layout with a [B, T] padding mask, which must be right padding.

  q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; rows whose mask has a hole come out as NaN.
  """
  layout = active_layout()
  if key_mask is None:
    return ring_attention(q, k, v, layout, causal=causal, window=window, impl=impl)
  lengths, right_padded = _right_padding_lengths(key_mask)
  o = ring_attention(q, k, v, layout, causal=causal, window=window, kv_lengths=lengths, impl=impl)
  return jnp.where(right_padded[:, None, None, None], o, jnp.nan)


@register(FlashAttentionConfig)
@register(FullAttentionConfig)
class FullAttention(HeadAttention):
  """Multi-head softmax attention: y = softmax(q k^T / sqrt(D)) v, projected back to the model width."""

  def attend(self, x, q, k, v, mask):
    return softmax_attention(q, k, v, causal=self.config.causal, key_mask=mask, impl=self.config.impl)

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> KVCache:
    """Keys and values of every position: k/v [B, max_len, Hkv, D] (GQA/MQA: Hkv < H heads only)."""
    check_decodable(self.config, max_len)
    return KVCache(*empty_kv(batch, max_len, self.qkv.num_kv_heads, self.qkv.head_dim, dtype), zero_index())

  def attend_cached(self, x, q, k, v, cache):
    return kv_cache_attention(q, k, v, cache, impl=decode_impl(self.config.impl))
