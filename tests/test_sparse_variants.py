"""Sliding-window, local, Longformer and BigBird attention: each blocked implementation against its dense pattern.

The dense oracle below materialises [B, H, T, S] scores, masks them with the variant's exported pattern
and takes an ordinary softmax; the variants must match it element for element (and in gradients),
including lengths that are not block multiples, GQA, both directions and padding.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer, make_config
from efficient_attention.blocked_attention import band_attention
from efficient_attention.variants.bigbird import BigBirdConfig, bigbird_attention, bigbird_block_layout, bigbird_pattern
from efficient_attention.variants.full import FullAttentionConfig
from efficient_attention.variants.longformer import LongformerConfig, longformer_attention, longformer_pattern
from efficient_attention.variants.sliding_window import (
    LocalConfig,
    SlidingWindowConfig,
    local_pattern,
    sliding_window_pattern,
)
from tests.helpers import assert_close, relative_rms

WIDTH = 16


def dense_attention(q, k, v, pattern, key_mask=None):
  """O(T * S) oracle: q [B, T, H, D], k/v [B, S, Hkv, D], pattern bool [T, S] or [H, T, S] -> [B, T, H, D]."""
  h, d = q.shape[2], q.shape[3]
  k = jnp.repeat(k, h // k.shape[2], axis=2)
  v = jnp.repeat(v, h // v.shape[2], axis=2)
  allowed = jnp.broadcast_to(jnp.asarray(pattern), (h, q.shape[1], k.shape[1]))[None]
  if key_mask is not None:
    allowed = allowed & key_mask[:, None, None, :]
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1) * allowed.any(-1, keepdims=True)
  return jnp.einsum("bhts,bshd->bthd", p, v)


# Inputs come from numpy: every eager jax op would cost a compilation, and this file must stay fast.
def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def random_qkv(seed, t, heads, kv_heads, d=8, batch=2):
  kv_shape = (batch, t, kv_heads, d)
  return normal(seed, batch, t, heads, d), normal(seed + 1, *kv_shape), normal(seed + 2, *kv_shape)


def padding_mask(t):
  """Row 0 unpadded; row 1 left-padded by 3 and right-padded by 4 (short windows then see no valid key)."""
  pos = np.arange(t)
  return jnp.asarray(np.stack([pos >= 0, (pos >= 3) & (pos < t - 4)]))


def lengths_mask(t, lengths):
  """Right padding: bool [len(lengths), t], True before each row's length."""
  return jnp.asarray(np.arange(t)[None] < np.array(lengths)[:, None])


def assert_matches_dense(fn, q, k, v, pattern, key_mask, *, grads, tol=1e-5):
  """Output (and with grads=True every input gradient) of fn(q, k, v) equal the dense oracle's."""
  cotangent = normal(99, *q.shape)
  dense = lambda *a: dense_attention(*a, pattern, key_mask)

  @jax.jit  # one compilation instead of one per eager op: keeps the file fast on a 2-core CPU
  def outputs_and_grads(q, k, v):
    if not grads:
      return (fn(q, k, v),), (dense(q, k, v),)
    out, vjp = jax.vjp(fn, q, k, v)
    ref, ref_vjp = jax.vjp(dense, q, k, v)
    return (out, *vjp(cotangent)), (ref, *ref_vjp(cotangent))

  got, expected = outputs_and_grads(q, k, v)
  chex.assert_shape(got[0], q.shape)
  allowed = np.broadcast_to(pattern, (q.shape[2], *pattern.shape[-2:]))[None] & np.asarray(key_mask)[:, None, None]
  no_keys = ~allowed.any(-1).transpose(0, 2, 1)  # [B, T, H]
  np.testing.assert_array_equal(np.asarray(got[0])[no_keys], 0.0)
  for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
    assert np.isfinite(np.asarray(a)).all(), name
    assert_close(a, b, tol, name)


def copy_params(src, dst):
  nnx.update(dst, nnx.state(src, nnx.Param))


def apply(module, x, mask=None):
  """module(x, mask=mask) compiled once (eager NNX calls compile every op separately)."""
  return jax.jit(lambda x, mask: module(x, mask=mask))(x, mask)


def test_patterns_by_hand():
  sliding = sliding_window_pattern(SlidingWindowConfig(window=2), 4)
  np.testing.assert_array_equal(sliding, np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool))
  local = local_pattern(LocalConfig(window=1), 4)
  np.testing.assert_array_equal(local, np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool))
  # Causal, window 2 at dilation 2 (keys t and t - 2), token 1 global.
  longformer = longformer_pattern(LongformerConfig(num_heads=1, window=2, dilation=(2,), global_tokens=(1,)), 5)
  expected = np.array(
      [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 1, 0, 1]], bool
  )
  np.testing.assert_array_equal(longformer, expected[None])


