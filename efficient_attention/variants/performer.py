"""Performer (Choromanski et al. 2021): softmax attention estimated with FAVOR+ positive random features.

exp(q . k / sqrt(D)) = E_w[phi(q) . phi(k)] for phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M), x' = x D^-1/4,
rows of W [M, D] ~ N(0, I_D). Drawing the rows in blocks of D mutually orthogonal directions (norms
resampled from the chi(D) distribution so each row stays marginally Gaussian) lowers the estimator's
variance. The normalised form y_t = phi(q_t) . sum_s phi(k_s) v_s / phi(q_t) . sum_s phi(k_s) then runs
in O(T) through `feature_attention` (causal prefix scan or global sums).

Stabilisation: exp of the raw logits overflows for large inputs, so each feature is shifted by a
constant before the exp, which must cancel between numerator and normaliser:
  queries: the max over features at the same position (one constant per query, cancels per row);
  keys, bidirectional: the max over every real position and feature (one constant per head);
  keys, causal: the running max over positions <= s (a global max would let a future key decide how
    far past keys underflow). Key s is scaled by exp(-m_s); the scan's state is kept in units of
    exp(-m_t) by decaying it by exp(m_{t-1} - m_t) <= 1 at each step, the kernel's per-head log decay.
    Every exponent is <= 0, and the output at t uses only keys <= t.

Floor: after the shifts, a query whose large features meet only keys whose features underflowed has a normaliser
near zero, and the normalisation's gradient (numerator / normaliser^2) overflows to inf, then NaN: training on
ListOps went non-finite within 520 steps once queries and keys grew. Every real feature gets `feature_floor`
added after the exp (as the numerical stabiliser of the authors' implementation does), which bounds the normaliser
away from zero. Being added in shifted units, it moves the output by 1e-5 to 1e-4 relative at the default 1e-6
(the estimator's own error is ~10% at M=64); feature_floor=0 gives the exact estimator, as the tests check.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import check_decodable, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.registry import register
from efficient_attention.validation import check_at_least, check_choice, check_positive
from efficient_attention.variants.linear import empty_feature_state, feature_attention, feature_attention_cached
from kernels.linear_attention.api import IMPLEMENTATIONS

f32 = jnp.float32
# Added to every real (shifted) feature by default; see "Floor" in the module docstring.
FEATURE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerformerConfig(AttentionConfig):
  variant = "performer"
  # Random features M per head; the estimator's variance falls as 1/M (the paper suggests M ~ D log D).
  num_features: int = 256
  # Draw new random features on every training-mode call (not after model.eval()), from the `params`
  # stream of the rngs the module was built with; the last draw is kept for evaluation.
  redraw_features: bool = False
  # Prefix-scan implementation for the causal form (kernels.linear_attention): "xla" (the jnp reference), "pallas"
  # (the kernels; interpret mode off GPU), "triton" (Triton-language kernels via jax-triton; GPU only) or "auto"
  # (the faster GPU kernels on GPU, the reference elsewhere).
  impl: str = "auto"
  # Tokens per chunk of the causal scan.
  chunk_size: int = 64
  # Added to every feature after its stabilising shift, so gradients stay finite when queries meet only keys
  # whose features underflow (module docstring, "Floor"); 0 gives the exact FAVOR+ estimator.
  feature_floor: float = FEATURE_FLOOR

  def __post_init__(self):
    super().__post_init__()
    check_positive("num_features", self.num_features)
    check_at_least("feature_floor", self.feature_floor, 0)
    check_choice("impl", self.impl, IMPLEMENTATIONS)
    check_positive("chunk_size", self.chunk_size)


def orthogonal_gaussian_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
  """W [M, D] fp32: blocks of D orthogonal directions, each row's norm drawn from chi(D)."""
  direction_key, norm_key = jax.random.split(key)
  blocks = -(-num_features // dim)
  directions = jax.random.orthogonal(direction_key, dim, shape=(blocks,), dtype=f32)
  directions = directions.reshape(blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), f32), axis=-1)
  return directions * norms[:, None]


def _feature_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, T, H, D], w [M, D] -> W x' - |x'|^2 / 2 with x' = x D^-1/4, fp32 [B, T, H, M]."""
  x = x.astype(f32) * x.shape[-1] ** -0.25
  return jnp.einsum("bthd,md->bthm", x, w.astype(f32)) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def query_features(q: jax.Array, w: jax.Array, floor: float = FEATURE_FLOOR) -> jax.Array:
  """phi(q) [B, T, H, M] fp32, each position shifted by its own max logit, plus `floor`."""
  logits = _feature_logits(q, w)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return (jnp.exp(logits - shift) + floor) / math.sqrt(w.shape[0])


def key_features(
    k: jax.Array, w: jax.Array, *, causal: bool, key_mask: jax.Array | None = None, floor: float = FEATURE_FLOOR
) -> tuple[jax.Array, jax.Array | None]:
  """phi(k) [B, T, Hkv, M] fp32 (zero at padded keys) and, when causal, the scan's log decay [B, T, Hkv].

  The shift is the running (causal) or global (bidirectional) max logit over real keys; see the
  module docstring. Padded keys take no part in it, so their contents cannot change real outputs.
  """
  features, decay, _ = _key_features(k, w, causal=causal, key_mask=key_mask, floor=floor)
  return features, decay


