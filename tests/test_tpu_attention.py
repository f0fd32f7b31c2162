"""TPU Pallas kernels (Mosaic TPU lowering) of flash and block-sparse attention, run in interpret mode on CPU.

The public ops pick the TPU kernels when `kernels.backend.pallas_platform()` says "tpu"; here it is patched so, and the ops
run end to end (forward, lse, jax.vjp through the custom_vjp) against the references. Interpret mode fills
outputs with NaN first, so an unwritten tile fails the (NaN-rejecting) error checks. A lowering test builds the
kernels for a TPU target with jax.export, which runs the Pallas-to-Mosaic lowering (block-shape rules, every
op in the kernel bodies) without a TPU; only Mosaic's own compilation in libtpu is left untested.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kernels import backend
from kernels.block_sparse import api as block_sparse_api
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse import mask as bsm
from kernels.block_sparse import pallas_tpu as block_sparse_tpu
from kernels.block_sparse.pallas_gpu import _Static as _BlockSparseStatic
from kernels.flash_attention import flash_attention, pallas_tpu
from kernels.flash_attention.pallas_gpu import _Static
from tests.flash_helpers import check_against_reference
from tests.flash_helpers import inputs as _inputs
from tests.helpers import assert_close

# 16-row tiles so short sequences span several tiles (full, boundary and skipped ones).
SMALL_TILES = pallas_tpu.BlockSizes(16, 16, 16, 16, 16, 16)
TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 2e-2)}  # (forward, gradients)


@pytest.fixture
def on_tpu(monkeypatch):
  monkeypatch.setattr(backend, "pallas_platform", lambda: "tpu")


FLASH_CASES = [
    # b, t, s, h, hkv, d, causal, window, kv_lengths, dtype, block_sizes
    pytest.param(1, 37, 53, 4, 2, 32, True, None, None, jnp.float32, SMALL_TILES, id="causal-gqa2-T<S-unaligned"),
    # D = 128 takes the lane-dense [B, T, H * D] view (the others the heads-first one).
    pytest.param(2, 33, 50, 2, 1, 128, False, (7, 5), [45, 0], jnp.float32, SMALL_TILES,
                 id="window-mqa-kvlen-empty-rows-d128"),
    pytest.param(2, 40, 40, 4, 2, 64, True, (9, None), [40, 17], jnp.bfloat16, None, id="sliding-padded-bf16"),
]


@pytest.mark.parametrize("b,t,s,h,hkv,d,causal,window,kv_lengths,dtype,block_sizes", FLASH_CASES)
def test_flash_tpu_matches_reference(on_tpu, b, t, s, h, hkv, d, causal, window, kv_lengths, dtype, block_sizes):
  q, k, v, do, dlse = _inputs(b, t, s, h, hkv, d, dtype)
  lengths = None if kv_lengths is None else jnp.array(kv_lengths, jnp.int32)

  @jax.jit
  def run(q, k, v, do, dlse):
    results = []
    for impl in ("pallas", "xla"):
      f = lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, kv_lengths=lengths,
                                          return_lse=True, impl=impl, block_sizes=block_sizes)
      (o, lse), vjp = jax.vjp(f, q, k, v)
      results.append((o, lse, *vjp((do, dlse))))
    return results

  results, expected = run(q, k, v, do, dlse)
  check_against_reference(results, expected, dtype, *TOLERANCE[jnp.dtype(dtype).name])
  if kv_lengths is not None and 0 in kv_lengths:
    empty = kv_lengths.index(0)
    np.testing.assert_array_equal(np.asarray(results[0][empty]), 0.0)


def test_auto_picks_the_tpu_kernel_on_tpu(on_tpu, monkeypatch):
  calls = []
  forward = pallas_tpu.forward
  monkeypatch.setattr(pallas_tpu, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
  q, k, v, _, _ = _inputs(1, 16, 16, 2, 2, 16, jnp.float32)
  jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="auto"), q, k, v)
  assert calls, "impl='auto' did not reach pallas_tpu.forward"


def _tpu_target():
  """Abstract TPU v5e target, so the Mosaic lowering (which reads the chip's tiling) runs on a CPU host."""
  device = jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flash_kernels_lower_for_tpu(dtype):
  b, t, s, h, hkv, d = 1, 256, 384, 4, 2, 128
  static = _Static(sm_scale=d**-0.5, causal=True, window=(100, None), offset=s - t, has_kv_length=True,
                   group=h // hkv, precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
  blocks = pallas_tpu.BlockSizes()
  q, kv = jax.ShapeDtypeStruct((b, t, h, d), dtype), jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  lse, lengths = jax.ShapeDtypeStruct((b, h, t), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)
  fwd = lambda q, k, v, n: pallas_tpu.forward(q, k, v, n, static=static, blocks=blocks, interpret=False)
  bwd = lambda q, k, v, o, lse, do, n, dlse: pallas_tpu.backward(q, k, v, o, lse, do, n, dlse=dlse, static=static,
                                                                 blocks=blocks, interpret=False)
  with _tpu_target():
    for f, args in ((fwd, (q, kv, kv, lengths)), (bwd, (q, kv, kv, q, lse, q, lengths, lse))):
      text = jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
      assert "tpu_custom_call" in text


# ---------------------------------------------------------------------------------------------------------------
# Block-sparse attention


BLOCK_SPARSE_CASES = [
    # A band wide enough for full tiles, global rows/columns, GQA 2, and a length that cuts through full tiles.
    pytest.param(lambda: (bsm.local(96, 40, block_q=16, block_k=16)
                          | bsm.global_tokens(96, (0, 50), block_q=16, block_k=16)),
                 (2, 96, 96, 4, 2, 16), [96, 41], SMALL_TILES, id="local|global-gqa2-kvlen"),
    # One random draw per query head (two heads share a kv head, so dk/dv sums two different lists), T != S,
    # kernel rows half a mask tile.
    pytest.param(lambda: bsm.random_blocks(64, 2, 1, 128, num_heads=2, block_q=32, block_k=32),
                 (1, 64, 128, 2, 1, 16), None, SMALL_TILES, id="random-per-head-T<S-subtiles"),
    # One 256x256 mask tile: the dk/dv kernel splits its keys into two 128-lane tiles; D = 128 (lane-dense view).
    pytest.param(lambda: bsm.causal(256, block_q=256, block_k=256), (1, 256, 256, 1, 1, 128), None,
                 pallas_tpu.BlockSizes(block_q=128, block_q_dq=128, block_k_dkv=128), id="causal-dkv-lane-split"),
]


@pytest.mark.parametrize("make_mask,dims,kv_lengths,block_sizes", BLOCK_SPARSE_CASES)
def test_block_sparse_tpu_matches_reference(on_tpu, make_mask, dims, kv_lengths, block_sizes):
  mask = make_mask()
  b, t, s, h, hkv, d = dims
  q, k, v, do, _ = _inputs(b, t, s, h, hkv, d, jnp.float32)
  lengths = None if kv_lengths is None else jnp.array(kv_lengths, jnp.int32)

  @jax.jit
  def run(q, k, v, do):
    results = []
    for impl in ("pallas", "xla"):
      f = lambda q, k, v: block_sparse_attention(q, k, v, mask, kv_lengths=lengths, impl=impl,
                                                 block_sizes=block_sizes)
      o, vjp = jax.vjp(f, q, k, v)
      results.append((o, *vjp(do)))
    return results

  actual, expected = run(q, k, v, do)
  chex.assert_shape(actual[0], q.shape)
  for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected):
    chex.assert_tree_all_finite(a)
    assert_close(a, e, 1e-5, name)


def test_block_sparse_kernels_lower_for_tpu():
  t, h, hkv, d = 512, 4, 2, 128
  shared = bsm.local(t, 200, block_q=128, block_k=128) | bsm.global_tokens(t, (0,), block_q=128, block_k=128)
  mask = bsm.stack_heads([shared, bsm.causal(t, block_q=128, block_k=128)] * 2)
  lists, transposed_lists, tiles = block_sparse_api._mask_arrays(mask)
  static = _BlockSparseStatic(sm_scale=d**-0.5, group=h // hkv, per_head_mask=True, mask_block_q=128,
                              mask_block_k=128, has_kv_length=True, precision=None)
  blocks = pallas_tpu.BlockSizes()
  q, kv = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
  lse, lengths = jax.ShapeDtypeStruct((1, h, t), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
  fwd = lambda q, k, v, n: block_sparse_tpu.forward(q, k, v, n, lists, tiles, static=static, blocks=blocks,
                                                    interpret=False)
  bwd = lambda q, k, v, o, lse, do, n: block_sparse_tpu.backward(
      q, k, v, o, lse, do, n, lists, transposed_lists, tiles, static=static, blocks=blocks, interpret=False)
  with _tpu_target():
    for f, args in ((fwd, (q, kv, kv, lengths)), (bwd, (q, kv, kv, q, lse, q, lengths))):
      assert "tpu_custom_call" in jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
