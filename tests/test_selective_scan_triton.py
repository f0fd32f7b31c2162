"""impl="triton" (the chunk-parallel Triton-language kernels through jax-triton) against the fp32 token-by-token
oracle and against impl="pallas", so the two GPU paths check each other: outputs, final state and the gradient of
every input, with random cotangents on both y and the final state. Everything but the argument checks needs a
GPU. jax-triton hands the kernels uninitialised output buffers, so a row a kernel fails to write shows up as
garbage in these whole-array comparisons."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from kernels import selective_scan
from kernels.selective_scan import reference
from kernels.selective_scan.triton_config import BlockSizes
from tests.helpers import assert_close
from tests.test_selective_scan_kernel import _values_and_grads
from tests.test_selective_scan_ref import make_inputs

# (forward, gradients) as relative RMS errors. fp32 gradients over hundreds of tokens sum many per-token terms
# and Triton's exp differs from XLA's in the last bits, as in the Pallas GPU tests.
TOLERANCE = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 2e-2)}


def test_triton_off_gpu_raises_a_clear_error():
  args = make_inputs(0, length=4, dm=8, n=4)
  with pytest.raises(NotImplementedError, match="impl='triton' needs a CUDA GPU and jax-triton"):
    selective_scan(**args, impl="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block_sizes=BlockSizes(block_d=3)), r"^block_sizes\.block_d=3 .* power of two"),
        (dict(block_sizes=BlockSizes(chunk_bwd=24)), r"^block_sizes\.chunk_bwd=24 .* power of two"),
        (dict(block_sizes=BlockSizes(num_stages=0)), r"^block_sizes\.num_stages=0"),
        (dict(block_sizes=BlockSizes(atomic_bc=1)), r"^block_sizes\.atomic_bc=1 .* bool"),
        (dict(block_sizes=BlockSizes(prefetch=0)), r"^block_sizes\.prefetch=0 .* bool"),
        # Dm / G = 4 channels per group: a 16-channel block would span groups.
        (dict(block_sizes=BlockSizes(block_d=4, block_d_bwd=16), groups=2),
         r"^block_sizes\.block_d_bwd=16 .* Dm / G = 4"),
        (dict(x_dtype=jnp.int32), r"^x\.dtype=int32 is not valid for impl='triton'"),
    ],
)
def test_triton_invalid_arguments_name_the_argument(change, message):
  args = make_inputs(0, length=4, dm=8, n=4, groups=change.get("groups"))
  if "x_dtype" in change:
    args["x"] = args["x"].astype(change["x_dtype"])
  with pytest.raises(ValueError, match=message):
    selective_scan(**args, impl="triton", block_sizes=change.get("block_sizes"))


def test_default_tiles_scale_with_the_state_size_and_fit_the_groups():
  assert BlockSizes.get_default(16) == BlockSizes()
  blocks = BlockSizes.get_default(64)
  assert (blocks.block_d, blocks.block_d_bwd, blocks.prefetch) == (2, 1, False)
  # Dm / G = 2 channels per group: both blocks halve until they divide it.
  assert (BlockSizes.get_default(4).fitted(2).block_d, BlockSizes.get_default(4).fitted(2).block_d_bwd) == (2, 2)


def test_pallas_block_sizes_are_rejected_by_triton():
  from kernels.selective_scan.pallas_gpu import BlockSizes as PallasBlockSizes  # noqa: PLC0415

  args = make_inputs(0, length=4, dm=8, n=4)
  with pytest.raises(ValueError, match=r"^block_sizes=.* is not valid for impl='triton'"):
    selective_scan(**args, impl="triton", block_sizes=PallasBlockSizes())


# Small tiles put several chunks and channel blocks in every case. SMALL's checkpoints (chunk_bwd < chunk) fall
# inside the forward's chunks (four to a chunk; the defaults put two), its dB/dC are atomic adds and its forward
# loads each chunk's inputs in place (no prefetch); COARSE_CHECKPOINTS' (chunk_bwd > chunk) span two forward
# chunks, and its backward tiles cross two warps.
SMALL = BlockSizes(block_d=4, chunk=16, num_stages=1, block_d_bwd=2, chunk_bwd=4, num_warps_bwd=1, atomic_bc=True,
                   prefetch=False)
COARSE_CHECKPOINTS = BlockSizes(block_d=2, chunk=8, block_d_bwd=2, chunk_bwd=16, num_warps_bwd=2)

# Each case compiles its own kernels (shapes, dtype and tiles are constexprs), so the list is short and every
# case targets bugs the others cannot show; the whole file stays well under a minute on an H200.
GPU_CASES = [
    # batch, length, dm, n, groups, dtype, every optional input, dt_softplus, block sizes (None: the defaults),
    # whether to compare with impl="pallas" too (its compiles are slow: one tiny case)
    pytest.param(2, 100, 32, 16, None, jnp.float32, True, True, None, True,
                 id="f32-n16-all-options-ragged-defaults"),
    pytest.param(2, 100, 32, 16, None, jnp.bfloat16, True, True, None, False,
                 id="bf16-n16-all-options-ragged-defaults"),
    # N = 5 pads to 8 (masked states); two groups (four atomic dB/dC adders each); no D, z, bias or initial
    # state; delta = dt.
    pytest.param(2, 45, 16, 5, 2, jnp.float32, False, False, SMALL, False,
                 id="f32-n5-grouped-bare-no-softplus-small-atomic-tiles"),
    # L a multiple of every chunk (no padded tokens), four groups of four channels, a wide state.
    pytest.param(1, 64, 16, 64, 4, jnp.bfloat16, True, True, COARSE_CHECKPOINTS, False,
                 id="bf16-n64-grouped-coarse-checkpoints"),
    pytest.param(1, 1, 16, 4, None, jnp.float32, True, True, None, False, id="f32-n4-one-token"),
]


def _case_inputs(batch, length, dm, n, groups, dtype, options, dt_softplus=True):
  args = make_inputs(7, batch=batch, length=length, dm=dm, n=n, groups=groups, with_d=options, with_z=options,
                     with_dt_bias=options, with_state=options)
  if dt_softplus:
    # Mamba-like step sizes (softplus(dt + bias) mostly in [1e-3, 1e-1]) so the state remembers many tokens.
    args["dt"] = args["dt"] * 0.5 - 3.0
  else:
    # dt + dt_bias is the step itself: positive, or the state would grow without bound.
    args["dt"] = jnp.abs(args["dt"]) * 0.05
    if options:
      args["dt_bias"] = jnp.abs(args["dt_bias"]) * 0.01
  args = {k: v.astype(dtype) if k in ("x", "dt", "z", "B", "C") else v for k, v in args.items()}
  cot = make_inputs(8, batch=batch, length=length, dm=dm, n=n)
  return args, (cot["x"].astype(dtype), cot["initial_state"])


def _scan(impl, blocks, dt_softplus, args):
  return selective_scan(**args, dt_softplus=dt_softplus, return_final_state=True, impl=impl, block_sizes=blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, length, dm, n, groups, dtype, options, dt_softplus, blocks, against_pallas",
                         GPU_CASES)
def test_gpu_triton_matches_naive_and_pallas(batch, length, dm, n, groups, dtype, options, dt_softplus, blocks,
                                             against_pallas):
  args, cotangents = _case_inputs(batch, length, dm, n, groups, dtype, options, dt_softplus)

  def naive(args):
    y, state = reference.selective_scan_naive(**args, dt_softplus=dt_softplus)
    return y.astype(dtype), state

  with_grads = jax.jit(_values_and_grads, static_argnums=0)
  (y, state), grads = with_grads(functools.partial(_scan, "triton", blocks, dt_softplus), args, cotangents)
  expected = {"naive": with_grads(naive, args, cotangents)}
  if against_pallas:
    expected["pallas"] = with_grads(functools.partial(_scan, "pallas", None, dt_softplus), args, cotangents)
  fwd_tol, grad_tol = TOLERANCE[dtype]
  chex.assert_type(y, dtype)
  chex.assert_shape(state, (batch, dm, n))
  chex.assert_type(state, jnp.float32)
  assert set(grads) == set(args)
  for name in args:
    chex.assert_shape(grads[name], args[name].shape)
    chex.assert_type(grads[name], args[name].dtype)
    chex.assert_tree_all_finite(grads[name])
  for what, ((y_ref, state_ref), grads_ref) in expected.items():
    assert_close(y, y_ref, fwd_tol, f"y against {what}")
    assert_close(state, state_ref, fwd_tol, f"state against {what}")
    for name in args:
      assert_close(grads[name], grads_ref[name], grad_tol, f"gradient of {name} against {what}")
  if blocks is not None:
    return
  # Without gradients the forward writes no checkpoints: another specialisation of the forward kernel (and
  # another compile, so only with the default tiles).
  y_plain, state_plain = jax.jit(functools.partial(_scan, "triton", blocks, dt_softplus))(args)
  (y_ref, state_ref), _ = expected["naive"]
  assert_close(y_plain, y_ref, fwd_tol, "y without gradients")
  assert_close(state_plain, state_ref, fwd_tol, "state without gradients")


@pytest.mark.gpu
def test_gpu_triton_y_only_and_strong_decay_stay_finite():
  # Large steps (delta ~ 5, a ~ exp(-5 |A|)) and no returned state: the carried state and its cotangent stay finite.
  # The shapes of the first GPU case, so its compiled kernels are reused.
  args, _ = _case_inputs(2, 100, 32, 16, None, jnp.float32, True)
  args["dt"] = args["dt"] + 8.0

  def loss(args, impl):
    return jnp.sum(selective_scan(**args, impl=impl) ** 2)

  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, impl="triton")))(args)
  value_ref, grads_ref = jax.jit(jax.value_and_grad(functools.partial(loss, impl="xla")))(args)
  chex.assert_tree_all_finite((value, grads))
  assert_close(value, value_ref, 1e-5, "loss")
  for name in args:
    assert_close(grads[name], grads_ref[name], 1e-4, f"gradient of {name}")
