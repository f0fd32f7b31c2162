"""Plain-jnp attention with fp32 accumulation: the oracle every flash-attention kernel is tested against."""

import jax
import jax.numpy as jnp

from kernels.flash_attention.masking import allowed


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    kv_lengths: jax.Array | None = None,
    return_lse: bool = False,
):
  """q [B, T, H, D], k/v [B, S, Hkv, D] -> o [B, T, H, D] (and lse [B, H, T] fp32 if return_lse).

  Rows with no attended key give o = 0 and lse = -inf.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  kv_length = None if kv_lengths is None else kv_lengths.reshape(b, 1, 1, 1, 1)
  mask = allowed(
      jnp.arange(t)[:, None], jnp.arange(s)[None, :], offset=s - t, causal=causal, window=window,
      kv_length=kv_length,
  )
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32)) / jnp.where(denom == 0, 1.0, denom).transpose(
      0, 3, 1, 2, 4
  )
  o = o.reshape(b, t, h, d).astype(q.dtype)
  if not return_lse:
    return o
  lse = (jnp.log(denom) + row_max)[..., 0].reshape(b, h, t)
  return o, lse
