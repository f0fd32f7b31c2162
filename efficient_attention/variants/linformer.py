"""Linformer (Wang et al. 2020): keys and values projected along the sequence to a fixed length.

K' = E K, V' = F V with learned E, F [P, max_len] (P = projected_length), then softmax(q K'^T / sqrt(D)) V'
costs O(T P) instead of O(T^2). Sequences shorter than max_len use the first T columns of E and F.
One E (and F) is shared by all heads of the layer (the paper's headwise sharing); `share_kv_projection`
also ties F to E (key-value sharing). Bidirectional only.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.config import AttentionConfig
from efficient_attention.layers import HeadAttention
from efficient_attention.registry import register
from efficient_attention.validation import check_positive
from efficient_attention.variants.full import softmax_attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinformerConfig(AttentionConfig):
  variant = "linformer"
  supports_causal = False
  # Linformer is an encoder mixer; see causal_unsupported_reason.
  causal: bool = False
  # Rows P that keys and values are projected to along the sequence (the paper's k).
  projected_length: int = 64
  # Longest sequence the projections cover: E and F are [projected_length, max_len].
  max_len: int = 512
  # Tie the value projection F to the key projection E.
  share_kv_projection: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_positive("projected_length", self.projected_length)
    check_positive("max_len", self.max_len)

  def causal_unsupported_reason(self) -> str:
    return (
        "projecting keys and values along the sequence mixes every position, future ones included, "
        "into each projected row, so no output can be restricted to its past"
    )


class SequenceProjection(nnx.Module):
  """x [B, S, H, D] -> E[:, :S] x [B, P, H, D] for a learned E [P, max_len]."""

  def __init__(self, projected_length: int, max_len: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    # Scaled like a dense layer with fan-in max_len, so a full-length projection keeps unit scale.
    init = nnx.initializers.normal(stddev=max_len**-0.5)
    self.weight = nnx.Param(init(rngs.params(), (projected_length, max_len), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    e = self.weight[:, : x.shape[1]].astype(self.dtype)
    return jnp.einsum("ps,bshd->bphd", e, x, preferred_element_type=jnp.float32).astype(self.dtype)


@register(LinformerConfig)
class Linformer(HeadAttention):
  """Multi-head attention over sequence-projected keys and values (MHA/GQA/MQA)."""

  def __init__(self, config: LinformerConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    project = lambda: SequenceProjection(
        config.projected_length, config.max_len, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.key_projection = project()
    self.value_projection = self.key_projection if config.share_kv_projection else project()

  def attend(self, x, q, k, v, mask):
    t = x.shape[1]
    if t > self.config.max_len:
      raise ValueError(
          f"sequence length T={t} is not valid for max_len={self.config.max_len}; the projections cover "
          f"at most max_len positions (build the mixer with max_len >= {t})"
      )
    if mask is not None:
      # Zeroed rows add nothing to the projections, so padding cannot reach the projected keys/values.
      k = jnp.where(mask[:, :, None, None], k, 0)
      v = jnp.where(mask[:, :, None, None], v, 0)
    return softmax_attention(q, self.key_projection(k), self.value_projection(v), causal=False)
