"""Selective-scan Pallas kernels (interpret mode on CPU) against the token-by-token fp32 oracle.

Outputs, final state and the gradient of every input, with random cotangents on both y and the final state.
Interpret mode fills every output buffer with NaN before the kernel runs, so a row the kernel fails to write
fails the relative-error checks (which reject NaN).
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from kernels import selective_scan
from kernels.selective_scan import reference
from kernels.selective_scan.pallas_gpu import BlockSizes
from tests.helpers import assert_close
from tests.test_selective_scan_ref import _largest_array, make_inputs

TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 2e-2)}  # (forward, gradients)

CASES = {
    # 37 = 4 chunks of 8 + a tail of 5; two channel blocks; every optional input.
    "ragged_all_options_n4": dict(inputs=dict(length=37, dm=8, n=4), blocks=BlockSizes(block_d=4, chunk=8)),
    # Grouped B/C (G=2, 4 channels each, blocks of 2 so each group spans two blocks), no optional input,
    # dt used as delta directly; 13 = 3 chunks of 4 + a tail of 1.
    "grouped_bare_n16": dict(
        inputs=dict(length=13, dm=8, n=16, groups=2, with_d=False, with_z=False, with_dt_bias=False,
                    with_state=False, positive_dt=True),
        blocks=BlockSizes(block_d=2, block_d_bwd=4, chunk=4), dt_softplus=False),
    # N=64, a sequence shorter than one chunk (only the tail chunk runs), default tiles fitted to Dm=4.
    "short_n64": dict(inputs=dict(batch=1, length=6, dm=4, n=64), blocks=None),
    # Segments of 8 tokens (2 chunks of 4) over 37: the last segment is 1 full chunk + a tail of 1, so the
    # combine across 5 segments, the tail under its lax.cond and the per-segment partials all run; grouped B/C
    # (each group spanning two blocks) and an initial state.
    "segmented_grouped_ragged": dict(inputs=dict(length=37, dm=8, n=4, groups=2),
                                     blocks=BlockSizes(block_d=2, block_d_bwd=4, chunk=4, segment=8)),
    # 19 = segments of 8, 8, 3: the last segment is only the tail chunk (no full chunk); no optional input.
    "segmented_tail_only_bare": dict(
        inputs=dict(batch=1, length=19, dm=4, n=16, with_d=False, with_z=False, with_dt_bias=False,
                    with_state=False, positive_dt=True),
        blocks=BlockSizes(block_d=4, chunk=4, segment=8), dt_softplus=False),
}


def _values_and_grads(fn, args, cotangents):
  outputs, vjp = jax.vjp(fn, args)
  return outputs, vjp(cotangents)[0]


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_naive_values_state_and_every_gradient(case):
  spec = CASES[case]
  args = make_inputs(1, **spec["inputs"])
  dt_softplus = spec.get("dt_softplus", True)
  batch, length, dm = args["x"].shape
  cot = make_inputs(2, batch=batch, length=length, dm=dm, n=args["A"].shape[1])
  cotangents = (cot["x"], cot["initial_state"])

  def pallas(args):
    return selective_scan(**args, dt_softplus=dt_softplus, return_final_state=True, impl="pallas",
                          block_sizes=spec["blocks"])

  def naive(args):
    return reference.selective_scan_naive(**args, dt_softplus=dt_softplus)

  (y, state), grads = jax.jit(_values_and_grads, static_argnums=0)(pallas, args, cotangents)
  (y_ref, state_ref), grads_ref = jax.jit(_values_and_grads, static_argnums=0)(naive, args, cotangents)
  chex.assert_shape(y, (batch, length, dm))
  chex.assert_type(state, jnp.float32)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state, state_ref, 1e-5, "final state")
  assert set(grads) == set(args)
  for name in args:
    chex.assert_shape(grads[name], args[name].shape)
    assert_close(grads[name], grads_ref[name], 1e-5, f"gradient of {name}")


def test_bf16_inputs_and_a_state_size_that_is_not_a_power_of_two():
  # N=5 is padded to 8 inside; the padded states must stay out of y and the returned state.
  args = make_inputs(5, length=19, dm=8, n=5)
  args = {k: v.astype(jnp.bfloat16) if k != "initial_state" else v for k, v in args.items()}
  blocks = BlockSizes(block_d=4, chunk=8)
  y, state = jax.jit(lambda a: selective_scan(**a, return_final_state=True, impl="pallas", block_sizes=blocks))(args)
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_shape(state, (2, 8, 5))
  y_ref, state_ref = jax.jit(lambda a: reference.selective_scan_naive(**a))(args)
  assert_close(y, y_ref, 1e-2, "y")
  assert_close(state, state_ref, 1e-5, "final state")


def test_backward_keeps_only_chunk_checkpoints():
  # A full [B, L, Dm, N] state history is `chunk` times the checkpoints [B, L / chunk, Dm, N].
  args = make_inputs(4, batch=1, length=512, dm=8, n=16)

  def loss(args):
    blocks = BlockSizes(block_d=8, chunk=16)
    y, state = selective_scan(**args, return_final_state=True, impl="pallas", block_sizes=blocks)
    return jnp.sum(y) + jnp.sum(state)

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(args).jaxpr
  assert _largest_array(jaxpr) <= 512 * 8 * 16 // 8


@pytest.mark.parametrize(
    "blocks, message",
    [
        (BlockSizes(block_d=3), r"^block_sizes\.block_d=3 .* power of two"),
        (BlockSizes(block_d=8, block_d_bwd=16), r"^block_sizes\.block_d_bwd=16 .* Dm / G = 8"),
        (BlockSizes(chunk=0), r"^block_sizes\.chunk=0"),
        (BlockSizes(chunk=8, segment=12), r"^block_sizes\.segment=12 .* multiple of block_sizes\.chunk=8"),
    ],
)
def test_invalid_block_sizes_name_the_field(blocks, message):
  args = make_inputs(0, length=4, dm=8, n=4)
  with pytest.raises(ValueError, match=message):
    selective_scan(**args, impl="pallas", block_sizes=blocks)


GPU_CASES = [
    # batch, length, dm, n, groups, dtype, every optional input, block sizes (None: the defaults)
    pytest.param(2, 2048 + 37, 512, 16, None, jnp.float32, True, None, id="f32-all-options-ragged"),
    pytest.param(2, 2048, 512, 16, None, jnp.bfloat16, True, None, id="bf16-all-options"),
    pytest.param(1, 1024 + 3, 256, 64, 4, jnp.float32, False, None, id="f32-grouped-n64-bare"),
    # Segmented: 8 segments + a last one of 37 tokens (2 chunks + a tail of 5), grouped B/C, every option.
    pytest.param(2, 4096 + 37, 512, 16, 2, jnp.float32, True, BlockSizes(segment=512),
                 id="f32-segmented-grouped-all-options-ragged"),
    pytest.param(2, 4096, 512, 16, None, jnp.bfloat16, True, BlockSizes(segment=1024), id="bf16-segmented"),
    pytest.param(1, 1024 + 3, 256, 64, 4, jnp.float32, False, BlockSizes(block_d=4, segment=256),
                 id="f32-segmented-grouped-n64-bare"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, length, dm, n, groups, dtype, options, blocks", GPU_CASES)
def test_gpu_pallas_matches_naive(batch, length, dm, n, groups, dtype, options, blocks):
  args = make_inputs(7, batch=batch, length=length, dm=dm, n=n, groups=groups, with_d=options,
                     with_z=options, with_dt_bias=options, with_state=options)
  # Mamba-like step sizes (softplus(dt + bias) mostly in [1e-3, 1e-1]) so the state remembers many tokens.
  args["dt"] = args["dt"] * 0.5 - 3.0
  args = {k: v.astype(dtype) if k in ("x", "dt", "z", "B", "C") else v for k, v in args.items()}
  cot = make_inputs(8, batch=batch, length=length, dm=dm, n=n)
  cotangents = (cot["x"].astype(dtype), cot["initial_state"])

  def pallas(args):
    return selective_scan(**args, return_final_state=True, impl="pallas", block_sizes=blocks)

  def naive(args):
    y, state = reference.selective_scan_naive(**args)
    return y.astype(dtype), state

  (y, state), grads = jax.jit(_values_and_grads, static_argnums=0)(pallas, args, cotangents)
  (y_ref, state_ref), grads_ref = jax.jit(_values_and_grads, static_argnums=0)(naive, args, cotangents)
  fwd_tol, grad_tol = TOLERANCE[dtype]
  # fp32 gradients sum thousands of per-token terms, and Triton's exp differs from XLA's in the last bits.
  grad_tol = max(grad_tol, 1e-4)
  assert_close(y, y_ref, fwd_tol, "y")
  assert_close(state, state_ref, max(fwd_tol, 1e-5), "final state")
  for name in args:
    chex.assert_tree_all_finite(grads[name])
    assert_close(grads[name], grads_ref[name], grad_tol, f"gradient of {name}")


@pytest.mark.gpu
def test_gpu_auto_takes_the_triton_kernels_where_installed():
  """impl="auto" on a GPU runs the Triton kernels when jax-triton is installed (the faster GPU path), the Pallas
  kernels otherwise; Pallas-kernel block sizes keep the Pallas kernels."""
  import importlib.util  # noqa: PLC0415

  args = make_inputs(9, batch=1, length=300, dm=64, n=16)
  run = lambda impl, **kw: selective_scan(**args, return_final_state=True, impl=impl, **kw)
  expected = "triton" if importlib.util.find_spec("jax_triton") else "pallas"
  chex.assert_trees_all_equal(run("auto"), run(expected))
  chex.assert_trees_all_equal(run("auto", block_sizes=BlockSizes()), run("pallas", block_sizes=BlockSizes()))
