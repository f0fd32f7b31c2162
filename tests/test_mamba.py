"""Mamba: the parallel module computes the Mamba recurrence token by token, with Mamba's initialisation."""

import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer
from efficient_attention.variants.mamba import MambaConfig
from tests.helpers import assert_close

WIDTH = 8


def _randomised(config, seed=0):
  """A small Mamba whose every parameter is random, so no init symmetry (D = 1, equal A rows) hides a bug."""
  mixer = build_mixer(config, WIDTH, rngs=nnx.Rngs(seed))
  params = nnx.state(mixer, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed + 1)
  nnx.update(mixer, jax.tree.unflatten(
      treedef, [jnp.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
  ))
  return mixer


def _recurrence(mixer, x):
  """Mamba one token at a time in float64 NumPy, from the module's parameters: x [B, T, C] -> [B, T, C]."""
  p = {k: np.asarray(v[...], np.float64) for k, v in dict(
      w_in=mixer.in_proj.kernel, b_in=mixer.in_proj.bias, w_conv=mixer.conv.kernel, b_conv=mixer.conv.bias,
      w_x=mixer.x_proj.kernel, w_dt=mixer.dt_proj.kernel, dt_bias=mixer.dt_bias, a_log=mixer.A_log,
      d=mixer.D, w_out=mixer.out_proj.kernel, b_out=mixer.out_proj.bias,
  ).items()}
  silu = lambda v: v / (1 + np.exp(-v))
  e, n = p["a_log"].shape
  k, r = p["w_conv"].shape[0], p["w_dt"].shape[0]
  a = -np.exp(p["a_log"])
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    window = np.zeros((k, e))  # the last K conv inputs, oldest first
    h = np.zeros((e, n))
    for t in range(x.shape[1]):
      xz = x[b, t] @ p["w_in"] + p["b_in"]
      window = np.concatenate([window[1:], xz[None, :e]])
      u = silu((window * p["w_conv"]).sum(0) + p["b_conv"])
      proj = u @ p["w_x"]
      dt, b_t, c_t = proj[:r], proj[r : r + n], proj[r + n :]
      delta = np.log1p(np.exp(dt @ p["w_dt"] + p["dt_bias"]))
      h = np.exp(delta[:, None] * a) * h + (delta * u)[:, None] * b_t[None, :]
      y = (h @ c_t + p["d"] * u) * silu(xz[e:])
      out[b, t] = y @ p["w_out"] + p["b_out"]
  return out


def test_parallel_module_equals_token_by_token_recurrence():
  config = MambaConfig(d_state=4, dt_rank=3, use_bias=True)
  mixer = _randomised(config)
  x = jax.random.normal(jax.random.key(2), (2, 11, WIDTH))
  y = nnx.jit(lambda m, x: m(x))(mixer, x)
  chex.assert_shape(y, x.shape)
  assert_close(y, _recurrence(mixer, x), 1e-5, "mamba output")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_on_both_sides_is_skipped(causal):
  # Left padding must leave the state and the conv window exactly as at the start of an unpadded sequence; for
  # the bidirectional mixer the right padding is the reversed branch's left padding.
  mixer = _randomised(MambaConfig(d_state=4, causal=causal))
  real = jax.random.normal(jax.random.key(3), (1, 7, WIDTH))
  junk = 10 * jax.random.normal(jax.random.key(4), (1, 5, WIDTH))
  padded = jnp.concatenate([junk[:, :3], real, junk[:, 3:]], axis=1)
  positions = jnp.arange(12)[None, :]
  mask = (positions >= 3) & (positions < 10)

  def loss(m, x):
    y = m(x, mask=mask)
    return jnp.sum(y[:, 3:10] ** 2), y

  grad, y = nnx.jit(nnx.grad(loss, argnums=1, has_aux=True))(mixer, padded)
  assert_close(y[:, 3:10], nnx.jit(lambda m, x: m(x))(mixer, real), 1e-5, "padded output")
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(np.asarray(grad)[:, :3], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[:, 10:], 0.0)


def test_initialisation_follows_mamba():
  config = MambaConfig(d_state=16, expand=2, dt_min=1e-3, dt_max=1e-1)
  width = 40
  mixer = build_mixer(config, width, rngs=nnx.Rngs(0))
  inner, rank = 2 * width, math.ceil(width / 16)
  chex.assert_shape(mixer.x_proj.kernel[...], (inner, rank + 2 * 16))
  chex.assert_shape(mixer.dt_proj.kernel[...], (rank, inner))
  log_step = np.log(np.asarray(jax.nn.softplus(mixer.dt_bias[...]), np.float64))
  low, high = math.log(1e-3), math.log(1e-1)
  assert low - 1e-3 <= log_step.min() and log_step.max() <= high + 1e-3
  # Log-uniform: mean and spread of log(step) match U(log dt_min, log dt_max) (sampling error ~10%).
  assert abs(log_step.mean() - (low + high) / 2) < 0.15 * (high - low)
  assert abs(log_step.std() / ((high - low) / math.sqrt(12)) - 1) < 0.25
  np.testing.assert_allclose(np.exp(mixer.A_log[...]), np.broadcast_to(np.arange(1, 17), (inner, 16)), rtol=1e-6)
  np.testing.assert_array_equal(mixer.D[...], 1.0)
  assert MambaConfig(dt_rank=5).dt_rank_for(width) == 5


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("d_state", dict(d_state=0)),
        ("d_conv", dict(d_conv=0)),
        ("dt_rank", dict(dt_rank="full")),
        ("dt_rank", dict(dt_rank=0)),
        ("dt_min", dict(dt_min=0.2, dt_max=0.1)),
        ("impl", dict(impl="cudnn")),
    ],
)
def test_invalid_config_names_the_field(field, overrides):
  with pytest.raises(ValueError, match=rf"^{field}="):
    MambaConfig(**overrides)


