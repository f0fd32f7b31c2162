"""Split-KV decode attention (Pallas, interpret mode on CPU) against the jnp reference, with per-row lengths.

Interpret mode fills output buffers with NaN before the kernel runs, so a split the kernel fails to write fails the
relative-error check (which rejects NaN).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from kernels.decode_attention import BlockSizes, decode_attention
from kernels.decode_attention.reference import decode_attention_reference
from kernels.flash_attention.reference import attention_reference
from tests.helpers import assert_close

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(b, s, h, hkv, d, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, h, d)).astype(dtype), jax.random.normal(kk, (b, s, hkv, d)).astype(dtype),
          jax.random.normal(kv, (b, s, hkv, d)).astype(dtype))


CASES = [
    # b, s, h, hkv, d, lengths, dtype, blocks
    pytest.param(3, 100, 8, 2, 32, [100, 37, 1], jnp.float32, BlockSizes(block_k=16, num_splits=4), id="gqa4-padded-S"),
    pytest.param(2, 64, 4, 1, 24, [64, 17], jnp.bfloat16, BlockSizes(block_k=16, num_splits=2), id="mqa-d24-bf16"),
    pytest.param(2, 48, 2, 2, 16, [0, 48], jnp.float32, None, id="mha-empty-row-default-blocks"),
]


@pytest.mark.parametrize("b,s,h,hkv,d,lengths,dtype,blocks", CASES)
def test_pallas_matches_reference(b, s, h, hkv, d, lengths, dtype, blocks):
  q, k, v = _inputs(b, s, h, hkv, d, dtype)
  lengths = jnp.array(lengths, jnp.int32)
  expected = decode_attention(q, k, v, lengths, impl="xla")
  actual = decode_attention(q, k, v, lengths, impl="pallas", block_sizes=blocks)
  assert actual.shape == (b, h, d) and actual.dtype == dtype
  assert_close(actual, expected, TOLERANCE[dtype], "decode attention")
  empty = lengths == 0
  assert bool(jnp.all(jnp.where(empty[:, None, None], actual == 0, True)))


def test_reference_is_the_last_row_of_causal_attention():
  q, k, v = _inputs(2, 20, 4, 2, 16, jnp.float32, seed=1)
  lengths = jnp.array([20, 20], jnp.int32)
  full = attention_reference(q[:, None], k, v, causal=True)[:, 0]
  assert_close(decode_attention_reference(q, k, v, lengths), full, 1e-6)


def test_gradients_flow_through_the_pallas_path():
  q, k, v = _inputs(1, 32, 2, 1, 16, jnp.float32, seed=2)
  lengths = jnp.array([20], jnp.int32)
  loss = lambda impl: lambda q, k, v: jnp.sum(decode_attention(q, k, v, lengths, impl=impl) ** 2)
  for got, want in zip(jax.grad(loss("pallas"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 4, 16), (2, 8, 3, 16)), "num_heads=4 is not valid; it must be a multiple of num_kv_heads=3"),
        (((2, 4, 16), (2, 8, 4, 32)), "must match q.shape"),
        (((2, 1, 4, 16), (2, 8, 4, 16)), r"q.shape=\(2, 1, 4, 16\) is not valid; expected \[B, H, D\]"),
    ],
)
def test_bad_inputs_raise(shapes, match):
  q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, k, jnp.zeros((2,), jnp.int32))


def test_bad_lengths_and_impl_raise():
  q, k = jnp.zeros((2, 4, 16)), jnp.zeros((2, 8, 4, 16))
  with pytest.raises(ValueError, match=r"lengths must be an int array of shape \[B\]"):
    decode_attention(q, k, k, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="impl='triton' is not valid"):
    decode_attention(q, k, k, jnp.zeros((2,), jnp.int32), impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [32, 8, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_kernel_matches_reference_at_long_context(hkv, dtype):
  b, s, h, d = 4, 32768, 32, 128
  q, k, v = _inputs(b, s, h, hkv, d, dtype, seed=3)
  lengths = jnp.array([32768, 20000, 1, 4097], jnp.int32)
  expected = decode_attention(q, k, v, lengths, impl="xla")
  actual = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl="pallas"))(q, k, v, lengths)
  assert_close(actual, expected, 1e-2, f"decode attention hkv={hkv}")


@pytest.mark.gpu
@pytest.mark.parametrize("d,splits", [(64, None), (128, 1), (256, 8), (80, None)])
def test_gpu_kernel_head_dims_and_split_counts(d, splits):
  q, k, v = _inputs(2, 5000, 16, 4, d, jnp.bfloat16, seed=4)
  lengths = jnp.array([5000, 1234], jnp.int32)
  blocks = None if splits is None else dataclasses.replace(BlockSizes.get_default(d), num_splits=splits)
  expected = decode_attention(q, k, v, lengths, impl="xla")
  assert_close(decode_attention(q, k, v, lengths, impl="pallas", block_sizes=blocks), expected, 1e-2)
