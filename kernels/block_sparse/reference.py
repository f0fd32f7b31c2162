"""Dense masked softmax with fp32 accumulation: the oracle every block-sparse kernel is tested against."""

import jax
import jax.numpy as jnp

from kernels.block_sparse.mask import BlockMask


def block_sparse_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: BlockMask,
    *,
    sm_scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    return_lse: bool = False,
):
  """q [B, T, H, D], k/v [B, S, Hkv, D], mask over [T, S] -> o [B, T, H, D] (and lse [B, H, T] fp32 if return_lse).

  Materialises the [B, H, T, S] scores. kv_lengths int [B]: keys at or past it are not attended. Rows with no
  attended key give o = 0 and lse = -inf.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  allowed = jnp.broadcast_to(jnp.asarray(mask.to_dense()), (h, t, s)).reshape(1, hkv, h // hkv, t, s)
  if kv_lengths is not None:
    allowed = allowed & (jnp.arange(s) < kv_lengths.reshape(b, 1, 1, 1, 1))
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(denom == 0, 1.0, denom), v.astype(jnp.float32))
  o = o.reshape(b, t, h, d).astype(q.dtype)
  if not return_lse:
    return o
  return o, (jnp.log(denom) + row_max)[..., 0].reshape(b, h, t)
