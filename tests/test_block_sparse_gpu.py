"""Block-sparse attention on a GPU (Triton lowering) against the dense reference: every builder, bf16 and fp32."""

import chex
import jax
import jax.numpy as jnp
import pytest

from kernels.block_sparse import (
    bigbird,
    block_sparse_attention,
    causal,
    global_tokens,
    local,
    longformer,
    random_blocks,
)
from tests.block_sparse_helpers import TOLERANCE, compare, inputs
from tests.helpers import assert_close

GPU_MASKS = {
    "sliding-256": lambda t: local(t, 256),
    "local-symmetric-100": lambda t: local(t, 100, causal=False),
    "bigbird-64": lambda t: bigbird(t, block_size=64, num_random_blocks=3, causal=False),
    "longformer-per-head": lambda t: longformer(t, 128, dilation=(1, 1, 2, 2, 3, 3, 4, 4), global_positions=(0, 500)),
    "causal-random": lambda t: causal(t) | random_blocks(t, 2, seed=0),
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mask_name,dtype",
    [(name, jnp.bfloat16) for name in GPU_MASKS] + [("sliding-256", jnp.float32), ("longformer-per-head", jnp.float32)],
)
def test_gpu_pallas_matches_reference(mask_name, dtype):
  t, h, hkv, d = 1000, 8, 2, 128
  mask = GPU_MASKS[mask_name](t)
  q, k, v, do = inputs(2, t, t, h, hkv, d, dtype)
  lengths = jnp.array([t, 777], jnp.int32)
  results = {}
  for impl in ("xla", "pallas"):
    f = lambda q, k, v: block_sparse_attention(q, k, v, mask, kv_lengths=lengths, impl=impl)
    # XLA's fp32 matmuls on GPU default to TF32; the oracle must not.
    with jax.default_matmul_precision("highest"):
      o, vjp = jax.vjp(f, q, k, v)
      results[impl] = (o, *vjp(do))
  fwd_tol, grad_tol = TOLERANCE[jnp.dtype(dtype).name]
  for name, a, e in zip(("o", "dq", "dk", "dv"), results["pallas"], results["xla"]):
    chex.assert_tree_all_finite(a)
    assert_close(a, e, fwd_tol if name == "o" else grad_tol, name)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
def test_gpu_head_dims_and_small_tiles(d):
  t = 512
  mask = local(t, 64, block_q=64, block_k=32) | global_tokens(t, (3,), block_q=64, block_k=32)
  q, k, v, do = inputs(1, t, t, 4, 4, d, jnp.bfloat16)
  with jax.default_matmul_precision("highest"):
    compare(q, k, v, do, mask, block_sizes=None)
