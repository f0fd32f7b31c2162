"""Inputs and the kernel-against-reference checks shared by the flash-attention tests (Triton, Mosaic GPU and
Mosaic TPU kernels)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_close


def inputs(b, t, s, h, hkv, d, dtype, seed=0, scale=1.0):
  """q [B, T, H, D] (times scale), k/v [B, S, Hkv, D], do [B, T, H, D] in dtype, and an fp32 lse cotangent
  [B, H, T]."""
  ks = jax.random.split(jax.random.key(seed), 5)
  q = (jax.random.normal(ks[0], (b, t, h, d)) * scale).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d)).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d)).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, h, d)).astype(dtype)
  dlse = jax.random.normal(ks[4], (b, h, t))
  return q, k, v, do, dlse


def finite(x):
  """x with its infinities (the -inf lse of rows that attend nothing) replaced by 0."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


def check_against_reference(results, expected, dtype, fwd_tol: float, grad_tol: float) -> None:
  """results / expected: (o [B, T, H, D], lse [B, H, T], dq, dk, dv) of a kernel and of the reference.

  o has the reference's shape and the inputs' dtype; lse is infinite exactly where the reference's is; the
  gradients are finite.
  """
  (o, lse, *grads), (o_ref, lse_ref, *grads_ref) = results, expected
  b, t, h, d = o_ref.shape
  chex.assert_shape(o, (b, t, h, d))
  chex.assert_type(o, dtype)
  chex.assert_shape(lse, (b, h, t))
  assert_close(o, o_ref, fwd_tol, "o")
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
  assert_close(finite(lse), finite(lse_ref), 1e-5, "lse")
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    chex.assert_tree_all_finite(g)
    assert_close(g, g_ref, grad_tol, name)
