"""Mosaic GPU flash-attention forward (kernels/flash_attention/mosaic_gpu.py) against the jnp reference.

On CPU the kernel body runs in Mosaic GPU interpret mode: the three warpgroups run as threads with the TMA copies,
wgmma and barriers simulated, and output buffers start as NaN so an unwritten tile fails. The `gpu` tests compile
it for a Hopper GPU at larger shapes and check gradients through impl="mosaic" (the Triton-lowering backward).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import backend
from kernels.flash_attention import api, flash_attention, mosaic_gpu, pallas_gpu
from kernels.flash_attention.reference import attention_reference
from tests.flash_helpers import inputs as _inputs
from tests.helpers import assert_close

FWD_TOL, GRAD_TOL = 1e-2, 2e-2  # bf16/fp16, as DESIGN.md section 5


def _check(b, t, s, h, hkv, d, causal, dtype, config=None, grads=False):
  q, k, v, do, dlse = _inputs(b, t, s, h, hkv, d, dtype)
  results = {}
  for impl in ("xla", "mosaic"):
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, return_lse=True, impl=impl, mosaic_config=config)
    if grads:
      (o, lse), vjp = jax.vjp(f, q, k, v)
      results[impl] = (o, lse, *vjp((do, dlse)))
    else:
      results[impl] = f(q, k, v)
  for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), results["mosaic"], results["xla"]):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.shape, want.dtype)
    assert_close(got, want, FWD_TOL if name in ("o", "lse") else GRAD_TOL, name)


# Interpret mode on CPU: each case takes seconds, so two cases cover the distinct paths between them.
INTERPRET_CASES = [
    # Causal, T < S (diagonal offset), GQA, both lengths padded: unmasked, diagonal and padded tiles, and the
    # earlier consumer releasing slots it does not compute; gradients through the Triton backward.
    pytest.param(1, 200, 328, 2, 1, 64, True, jnp.bfloat16, mosaic_gpu.Config(block_k=64), True,
                 id="causal-gqa2-T<S-padded-grads"),
    # Non-causal, a three-stage ring that wraps, D = 128, fp16, keys padded inside the last tile.
    pytest.param(1, 128, 250, 1, 1, 128, False, jnp.float16, mosaic_gpu.Config(block_k=64, num_stages=3), False,
                 id="bidir-3stages-d128-f16"),
    # Fewer key tiles than ring slots (the prologue must not slice past S), and no padding, so the gradients
    # come from the Mosaic backward: the pairing impl="mosaic" runs on aligned shapes.
    pytest.param(1, 128, 128, 2, 1, 64, True, jnp.bfloat16, mosaic_gpu.Config(block_k=64, num_stages=4), True,
                 id="causal-gqa2-one-tile-4stages-mosaic-bwd"),
    # Config.overlap (intra-warpgroup pipelining, token turns): causal with T < S and both lengths padded, so
    # the first tile is masked, the consumers need different tile counts and one passes turns at the end.
    pytest.param(1, 200, 328, 2, 1, 64, True, jnp.bfloat16, mosaic_gpu.Config(block_k=64, overlap=True), False,
                 id="overlap-causal-gqa2-T<S-padded"),
    # Config.overlap without a mask, over a 3-slot ring that wraps (P V of tile j - 1 reads the previous slot).
    pytest.param(1, 128, 384, 1, 1, 128, False, jnp.bfloat16,
                 mosaic_gpu.Config(block_k=64, num_stages=3, overlap=True), False, id="overlap-bidir-3stages-d128"),
]


@pytest.mark.parametrize("b,t,s,h,hkv,d,causal,dtype,config,grads", INTERPRET_CASES)
def test_interpret_matches_reference(b, t, s, h, hkv, d, causal, dtype, config, grads):
  _check(b, t, s, h, hkv, d, causal, dtype, config, grads)


@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
def test_interpret_race_detector_finds_no_race(capsys, overlap):
  """The happens-before race detector of interpret mode over the TMA ring, its barriers and the early-finishing
  consumer's releases (causal, 4 key tiles in a 2-slot ring; it reports races by printing)."""
  q, k, v, _, _ = _inputs(1, 256, 256, 1, 1, 64, jnp.bfloat16)
  params = plgpu.InterpretGPUParams(detect_races=True)
  o, lse = mosaic_gpu.forward(q, k, v, causal=True, sm_scale=0.125,
                              config=mosaic_gpu.Config(block_k=64, overlap=overlap), interpret=params)
  want_o, want_lse = attention_reference(q, k, v, causal=True, sm_scale=0.125, return_lse=True)
  assert_close(o, want_o, FWD_TOL, "o")
  assert_close(lse, want_lse, FWD_TOL, "lse")
  assert "RACE DETECTED" not in capsys.readouterr().out


@pytest.mark.parametrize("config", [None, mosaic_gpu.Config(consumer_registers=240, overlap=True),
                                    mosaic_gpu.Config(heads_inner=True)], ids=["default", "overlap-240", "heads-inner"])
@pytest.mark.parametrize("causal,kv_length", [(False, 1000), (True, None), (False, None)],
                         ids=["bidir-padded", "causal", "bidir"])