def test_pallas_scan_gives_the_xla_output():
  # The same random parameters under both selective-scan implementations (Pallas runs in interpret mode on CPU).
  x = jax.random.normal(jax.random.key(5), (2, 11, WIDTH))
  outputs = {impl: nnx.jit(lambda m, x: m(x))(_randomised(MambaConfig(d_state=4, impl=impl)), x)
             for impl in ("xla", "pallas")}
  assert_close(outputs["pallas"], outputs["xla"], 1e-5, "mamba output")


def test_bidirectional_sums_a_forward_and_a_reversed_recurrence():
  # causal=False: the forward branch's recurrence plus, flipped back, the backward branch's recurrence over the
  # reversed sequence, through the shared in- and out-projections (whose bias is added once).
  mixer = _randomised(MambaConfig(d_state=4, dt_rank=3, use_bias=True, causal=False))
  x = jax.random.normal(jax.random.key(6), (2, 9, WIDTH))
  y = nnx.jit(lambda m, x: m(x))(mixer, x)
  backward = types.SimpleNamespace(**{name: getattr(mixer.backward, name) for name in (
      "conv", "x_proj", "dt_proj", "dt_bias", "A_log", "D")}, in_proj=mixer.in_proj, out_proj=mixer.out_proj)
  flip = lambda a: np.flip(np.asarray(a), axis=1)
  expected = _recurrence(mixer, x) + flip(_recurrence(backward, flip(x))) - np.asarray(mixer.out_proj.bias[...])
  assert_close(y, expected, 1e-5, "bidirectional mamba output")
  # Every position sees later ones, unlike the causal mixer.
  later = nnx.jit(lambda m, x: m(x))(mixer, x.at[:, -1].add(1.0))
  assert float(jnp.abs(later - y)[:, 0].max()) > 1e-4


def test_bidirectional_mamba_refuses_to_decode():
  mixer = build_mixer(MambaConfig(causal=False), WIDTH, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal=False is not valid for decoding"):
    mixer.init_cache(1, 8)


def test_causal_mamba_has_no_backward_branch():
  assert build_mixer(MambaConfig(), WIDTH, rngs=nnx.Rngs(0)).backward is None