def _key_features(k, w, *, causal, key_mask=None, initial_shift=None, floor=FEATURE_FLOOR):
  """key_features, continuing a causal running max from initial_shift [B, Hkv] (-inf: no key yet); also
  returns the running max after the last key [B, Hkv] (None when bidirectional)."""
  logits = _feature_logits(k, w)
  real = jnp.ones(k.shape[:3], bool) if key_mask is None else jnp.broadcast_to(key_mask[:, :, None], k.shape[:3])
  peak = jnp.where(real, jnp.max(jax.lax.stop_gradient(logits), axis=-1), -jnp.inf)  # [B, T, Hkv]
  if causal:
    start = jnp.full_like(peak[:, :1], -jnp.inf) if initial_shift is None else initial_shift[:, None]
    shift = jax.lax.cummax(jnp.concatenate([start, peak], axis=1), axis=1)[:, 1:]
  else:
    shift = jnp.max(peak, axis=1, keepdims=True)
  # -inf until the first real key: nothing has been accumulated yet, so any finite shift will do.
  safe_shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  # The -inf inside the exp keeps padded keys' gradients zero (an exp overflowing in the unused branch of a
  # where would give 0 * inf = NaN).
  shifted = jnp.where(real[..., None], logits - safe_shift[..., None], -jnp.inf)
  features = jnp.where(real[..., None], jnp.exp(shifted) + floor, 0.0)
  features = features / math.sqrt(w.shape[0])
  if not causal:
    return features, None, None
  previous = jnp.concatenate([start, shift[:, :-1]], axis=1)
  decay = jnp.where(jnp.isfinite(previous), previous, safe_shift) - safe_shift
  return features, decay, shift[:, -1]


def performer_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
    feature_floor: float = FEATURE_FLOOR,
) -> jax.Array:
  """FAVOR+ estimate of softmax(q k^T / sqrt(D)) v.

  q [B, T, H, D], k/v [B, T, Hkv, D], w [M, D] -> fp32 [B, T, H, D].
  """
  phi_k, decay = key_features(k, w, causal=causal, key_mask=key_mask, floor=feature_floor)
  return feature_attention(
      query_features(q, w, feature_floor), phi_k, v, causal=causal, key_mask=key_mask, decay=decay, impl=impl,
      chunk_size=chunk_size,
  )


class PerformerState(NamedTuple):
  """Decoding cache: the scan state [B, H, M, D + 1] fp32 in units of exp(-shift), the running max key logit
  shift [B, Hkv] fp32 (-inf before the first key); both constant in size."""

  state: jax.Array
  shift: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


class RandomFeatures(nnx.Variable):
  """A drawn, not learned, projection: optimisers and nnx.grad select nnx.Param, so they leave it alone."""


@register(PerformerConfig)
class Performer(HeadAttention):
  """Multi-head FAVOR+ attention (MHA/GQA/MQA); one feature matrix shared by all heads of the layer."""

  def __init__(self, config: PerformerConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head_dim = config.head_dim_for(width)
    self.features = RandomFeatures(orthogonal_gaussian_features(rngs.params(), config.num_features, self.head_dim))
    # Training mode, as in nnx.Dropout; model.eval() (or nnx.view) sets it.
    self.deterministic = False
    self.redraw_rngs = rngs.params.fork() if config.redraw_features else None

  def set_view(self, deterministic: bool | None = None):
    """Used by nnx.view: deterministic=True stops feature redraws."""
    if deterministic is not None:
      self.deterministic = deterministic

  def attend(self, x, q, k, v, mask):
    if self.config.redraw_features and not self.deterministic:
      self.features[...] = orthogonal_gaussian_features(self.redraw_rngs(), self.config.num_features, self.head_dim)
    return performer_attention(
        q, k, v, self.features[...], causal=self.config.causal, key_mask=mask, impl=self.config.impl,
        chunk_size=self.config.chunk_size, feature_floor=self.config.feature_floor,
    )

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> PerformerState:
    """Constant-size state; max_len only bounds the positions. Decoding uses the current features (no redraw)."""
    check_decodable(self.config, max_len)
    return PerformerState(
        empty_feature_state(batch, self.config.num_heads, self.config.num_features, self.head_dim),
        jnp.full((batch, self.qkv.num_kv_heads), -jnp.inf, f32), zero_index(),
    )

  def attend_cached(self, x, q, k, v, cache):
    w = self.features[...]
    floor = self.config.feature_floor
    phi_k, decay, shift = _key_features(k, w, causal=True, initial_shift=cache.shift, floor=floor)
    y, state = feature_attention_cached(query_features(q, w, floor), phi_k, v, cache.state, decay=decay,
                                        impl=self.config.impl, chunk_size=self.config.chunk_size)
    return y, PerformerState(state, shift, cache.index + x.shape[1])
