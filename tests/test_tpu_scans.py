"""The TPU Pallas kernels of linear attention and the selective scan, run in interpret mode on CPU.

`kernels.backend.pallas_platform` is patched to say "tpu", so the public ops take the TPU path end to end (padding, the
custom VJP, the forward and backward kernels) and are checked against the token-by-token fp32 oracles: outputs,
final state and every gradient. Interpret mode fills outputs and scratch buffers with NaN before the kernels
run, so an unwritten tile or an uninitialised state fails the (NaN-rejecting) error checks. Lowering for a real
TPU is checked by exporting the differentiated ops for the "tpu" platform, which runs the Mosaic lowering
(block-shape rules, supported primitives) without a TPU.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels import backend, linear_attention, selective_scan
from kernels.linear_attention import pallas_tpu as la_tpu
from kernels.linear_attention.reference import linear_attention_recurrent
from kernels.selective_scan import pallas_tpu as ss_tpu
from kernels.selective_scan import reference as ss_reference
from tests.helpers import assert_close
from tests.test_linear_attention_kernel import _outputs_and_grads
from tests.test_selective_scan_kernel import _values_and_grads
from tests.test_selective_scan_ref import make_inputs

# T = 37 is not a multiple of the 16-token chunk; K = 136 pads to two 128-lane slices (the per-channel decay
# walks both) and V = 12 differs from K, so a transposed state would not line up.
B, T, H, K, V = 2, 37, 2, 136, 12
LA_BLOCKS = la_tpu.BlockSizes(chunk=16)


@pytest.fixture(autouse=True)
def on_tpu(monkeypatch):
  monkeypatch.setattr(backend, "pallas_platform", lambda: "tpu")


def _la_inputs(kind, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
  # q.k sums K = 136 products: scale as models do so that outputs stay O(1).
  q, k, v = normal(B, T, H, K, scale=K**-0.5), normal(B, T, H, K, scale=K**-0.5), normal(B, T, H, V)
  decay = None
  if kind != "none":
    shape = (B, T, H) if kind == "head" else (B, T, H, K)
    decay = -jnp.log1p(jnp.exp(-2.0 - normal(*shape)))  # log sigmoid(2 + z): rates in about (0.5, 1)
  return q, k, v, decay, normal(B, H, K, V)


def _la_pallas(q, k, v, decay, state):
  return linear_attention(q, k, v, decay=decay, initial_state=state, return_final_state=True, impl="pallas",
                          block_sizes=LA_BLOCKS)


def _la_recurrent(q, k, v, decay, state):
  return linear_attention_recurrent(q, k, v, decay=decay, initial_state=state)


@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_linear_attention_matches_recurrence(kind):
  args = _la_inputs(kind)
  (o, final), grads = jax.jit(functools.partial(_outputs_and_grads, _la_pallas))(*args)
  (o_ref, final_ref), grads_ref = jax.jit(functools.partial(_outputs_and_grads, _la_recurrent))(*args)
  chex.assert_shape(o, (B, T, H, V))
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(final, final_ref, 1e-5, "final state")
  for name, g, g_ref in zip(("q", "k", "v", "decay", "initial_state"), grads, grads_ref):
    if g_ref is not None:
      chex.assert_shape(g, g_ref.shape)
      assert_close(g, g_ref, 1e-5, f"d{name}")


def test_linear_attention_bf16_default_blocks():
  q, k, v, decay, _ = _la_inputs("head", seed=1)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  o, final = jax.jit(lambda q, k, v, d: linear_attention(q, k, v, decay=d, return_final_state=True,
                                                         impl="pallas"))(*low, decay)
  chex.assert_type(o, jnp.bfloat16)
  chex.assert_type(final, jnp.float32)
  o_ref, final_ref = _la_recurrent(*(x.astype(jnp.float32) for x in low), decay, jnp.zeros((B, H, K, V)))
  assert_close(o, o_ref, 1e-2, "bf16 o")
  assert_close(final, final_ref, 1e-2, "bf16 final state")


SS_CASES = {
    # 37 = 2 chunks of 16 + 5 tokens of a padded third; Dm = 8 is one full-width block; every optional input.
    "ragged_all_options": dict(inputs=dict(length=37, dm=8, n=4), blocks=ss_tpu.BlockSizes(chunk=16)),
    # Grouped B/C: G = 2 groups of 256 channels in 128-lane blocks, so each group's dB/dC sums two blocks;
    # no optional input and dt used as delta directly (the padding mask must then zero dt itself).
    "grouped_bare": dict(
        inputs=dict(length=13, dm=512, n=16, groups=2, with_d=False, with_z=False, with_dt_bias=False,
                    with_state=False, positive_dt=True),
        blocks=ss_tpu.BlockSizes(block_d=128, chunk=8), dt_softplus=False),
}


@pytest.mark.parametrize("case", SS_CASES)
def test_selective_scan_matches_naive(case):
  spec = SS_CASES[case]
  args = make_inputs(1, **spec["inputs"])
  dt_softplus = spec.get("dt_softplus", True)
  batch, length, dm = args["x"].shape
  cot = make_inputs(2, batch=batch, length=length, dm=dm, n=args["A"].shape[1])

  def pallas(args):
    return selective_scan(**args, dt_softplus=dt_softplus, return_final_state=True, impl="pallas",
                          block_sizes=spec["blocks"])

  def naive(args):
    return ss_reference.selective_scan_naive(**args, dt_softplus=dt_softplus)

  run = jax.jit(_values_and_grads, static_argnums=0)
  (y, state), grads = run(pallas, args, (cot["x"], cot["initial_state"]))
  (y_ref, state_ref), grads_ref = run(naive, args, (cot["x"], cot["initial_state"]))
  chex.assert_shape(y, (batch, length, dm))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state, state_ref, 1e-5, "final state")
  assert set(grads) == set(args)
  for name in args:
    chex.assert_shape(grads[name], args[name].shape)
    assert_close(grads[name], grads_ref[name], 1e-5, f"gradient of {name}")


def test_dispatch_on_tpu():
  """auto picks the TPU kernels; a group layout they cannot tile raises for pallas and falls back for auto."""
  traced = lambda fn, *args: str(jax.make_jaxpr(fn)(*args))
  q, k, v, _, _ = _la_inputs("none")
  assert "pallas_call" in traced(functools.partial(linear_attention, impl="auto"), q, k, v)
  args = make_inputs(0, length=8, dm=8, n=4)
  assert "pallas_call" in traced(lambda a: selective_scan(**a, impl="auto"), args)
  grouped = make_inputs(0, length=8, dm=8, n=4, groups=2)
  assert "pallas_call" not in traced(lambda a: selective_scan(**a, impl="auto"), grouped)
  with pytest.raises(NotImplementedError, match="Dm / G to be a multiple of 128"):
    selective_scan(**grouped, impl="pallas")
  with pytest.raises(ValueError, match=r"block_sizes\.chunk=12"):
    linear_attention(q, k, v, impl="pallas", block_sizes=la_tpu.BlockSizes(chunk=12))


def _export_for_tpu(fn, *avals):
  """Lowers fn for a TPU (v5e) without one: runs the Mosaic lowering of every pallas_call in it."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
    return export.export(jax.jit(fn), platforms=["tpu"])(*avals)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_lower_for_tpu(dtype):
  # Model-sized tiles (default blocks): K = V = 128, Dm = 512 in G = 2 groups, N = 16.
  sds = lambda *shape, d=dtype: jax.ShapeDtypeStruct(shape, d)

  def la_grads(q, k, v, d_head, d_channel, state):
    def loss(q, k, v, d_head, d_channel, state):
      total = 0.0
      for decay in (None, d_head, d_channel):
        o, final = la_tpu.linear_attention(q, k, v, decay, state, None, interpret=False)
        total += jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
      return total
    return jax.grad(loss, argnums=tuple(range(6)))(q, k, v, d_head, d_channel, state)

  _export_for_tpu(la_grads, sds(2, 256, 2, 128), sds(2, 256, 2, 128), sds(2, 256, 2, 128),
                  sds(2, 256, 2, d=jnp.float32), sds(2, 256, 2, 128, d=jnp.float32), sds(2, 2, 128, 128, d=jnp.float32))

  def ss_grads(x, dt, A, B_, C_, D, z, bias, h0):
    def loss(*a):
      y, state = ss_tpu.selective_scan(*a[:5], D=a[5], z=a[6], dt_bias=a[7], dt_softplus=True, initial_state=a[8],
                                       block_sizes=None, interpret=False)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)
    return jax.grad(loss, argnums=tuple(range(9)))(x, dt, A, B_, C_, D, z, bias, h0)

  f32 = jnp.float32
  _export_for_tpu(ss_grads, sds(2, 200, 512), sds(2, 200, 512), sds(512, 16, d=f32), sds(2, 200, 2, 16),
                  sds(2, 200, 2, 16), sds(512, d=f32), sds(2, 200, 512), sds(512, d=f32), sds(2, 512, 16, d=f32))


