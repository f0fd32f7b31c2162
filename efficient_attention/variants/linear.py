"""Linear attention (Katharopoulos et al. 2020): softmax(q k^T) replaced by phi(q) phi(k)^T, phi(x) = elu(x) + 1.

y_t = phi(q_t)^T (sum_s phi(k_s) v_s^T) / phi(q_t)^T (sum_s phi(k_s)), over s <= t (causal) or every s.
Causal: one prefix scan (kernels.linear_attention) carries both sums, O(T) time and memory.
Bidirectional: the two sums are global, O(T) as well. No T x T matrix is formed in either direction.

`feature_attention` is that normalised form for any non-negative feature map; Performer reuses it.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_attention.cache import check_decodable, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.parallel import sequence_linear_attention
from efficient_attention.registry import register
from efficient_attention.validation import check_choice, check_positive
from kernels.linear_attention import linear_attention, linear_attention_step
from kernels.linear_attention.api import IMPLEMENTATIONS

f32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig(AttentionConfig):
  variant = "linear"
  # Prefix-scan implementation for the causal form (kernels.linear_attention): "xla" (the jnp reference), "pallas"
  # (the kernels; interpret mode off GPU), "triton" (Triton-language kernels via jax-triton; GPU only) or "auto"
  # (the faster GPU kernels on GPU, the reference elsewhere).
  impl: str = "auto"
  # Tokens per chunk of the causal scan: quadratic work inside a chunk, one state update per chunk.
  chunk_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    check_choice("impl", self.impl, IMPLEMENTATIONS)
    check_positive("chunk_size", self.chunk_size)


def elu_features(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1 > 0, in fp32: [..., D] -> [..., D]."""
  return jax.nn.elu(x.astype(f32)) + 1.0


def feature_attention(
    phi_q: jax.Array,
    phi_k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    decay: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> jax.Array:
  """Normalised attention with non-negative features, without a T x T matrix.

  Args:
    phi_q: [B, T, H, M] query features. phi_k: [B, T, Hkv, M] key features (H % Hkv == 0).
    v: [B, T, Hkv, D] values.
    causal: prefix sums (s <= t) through the kernel scan, or global sums.
    key_mask: optional bool [B, T], True at real tokens; padded keys and values are zeroed.
    decay: optional log decay [B, T, Hkv] for the causal scan, applied to numerator and normaliser
      alike. Performer passes its running stabiliser here, which cancels exactly in the ratio.
    impl, chunk_size: forwarded to `kernels.linear_attention`.

  Returns:
    [B, T, H, D] fp32.
  """
  b, t, h, m = phi_q.shape
  hkv, d = phi_k.shape[2], v.shape[-1]
  groups = h // hkv
  v = v.astype(f32)
  if key_mask is not None:
    keep = key_mask[:, :, None, None]
    phi_k = jnp.where(keep, phi_k, 0.0)
    v = jnp.where(keep, v, 0.0)
  # A ones column appended to v makes the same sums carry the normaliser sum_s phi(k_s).
  v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  if causal:
    # The kernel takes one key head per query head; the repeated copies are O(T), never T x T.
    phi_k, v = jnp.repeat(phi_k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    decay = None if decay is None else jnp.repeat(decay, groups, axis=2)
    # Split over the sequence axis when a sequence-parallel mesh is active (efficient_attention.parallel).
    out = sequence_linear_attention(phi_q, phi_k, v, decay=decay, impl=impl, chunk_size=chunk_size)
  else:
    kv = jnp.einsum("bskm,bskd->bkmd", phi_k, v, preferred_element_type=f32)  # [B, Hkv, M, D + 1]
    out = jnp.einsum("btkgm,bkmd->btkgd", phi_q.reshape(b, t, hkv, groups, m), kv, preferred_element_type=f32)
    out = out.reshape(b, t, h, d + 1)
  return _normalised(out)


def _normalised(out: jax.Array) -> jax.Array:
  """[..., D + 1] numerator and normaliser columns -> [..., D]."""
  numerator, normaliser = out[..., :-1], out[..., -1:]
  # Weights are non-negative, so the ratio is a convex combination of values; only an exactly zero
  # normaliser (no real key in reach) needs guarding, and it has a zero numerator.
  return numerator / jnp.where(normaliser > 0, normaliser, 1.0)


class FeatureState(NamedTuple):
  """Decoding cache of the causal feature-map mixers: the scan state [B, H, M, D + 1] fp32 (sum of phi(k) v^T,
  with the normaliser sum of phi(k) as its last column), constant in size however long the sequence."""

  state: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


def empty_feature_state(batch: int, heads: int, features: int, head_dim: int) -> jax.Array:
  return jnp.zeros((batch, heads, features, head_dim + 1), f32)


def feature_attention_cached(
    phi_q: jax.Array,
    phi_k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    decay: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Causal `feature_attention` continued from a scan state: the same shapes, plus state [B, H, M, D + 1] fp32.

  Returns ([B, T, H, D] fp32, the state after the T tokens). One token takes `linear_attention_step`; a
  prefill chunk the scan with initial_state.
  """
  t, h = phi_q.shape[1], phi_q.shape[2]
  groups = h // phi_k.shape[2]
  v = v.astype(f32)
  v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  phi_k, v = jnp.repeat(phi_k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  decay = None if decay is None else jnp.repeat(decay, groups, axis=2)
  if t == 1:
    out, state = linear_attention_step(phi_q[:, 0], phi_k[:, 0], v[:, 0], state,
                                       decay=None if decay is None else decay[:, 0])
    out = out[:, None]
  else:
    out, state = linear_attention(phi_q, phi_k, v, decay=decay, initial_state=state, return_final_state=True,
                                  impl=impl, chunk_size=min(chunk_size, t))
  return _normalised(out), state


@register(LinearAttentionConfig)
class LinearAttention(HeadAttention):
  """Multi-head linear attention with phi = elu + 1; rotary (if configured) acts on q, k before phi."""

  def attend(self, x, q, k, v, mask):
    return feature_attention(
        elu_features(q), elu_features(k), v, causal=self.config.causal, key_mask=mask,
        impl=self.config.impl, chunk_size=self.config.chunk_size,
    )

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> FeatureState:
    """The scan state [B, H, D, D + 1] fp32; max_len only bounds the positions (the state does not grow)."""
    check_decodable(self.config, max_len)
    return FeatureState(empty_feature_state(batch, self.qkv.num_heads, self.qkv.head_dim, self.qkv.head_dim),
                        zero_index())

  def attend_cached(self, x, q, k, v, cache):
    y, state = feature_attention_cached(elu_features(q), elu_features(k), v, cache.state, impl=self.config.impl,
                                        chunk_size=self.config.chunk_size)
    return y, FeatureState(state, cache.index + x.shape[1])
