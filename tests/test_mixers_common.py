"""Properties every registered sequence mixer must have, whatever its algorithm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, config_class, make_config, variant_names

WIDTH, T, B = 32, 24, 2


def _directions():
  cases = []
  for name in variant_names():
    cls = config_class(name)
    if cls.supports_causal:
      cases.append(pytest.param(name, True, id=f"{name}-causal"))
    if cls.supports_bidirectional:
      cases.append(pytest.param(name, False, id=f"{name}-bidirectional"))
  return cases


def _mixer(name, causal, dtype=jnp.float32, seed=0):
  config = make_config(name, causal=causal, num_heads=4, max_len=64)
  return build_mixer(config, WIDTH, dtype=dtype, rngs=nnx.Rngs(seed))


def _inputs(seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (B, T, WIDTH), dtype)


# One compiled forward per mixer and input shape, called on both inputs of a comparison: eager calls would
# dispatch (and compile) the mixer op by op.
_forward = nnx.jit(lambda mixer, x, mask=None: mixer(x, mask=mask))


@pytest.mark.parametrize("name,causal", _directions())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_shape_dtype_and_finite_gradients_under_jit(name, causal, dtype):
  mixer = _mixer(name, causal, dtype)
  mixer.eval()
  x = _inputs(dtype=dtype)

  def loss(m, x):
    return jnp.mean(m(x).astype(jnp.float32) ** 2)

  # The output and the gradients from one program: one compile where a second would compile the forward again.
  y, (grads_params, grads_x) = nnx.jit(lambda m, x: (m(x), nnx.grad(loss, argnums=(0, 1))(m, x)))(mixer, x)
  chex.assert_shape(y, (B, T, WIDTH))
  chex.assert_type(y, dtype)
  chex.assert_tree_all_finite(y)
  chex.assert_tree_all_finite(grads_params)
  chex.assert_tree_all_finite(grads_x)
  assert float(jnp.abs(grads_x.astype(jnp.float32)).sum()) > 0, "no gradient reaches the input"


@pytest.mark.parametrize("name", [p.values[0] for p in _directions() if p.values[1]])
def test_causal_outputs_ignore_the_future(name):
  mixer = _mixer(name, causal=True)
  mixer.eval()
  x = _inputs()
  t = T // 2
  changed = x.at[:, t + 1 :].set(jax.random.normal(jax.random.key(7), (B, T - t - 1, WIDTH)))
  y, y_changed = _forward(mixer, x), _forward(mixer, changed)
  np.testing.assert_allclose(y[:, : t + 1], y_changed[:, : t + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y[:, t + 1 :], y_changed[:, t + 1 :]), "outputs after t should see the change"


@pytest.mark.parametrize("name,causal", _directions())
def test_padded_positions_do_not_change_real_outputs(name, causal):
  mixer = _mixer(name, causal)
  mixer.eval()
  x = _inputs()
  lengths = jnp.array([T - 5, T])
  mask = jnp.arange(T)[None, :] < lengths[:, None]
  garbage = jax.random.normal(jax.random.key(3), x.shape) * 10
  y = _forward(mixer, x, mask)
  y_garbage = _forward(mixer, jnp.where(mask[..., None], x, garbage), mask)
  chex.assert_tree_all_finite(y)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_garbage)[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", variant_names())
def test_bad_mask_shape_raises(name):
  cls = config_class(name)
  mixer = _mixer(name, causal=cls.supports_causal)
  with pytest.raises(ValueError, match="mask"):
    mixer(_inputs(), mask=jnp.ones((B, T + 1), bool))


def test_unknown_variant_lists_the_choices():
  with pytest.raises(ValueError, match=r"variant='nope' is not valid; choose one of .*full"):
    make_config("nope")


def test_every_mission_variant_is_registered():
  expected = {
      "full", "sliding_window", "local", "longformer", "bigbird", "linformer", "performer", "linear",
      "compressive", "mamba", "rwkv",
  }
  assert expected <= set(variant_names())


@pytest.mark.parametrize("name", variant_names())
def test_parameters_do_not_share_buffers(name):
  """A training step donates its parameters; two parameters on one buffer make that fail on GPU ("Attempt to
  donate the same buffer twice"), which CPU runs do not show."""
  causal = config_class(name).supports_causal
  leaves = jax.tree.leaves(nnx.state(_mixer(name, causal), nnx.Param))
  pointers = [leaf.unsafe_buffer_pointer() for leaf in leaves]
  assert len(set(pointers)) == len(pointers)
