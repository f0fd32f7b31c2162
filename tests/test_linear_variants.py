"""Linear-attention variants compute what their papers say: linear, performer, linformer, rwkv."""

import functools
import math

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, make_config
from efficient_attention.variants.performer import orthogonal_gaussian_features, performer_attention
from efficient_attention.variants.rwkv import rwkv6_recurrence
from kernels import linear_attention_step
from tests.helpers import assert_close

B, T, WIDTH, HEADS, KV_HEADS = 2, 20, 32, 4, 2
D = WIDTH // HEADS


def _mixer(name, **overrides):
  config = make_config(name, num_heads=HEADS, **overrides)
  return build_mixer(config, WIDTH, rngs=nnx.Rngs(0))


def _normal(seed, shape):
  # numpy draws: eager jax.random calls would each compile a program, the bulk of this file's run time.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _x(t=T):
  return _normal(1, (B, t, WIDTH))


def _heads_of_kv(a):
  """[B, T, Hkv, X] -> [B, T, H, X], query head h reading key/value head h // (H / Hkv)."""
  return jnp.repeat(a, HEADS // a.shape[2], axis=2)


def _elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


# Jitted once per shape: compiling whole functions is much cheaper here than running them op by op.
_call = nnx.jit(lambda mixer, x, mask=None: mixer(x, mask=mask))
_step = jax.jit(linear_attention_step)
# The exact estimator (no feature floor), which the oracles below compute.
_performer_attention = jax.jit(functools.partial(performer_attention, chunk_size=8, feature_floor=0.0),
                               static_argnames="causal")


def _favor_features(x, w):
  """The paper's positive random features, unstabilised: exp(w x' - |x'|^2 / 2) / sqrt(M), x' = x D^-1/4."""
  x = x * x.shape[-1] ** -0.25
  return jnp.exp(x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)) / math.sqrt(w.shape[0])


def _features(name, mixer):
  if name == "linear":
    return _elu_plus_one, _elu_plus_one
  w = mixer.features[...]
  return (lambda q: _favor_features(q, w)), (lambda k: _favor_features(k, w))


def _causal_mixer(name):
  exact = {"feature_floor": 0.0} if name == "performer" else {}  # the oracles use the paper's exact features
  return _mixer(name, causal=True, num_kv_heads=KV_HEADS, chunk_size=8, **exact)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_causal_parallel_form_equals_step_recurrence(name):
  mixer = _causal_mixer(name)
  x = _x()
  q, k, v = mixer.qkv(x)
  phi_q, phi_k = _features(name, mixer)
  fq, fk = phi_q(q), _heads_of_kv(phi_k(k))
  v1 = _heads_of_kv(jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1))
  state = jnp.zeros((B, HEADS, fq.shape[-1], D + 1))
  outputs = []
  for t in range(T):
    o, state = _step(fq[:, t], fk[:, t], v1[:, t], state)
    outputs.append(o[..., :-1] / o[..., -1:])
  expected = mixer.out(jnp.stack(outputs, axis=1).reshape(B, T, -1))
  assert_close(_call(mixer, x, jnp.ones((B, T), bool)), expected, 1e-5, name)


def test_linear_bidirectional_equals_quadratic_formula():
  mixer = _mixer("linear", causal=False, num_kv_heads=KV_HEADS)
  x = _x()
  mask = jnp.arange(T)[None, :] < jnp.array([T - 6, T])[:, None]
  q, k, v = mixer.qkv(x)
  scores = jnp.einsum("bthd,bshd->bhts", _elu_plus_one(q), _heads_of_kv(_elu_plus_one(k)))
  scores = jnp.where(mask[:, None, None, :], scores, 0.0)
  y = jnp.einsum("bhts,bshd->bthd", scores / scores.sum(-1, keepdims=True), _heads_of_kv(v))
  assert_close(_call(mixer, x, mask), mixer.out(y.reshape(B, T, -1)), 1e-5)


def test_performer_features_are_blockwise_orthogonal_with_gaussian_norms():
  w = orthogonal_gaussian_features(jax.random.key(0), 4096, 16)
  chex.assert_shape(w, (4096, 16))
  for block in (w[:16], w[16:32]):
    gram = block @ block.T
    np.testing.assert_allclose(gram - jnp.diag(jnp.diag(gram)), 0.0, atol=1e-4)
  norms = jnp.linalg.norm(w, axis=-1)
  # chi(16) norms: mean ~ 3.9, and not all equal (an unscaled orthogonal matrix would give exactly 1).
  assert 3.0 < float(norms.mean()) < 5.0 and float(norms.std()) > 0.2


