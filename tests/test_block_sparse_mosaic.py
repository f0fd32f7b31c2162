"""Block-sparse attention with impl="mosaic": the Mosaic GPU forward and backward (kernels/block_sparse/mosaic_gpu.py,
mosaic_gpu_bwd.py; the Triton backward for 128 x 64 mask tiles), against the dense masked reference.

On CPU the kernels run in interpret mode (Mosaic GPU: warpgroups as threads, TMA, wgmma and barriers simulated);
the lowering tests check the compiled path's layouts and shared-memory budget without a GPU. The `gpu` tests run
every builder on an H100/H200.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.block_sparse import (bigbird, block_sparse_attention, causal, from_dense, global_tokens, local,
                                  stack_heads)
from kernels.block_sparse import mosaic_gpu as block_sparse_mosaic
from kernels.block_sparse import mosaic_gpu_bwd as block_sparse_mosaic_bwd
from kernels.block_sparse import schedule
from kernels.block_sparse.reference import block_sparse_reference
from tests.block_sparse_helpers import SMALL_TILES, compare, inputs
from tests.helpers import assert_close


def _rows_attending_nothing(t, s, block_k):
  """A pattern with a full tile, whose query rows 130..149 attend nothing and whose row 200 attends one key."""
  rng = np.random.default_rng(1)
  dense = rng.random((t, s)) < 0.2
  dense[:, : s // 2] |= np.tril(np.ones((t, s // 2), bool), -1)
  dense[:128, 128:256] = True  # a full tile
  dense[130:150] = False
  dense[200] = False
  dense[200, 7] = True
  return from_dense(dense, block_q=128, block_k=block_k)


def _second_row_empty(t, s, block_k):
  """_rows_attending_nothing with queries 128..255 attending nothing: a mask row with an empty visit list."""
  dense = np.asarray(_rows_attending_nothing(t, s, block_k).to_dense())[0]
  dense[128:256] = False
  return from_dense(dense, block_q=128, block_k=block_k)


_GRID = block_sparse_mosaic.Config(persistent=False)  # one CTA per row
# Persistent on 2 CTAs (several rows, and several dk/dv key tiles, per CTA; the rings run across them), with one Q
# buffer (the next row's Q loads after this row's O has left) and two slots for the partial tiles' masks; the
# default (two Q buffers, one mask slot) runs in the D = 128 case.
_Q_BUFFERS_1 = block_sparse_mosaic.Config(q_buffers=1, num_ctas=2)


@pytest.mark.parametrize(
    "t,s,h,hkv,d,block_k,make_mask,config",
    [
        # Sliding window with global tokens: full tiles, partial tiles from two builders, GQA 2, 64-key tiles.
        pytest.param(384, 384, 2, 1, 64, 64, lambda t, s, bk: local(t, 300, block_q=128, block_k=bk)
                     | global_tokens(t, (5,), block_q=128, block_k=bk), _GRID, id="sliding+global-gqa2-bk64"),
        # One pattern per head (a window, and rows with nothing or a single key to attend), T != S, 128-key tiles.
        # The Mosaic backward from here on (128 x 128 tiles): one pattern per head, rows with nothing or a single
        # key to attend, T != S.
        pytest.param(256, 384, 2, 2, 64, 128, lambda t, s, bk: stack_heads(
            [local(t, 100, s, block_q=128, block_k=bk), _rows_attending_nothing(t, s, bk)]), _Q_BUFFERS_1,
                     id="per-head-empty-rows-T<S-bk128"),
        # Config.overlap (S_j issued with P_{j-1} V_{j-1}, a token passed between the consumers): partial tiles'
        # biases, a row with nothing to visit and rows attending nothing, several rows per CTA, GQA 2.
        pytest.param(256, 384, 2, 1, 64, 128, lambda t, s, bk: stack_heads(
            [local(t, 100, s, block_q=128, block_k=bk) | global_tokens(t, (5,), s, block_q=128, block_k=bk),
             _second_row_empty(t, s, bk)]), block_sparse_mosaic.Config(overlap=True, num_ctas=2),
                     id="overlap-per-head-empty-rows"),
        # D = 128 (the dq kernel steps through each key tile in two 64-key halves), GQA 2 (the dk/dv stream
        # crosses from one query head's list to the next).
        pytest.param(256, 256, 2, 1, 128, 128, lambda t, s, bk: local(t, 300, block_q=128, block_k=bk), None,
                     id="sliding-gqa2-bk128-d128"),
    ],
)
def test_interpret_matches_reference(t, s, h, hkv, d, block_k, make_mask, config):
  mask = make_mask(t, s, block_k)
  assert mask.lists.num_full.sum() > 0 and mask.tiles.size  # both loops of the kernels run
  q, k, v, do = inputs(1, t, s, h, hkv, d, jnp.bfloat16)
  o = compare(q, k, v, do, mask, block_sizes=SMALL_TILES, impl="mosaic", mosaic_config=config)
  if mask.num_heads > 1:  # rows that attend nothing give zeros
    assert not np.asarray(o[0, 130:150, 1], np.float32).any()


def test_persistent_schedules_share_uneven_rows_between_ctas():
  """The schedules the persistent kernels get on 2 CTAs (test_interpret_matches_reference runs them): forward/dq
  items of uneven length (a global row, rows with nothing to attend), several per CTA, and dk/dv items likewise."""
  t, s = 384, 384
  mask = stack_heads([local(t, 100, s) | global_tokens(t, (0,)), _rows_attending_nothing(t, s, 128)])
  counts = np.asarray(mask.lists.count)
  assert len(np.unique(counts)) > 1  # rows of uneven length: the schedule has something to balance
  items, lengths = block_sparse_mosaic.work_schedule(counts, 2, 1, block_sparse_mosaic.Config(num_ctas=2))
  np.testing.assert_array_equal(lengths, [3, 3])
  assert sorted(items[items >= 0]) == list(range(6))
  _, _, dkv_items, dkv_lengths = block_sparse_mosaic_bwd.work_schedules(mask.lists, mask.transposed_lists, 2, 1, 1,
                                                                        num_ctas=2)
  np.testing.assert_array_equal(np.sort(dkv_lengths), [1, 2])
  assert sorted(dkv_items[dkv_items >= 0]) == list(range(3))


def test_band_bounds_describe_window_tiles_exactly():
  for mask in (local(384, 100, 512), local(384, (70, 30), causal=False), causal(256, 384, block_k=64)):
    bounds = block_sparse_mosaic.band_bounds(mask.tiles, mask.lists.tiles)
    assert bounds is not None
    lists = mask.lists
    for head, row, entry in zip(*np.nonzero(np.arange(lists.blocks.shape[-1]) >= lists.num_full[..., None])):
      if entry >= lists.count[head, row]:
        continue
      lo, hi = bounds[head, row, entry]
      tile = mask.tiles[lists.tiles[head, row, entry]]
      diagonal = np.arange(tile.shape[1])[None, :] - np.arange(tile.shape[0])[:, None]
      np.testing.assert_array_equal((diagonal >= lo) & (diagonal <= hi), tile)
  mixed = local(384, 100) | global_tokens(384, (5,))
  assert block_sparse_mosaic.band_bounds(mixed.tiles, mixed.lists.tiles) is None


def test_interpret_band_masks_match_reference():
  """Partial tiles masked in the kernels from band bounds (no bias ring), forward with two Q buffers, and the
  backward: a causal window and T < S (the band's offset), each warpgroup's rows and each 64-key or 64-query step
  at its place in the tile. (A mask with other partial tiles keeps the bias: `_mosaic_bands` gives None.)"""
  from kernels.block_sparse import api
  t, s = 256, 384
  q, k, v, do = inputs(1, t, s, 2, 1, 128, jnp.bfloat16)  # D = 128: the dq kernel's 64-key halves of a tile
  config = block_sparse_mosaic.Config(band_masks=True, q_buffers=2, num_ctas=1)
  assert api._mosaic_bands(local(t, 100, s) | global_tokens(t, (5,), s), config) is None
  compare(q, k, v, do, local(t, 100, s), block_sizes=SMALL_TILES, impl="mosaic", mosaic_config=config)


def test_interpret_race_detector_finds_no_race(capsys):
  """The happens-before race detector over the K/V/bias ring (3 masked tiles per row in a 2-slot ring) and the Q/O
  buffers (3 rows: the third row's Q loads into the buffer the first row's O leaves from)."""
  t = 384
  mask = local(t, 100, block_q=128, block_k=64)
  q, k, v, _ = inputs(1, t, t, 1, 1, 64, jnp.bfloat16)
  lists = tuple(jnp.asarray(x, jnp.int32) for x in mask.lists)
  bias = block_sparse_mosaic.bias_tiles(jnp.asarray(mask.tiles, jnp.int8), jnp.bfloat16)
  # Persistent with 1 CTA: both rows' tiles pass through one ring (the second row's loads overlap the first's end),
  # the second row's Q loads into the other buffer during the first (after its first step, late_q_prefetch), and
  # the masks share one slot.
  config = block_sparse_mosaic.Config(num_ctas=1, q_buffers=2, bias_stages=1, late_q_prefetch=True)
  o, lse = block_sparse_mosaic.forward(q, k, v, lists, bias, sm_scale=0.125, per_head_mask=False, config=config,
                                       interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert_close(o, block_sparse_reference(q, k, v, mask, sm_scale=0.125), 1e-2, "o")
  assert np.isfinite(np.asarray(lse)).all()
  assert "RACE DETECTED" not in capsys.readouterr().out


_PERSISTENT_132 = block_sparse_mosaic.Config(num_ctas=132)


@pytest.mark.parametrize("d,block_k,config", [
    (128, 128, _GRID), (128, 128, _PERSISTENT_132),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, q_buffers=1)),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, late_q_prefetch=True)),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, overlap=True)),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, overlap=True, band_masks=True)),
    (128, 64, _PERSISTENT_132), (64, 128, _PERSISTENT_132),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, band_masks=True)),
    (128, 128, block_sparse_mosaic.Config(num_ctas=132, band_masks=True, num_stages=3, q_buffers=1))])
def test_lowers_for_cuda(d, block_k, config):
  """The Mosaic GPU lowering (wgmma and bias layouts, the shared-memory budget) runs without a GPU."""
  t = 1024
  mask = local(t, 300, block_q=128, block_k=block_k)
  if not config.band_masks:  # partial tiles that are not bands: the bias ring
    mask = mask | global_tokens(t, (0,), block_q=128, block_k=block_k)
  bands = block_sparse_mosaic.band_bounds(mask.tiles, mask.lists.tiles) if config.band_masks else None
  lists = tuple(jnp.asarray(x, jnp.int32) for x in mask.lists)
  bias = block_sparse_mosaic.bias_tiles(jnp.asarray(mask.tiles, jnp.int8), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((1, t, 4, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: block_sparse_mosaic.forward(q, k, v, lists, bias, sm_scale=0.1, per_head_mask=False,
                                                          config=config, bands=bands))
  assert "mosaic_gpu" in f.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("d,band,stages_dkv", [(64, False, 3), (128, False, 3), (128, True, 3), (128, True, 4)])
def test_backward_lowers_for_cuda(d, band, stages_dkv):
  """The Mosaic GPU lowering of both backward kernels (layouts, shared memory) runs without a GPU; a 4-deep dk/dv
  ring fits at D = 128 without the bias ring."""
  t, h, hkv = 1024, 4, 2
  if band:  # windows only: the partial tiles masked from bounds
    mask = stack_heads([local(t, 300), local(t, 200), local(t, 100), local(t, 500)])
  else:
    mask = stack_heads([local(t, 300), global_tokens(t, (0,)), local(t, 100), local(t, 500)])
  bands = ((block_sparse_mosaic.band_bounds(mask.tiles, mask.lists.tiles),
            block_sparse_mosaic.band_bounds(mask.tiles, mask.transposed_lists.tiles)) if band else None)
  lists, transposed = (tuple(jnp.asarray(x, jnp.int32) for x in ls) for ls in (mask.lists, mask.transposed_lists))
  bias = block_sparse_mosaic.bias_tiles(jnp.asarray(mask.tiles, jnp.int8), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, h, t), jnp.float32)
  work = block_sparse_mosaic_bwd.work_schedules(mask.lists, mask.transposed_lists, h, hkv, 1, num_ctas=132)
  f = jax.jit(lambda q, k, v, o, lse, do: block_sparse_mosaic_bwd.backward(
      q, k, v, o, lse, do, lists, transposed, bias, sm_scale=0.1, per_head_mask=True, work=work, bands=bands,
      config=block_sparse_mosaic_bwd.Config(num_stages_dkv=stages_dkv)))
  text = f.trace(q, k, k, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 2  # the dq and dk/dv kernels


def test_auto_takes_mosaic_on_hopper_where_it_applies(monkeypatch):
  """impl="auto" on an sm_90 GPU: the Mosaic kernels for what they take, the Triton-lowering ones otherwise."""
  from kernels import backend
  from kernels.block_sparse import api
  from kernels.flash_attention import api as flash_api
  monkeypatch.setattr(backend, "on_gpu", lambda: True)
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  choose = lambda q=q, mask=local(256, 64), lengths=None, blocks=None: api._auto_impl(q, mask, lengths, blocks, None)
  monkeypatch.setattr(flash_api, "_hopper", lambda: True)
  assert choose() == "mosaic"
  assert choose(mask=local(256, 64, block_k=64)) == "mosaic"
  assert choose(q=q.astype(jnp.float32)) == "pallas"
  assert choose(mask=local(256, 64, block_q=64, block_k=64)) == "pallas"
  assert choose(lengths=jnp.array([100])) == "pallas"
  assert choose(blocks=SMALL_TILES) == "pallas"
  monkeypatch.setattr(flash_api, "_hopper", lambda: False)
  assert choose() == "pallas"


def test_lpt_schedule_balances_and_covers_every_item():
  rng = np.random.default_rng(0)
  costs = np.concatenate([[130.0, 130.0], rng.integers(5, 12, 500)])  # two BigBird-like global rows
  items, lengths = schedule.lpt_schedule(costs, 16)
  listed = np.concatenate([row[:n] for row, n in zip(items, lengths)])
  assert sorted(listed) == list(range(len(costs)))  # every item exactly once
  assert (items[np.arange(items.shape[1]) >= lengths[:, None]] == -1).all()
  loads = np.array([costs[row[:n]].sum() for row, n in zip(items, lengths)])
  assert loads.max() <= costs.sum() / 16 + costs.max()  # Graham's bound for greedy LPT
  assert loads.max() - loads.min() <= 130  # the global rows' CTAs get nothing else until the others catch up
  assert all((np.diff(costs[row[:n]]) <= 0).all() for row, n in zip(items, lengths))  # longest first
  one_each, ones = schedule.lpt_schedule([3, 9, 5], 3)
  np.testing.assert_array_equal(one_each[:, 0], [1, 2, 0])  # one CTA per item: the launch order, longest first
  np.testing.assert_array_equal(ones, [1, 1, 1])
  with pytest.raises(ValueError, match="num_ctas"):
    schedule.lpt_schedule([1.0], 0)


def test_unsupported_problems_name_the_argument():
  q, k, v, _ = inputs(1, 256, 256, 2, 2, 64, jnp.bfloat16)
  cases = [
      (dict(mask=local(256, 64, block_q=64, block_k=64)), "mask tiles 64x64"),
      (dict(mask=local(256, 64), kv_lengths=jnp.array([200])), "kv_lengths"),
      (dict(mask=local(256, 64), q=q.astype(jnp.float32), k=k.astype(jnp.float32), v=v.astype(jnp.float32)),
       "dtype float32"),
  ]
  for kwargs, message in cases:
    args = dict(q=q, k=k, v=v) | kwargs
    with pytest.raises(ValueError, match=message):
      block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"), impl="mosaic", **args)
  with pytest.raises(ValueError, match="num_stages"):
    block_sparse_mosaic.Config(num_stages=1)
  with pytest.raises(ValueError, match="num_ctas"):
    block_sparse_mosaic.Config(num_ctas=0)
  with pytest.raises(ValueError, match="q_buffers=3"):
    block_sparse_mosaic.Config(q_buffers=3)
  with pytest.raises(ValueError, match="persistent"):
    block_sparse_mosaic.Config(q_buffers=2, persistent=False)
  with pytest.raises(ValueError, match="bias_stages"):
    block_sparse_mosaic.Config(bias_stages=0)
  with pytest.raises(ValueError, match="late_q_prefetch"):
    block_sparse_mosaic.Config(q_buffers=1, late_q_prefetch=True)
  with pytest.raises(ValueError, match="shared memory"):  # two Q buffers and two bias slots at D = 128
    block_sparse_attention(*inputs(1, 256, 256, 1, 1, 128, jnp.bfloat16)[:3], local(256, 64), impl="mosaic",
                           mosaic_config=block_sparse_mosaic.Config(q_buffers=2, bias_stages=2))
  with pytest.raises(ValueError, match="backward='triton'"):
    block_sparse_mosaic.Config(backward="triton")
  with pytest.raises(ValueError, match="num_stages_dkv"):
    block_sparse_mosaic_bwd.Config(num_stages_dkv=1)
  with pytest.raises(ValueError, match="backward_config"):
    block_sparse_mosaic.Config(backward="pallas", backward_config=block_sparse_mosaic_bwd.Config())
  # A 4-deep dk/dv ring with the bias ring at D = 128 (258 KiB), named before any kernel is built.
  q, k, v = inputs(1, 256, 256, 1, 1, 128, jnp.bfloat16)[:3]
  deep_ring = block_sparse_mosaic.Config(backward_config=block_sparse_mosaic_bwd.Config(num_stages_dkv=4))
  loss = lambda q: block_sparse_attention(q, k, v, local(256, 64), impl="mosaic", mosaic_config=deep_ring).sum()
  with pytest.raises(ValueError, match="num_stages_dkv=4 needs 264192 bytes of shared memory at D = 128 with the "
                                       "bias ring"):
    jax.eval_shape(jax.grad(loss), q)


GPU_MASKS = {
    "sliding-256": lambda t: local(t, 256),
    "sliding-1024-bk64": lambda t: local(t, 1024, block_k=64),
    "local-symmetric-100": lambda t: local(t, 100, causal=False),
    "bigbird-64": lambda t: bigbird(t, block_size=64, num_random_blocks=3, causal=False),
    "per-head-empty-rows": lambda t: stack_heads([local(t, 256)] * 7 + [_rows_attending_nothing(t, t, 128)]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mask_name", list(GPU_MASKS))
def test_gpu_matches_reference(mask_name):
  t = 1024
  q, k, v, do = inputs(2, t, t, 8, 2, 128, jnp.bfloat16)
  compare(q, k, v, do, GPU_MASKS[mask_name](t), block_sizes=None, impl="mosaic")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    block_sparse_mosaic.Config(band_masks=True, q_buffers=2),
    block_sparse_mosaic.Config(band_masks=True, overlap=True),
    block_sparse_mosaic.Config(band_masks=True, num_stages=3, q_buffers=1, num_ctas=20),
    block_sparse_mosaic.Config(band_masks=True, backward_config=block_sparse_mosaic_bwd.Config(num_stages_dkv=4))])
def test_gpu_band_masks_match_reference(config):
  """Window masks from band bounds in the kernel (no bias ring), with a second Q buffer or a third K/V stage, or a
  4-deep dk/dv ring in the backward."""
  t, s = 1024, 1280
  q, k, v, do = inputs(2, t, s, 8, 2, 128, jnp.bfloat16)
  for mask in (local(t, 256, s), local(t, (200, 100), s, causal=False)):
    compare(q, k, v, do, mask, block_sizes=None, impl="mosaic", mosaic_config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_head_dim_64_and_fp16(dtype):
  """D = 64 (the dq kernel takes whole 128-key tiles) and fp16, T != S, through impl="auto" on Hopper."""
  t, s = 768, 1024
  q, k, v, do = inputs(1, t, s, 4, 4, 64, dtype)
  mask = local(t, 300, s) | global_tokens(t, (0, 513), s)
  from kernels.block_sparse import api
  assert api._auto_impl(q, mask, None, None, None) == "mosaic"  # on an H100/H200
  compare(q, k, v, do, mask, block_sizes=None, impl="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("mask_name", ["sliding-256", "per-head-empty-rows"])
def test_gpu_forward_configs_match_reference(mask_name):
  """The persistent kernels on 20 CTAs (2 x 8 x 8 = 128 rows: several per CTA), also with one Q buffer and two
  bias slots, with the next row's Q loaded after a row's first step or with overlap, and one CTA per row
  (test_gpu_matches_reference runs the default: one CTA per SM)."""
  t = 1024
  q, k, v, do = inputs(2, t, t, 8, 2, 128, jnp.bfloat16)
  for config in (block_sparse_mosaic.Config(num_ctas=20), block_sparse_mosaic.Config(num_ctas=20, q_buffers=1),
                 block_sparse_mosaic.Config(num_ctas=20, late_q_prefetch=True),
                 block_sparse_mosaic.Config(num_ctas=20, overlap=True), _GRID):
    compare(q, k, v, do, GPU_MASKS[mask_name](t), block_sizes=None, impl="mosaic", mosaic_config=config)
