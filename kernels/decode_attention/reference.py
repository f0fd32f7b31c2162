"""Plain-jnp decode attention with fp32 accumulation: the oracle the split-KV kernel is tested against."""

import jax
import jax.numpy as jnp


def decode_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, sm_scale: float | None = None
) -> jax.Array:
  """q [B, H, D], k/v [B, S, Hkv, D], lengths int [B] -> o [B, H, D] in q's dtype.

  Query b attends keys 0 .. lengths[b] - 1 of its row; a row with lengths[b] == 0 gives zeros.
  """
  b, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, hkv, h // hkv, d)
  logits = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
  valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
  logits = jnp.where(valid, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgs,bskd->bkgd", p, v.astype(jnp.float32)) / jnp.where(denom == 0, 1.0, denom)
  return o.reshape(b, h, d).astype(q.dtype)