def test_performer_approximates_softmax_better_with_more_features():
  t, d = 32, 16
  q, k, v = (_normal(seed, (1, t, 2, d)) for seed in range(3))
  # The estimator's variance grows like exp(|q'|^2 + |k'|^2); this scale keeps it moderate while the
  # softmax still differs clearly from a plain average.
  q, k = 0.5 * q, 0.5 * k
  s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
  # The first m rows of a larger draw are a draw of m features; two draws average out some luck.
  draws = [orthogonal_gaussian_features(jax.random.key(seed), 4096, d) for seed in range(2)]
  for causal, sizes in ((False, (16, 256, 4096)), (True, (4096,))):
    allowed = jnp.tril(jnp.ones((t, t), bool)) if causal else jnp.ones((t, t), bool)
    exact = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1), v)
    plain_average = jnp.einsum("ts,bshd->bthd", allowed / allowed.sum(-1, keepdims=True), v)
    rel = lambda a: float(jnp.sqrt(jnp.mean((a - exact) ** 2) / jnp.mean(exact**2)))
    errors = [np.mean([rel(_performer_attention(q, k, v, w[:m], causal=causal)) for w in draws]) for m in sizes]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * rel(plain_average), (causal, errors, rel(plain_average))


def test_performer_causal_stabiliser_is_exact_for_large_logits():
  # Keys of norms 1 to 12 in random order: their logits fall from about 0 to below -200, past where
  # exp underflows in fp32, and the running max jumps up whenever a shorter key arrives. The shift
  # must keep every exponent <= 0 and still cancel exactly. Oracle: log-space weights of the same features.
  q, k, v = (_normal(seed, (1, 24, 1, 8)) for seed in range(3))
  k = k * jnp.asarray(np.random.default_rng(5).uniform(1.0, 12.0, 24), jnp.float32)[None, :, None, None]
  w = orthogonal_gaussian_features(jax.random.key(3), 256, 8)
  y = _performer_attention(q, k, v, w, causal=True)
  logit = lambda x: (x * 8**-0.25) @ w.T - 0.5 * jnp.sum((x * 8**-0.25) ** 2, axis=-1, keepdims=True)
  pair = jax.nn.logsumexp(logit(q)[:, :, None, :, :] + logit(k)[:, None, :, :, :], axis=-1)  # [B, T, S, H]
  pair = jnp.where(jnp.tril(jnp.ones((24, 24), bool))[None, :, :, None], pair, -jnp.inf)
  expected = jnp.einsum("btsh,bshd->bthd", jax.nn.softmax(pair, axis=2), v)
  chex.assert_tree_all_finite(y)
  assert_close(y, expected, 1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_performer_gradients_stay_finite_when_queries_meet_only_underflowed_keys(causal):
  # Queries and keys of norm ~60 (what training reached on ListOps before going non-finite): after the shifts a
  # query's large features meet keys whose features underflowed, the normaliser is ~0 and the normalisation's
  # gradient overflows. Without the feature floor these gradients hold NaN; with it they are finite. At ordinary
  # norms the floor leaves the output at the exact estimator's.
  q0, k0, v = (_normal(seed, (1, 32, 2, 16)) for seed in range(3))
  q, k = 15 * q0, 15 * k0
  w = orthogonal_gaussian_features(jax.random.key(1), 64, 16)

  def loss(floor, q, k, v):
    return jnp.sum(performer_attention(q, k, v, w, causal=causal, chunk_size=8, feature_floor=floor) ** 2)

  exact = jax.grad(functools.partial(loss, 0.0), argnums=(0, 1, 2))(q, k, v)
  assert not all(bool(jnp.all(jnp.isfinite(g))) for g in exact), "the case no longer reaches the overflow"
  floored = jax.grad(functools.partial(loss, 1e-6), argnums=(0, 1, 2))(q, k, v)
  chex.assert_tree_all_finite(floored)
  chex.assert_tree_all_finite(performer_attention(q, k, v, w, causal=causal, chunk_size=8))
  ordinary = performer_attention(q0, k0, v, w, causal=causal, chunk_size=8)
  assert_close(ordinary, _performer_attention(q0, k0, v, w, causal=causal), 3e-4)


def test_performer_redraws_features_in_training_mode_only():
  mixer = _mixer("performer", redraw_features=True)
  x = _x()
  first = mixer.features[...]
  _call(mixer, x)
  second = mixer.features[...]
  _call(mixer, x)
  assert not np.allclose(first, second) and not np.allclose(second, mixer.features[...])
  mixer.eval()
  kept = mixer.features[...]
  y1, y2 = _call(mixer, x), _call(mixer, x)
  np.testing.assert_array_equal(kept, mixer.features[...])
  np.testing.assert_array_equal(y1, y2)
  assert not isinstance(mixer.features, nnx.Param), "features are drawn, not trained"


def _intermediate_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(var.aval.shape)
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _intermediate_shapes(sub)


def _has_t_by_t(mixer, t):
  jaxpr = jax.make_jaxpr(lambda x: mixer(x))(_x(t=t))
  return any(shape.count(t) >= 2 or t * t in shape for shape in _intermediate_shapes(jaxpr))


@pytest.mark.parametrize("name", ["linear", "performer"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_no_t_by_t_intermediate(name, causal):
  t = 40  # a size no other axis has (chunks of 8, width 32, 4 heads of 8, 256 features)
  mixer = _mixer(name, causal=causal, chunk_size=8)
  assert not _has_t_by_t(mixer, t)
  assert _has_t_by_t(_mixer("full", causal=causal), t), "the check must see full attention's T x T scores"


def test_linformer_rejects_causal_with_a_reason():
  with pytest.raises(ValueError, match="causal=True is not valid for variant 'linformer': projecting keys"):
    make_config("linformer", causal=True)


def test_linformer_rejects_sequences_longer_than_max_len():
  mixer = _mixer("linformer", max_len=16, projected_length=4)
  with pytest.raises(ValueError, match=r"T=20 is not valid for max_len=16"):
    mixer(_x())


def test_linformer_attends_over_projected_keys_and_values():
  mixer = _mixer("linformer", max_len=32, projected_length=6, share_kv_projection=True, num_kv_heads=KV_HEADS)
  assert mixer.value_projection is mixer.key_projection
  x = _x()
  mask = jnp.arange(T)[None, :] < jnp.array([T - 6, T])[:, None]
  q, k, v = mixer.qkv(x)
  e = mixer.key_projection.weight[:, :T]  # the first T of max_len columns
  keep = mask[:, :, None, None]
  k_proj = jnp.einsum("ps,bshd->bphd", e, jnp.where(keep, k, 0))
  v_proj = jnp.einsum("ps,bshd->bphd", e, jnp.where(keep, v, 0))
  s = jnp.einsum("bthd,bphd->bhtp", q, _heads_of_kv(k_proj)) / math.sqrt(D)
  y = jnp.einsum("bhtp,bphd->bthd", jax.nn.softmax(s, axis=-1), _heads_of_kv(v_proj))
  assert_close(_call(mixer, x, mask), mixer.out(y.reshape(B, T, -1)), 1e-5)


def test_rwkv6_parallel_form_equals_naive_loop():
  b, t, h, dk, dv = 2, 19, 2, 4, 3
  r, k = _normal(0, (b, t, h, dk)), _normal(1, (b, t, h, dk))
  v = _normal(2, (b, t, h, dv))
  # log w = -exp(z): z up to 3 gives per-step decays down to exp(-20).
  log_w = jnp.asarray(-np.exp(np.random.default_rng(3).uniform(-4.0, 3.0, (b, t, h, dk))), jnp.float32)
  u = _normal(4, (h, dk))
  y = jax.jit(rwkv6_recurrence, static_argnames="chunk_size")(r, k, v, log_w, u, chunk_size=8)

  r, k, v, w, u = (np.asarray(a, np.float64) for a in (r, k, v, jnp.exp(log_w), u))
  expected = np.zeros((b, t, h, dv))
  state = np.zeros((b, h, dk, dv))
  for i in range(t):
    kv = k[:, i, :, :, None] * v[:, i, :, None, :]
    expected[:, i] = np.einsum("bhk,bhkv->bhv", r[:, i], state + u[None, :, :, None] * kv)
    state = w[:, i, :, :, None] * state + kv
  assert_close(y, expected, 1e-5)


@pytest.mark.parametrize("name", ["rwkv", "performer"])
def test_left_padding_does_not_reach_real_tokens(name):
  # The common suite pads on the right. These mixers also skip padding at the start of a sequence,
  # where RWKV's token shift and decay, and Performer's running stabiliser, could otherwise leak it.
  mixer = _mixer("rwkv", chunk_size=8) if name == "rwkv" else _causal_mixer(name)
  x = _x()
  mask = jnp.arange(T)[None, :] >= jnp.array([5, 0])[:, None]
  garbage = 10 * _normal(9, x.shape)
  y = _call(mixer, x, mask)
  y_garbage = _call(mixer, jnp.where(mask[..., None], x, garbage), mask)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_garbage)[real], rtol=1e-5, atol=1e-5)


def test_performer_feature_floor_must_be_non_negative():
  with pytest.raises(ValueError, match="feature_floor=-1e-06 is not valid"):
    make_config("performer", num_heads=HEADS, feature_floor=-1e-6)