@pytest.mark.parametrize(
    "config",
    [SlidingWindowConfig(num_heads=4, num_kv_heads=2, window=11), LocalConfig(num_heads=4, num_kv_heads=2, window=10)],
    ids=["sliding_window", "local"],
)
def test_window_covering_sequence_equals_full(config):
  # The smallest window covering all T = 11 positions, so an off-by-one in the window cannot pass.
  t = 11
  full = build_mixer(
      FullAttentionConfig(num_heads=4, num_kv_heads=2, causal=config.causal), WIDTH, rngs=nnx.Rngs(0)
  )
  band = build_mixer(config, WIDTH, rngs=nnx.Rngs(1))
  copy_params(full, band)
  x = normal(0, 2, t, WIDTH)
  mask = lengths_mask(t, [t, t - 3])
  assert_close(apply(band, x, mask), apply(full, x, mask), 1e-5)


@pytest.mark.parametrize(
    "pattern_fn, config, heads, kv_heads, t, block_size, grads",
    [
        (sliding_window_pattern, SlidingWindowConfig(window=5), 4, 2, 37, 4, True),
        (sliding_window_pattern, SlidingWindowConfig(window=9), 2, 1, 45, None, False),
        (local_pattern, LocalConfig(window=3), 4, 2, 37, 5, True),
        (local_pattern, LocalConfig(window=20), 2, 2, 50, None, False),
    ],
    ids=["sliding-gqa-block4", "sliding-mqa-default-block", "local-gqa-block5", "local-default-block"],
)
def test_band_matches_dense(pattern_fn, config, heads, kv_heads, t, block_size, grads):
  q, k, v = random_qkv(0, t, heads, kv_heads)
  key_mask = padding_mask(t)
  lo, hi = config.band()
  fn = lambda q, k, v: band_attention(q, k, v, lo=lo, hi=hi, key_mask=key_mask, block_size=block_size)
  assert_matches_dense(fn, q, k, v, pattern_fn(config, t), key_mask, grads=grads)


@pytest.mark.parametrize(
    "causal, dilation, grads",
    [(True, (1, 1, 1, 2), True), (False, (2, 2, 1, 1), False)],
    ids=["causal-groups-split-across-dilations", "bidirectional-whole-groups"],
)
def test_longformer_matches_dense(causal, dilation, grads):
  t = 41
  config = LongformerConfig(
      num_heads=4, num_kv_heads=2, window=3, dilation=dilation, global_tokens=(0, 5, 40, 60), causal=causal
  )
  q, k, v = random_qkv(2, t, 4, 2)
  key_mask = padding_mask(t)
  fn = lambda q, k, v: longformer_attention(
      q, k, v, window=config.window, dilations=config.head_dilations(), global_tokens=config.global_tokens,
      causal=causal, key_mask=key_mask,
  )
  assert_matches_dense(fn, q, k, v, longformer_pattern(config, t), key_mask, grads=grads)


def test_longformer_separate_global_projections_match_dense():
  t = 23
  config = LongformerConfig(
      num_heads=2, window=4, dilation=(1, 2), global_tokens=(0, 9), separate_global_projections=True,
      causal=False,
  )
  module = build_mixer(config, WIDTH, rngs=nnx.Rngs(3))
  x = normal(4, 2, t, WIDTH)
  key_mask = padding_mask(t)
  pattern = longformer_pattern(config, t)

  @jax.jit
  def dense_module(x):
    local = dense_attention(*module.qkv(x), pattern, key_mask)
    global_rows = dense_attention(*module.global_qkv(x), pattern, key_mask)
    return module.out(local.at[:, [0, 9]].set(global_rows[:, [0, 9]]).reshape(2, t, -1))

  assert_close(apply(module, x, key_mask), dense_module(x), 1e-5)


