"""The Pallas linear-attention kernels (interpret mode on CPU) against the token-by-token fp32 recurrence."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, make_config
from kernels import backend, linear_attention
from kernels.linear_attention.api import auto_impl
from kernels.linear_attention.pallas_gpu import BlockSizes
from kernels.linear_attention.reference import linear_attention_recurrent
from tests.helpers import assert_close

# T is not a multiple of the chunk; K and V are not powers of two, and with 16-wide tiles K and V each
# span two programs, so padding, tiling and the carry across chunks are all exercised.
B, T, H, K, V = 2, 37, 2, 24, 20
SMALL = BlockSizes(chunk=16, block_k=16, block_v=16)
GRAD_NAMES = ("q", "k", "v", "decay", "initial_state")


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


def _decay_shape(kind, b=B, t=T, h=H, k=K):
  return (b, t, h) if kind == "head" else (b, t, h, k)


def _inputs(kind, b=B, t=T, h=H, k=K, v=V, seed=0):
  """q, k, v, decay (None, per head or per channel) and an initial state, fp32."""
  # numpy draws: eager jax.random calls would each compile a program.
  rng = np.random.default_rng(seed)
  q, key, value = _normal(rng, b, t, h, k), _normal(rng, b, t, h, k), _normal(rng, b, t, h, v)
  decay = None
  if kind != "none":
    # log sigmoid(2 + z): per-step rates over roughly (0.5, 1), the range gated models live in.
    decay = -jnp.asarray(np.log1p(np.exp(-2.0 - rng.standard_normal(_decay_shape(kind, b, t, h, k)))), jnp.float32)
  return q, key, value, decay, _normal(rng, b, h, k, v)


def _outputs_and_grads(fn, q, k, v, decay, state):
  """(o, final state) and the gradients of a random projection of both wrt q, k, v, decay, state."""
  o_cot = jax.random.normal(jax.random.key(11), (*q.shape[:3], v.shape[-1]))
  s_cot = jax.random.normal(jax.random.key(12), state.shape)

  def loss(q, k, v, decay, state):
    o, final = fn(q, k, v, decay, state)
    return jnp.sum(o.astype(jnp.float32) * o_cot) + jnp.sum(final * s_cot), (o, final)

  grads, outputs = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, decay, state)
  return outputs, grads


def _pallas(q, k, v, decay, state, blocks=SMALL):
  return linear_attention(q, k, v, decay=decay, initial_state=state, return_final_state=True, impl="pallas",
                          block_sizes=blocks)


def _recurrent(q, k, v, decay, state):
  return linear_attention_recurrent(q, k, v, decay=decay, initial_state=state)


# Compiled once per input shape and decay kind, and shared (compilation dominates this file's run time).
pallas_with_grads = jax.jit(functools.partial(_outputs_and_grads, _pallas))
recurrent_with_grads = jax.jit(functools.partial(_outputs_and_grads, _recurrent))


def _assert_matches(actual, expected, tol_out, tol_grad, grad_tols=None):
  (o, final), grads = actual
  (o_ref, final_ref), grads_ref = expected
  chex.assert_tree_all_finite((o, final, [g for g in grads if g is not None]))
  assert_close(o, o_ref, tol_out, "o")
  assert_close(final, final_ref, tol_out, "final state")
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    if g_ref is not None:
      assert_close(g, g_ref, (grad_tols or {}).get(name, tol_grad), f"d{name}")


@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_matches_recurrence_outputs_state_and_every_gradient(kind):
  args = _inputs(kind)
  _assert_matches(pallas_with_grads(*args), recurrent_with_grads(*args), 1e-5, 1e-5)


@pytest.mark.parametrize("kind", ["head", "channel"])
def test_strong_decay_stays_finite(kind):
  # Each chunk opens with four exp(-100) steps: the log decay inside a chunk sums to -400, which would
  # overflow any exp(-cumsum) factor. Same shapes as above, so the compiled programs are reused.
  q, k, v, _, state = _inputs("none")
  strong = (jnp.arange(T) % SMALL.chunk < 4).reshape((1, T) + (1,) * (len(_decay_shape(kind)) - 2))
  decay = jnp.broadcast_to(jnp.where(strong, -100.0, -0.05), _decay_shape(kind)).astype(jnp.float32)
  # Differences of chunk-cumulated log decays of size 400 carry an absolute error of ~400 * 2^-24 in
  # the exponent, which bounds the accuracy here (the reference sums each span directly instead):
  # measured 5e-5 on o and dq/dk/dv and 8e-5 on the decay gradient.
  _assert_matches(pallas_with_grads(q, k, v, decay, state), recurrent_with_grads(q, k, v, decay, state), 3e-4,
                  3e-4)


def test_default_blocks_bf16_forward():
  q, k, v, decay, _ = _inputs("head")
  o, final = jax.jit(lambda q, k, v, d: linear_attention(
      q, k, v, decay=d, return_final_state=True, impl="pallas"))(*(x.astype(jnp.bfloat16) for x in (q, k, v)), decay)
  chex.assert_type(o, jnp.bfloat16)
  chex.assert_type(final, jnp.float32)
  o_ref, final_ref = _recurrent(q, k, v, decay, jnp.zeros((B, H, K, V)))
  assert_close(o, o_ref, 1e-2, "bf16 o")
  assert_close(final, final_ref, 1e-2, "bf16 final state")


@pytest.mark.parametrize(
    "blocks,match",
    [(BlockSizes(chunk=24), r"block_sizes\.chunk=24"), (BlockSizes(block_v=8), r"block_sizes\.block_v=8")],
)
def test_invalid_block_sizes_name_the_field(blocks, match):
  q, k, v, _, _ = _inputs("none")
  with pytest.raises(ValueError, match=match):
    linear_attention(q, k, v, impl="pallas", block_sizes=blocks)


def test_auto_takes_the_reference_off_gpu_and_pallas_declines_other_dtypes():
  q, k, v, _, _ = _inputs("none", t=8)
  trace = lambda impl: str(jax.make_jaxpr(functools.partial(linear_attention, impl=impl))(q, k, v))
  assert trace("auto") == trace("xla")
  fp8 = jnp.float8_e4m3fn
  with pytest.raises(NotImplementedError, match="impl='pallas' takes float32, bfloat16 or float16"):
    linear_attention(q.astype(fp8), k.astype(fp8), v, impl="pallas")


def test_auto_on_gpu_takes_the_kernels_up_to_the_measured_key_dim(monkeypatch):
  """On a GPU, impl="auto" takes the Triton kernels (Pallas without jax-triton) for K <= 128 and the chunked XLA
  path for wider feature maps (Performer's 256 features), where it measured 3.5x faster."""
  monkeypatch.setattr(backend, "on_gpu", lambda: True)
  monkeypatch.setattr(backend, "has_jax_triton", lambda: True)
  shape = lambda width: jax.ShapeDtypeStruct((2, 64, 4, width), jnp.float32)
  assert auto_impl(shape(128), shape(32)) == "triton"
  assert auto_impl(shape(256), shape(33)) == "xla"
  monkeypatch.setattr(backend, "has_jax_triton", lambda: False)
  assert auto_impl(shape(64), shape(64)) == "pallas"
  monkeypatch.setattr(backend, "on_gpu", lambda: False)
  assert auto_impl(shape(64), shape(64)) == "xla"


def _assert_variant_matches(variant, width, heads, t, tol):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, t, width), np.float32))
  outputs = {}
  for impl in ("xla", "pallas"):
    mixer = build_mixer(make_config(variant, num_heads=heads, impl=impl), width, rngs=nnx.Rngs(0))
    outputs[impl] = nnx.jit(lambda m, x: m(x))(mixer, x)
  assert_close(outputs["pallas"], outputs["xla"], tol, f"{variant} output")


