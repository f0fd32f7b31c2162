"""Linear attention (Katharopoulos et al. 2020): softmax(q k^T) replaced by phi(q) phi(k)^T, phi(x) = elu(x) + 1.

y_t = phi(q_t)^T (sum_s phi(k_s) v_s^T) / phi(q_t)^T (sum_s phi(k_s)), over s <= t (causal) or every s.
Causal: one prefix scan (kernels.linear_attention) carries both sums, O(T) time and memory.
Bidirectional: the two sums are global, O(T) as well. No T x T matrix is formed in either direction.

`feature_attention` is that normalised form for any non-negative feature map; Performer reuses it.
"""

import dataclasses

import jax
import jax.numpy as jnp

from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.registry import register
from efficient_attention.validation import check_choice, check_positive
from kernels.linear_attention import linear_attention
from kernels.linear_attention.api import IMPLEMENTATIONS

f32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig(AttentionConfig):
  variant = "linear"
  # Prefix-scan implementation for the causal form (kernels.linear_attention): "xla" (the jnp reference) or "auto".
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
    out = linear_attention(phi_q, phi_k, v, decay=decay, impl=impl, chunk_size=chunk_size)
  else:
    kv = jnp.einsum("bskm,bskd->bkmd", phi_k, v, preferred_element_type=f32)  # [B, Hkv, M, D + 1]
    out = jnp.einsum("btkgm,bkmd->btkgd", phi_q.reshape(b, t, hkv, groups, m), kv, preferred_element_type=f32)
    out = out.reshape(b, t, h, d + 1)
  numerator, normaliser = out[..., :-1], out[..., -1:]
  # Weights are non-negative, so the ratio is a convex combination of values; only an exactly zero
  # normaliser (no real key in reach) needs guarding, and it has a zero numerator.
  return numerator / jnp.where(normaliser > 0, normaliser, 1.0)


@register(LinearAttentionConfig)
class LinearAttention(HeadAttention):
  """Multi-head linear attention with phi = elu + 1; rotary (if configured) acts on q, k before phi."""

  def attend(self, x, q, k, v, mask):
    return feature_attention(
        elu_features(q), elu_features(k), v, causal=self.config.causal, key_mask=mask,
        impl=self.config.impl, chunk_size=self.config.chunk_size,
    )