@pytest.mark.parametrize(
    "causal, separate", [(True, False), (False, True)], ids=["causal-shared", "bidirectional-separate-projections"]
)
def test_longformer_all_global_equals_full(causal, separate):
  t = 12
  full = build_mixer(FullAttentionConfig(num_heads=4, num_kv_heads=2, causal=causal), WIDTH, rngs=nnx.Rngs(0))
  config = LongformerConfig(
      num_heads=4, num_kv_heads=2, window=1, global_tokens=tuple(range(t)), causal=causal,
      separate_global_projections=separate,
  )
  longformer = build_mixer(config, WIDTH, rngs=nnx.Rngs(5))
  copy_params(full.qkv, longformer.global_qkv if separate else longformer.qkv)
  copy_params(full.out, longformer.out)
  x = normal(6, 2, t, WIDTH)
  mask = lengths_mask(t, [t, t - 4])
  assert_close(apply(longformer, x, mask), apply(full, x, mask), 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bigbird_matches_dense(causal):
  t, block = 45, 4  # 12 blocks, the last one partial
  config = BigBirdConfig(
      num_heads=4, num_kv_heads=2, block_size=block, num_global_blocks=2, num_random_blocks=2, seed=3,
      causal=causal,
  )
  q, k, v = random_qkv(7, t, 4, 2)
  key_mask = padding_mask(t)
  fn = lambda q, k, v: bigbird_attention(
      q, k, v, layout=bigbird_block_layout(config, t), block_size=block, num_global_blocks=2, causal=causal,
      key_mask=key_mask,
  )
  assert_matches_dense(fn, q, k, v, bigbird_pattern(config, t), key_mask, grads=causal)


def test_bigbird_random_blocks_are_seeded():
  config = BigBirdConfig(block_size=4, seed=1, causal=False)
  layout = bigbird_block_layout(config, 128)
  np.testing.assert_array_equal(layout, bigbird_block_layout(config, 128))
  other = bigbird_block_layout(BigBirdConfig(block_size=4, seed=2, causal=False), 128)
  assert (layout != other).any()
  # The seed reaches the module: same parameters, different seed, different output.
  x = normal(8, 1, 64, WIDTH)
  a = build_mixer(BigBirdConfig(block_size=4, seed=1), WIDTH, rngs=nnx.Rngs(0))
  b = build_mixer(BigBirdConfig(block_size=4, seed=2), WIDTH, rngs=nnx.Rngs(0))
  assert relative_rms(apply(a, x), apply(b, x)) > 1e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bigbird_density(causal):
  block, g, r, nb = 4, 2, 3, 24
  config = BigBirdConfig(
      block_size=block, num_sliding_blocks=3, num_global_blocks=g, num_random_blocks=r, causal=causal
  )
  layout = bigbird_block_layout(config, nb * block)
  expected_blocks = []
  for i in range(nb):
    reach = i + 1 if causal else nb  # blocks a query block may see at all
    sliding = set(range(max(i - 1, 0), min(i + 2, reach)))
    # Global rows see everything they may; others: sliding + global + r random blocks that repeat neither.
    expected_blocks.append(reach if i < g else min(len(sliding | set(range(g))) + r, reach))
    assert not layout[i, reach:].any(), i
    assert layout[i, :min(g, reach)].all(), i
  np.testing.assert_array_equal(layout.sum(1), expected_blocks)
  # Element density: every attended block is whole, except the diagonal block of a causal row (t % block + 1).
  t = np.arange(nb * block)
  blocks = np.repeat(expected_blocks, block)
  expected_keys = (blocks - 1) * block + t % block + 1 if causal else blocks * block
  np.testing.assert_array_equal(bigbird_pattern(config, nb * block).sum(1), expected_keys)


def largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""

  def walk(jaxpr):
    sizes = [0]
    for eqn in jaxpr.eqns:
      sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          sizes.append(walk(inner))
    return max(sizes)

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize(
    "config",
    [
        SlidingWindowConfig(num_heads=2, window=16),
        LocalConfig(num_heads=2, window=8),
        LongformerConfig(num_heads=2, window=8, dilation=(1, 4), global_tokens=(0, 100), causal=False),
        BigBirdConfig(num_heads=2, block_size=16),
    ],
    ids=lambda c: c.variant,
)
def test_memory_is_not_quadratic(config):
  t, heads = 512, 2
  module = build_mixer(config, WIDTH, rngs=nnx.Rngs(0))
  x = jnp.zeros((1, t, WIDTH))
  # Dense scores would be heads * T * T; the blocked path stays a small multiple of T.
  assert largest_intermediate(lambda x: module(x), x) < heads * t * t // 4


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (SlidingWindowConfig, dict(window=0), "window"),
        (SlidingWindowConfig, dict(window=2.5), "window"),
        (SlidingWindowConfig, dict(causal=False), "causal"),
        (LocalConfig, dict(window=-1), "window"),
        (LocalConfig, dict(causal=True), "sliding_window"),
        (LongformerConfig, dict(window=0), "window"),
        (LongformerConfig, dict(num_heads=4, dilation=(1, 2, 1)), "dilation"),
        (LongformerConfig, dict(dilation=(0,)), "dilation"),
        (LongformerConfig, dict(global_tokens=(3, 3)), "global_tokens"),
        (LongformerConfig, dict(global_tokens=(-1,)), "global_tokens"),
        (BigBirdConfig, dict(block_size=0), "block_size"),
        (BigBirdConfig, dict(num_sliding_blocks=2), "num_sliding_blocks"),
        (BigBirdConfig, dict(num_global_blocks=-1), "num_global_blocks"),
        (BigBirdConfig, dict(num_random_blocks=-1), "num_random_blocks"),
        (BigBirdConfig, dict(seed=-1), "seed"),
    ],
)
def test_bad_config_names_the_field(cls, kwargs, field):
  with pytest.raises(ValueError, match=field):
    cls(**kwargs)


@pytest.mark.parametrize("name,window", [("sliding_window", 7), ("local", 5)])
def test_pallas_impl_equals_blocked_reference(name, window):
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  mask = jnp.arange(40)[None, :] < jnp.array([[40], [29]])
  blocked = build_mixer(make_config(name, num_heads=4, num_kv_heads=2, window=window), 32, rngs=nnx.Rngs(0))
  flash = build_mixer(make_config(name, num_heads=4, num_kv_heads=2, window=window, impl="pallas"), 32,
                      rngs=nnx.Rngs(0))
  real = jnp.broadcast_to(mask[..., None], x.shape)
  expected = jnp.where(real, blocked(x, mask=mask), 0)
  actual = jnp.where(real, flash(x, mask=mask), 0)
  assert_close(actual, expected, 1e-5)
