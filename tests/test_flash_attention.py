"""Flash-attention kernels (Pallas, interpret mode on CPU) against the jnp reference: forward, LSE and gradients.

Interpret mode fills every output buffer with NaN before the kernel runs, so a tile the kernel fails to write
shows up as NaN and fails the relative-error checks (which reject NaN).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.flash_attention import BlockSizes, flash_attention
from kernels.flash_attention.reference import attention_reference
from tests.flash_helpers import check_against_reference, finite
from tests.flash_helpers import inputs as _inputs
from tests.helpers import assert_close

# 16-row tiles so short test sequences still span several tiles (full, boundary and empty ones).
SMALL_TILES = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 2e-2)}  # (forward, gradients)


CASES = [
    # b, t, s, h, hkv, d, causal, window, kv_lengths, dtype
    pytest.param(2, 48, 48, 2, 2, 64, True, None, None, jnp.float32, id="causal-mha-f32"),
    pytest.param(1, 40, 40, 4, 2, 64, False, None, None, jnp.float32, id="bidir-gqa2-f32"),
    pytest.param(1, 37, 53, 8, 1, 32, True, None, None, jnp.float32, id="causal-mqa8-T<S-unaligned"),
    pytest.param(1, 50, 50, 2, 1, 128, True, (20, None), None, jnp.float32, id="sliding-window-d128"),
    pytest.param(2, 33, 50, 2, 2, 64, False, (7, 5), [45, 10], jnp.float32, id="local-window-padded"),
    pytest.param(2, 40, 40, 4, 2, 64, True, None, [40, 17], jnp.bfloat16, id="causal-padded-bf16"),
    pytest.param(1, 48, 48, 2, 2, 64, False, None, None, jnp.float16, id="bidir-f16"),
]


@pytest.mark.parametrize("b,t,s,h,hkv,d,causal,window,kv_lengths,dtype", CASES)
def test_pallas_matches_reference_forward_lse_and_gradients(b, t, s, h, hkv, d, causal, window, kv_lengths, dtype):
  q, k, v, do, dlse = _inputs(b, t, s, h, hkv, d, dtype)
  lengths = None if kv_lengths is None else jnp.array(kv_lengths, jnp.int32)
  results = {}
  for impl in ("xla", "pallas"):
    f = lambda q, k, v: flash_attention(
        q, k, v, causal=causal, window=window, kv_lengths=lengths, return_lse=True, impl=impl,
        block_sizes=SMALL_TILES,
    )
    (o, lse), vjp = jax.vjp(f, q, k, v)
    results[impl] = (o, lse, *vjp((do, dlse)))
  check_against_reference(results["pallas"], results["xla"], dtype, *TOLERANCE.get(dtype, (1e-2, 2e-2)))


@pytest.mark.parametrize("causal,window", [(True, None), (False, (3, 6)), (True, (9, None))])
def test_reference_matches_explicit_formula(causal, window):
  q, k, v, _, _ = _inputs(2, 13, 21, 4, 2, 16, jnp.float32)
  lengths = jnp.array([21, 9])
  o = attention_reference(q, k, v, causal=causal, window=window, kv_lengths=lengths)
  t, s = 13, 21
  pos = np.arange(t)[:, None] + s - t
  j = np.arange(s)[None, :]
  keep = np.ones((t, s), bool)
  if causal:
    keep &= j <= pos
  if window is not None:
    left, right = window
    keep &= (j >= pos - left) if left is not None else True
    keep &= (j <= pos + right) if right is not None else True
  logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)) / 4.0
  full_keep = keep[None, None] & (j[None, None] < np.asarray(lengths)[:, None, None, None])
  logits = np.where(full_keep, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = np.where(full_keep, p, 0)
  p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
  expected = np.einsum("bhts,bshd->bthd", p, np.repeat(np.asarray(v, np.float64), 2, 2))
  assert_close(o, np.nan_to_num(expected), 1e-5)


def test_rows_that_attend_nothing_give_zeros_not_nan():
  q, k, v, do, _ = _inputs(2, 32, 32, 2, 2, 32, jnp.float32)
  lengths = jnp.array([32, 0])
  f = lambda q, k, v: flash_attention(q, k, v, kv_lengths=lengths, return_lse=True, impl="pallas",
                                      block_sizes=SMALL_TILES)
  (o, lse), vjp = jax.vjp(f, q, k, v)
  dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
  chex.assert_tree_all_finite((o, dq, dk, dv))
  np.testing.assert_array_equal(np.asarray(o[1]), 0.0)
  assert bool(jnp.all(lse[1] == -jnp.inf))


def test_large_logits_stay_finite():
  q, k, v, _, _ = _inputs(1, 48, 48, 2, 1, 64, jnp.bfloat16, scale=100.0)
  o = flash_attention(q, k, v, causal=True, impl="pallas", block_sizes=SMALL_TILES)
  chex.assert_tree_all_finite(o)
  assert_close(o, flash_attention(q, k, v, causal=True, impl="xla"), 2e-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(impl="fast"), r"impl='fast' is not valid; choose one of 'auto', 'xla', 'pallas', 'cudnn'"),
        (dict(window=(3,)), r"window=\(3,\) is not valid"),
        (dict(window=(-1, 0)), r"window=\(-1, 0\) is not valid"),
        (dict(kv_lengths=jnp.ones((3,), jnp.int32)), r"kv_lengths must be an int array of shape \[B\]"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
  q, k, v, _, _ = _inputs(2, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, **kwargs)


def test_heads_not_divisible_raise():
  q, _, _, _, _ = _inputs(1, 8, 8, 3, 3, 16, jnp.float32)
  _, k, v, _, _ = _inputs(1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
    flash_attention(q, k, v)


def test_cudnn_rejects_what_it_cannot_do():
  q, k, v, _, _ = _inputs(1, 8, 16, 2, 2, 16, jnp.float32)
  with pytest.raises(NotImplementedError, match="causal with T != S"):
    flash_attention(q, k, v, causal=True, impl="cudnn")


GPU_CASES = [
    (2, 1024, 1024, 8, 8, 128, True, None),
    (2, 1000, 1000, 8, 2, 64, False, None),
    (1, 700, 2048, 8, 1, 128, True, None),
    (1, 2048, 2048, 4, 4, 128, True, (256, 0)),
    (1, 1024, 1024, 4, 2, 256, False, (100, 100)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,s,h,hkv,d,causal,window", GPU_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_gpu_pallas_matches_reference(b, t, s, h, hkv, d, causal, window, dtype):
  q, k, v, do, dlse = _inputs(b, t, s, h, hkv, d, dtype)
  lengths = jnp.array([s] + [s // 2] * (b - 1), jnp.int32)
  results = {}
  for impl in ("xla", "pallas"):
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, kv_lengths=lengths,
                                        return_lse=True, impl=impl)
    # XLA's fp32 matmuls on GPU default to TF32; the oracle must not.
    with jax.default_matmul_precision("highest"):
      (o, lse), vjp = jax.vjp(f, q, k, v)
      results[impl] = (o, lse, *vjp((do, dlse)))
  fwd_tol, grad_tol = TOLERANCE[dtype]
  names = ("o", "lse", "dq", "dk", "dv")
  for name, a, e in zip(names, results["pallas"], results["xla"]):
    assert_close(finite(a), finite(e), fwd_tol if name in ("o", "lse") else grad_tol, name)
