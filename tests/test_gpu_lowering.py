"""Every Triton-lowered Pallas kernel lowers for an sm_90 GPU on the CPU host.

Interpret mode runs a kernel's jaxpr, not its Triton lowering, so a kernel can pass every CPU test and still fail
to lower on the GPU (a block-sparse key walk once did: jnp's `%` reached Triton with an i1 operand). These tests
run the real lowering (jaxpr -> Triton IR) of the forward and backward kernels with the platform patched to a
Hopper GPU; compiling the IR and running it still need the GPU (`pytest -m gpu`).
"""

import types

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import pallas_call_registration

from kernels import backend, flash_attention, linear_attention, selective_scan
from kernels.block_sparse import block_sparse_attention, local
from kernels.decode_attention import decode_attention

S = jax.ShapeDtypeStruct


@pytest.fixture
def hopper(monkeypatch):
  """The kernels' api modules and Pallas' Triton lowering see an sm_90 GPU, so nothing runs in interpret mode."""
  gpu_info = types.SimpleNamespace(get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0"))
  monkeypatch.setattr(pallas_call_registration, "gpu_info_lib", gpu_info)
  monkeypatch.setattr(backend, "on_gpu", lambda: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _triton_kernels(fn, *args) -> int:
  """How many Triton kernels jit(fn)(*args) lowers to for CUDA."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return text.count("__gpu$xla.gpu.triton")


def _gradient(fn, argnums=(0, 1, 2)):
  return jax.grad(lambda *args: fn(*args).astype(jnp.float32).sum(), argnums=argnums)


@pytest.mark.parametrize("options", [
    dict(causal=True, window=(32, 0), kv_lengths=jnp.array([200, 77])),
    dict(causal=False),
], ids=["causal-window-lengths", "bidirectional"])
def test_flash_attention(hopper, options):
  q, kv = S((2, 200, 4, 64), jnp.bfloat16), S((2, 200, 2, 64), jnp.bfloat16)
  attention = lambda q, k, v: flash_attention(q, k, v, impl="pallas", **options)
  assert _triton_kernels(_gradient(attention), q, kv, kv) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("tile,window", [(128, 256), (64, 100)])
def test_block_sparse_attention(hopper, tile, window):
  """Mask tiles of 128 walk the dq kernel's keys in two steps per tile (the walk that once failed to lower)."""
  t = 512
  mask = local(t, window, block_q=tile, block_k=tile)
  q, kv = S((2, t, 4, 128), jnp.bfloat16), S((2, t, 2, 128), jnp.bfloat16)
  attention = lambda q, k, v: block_sparse_attention(q, k, v, mask, kv_lengths=jnp.array([t, 300]), impl="pallas")
  assert _triton_kernels(_gradient(attention), q, kv, kv) == 3


@pytest.mark.parametrize("decay", [None, "head", "channel"])
def test_linear_attention(hopper, decay):
  """Training takes the two-pass forward (chunk states, then outputs) and two backward kernels."""
  x = S((2, 256, 4, 64), jnp.bfloat16)
  if decay is None:
    attention = lambda q, k, v: linear_attention(q, k, v, impl="pallas")
    assert _triton_kernels(_gradient(attention), x, x, x) == 4
    return
  g = S((2, 256, 4) + ((64,) if decay == "channel" else ()), jnp.float32)
  attention = lambda q, k, v, g: linear_attention(q, k, v, decay=g, impl="pallas")
  assert _triton_kernels(_gradient(attention, argnums=(0, 1, 2, 3)), x, x, x, g) == 4


def test_selective_scan(hopper):
  x, a, b = S((2, 256, 64), jnp.float32), S((64, 16), jnp.float32), S((2, 256, 16), jnp.float32)
  scan = lambda x, dt, a, b, c, z: selective_scan(x, dt, a, b, c, z=z, impl="pallas")
  assert _triton_kernels(_gradient(scan, argnums=(0, 1, 2, 3, 4, 5)), x, x, a, b, b, x) == 2  # forward, backward


def test_decode_attention(hopper):
  q, cache = S((2, 8, 128), jnp.bfloat16), S((2, 1024, 2, 128), jnp.bfloat16)
  decode = lambda q, k, v: decode_attention(q, k, v, jnp.array([1024, 300]), impl="pallas")
  assert _triton_kernels(decode, q, cache, cache) == 1
