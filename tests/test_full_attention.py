"""Full softmax attention against an explicit formula; GQA/MQA; xla vs cuDNN on GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, make_config
from efficient_attention.variants.full import softmax_attention
from tests.helpers import assert_close


def naive_attention(q, k, v, causal, key_mask=None):
  """Float64 numpy softmax attention with K/V explicitly repeated per query group."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  t, s_len = q.shape[1], k.shape[1]
  allowed = np.ones((t, s_len), bool)
  if causal:
    allowed = np.arange(s_len)[None, :] <= np.arange(t)[:, None] + (s_len - t)
  allowed = np.broadcast_to(allowed, s.shape)
  if key_mask is not None:
    allowed = allowed & np.asarray(key_mask)[:, None, None, :]
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(b, t, s, h, hkv, d, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
      jax.random.normal(kq, (b, t, h, d), dtype),
      jax.random.normal(kk, (b, s, hkv, d), dtype),
      jax.random.normal(kv, (b, s, hkv, d), dtype),
  )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("t,s", [(13, 13), (5, 13)], ids=["T=S", "T<S"])
def test_softmax_attention_matches_formula(causal, h, hkv, t, s):
  q, k, v = _qkv(2, t, s, h, hkv, 16)
  key_mask = jnp.arange(s)[None, :] < jnp.array([[s], [s - 3]])
  key_mask = key_mask.reshape(2, s)
  out = softmax_attention(q, k, v, causal=causal, key_mask=key_mask)
  assert_close(out, naive_attention(q, k, v, causal, key_mask), 1e-5)


def test_gqa_equals_mha_with_repeated_kv():
  q, k, v = _qkv(2, 11, 11, 8, 2, 16)
  gqa = softmax_attention(q, k, v, causal=True)
  mha = softmax_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), causal=True)
  assert_close(gqa, mha, 1e-6)


def test_module_with_kv_heads_equal_to_heads_is_mha():
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  mha = build_mixer(make_config("full", num_heads=4), 32, rngs=nnx.Rngs(0))
  explicit = build_mixer(make_config("full", num_heads=4, num_kv_heads=4), 32, rngs=nnx.Rngs(0))
  assert_close(explicit(x), mha(x), 1e-7)


def test_gqa_module_has_fewer_kv_parameters():
  mqa = build_mixer(make_config("full", num_heads=4, num_kv_heads=1), 32, rngs=nnx.Rngs(0))
  assert mqa.qkv.key.kernel.value.shape == (32, 8)
  assert mqa.qkv.query.kernel.value.shape == (32, 32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 is not valid; it must be divisible by num_kv_heads=3"),
        (dict(num_heads=0), "num_heads"),
        (dict(impl="triton"), r"impl='triton' is not valid; choose one of 'xla', 'cudnn', 'pallas'"),
    ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_config("full", **kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_variant_equals_xla(causal):
  x = jax.random.normal(jax.random.key(0), (2, 21, 32))
  mask = jnp.arange(21)[None, :] < jnp.array([[21], [15]])
  xla = build_mixer(make_config("full", num_heads=4, num_kv_heads=2, causal=causal), 32, rngs=nnx.Rngs(0))
  flash = build_mixer(make_config("flash", num_heads=4, num_kv_heads=2, causal=causal), 32, rngs=nnx.Rngs(0))
  real = jnp.broadcast_to(mask[..., None], (2, 21, 32))
  assert_close(jnp.where(real, flash(x, mask=mask), 0), jnp.where(real, xla(x, mask=mask), 0), 1e-5)


def test_flash_with_a_hole_in_the_mask_is_loud_not_wrong():
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  mask = jnp.array([[True] * 8, [True, False] + [True] * 6])
  flash = build_mixer(make_config("flash", num_heads=4), 32, rngs=nnx.Rngs(0))
  y = flash(x, mask=mask)
  assert bool(jnp.all(jnp.isfinite(y[0]))) and bool(jnp.all(jnp.isnan(y[1])))


def test_width_not_divisible_by_heads_raises():
  with pytest.raises(ValueError, match="width=30 is not valid; it must be divisible by num_heads=4"):
    build_mixer(make_config("full", num_heads=4), 30, rngs=nnx.Rngs(0))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 1])
def test_xla_equals_cudnn(causal, hkv):
  q, k, v = _qkv(2, 256, 256, 4, hkv, 64, dtype=jnp.bfloat16)
  key_mask = jnp.arange(256)[None, :] < jnp.array([[256], [200]])
  xla = softmax_attention(q, k, v, causal=causal, key_mask=key_mask, impl="xla")
  cudnn = softmax_attention(q, k, v, causal=causal, key_mask=key_mask, impl="cudnn")
  assert_close(cudnn, xla, 1e-2)

  def loss(impl, q, k, v):
    return jnp.sum(softmax_attention(q, k, v, causal=causal, key_mask=key_mask, impl=impl).astype(jnp.float32) ** 2)

  grads_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  grads_cudnn = jax.grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2))(q, k, v)
  for g_c, g_x in zip(grads_cudnn, grads_xla):
    assert_close(g_c, g_x, 2e-2)


@pytest.mark.gpu
def test_full_module_runs_with_cudnn():
  x = jax.random.normal(jax.random.key(0), (2, 128, 64), jnp.bfloat16)
  mixer_xla = build_mixer(make_config("full", num_heads=4), 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  mixer_cudnn = build_mixer(make_config("full", num_heads=4, impl="cudnn"), 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert_close(mixer_cudnn(x), mixer_xla(x), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flash_module_on_gpu_matches_full_xla(causal):
  """The flash variant on a GPU (impl="auto": the Mosaic kernels on Hopper at this shape, bf16, D=64, T a multiple
  of 128, no padding) against the full variant on XLA: output and the input gradient."""
  x = jax.random.normal(jax.random.key(0), (2, 512, 256), jnp.bfloat16)
  full = build_mixer(make_config("full", num_heads=4, causal=causal), 256, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  flash = build_mixer(make_config("flash", num_heads=4, causal=causal), 256, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert_close(flash(x), full(x), 2e-2)
  grad = lambda mixer: jax.grad(lambda x: jnp.sum(mixer(x).astype(jnp.float32) ** 2))(x)
  assert_close(grad(flash), grad(full), 3e-2)
