"""Block masks and block-sparse attention (Pallas, interpret mode on CPU) against the dense masked reference.

Mask tests are host-side numpy and cheap. Kernel tests pack several builders into one call (one pattern per
query head) so every builder's tiles go through the forward and both backward kernels without a compilation
each. Interpret mode fills outputs with NaN first, so an unwritten tile fails the (NaN-rejecting) checks. GPU tests:
tests/test_block_sparse_gpu.py.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention import build_mixer, make_config
from efficient_attention.variants.bigbird import BigBirdConfig, bigbird_pattern
from efficient_attention.variants.longformer import LongformerConfig, longformer_pattern
from kernels.block_sparse import (
    BlockMask,
    bigbird,
    block_sparse_attention,
    causal,
    dilated,
    from_dense,
    global_tokens,
    local,
    longformer,
    random_blocks,
    stack_heads,
)
from kernels.block_sparse.mask import EMPTY, FULL
from kernels.flash_attention import pallas_gpu
from tests.block_sparse_helpers import compare, inputs
from tests.helpers import assert_close


def _positions(t, s):
  """Query positions p = i + S - T [T, 1] and key indices [1, S]."""
  return np.arange(t)[:, None] + s - t, np.arange(s)[None, :]


# ---------------------------------------------------------------------------------------------------------------
# Masks (numpy only)


@pytest.mark.parametrize("t,s", [(45, 45), (37, 70)])
def test_builders_match_their_definitions(t, s):
  p, j = _positions(t, s)
  tiles = dict(block_q=16, block_k=32)
  expected = {
      "causal": (causal(t, s, **tiles), j <= p),
      "sliding": (local(t, 5, s, **tiles), (j > p - 5) & (j <= p)),
      "symmetric": (local(t, 4, s, causal=False, **tiles), np.abs(j - p) <= 4),
      "left-right": (local(t, (2, 7), s, **tiles), (j >= p - 2) & (j <= p + 7)),
      "dilated": (dilated(t, 3, 2, s, **tiles), ((p - j) % 2 == 0) & (j <= p) & (j >= p - 4)),
      "global": (global_tokens(t, (1, 40, 99), s, **tiles),
                 np.isin(p, (1, 40, 99)) | np.isin(j, (1, 40, 99))),
  }
  for name, (mask, dense) in expected.items():
    assert mask.num_heads == 1, name
    np.testing.assert_array_equal(mask.to_dense()[0], dense, err_msg=name)


def test_tiles_are_classified_and_deduplicated():
  mask = local(64, 16, block_q=16, block_k=16)
  # Sliding window of 16 on 16-tiles: every row has a partial diagonal tile and a partial tile before it,
  # and every diagonal tile has the same element mask (as has every sub-diagonal one): two distinct tiles.
  assert len(mask.tiles) == 2
  assert (mask.layout != FULL).all()
  np.testing.assert_array_equal(mask.lists.count[0], [1, 2, 2, 2])
  full_mask = local(64, 200, block_q=16, block_k=16)  # the window covers everything before each query
  assert (full_mask.layout[0][np.tril_indices(4, -1)] == FULL).all()
  assert (full_mask.layout[0][np.triu_indices(4, 1)] == EMPTY).all()
  assert mask.attended_pairs() == int(mask.to_dense().sum())


def test_random_blocks_are_seeded_and_distinct():
  a = random_blocks(100, 3, seed=4, block_q=16, block_k=16)
  np.testing.assert_array_equal(a.layout, random_blocks(100, 3, seed=4, block_q=16, block_k=16).layout)
  assert (a.layout != random_blocks(100, 3, seed=5, block_q=16, block_k=16).layout).any()
  np.testing.assert_array_equal((a.layout != EMPTY).sum(-1), 3)
  per_head = random_blocks(100, 2, seed=4, num_heads=3, block_q=16, block_k=16)
  assert per_head.num_heads == 3 and (per_head.layout[0] != per_head.layout[1]).any()


@pytest.mark.parametrize("causal_", [True, False], ids=["causal", "bidirectional"])
def test_longformer_and_bigbird_builders_equal_the_variants_patterns(causal_):
  t = 77
  config = LongformerConfig(num_heads=4, window=3, dilation=(1, 1, 2, 3), global_tokens=(0, 5, 90), causal=causal_)
  mask = longformer(t, 3, dilation=(1, 1, 2, 3), global_positions=(0, 5, 90), causal=causal_, block_q=16,
                    block_k=32)
  np.testing.assert_array_equal(mask.to_dense(), longformer_pattern(config, t))
  config = BigBirdConfig(block_size=5, num_global_blocks=2, num_random_blocks=2, seed=3, causal=causal_)
  mask = bigbird(t, block_size=5, num_global_blocks=2, num_random_blocks=2, seed=3, causal=causal_, block_q=16,
                 block_k=16)
  np.testing.assert_array_equal(mask.to_dense()[0], bigbird_pattern(config, t))


def _check_lists(mask: BlockMask):
  """Visit lists hold every non-empty tile once, full ones first, with the right tile index; same transposed."""
  for lists, layout in ((mask.lists, mask.layout), (mask.transposed_lists, mask.layout.transpose(0, 2, 1))):
    for h in range(layout.shape[0]):
      for r in range(layout.shape[1]):
        n_full, count = lists.num_full[h, r], lists.count[h, r]
        visited = lists.blocks[h, r, :count]
        assert sorted(visited) == list(np.flatnonzero(layout[h, r] != EMPTY))
        assert (layout[h, r, visited[:n_full]] == FULL).all()
        np.testing.assert_array_equal(layout[h, r, visited[n_full:]], lists.tiles[h, r, n_full:count])


_dense_masks = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda shape: st.tuples(hnp.arrays(bool, shape), hnp.arrays(bool, shape)))


@settings(max_examples=25, deadline=None)
@given(masks=_dense_masks, shared=st.booleans())
def test_combinations_and_lists_match_dense_logic(masks, shared):
  a, b = masks
  if shared:
    a = a[:1]
  ma, mb = from_dense(a, block_q=16, block_k=16), from_dense(b, block_q=16, block_k=16)
  np.testing.assert_array_equal(np.broadcast_to(ma.to_dense(), a.shape), a)
  np.testing.assert_array_equal(np.broadcast_to((ma | mb).to_dense(), b.shape), a | b)
  np.testing.assert_array_equal(np.broadcast_to((ma & mb).to_dense(), b.shape), a & b)
  for mask in (ma, ma | mb, ma & mb):
    _check_lists(mask)
    flat = mask.tiles.reshape(len(mask.tiles), mask.block_q * mask.block_k)
    assert not flat.all(1).any() and flat.any(1).all()  # partial tiles are neither full nor empty
    assert len({tile.tobytes() for tile in flat}) == len(flat)  # and distinct


def test_bad_masks_raise():
  with pytest.raises(ValueError, match="block_q=24"):
    causal(64, block_q=24)
  with pytest.raises(ValueError, match="window"):
    local(64, 0)
  with pytest.raises(ValueError, match="dilation"):
    dilated(64, 3, (1, 0))
  with pytest.raises(ValueError, match="cannot combine"):
    causal(64, block_q=16, block_k=16) | causal(64, block_q=32, block_k=16)
  with pytest.raises(ValueError, match="3 and 2 heads"):
    random_blocks(64, 1, 0, num_heads=3, block_q=16, block_k=16) | random_blocks(64, 1, 0, num_heads=2,
                                                                                  block_q=16, block_k=16)


# ---------------------------------------------------------------------------------------------------------------
# Kernels (interpret mode) against the dense reference


def test_every_builder_forward_and_gradients_gqa():
  t = 45  # not a multiple of the 16-tiles
  tiles = dict(block_q=16, block_k=16)
  heads = [
      causal(t, **tiles),
      local(t, 9, **tiles),
      local(t, 6, causal=False, **tiles),
      dilated(t, 4, 3, causal=False, **tiles),
      global_tokens(t, (3, 30), **tiles) & causal(t, **tiles),
      random_blocks(t, 1, seed=2, **tiles),
      longformer(t, 3, dilation=2, global_positions=(0, 20), **tiles),
      bigbird(t, block_size=8, num_random_blocks=1, seed=1, causal=False, **tiles),
  ]
  mask = stack_heads(heads)
  q, k, v, do = inputs(2, t, t, 8, 2, 32, jnp.float32)
  o = compare(q, k, v, do, mask, kv_lengths=jnp.array([t, 31], jnp.int32))
  # Rows that attend no key (here: padded keys only) give zeros, not NaN.
  no_keys = ~(mask.to_dense() & (np.arange(t) < 31)).any(-1)  # [H, T] for batch row 1
  assert no_keys.any()
  np.testing.assert_array_equal(np.asarray(o[1]).transpose(1, 0, 2)[no_keys], 0.0)


def test_bf16_cross_attention_kernel_tiles_inside_mask_tiles():
  # T != S, a shared mask on 32-tiles walked by 16-tile kernels (sub-tiles of rows and of keys), MQA.
  t, s = 40, 72
  mask = (causal(t, s, block_q=32, block_k=32) & local(t, 30, s, block_q=32, block_k=32)) | global_tokens(
      t, (0,), s, block_q=32, block_k=32)
  q, k, v, do = inputs(1, t, s, 4, 1, 64, jnp.bfloat16, seed=1)
  compare(q, k, v, do, mask)


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 0.6))
def test_random_dense_masks(seed, density):
  t, s = 33, 48
  dense = np.random.default_rng(seed).random((2, t, s)) < density
  dense[:, 5] = False  # always one row that attends nothing
  q, k, v, do = inputs(1, t, s, 2, 2, 16, jnp.float32, seed=seed)
  compare(q, k, v, do, from_dense(dense, block_q=16, block_k=16))


def test_bad_arguments_raise():
  q, k, v, _ = inputs(1, 32, 32, 2, 2, 16, jnp.float32)
  mask = causal(32, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="impl='fast' is not valid"):
    block_sparse_attention(q, k, v, mask, impl="fast")
  with pytest.raises(ValueError, match=r"mask.shape=\(48, 48\) is not valid"):
    block_sparse_attention(q, k, v, causal(48, block_q=16, block_k=16))
  with pytest.raises(ValueError, match="mask.num_heads=3 is not valid"):
    tiles = dict(block_q=16, block_k=16)
    block_sparse_attention(q, k, v, stack_heads([causal(32, **tiles), local(32, 3, **tiles), local(32, 5, **tiles)]))
  with pytest.raises(ValueError, match="mask must be a BlockMask"):
    block_sparse_attention(q, k, v, np.ones((32, 32), bool))


# ---------------------------------------------------------------------------------------------------------------
# Variants on the kernel


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("longformer", dict(window=3, dilation=(1, 2, 1, 3), global_tokens=(0, 7), causal=True,
                            separate_global_projections=True)),
        ("bigbird", dict(block_size=4, num_global_blocks=1, causal=False)),
    ],
)
def test_pallas_impl_equals_xla(name, kwargs):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 32), dtype=np.float32))
  mask = jnp.arange(40)[None, :] < jnp.array([[40], [29]])
  real = jnp.broadcast_to(mask[..., None], x.shape)
  outputs = []
  for impl in ("xla", "pallas"):
    module = build_mixer(make_config(name, num_heads=4, num_kv_heads=2, impl=impl, **kwargs), 32, rngs=nnx.Rngs(0))
    outputs.append(jax.jit(lambda x, mask: jnp.where(real, module(x, mask=mask), 0))(x, mask))
  assert_close(outputs[1], outputs[0], 1e-5)


def test_bench_kernel_blocks_overrides():
  """The benchmark's --blocks overrides replace the named fields of the GPU defaults and reject bad entries."""
  from experiments.bench.block_sparse import kernel_blocks

  blocks = kernel_blocks(["block_q=64", "num_warps=4"], head_dim=128)
  default = pallas_gpu.BlockSizes.get_default(128)
  assert (blocks.block_q, blocks.num_warps) == (64, 4)
  assert blocks.block_k == default.block_k and blocks.num_stages_dq == default.num_stages_dq
  for entry in ("block_x=64", "block_q=big", "num_warps"):
    with pytest.raises(ValueError, match="--blocks entry"):
      kernel_blocks([entry])