# GPU machine: the same kernels, still interpreted, at model sizes and default blocks (many chunks per walk).
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["head", "channel"])
def test_gpu_linear_attention_default_blocks_long(kind):
  b, t, h, d = 1, 600, 2, 128
  rng = np.random.default_rng(3)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = normal(b, t, h, d) * d**-0.5, normal(b, t, h, d) * d**-0.5, normal(b, t, h, d)
  decay = -jnp.log1p(jnp.exp(-2.0 - normal(*((b, t, h) if kind == "head" else (b, t, h, d)))))
  state = normal(b, h, d, d)

  def loss(fn, q, k, v, decay, state):
    o, final = fn(q, k, v, decay, state)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(final * jnp.sin(final)), (o, final)

  pallas = lambda q, k, v, d, s: linear_attention(q, k, v, decay=d, initial_state=s, return_final_state=True,
                                                  impl="pallas")
  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4), has_aux=True))
  grads, (o, final) = grad(pallas)(q, k, v, decay, state)
  grads_ref, (o_ref, final_ref) = grad(_la_recurrent)(q, k, v, decay, state)
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(final, final_ref, 1e-5, "final state")
  for name, g, g_ref in zip(("q", "k", "v", "decay", "initial_state"), grads, grads_ref):
    # The decay gradient is q.dq - k.dk summed over T: a difference of O(1) terms (as on the GPU path).
    assert_close(g, g_ref, 1e-4, f"d{name}")


@pytest.mark.gpu
def test_gpu_selective_scan_default_blocks_long():
  args = make_inputs(7, batch=1, length=1000 + 3, dm=512, n=16, groups=2)
  args["dt"] = args["dt"] * 0.5 - 3.0  # Mamba-like step sizes: the state remembers many tokens
  cot = make_inputs(8, batch=1, length=1003, dm=512, n=16)
  run = jax.jit(_values_and_grads, static_argnums=0)
  (y, state), grads = run(lambda a: selective_scan(**a, return_final_state=True, impl="pallas"), args,
                          (cot["x"], cot["initial_state"]))
  (y_ref, state_ref), grads_ref = run(lambda a: ss_reference.selective_scan_naive(**a), args,
                                      (cot["x"], cot["initial_state"]))
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state, state_ref, 1e-5, "final state")
  for name in args:
    assert_close(grads[name], grads_ref[name], 1e-4, f"gradient of {name}")
