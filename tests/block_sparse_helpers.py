"""Inputs and the kernel-against-reference comparison shared by the block-sparse tests (CPU and GPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse import BlockSizes, block_sparse_attention
from tests.helpers import assert_close

# 16-row tiles so short test sequences still span several kernel tiles.
SMALL_TILES = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
TOLERANCE = {"float32": (1e-5, 1e-5), "float16": (1e-2, 2e-2), "bfloat16": (1e-2, 2e-2)}  # (forward, gradients)


def inputs(b, t, s, h, hkv, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
  return normal(b, t, h, d), normal(b, s, hkv, d), normal(b, s, hkv, d), normal(b, t, h, d)


def compare(q, k, v, do, mask, *, kv_lengths=None, block_sizes=SMALL_TILES, impl="pallas", mosaic_config=None):
  """Forward and every gradient of `impl` (a kernel) against impl="xla" (one compilation for both).

  impl="mosaic" runs eagerly off GPU: its interpret-mode forward deadlocks inside one jit with the Triton
  interpret-mode backward (both run as host callbacks).
  """
  kernel_impl = impl

  def run(q, k, v, do):
    results = []
    for impl in (kernel_impl, "xla"):
      f = lambda q, k, v: block_sparse_attention(q, k, v, mask, kv_lengths=kv_lengths, impl=impl,
                                                 block_sizes=block_sizes, mosaic_config=mosaic_config)
      o, vjp = jax.vjp(f, q, k, v)
      results.append((o, *vjp(do)))
    return results

  if impl != "mosaic" or jax.default_backend() == "gpu":
    run = jax.jit(run)
  (o, dq, dk, dv), expected = run(q, k, v, do)
  fwd_tol, grad_tol = TOLERANCE[q.dtype.name]
  chex.assert_shape(o, q.shape)
  chex.assert_type(o, q.dtype)
  for name, a, e in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), expected):
    chex.assert_tree_all_finite(a)
    assert_close(a, e, fwd_tol if name == "o" else grad_tol, name)
  return o
