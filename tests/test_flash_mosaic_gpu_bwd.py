"""impl="mosaic_bwd": the Mosaic GPU flash-attention backward (kernels/flash_attention/mosaic_gpu_bwd.py).

On CPU the kernels run in Mosaic GPU interpret mode, which simulates the warpgroups, TMA copies, barriers and
wgmma; the only difference from the GPU path is that wgmma's register left operands are staged through SMEM
there (interpret mode takes SMEM operands only). GPU-marked tests run the compiled kernels.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels.flash_attention import flash_attention
from kernels.flash_attention import mosaic_gpu_bwd
from kernels.flash_attention.api import _mosaic_bwd_attention
from tests.flash_helpers import inputs as _inputs
from tests.helpers import assert_close

GRAD_TOL = 2e-2  # bf16/fp16 gradients, relative RMS error (DESIGN.md section 5)


def _check_gradients(b, t, s, h, hkv, d, causal, dtype, attention=None):
  """dq, dk, dv (with an lse cotangent too) of impl="mosaic_bwd" against jax.vjp of the reference."""
  q, k, v, do, dlse = _inputs(b, t, s, h, hkv, d, dtype)
  attention = attention or (lambda q, k, v, impl: flash_attention(q, k, v, causal=causal, return_lse=True,
                                                                  impl=impl))
  grads = {}
  for impl in ("xla", "mosaic_bwd"):
    _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl), q, k, v)
    grads[impl] = vjp((do, dlse))
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads["mosaic_bwd"], grads["xla"]):
    assert g.shape == g_ref.shape and g.dtype == dtype, (name, g.shape, g.dtype)
    assert_close(g, g_ref, GRAD_TOL, name)


# Interpret mode is slow (~5-15 s a case), so two cases: causal with GQA, empty rows (T > S leaves the first
# T - S queries with nothing to attend) and diagonal tiles in both kernels; and the unmasked path with MHA.
@pytest.mark.parametrize("t,s,h,hkv,causal", [
    pytest.param(256, 128, 2, 1, True, id="causal-gqa2-T>S"),
    pytest.param(128, 128, 1, 1, False, id="bidir-mha"),
])
def test_interpret_matches_reference(t, s, h, hkv, causal):
  _check_gradients(1, t, s, h, hkv, 64, causal, jnp.bfloat16)


def _with_blocks(blocks, causal, d):
  """attention(q, k, v, impl) whose non-reference impl runs the Mosaic backward with `blocks`."""

  def attention(q, k, v, impl):
    if impl == "xla":
      return flash_attention(q, k, v, causal=causal, return_lse=True, impl="xla")
    return _mosaic_bwd_attention(q, k, v, causal=causal, sm_scale=d**-0.5, window=None, kv_lengths=None,
                                 block_sizes=None, bwd_blocks=blocks)

  return attention


@pytest.mark.parametrize("spec", ["64:64:64:64:2:2:1:1", "64:64:64:64:2:2:0:0:232:1:1"],
                         ids=["defer_release-await_dv", "defer_dk-fused_launch"])
def test_interpret_deferred_release_and_await_dv(spec):
  """defer_release frees each ring slot one step late (and the last one after the loops); await_dv waits for the
  dV product before forming dS^T; defer_dk issues each dK product a step late (the last after the loops), here
  with both kernels in one launch (fused_launch: 1 dk/dv CTA, then 4 dq CTAs, over one shared-memory union). Same
  gradients, here over two query heads per kv head (the carried dS^T crosses from one head to the next), masked
  and unmasked tiles and rows with nothing to attend."""
  blocks = mosaic_gpu_bwd.BlockSizes.parse(spec)
  assert (blocks.defer_dk and blocks.fused_launch) or (blocks.defer_release and blocks.await_dv)
  _check_gradients(1, 256, 128, 2, 1, 64, True, jnp.bfloat16, _with_blocks(blocks, True, 64))


@pytest.mark.parametrize("spec", [None, "64:64:64:64:3:3:0:0:240:1", "64:64:64:64:3:3:0:1:240:1",
                                  "64:64:64:128:3:2:0:1:240:0:1"],
                         ids=["default-fused_launch", "defer_dk", "defer_dk-await_dv", "fused_launch-unequal_tiles"])
def test_lowers_for_hopper_on_cpu(spec):
  """Lowering to Mosaic GPU (layouts, wgmma shapes, the SMEM budget) runs on the host, so CI catches breakage
  of the compiled path too; only PTX compilation and the run itself need the GPU."""
  d, dtype = 128, jnp.bfloat16
  q = jax.ShapeDtypeStruct((2, 512, 8, d), dtype)
  k = jax.ShapeDtypeStruct((2, 512, 2, d), dtype)
  lse = jax.ShapeDtypeStruct((2, 8, 512), jnp.float32)
  blocks = mosaic_gpu_bwd.BlockSizes.parse(spec) if spec else mosaic_gpu_bwd.BlockSizes.get_default(d)
  backward = jax.jit(lambda q, k, v, o, lse, do: mosaic_gpu_bwd.backward(q, k, v, o, lse, do, causal=True,
                                                                           sm_scale=d**-0.5, blocks=blocks))
  text = backward.trace(q, k, k, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
  # The dk/dv and dq kernels, or one launch of both (their shared memory a union: here of unequal tiles).
  assert text.count("custom_call @mosaic_gpu") == (1 if blocks.fused_launch else 2)


def test_supports_and_rejections():
  assert mosaic_gpu_bwd.supports((2, 1024, 16, 128), (2, 1024, 2, 128), jnp.bfloat16)
  assert mosaic_gpu_bwd.supports((1, 256, 8, 64), (1, 512, 8, 64), jnp.float16)
  for q_shape, dtype, kwargs in [
      ((1, 128, 2, 64), jnp.float32, {}),
      ((1, 128, 2, 96), jnp.bfloat16, {}),
      ((1, 100, 2, 64), jnp.bfloat16, {}),
      ((1, 128, 2, 64), jnp.bfloat16, dict(window=(8, 0))),
  ]:
    assert not mosaic_gpu_bwd.supports(q_shape, (1, 128, 2, q_shape[3]), dtype, **kwargs), (q_shape, dtype, kwargs)
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="window"):
    flash_attention(q, q, q, window=(8, 0), impl="mosaic_bwd")
  for spec in ("64:64", "64:64:64:64:3:3:2", "64:64:64:64:3:x", "64:64:64:64:3:3:0:2", "64:64:64:64:3:3:0:1:240:2",
               "64:64:64:64:3:3:0:1:240:0:2", "64:64:64:64:3:3:0:1:240:0:1:0"):
    with pytest.raises(ValueError, match="spec"):
      mosaic_gpu_bwd.BlockSizes.parse(spec)
  blocks = mosaic_gpu_bwd.BlockSizes.parse("64:64:64:64:3:3:0:1:240")
  assert blocks.await_dv and (blocks.compute_registers, blocks.producer_registers) == (240, 24)
  assert mosaic_gpu_bwd.BlockSizes.parse("64:64:64:64:3:3:0:1:240:1").defer_dk
  assert mosaic_gpu_bwd.BlockSizes.parse("64:64:64:64:3:3:0:1:240:0:1").fused_launch
  with pytest.raises(ValueError, match="defer_dk and defer_release"):
    mosaic_gpu_bwd.BlockSizes.parse("64:64:64:64:3:3:1:0:240:1")
  assert mosaic_gpu_bwd.BlockSizes().producer_registers == 40
  for registers in (244, 248, 16):  # not a multiple of 8; leaves the producer 8; under setmaxnreg's floor
    with pytest.raises(ValueError, match=f"compute_registers={registers}"):
      mosaic_gpu_bwd.BlockSizes(compute_registers=registers)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_reference(causal, group, d):
  _check_gradients(2, 512, 512, 8, 8 // group, d, causal, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("t,s", [(256, 768), (768, 256)])
def test_gpu_causal_unequal_lengths(t, s):
  _check_gradients(1, t, s, 4, 2, 128, True, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,d", [("64:64:64:128:3:2", 128), ("64:64:64:64:2:3", 64), ("128:64:64:64:2:2", 128),
                                    ("64:64:64:64:3:3:1", 128), ("64:64:64:128:3:2:1", 128),
                                    ("64:64:64:128:3:3:1", 64), ("64:64:64:64:3:3:0:1", 128),
                                    ("64:64:64:64:3:3:0:0:240", 128), ("64:64:64:64:3:3:0:1:240", 128),
                                    ("64:64:64:64:3:3:0:0:240:1", 128), ("64:64:64:64:3:3:0:1:240:1", 128),
                                    ("64:64:64:64:3:3:0:1:240:0:1", 128), ("64:64:64:128:3:2:0:1:240:0:1", 64),
                                    ("64:64:64:64:4:3:0:1:240:0:1", 128), ("64:64:64:128:4:2:0:1:240:0:1", 128),
                                    ("64:64:64:128:4:2:0:1:240:0:1", 64), ("64:64:64:64:4:4:0:1:240:0:1", 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_tile_configs(spec, d, causal):
  """The configurations the benchmark sweep tries compile and give the same gradients."""
  blocks = mosaic_gpu_bwd.BlockSizes.parse(spec)
  _check_gradients(1, 1024, 1024, 4, 2, d, causal, jnp.float16 if d == 64 else jnp.bfloat16,
                   _with_blocks(blocks, causal, d))