def test_lowers_for_cuda(causal, kv_length, config):
  """The Mosaic GPU lowering (layouts, wgmma shapes, shared-memory budget) runs without a GPU; interpret mode
  takes another path for P V, so this is what checks the compiled one on CPU."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: mosaic_gpu.forward(q, k, v, causal=causal, sm_scale=0.1, kv_length=kv_length,
                                                 config=config))
  f.trace(q, k, k).lower(lowering_platforms=("cuda",))


def test_lowering_fingerprint_tells_kernels_apart():
  """tests.lowering_fingerprint (the refactoring check) gives one kernel the same hash twice and another a new one."""
  from tests.lowering_fingerprint import fingerprint
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  forward = lambda overlap: lambda q, k, v: mosaic_gpu.forward(q, k, v, causal=False, sm_scale=0.1,
                                                               config=mosaic_gpu.Config(overlap=overlap))
  first = fingerprint(forward(True), q, q, q)
  assert fingerprint(forward(True), q, q, q) == first != fingerprint(forward(False), q, q, q)


def test_supports_and_errors():
  q, k, v, _, _ = _inputs(1, 128, 128, 2, 2, 64, jnp.bfloat16)
  assert mosaic_gpu.supports(q, k, v, True, None, None)
  assert not mosaic_gpu.supports(q.astype(jnp.float32), k, v, False, None, None)
  assert not mosaic_gpu.supports(q[..., :32], k[..., :32], v[..., :32], False, None, None)
  assert not mosaic_gpu.supports(q, k[:, :64], v[:, :64], True, None, None)  # causal with S < T
  with pytest.raises(NotImplementedError, match="window"):
    flash_attention(q, k, v, window=(8, 0), impl="mosaic")
  with pytest.raises(ValueError, match="T=100"):
    mosaic_gpu.forward(q[:, :100], k, v, causal=False, sm_scale=0.1)
  with pytest.raises(ValueError, match="block_q"):
    mosaic_gpu.Config(block_q=32)
  with pytest.raises(ValueError, match="consumer_registers=248"):  # would leave the producer 8
    mosaic_gpu.Config(consumer_registers=248)
  assert mosaic_gpu.Config(consumer_registers=240).producer_registers == 24
  assert mosaic_gpu.Config.parse("64:128:2:240:1") == mosaic_gpu.Config(consumer_registers=240, overlap=True)
  assert mosaic_gpu.Config.parse("64:64:3") == mosaic_gpu.Config(block_k=64, num_stages=3)
  assert mosaic_gpu.Config.parse("64:128:2:232:0:1") == mosaic_gpu.Config(overlap=False, heads_inner=True)
  # overlap=None: on for D = 128 without masked tiles; an explicit choice stands.
  assert mosaic_gpu.Config().resolved(128, needs_mask=False).overlap
  assert not mosaic_gpu.Config().resolved(128, needs_mask=True).overlap
  assert not mosaic_gpu.Config().resolved(64, needs_mask=False).overlap
  assert not mosaic_gpu.Config().resolved(256, needs_mask=False).overlap
  assert mosaic_gpu.Config(overlap=True).resolved(128, needs_mask=True).overlap
  for spec in ("64:128", "64:128:2:240:2", "64:x:2", "64:128:2:240:1:2", "64:128:2:240:1:0:1"):
    with pytest.raises(ValueError, match="spec"):
      mosaic_gpu.Config.parse(spec)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_gpu_forward(causal, d, group):
  _check(2, 1024, 1024, 8, 8 // group, d, causal, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_unaligned_t_ne_s(causal):
  _check(2, 1000, 1500, 4, 2, 128, causal, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_heads_inner(causal):
  """Query tiles launched across all heads first (Config.heads_inner): the same results."""
  _check(2, 1024, 1024, 8, 2, 128, causal, jnp.bfloat16, config=mosaic_gpu.Config(heads_inner=True))


@pytest.mark.gpu
def test_gpu_forward_d256_fp16():
  _check(1, 512, 512, 4, 4, 256, True, jnp.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [mosaic_gpu.Config(block_k=64, num_stages=4), mosaic_gpu.Config(block_k=64),
                                    mosaic_gpu.Config(block_q=128, block_k=64),
                                    mosaic_gpu.Config(consumer_registers=240),
                                    mosaic_gpu.Config(consumer_registers=240, overlap=True),
                                    mosaic_gpu.Config(overlap=True)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_tuning_configs(config, causal):
  _check(1, 2048, 2048, 4, 2, 128, causal, jnp.bfloat16, config)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(512, 512), (384, 700)])
def test_gpu_overlap_padded_gqa(causal, t, s):
  """Config.overlap on unaligned, padded lengths with GQA 4 and D = 64 (masked first tiles, passed turns)."""
  _check(2, t, s, 8, 2, 64, causal, jnp.bfloat16, mosaic_gpu.Config(consumer_registers=240, overlap=True))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(512, 512), (384, 700)])
def test_gpu_gradients(causal, t, s):
  _check(2, t, s, 4, 2, 128, causal, jnp.bfloat16, grads=True)


def test_auto_takes_mosaic_on_hopper_where_it_applies(monkeypatch):
  """impl="auto" on an sm_90 GPU: the Mosaic kernels for what they take, the Triton-lowering ones otherwise."""
  monkeypatch.setattr(backend, "on_gpu", lambda: True)
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  choose = lambda q=q, causal=True, window=None, lengths=None, blocks=None: api._auto_impl(
      q, q, q, causal, window, lengths, blocks)
  monkeypatch.setattr(api, "_hopper", lambda: True)
  assert choose() == "mosaic"
  assert choose(q=q.astype(jnp.float32)) == "pallas"
  assert choose(window=(16, 0)) == "pallas"
  assert choose(lengths=jnp.array([100])) == "pallas"
  assert choose(blocks=pallas_gpu.BlockSizes()) == "pallas"
  monkeypatch.setattr(api, "_hopper", lambda: False)
  assert choose() == "pallas"