@pytest.mark.parametrize("variant", ["linear", "performer", "rwkv"])
def test_variants_give_the_same_output_with_pallas(variant):
  _assert_variant_matches(variant, 32, 2, 20, 1e-5)


# GPU: realistic sizes, compiled through Triton, against the reference chunked scan in fp32.
GPU_B, GPU_T, GPU_H, GPU_D = 2, 1000, 4, 128
_reference_with_grads = jax.jit(functools.partial(
    _outputs_and_grads,
    lambda q, k, v, d, s: linear_attention(q, k, v, decay=d, initial_state=s, return_final_state=True, impl="xla")))
_gpu_pallas_with_grads = jax.jit(functools.partial(
    _outputs_and_grads, lambda q, k, v, d, s: _pallas(q, k, v, d, s, blocks=None)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_gpu_matches_reference(kind, dtype):
  q, k, v, decay, state = _inputs(kind, GPU_B, GPU_T, GPU_H, GPU_D, GPU_D)
  # Unit-variance q, k over 128 channels would make q.k (and the outputs) grow with D; scale as models do.
  q, k = q * GPU_D**-0.5, k * GPU_D**-0.5
  low = tuple(x.astype(dtype) for x in (q, k, v))
  actual = _gpu_pallas_with_grads(*low, decay, state)
  expected = _reference_with_grads(*(x.astype(jnp.float32) for x in low), decay, state)
  # Without gradients the forward is the fused single walk (with them, the two-pass one checked below).
  fused_o, _ = jax.jit(_pallas, static_argnames="blocks")(*low, decay, state, blocks=None)
  tol = 1e-5 if dtype == "float32" else 1e-2
  assert_close(fused_o, expected[0][0], tol, "fused forward o")
  if dtype == "float32":
    # The decay gradient is q.dq - k.dk summed over T: a difference of O(1) terms, so looser than the rest.
    _assert_matches(actual, expected, 1e-5, 1e-5, grad_tols={"decay": 1e-4})
  else:
    _assert_matches(actual, expected, 1e-2, 2e-2, grad_tols={"decay": 5e-2})


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["linear", "performer", "rwkv"])
def test_gpu_variants_give_the_same_output_with_pallas(variant):
  # Model-sized heads: V = D + 1 (the normaliser column) and Performer's feature count get padded.
  _assert_variant_matches(variant, 512, 8, 300, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["head", "channel"])
def test_gpu_strong_decay_stays_finite(kind):
  q, k, v, _, state = _inputs("none", GPU_B, GPU_T, GPU_H, GPU_D, GPU_D)
  q, k = q * GPU_D**-0.5, k * GPU_D**-0.5
  # -5 per step: -80 over a 16-token chunk, -320 over a 64-token one.
  decay = jnp.full(_decay_shape(kind, GPU_B, GPU_T, GPU_H, GPU_D), -5.0, jnp.float32)
  (o, final), grads = _gpu_pallas_with_grads(q, k, v, decay, state)
  chex.assert_tree_all_finite((o, final, grads))
  (o_ref, final_ref), _ = _reference_with_grads(q, k, v, decay, state)
  assert_close(o, o_ref, 1e-4, "o")
  assert_close(final, final_ref, 1e-4, "final state")
