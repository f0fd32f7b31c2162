"""impl="triton" (the Triton-language kernels through jax-triton) against the fp32 token-by-token recurrence and
against impl="pallas", so the two GPU paths check each other. Everything but the off-GPU error needs a GPU."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, make_config
from kernels import linear_attention
from kernels.linear_attention.pallas_gpu import BlockSizes
from tests.helpers import assert_close
from tests.test_linear_attention_kernel import (_assert_matches, _decay_shape, _inputs, _outputs_and_grads,
                                              _recurrent)

# T = 300 is not a multiple of any chunk; V = 24 (not a power of two) leaves masked channels. Small K and V
# keep the Triton compiles short (fp32 dots with exact products compile to long FMA sequences).
B, T, H, K, V = 2, 300, 2, 32, 24
# 16-wide tiles: two V tiles per walk, two K slices per per-channel decay tile.
SMALL = BlockSizes(chunk=16, block_k=16, block_v=16)


def test_triton_off_gpu_raises_a_clear_error():
  q, k, v, _, _ = _inputs("none", 1, 8, 1, 4, 4)
  with pytest.raises(NotImplementedError, match="impl='triton' needs a CUDA GPU and jax-triton"):
    linear_attention(q, k, v, impl="triton")
  # The variants accept the name (and hand it to the kernel).
  assert make_config("linear", impl="triton").impl == "triton"


def _scan(impl, q, k, v, decay, state, blocks=None):
  return linear_attention(q, k, v, decay=decay, initial_state=state, return_final_state=True, impl=impl,
                          block_sizes=blocks)


# Compiled once per input shape, dtype and decay kind; jax-triton caches the Triton kernels the same way.
_triton_with_grads = jax.jit(functools.partial(_outputs_and_grads, functools.partial(_scan, "triton")))
_pallas_with_grads = jax.jit(functools.partial(_outputs_and_grads, functools.partial(_scan, "pallas")))
_recurrent_with_grads = jax.jit(functools.partial(_outputs_and_grads, _recurrent))
_triton_forward = jax.jit(functools.partial(_scan, "triton"), static_argnames="blocks")


def _scaled_inputs(kind, dtype, seed=0):
  q, k, v, decay, state = _inputs(kind, B, T, H, K, V, seed=seed)
  # Unit-variance q, k over K channels would make q.k (and the outputs) grow with K; scale as models do.
  q, k = q * K**-0.5, k * K**-0.5
  return tuple(x.astype(dtype) for x in (q, k, v)) + (decay, state)


def _tolerances(dtype):
  """(forward, gradients, decay gradient): the decay gradient is q.dq - k.dk summed over T, a difference
  of O(1) terms, so it is looser than the rest."""
  return (1e-5, 1e-5, 1e-4) if dtype == "float32" else (1e-2, 2e-2, 5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_gpu_matches_recurrence_and_pallas(kind, dtype):
  q, k, v, decay, state = _scaled_inputs(kind, dtype)
  actual = _triton_with_grads(q, k, v, decay, state)
  tol_out, tol_grad, tol_decay = _tolerances(dtype)
  expected = _recurrent_with_grads(*(x.astype(jnp.float32) for x in (q, k, v)), decay, state)
  _assert_matches(actual, expected, tol_out, tol_grad, grad_tols={"decay": tol_decay})
  _assert_matches(actual, _pallas_with_grads(q, k, v, decay, state), tol_out, tol_grad,
                  grad_tols={"decay": tol_decay})
  # Without gradients the forward is the fused single walk (with them, the two-pass one checked above).
  o, final = _triton_forward(q, k, v, decay, state)
  chex.assert_type(o, q.dtype)
  chex.assert_type(final, jnp.float32)
  assert_close(o, expected[0][0], tol_out, "fused forward o")
  assert_close(final, expected[0][1], tol_out, "fused forward final state")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_gpu_small_tiles_and_two_pass_forward(kind):
  # Several V tiles per walk and K slices per chunk; the forward without gradients takes the two-pass path.
  args = _scaled_inputs(kind, "float32", seed=1)
  two_pass = dataclasses.replace(SMALL, fused_forward=False)
  actual = jax.jit(functools.partial(_outputs_and_grads, functools.partial(_scan, "triton", blocks=two_pass)))(*args)
  expected = _recurrent_with_grads(*args)
  _assert_matches(actual, expected, 1e-5, 1e-5, grad_tols={"decay": 1e-4})
  o, final = _triton_forward(*args, blocks=two_pass)
  assert_close(o, expected[0][0], 1e-5, "two-pass forward o")
  assert_close(final, expected[0][1], 1e-5, "two-pass forward final state")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["head", "channel"])
def test_gpu_strong_decay_stays_finite(kind):
  q, k, v, _, state = _scaled_inputs("none", "float32")
  # -5 per step: -80 over a 16-token chunk, -320 over a 64-token one; any exp(-cumsum) factor would overflow.
  decay = jnp.full(_decay_shape(kind, B, T, H, K), -5.0, jnp.float32)
  (o, final), grads = _triton_with_grads(q, k, v, decay, state)
  chex.assert_tree_all_finite((o, final, grads))
  (o_ref, final_ref), _ = _recurrent_with_grads(q, k, v, decay, state)
  assert_close(o, o_ref, 1e-4, "o")
  assert_close(final, final_ref, 1e-4, "final state")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["linear", "performer", "rwkv"])
def test_gpu_variants_give_the_same_output_with_triton(variant):
  # Model-sized heads: V = D + 1 (the normaliser column) and Performer's feature count are not powers of two.
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 300, 512), np.float32))
  outputs = {}
  for impl in ("xla", "triton"):
    mixer = build_mixer(make_config(variant, num_heads=8, impl=impl), 512, rngs=nnx.Rngs(0))
    outputs[impl] = nnx.jit(lambda m, x: m(x))(mixer, x)
  assert_close(outputs["triton"], outputs["xla"], 1e-4, f"{variant} output")
