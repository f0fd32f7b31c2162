"""The selective-scan reference: the chunked scan equals the token-by-token oracle, which equals the formula."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import selective_scan, selective_scan_step
from kernels.selective_scan import reference
from tests.helpers import assert_close


def make_inputs(seed, *, batch=2, length=37, dm=8, n=4, groups=None, with_d=True, with_z=True,
                with_dt_bias=True, with_state=True, positive_dt=False):
  """Random fp32 scan inputs as a dict of keyword arguments (absent options left out)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  bc_shape = (batch, length, n) if groups is None else (batch, length, groups, n)
  dt = normal(batch, length, dm)
  args = dict(
      x=normal(batch, length, dm),
      dt=jnp.abs(dt) * 0.5 if positive_dt else dt,
      # Decays spread over two orders of magnitude, as with Mamba's A = -(1..N).
      A=-jnp.exp(jnp.asarray(rng.uniform(-2.0, 1.0, (dm, n)), jnp.float32)),
      B=normal(*bc_shape),
      C=normal(*bc_shape),
  )
  if with_d:
    args["D"] = normal(dm)
  if with_z:
    args["z"] = normal(batch, length, dm)
  if with_dt_bias:
    args["dt_bias"] = normal(dm) - 1.0
  if with_state:
    args["initial_state"] = normal(batch, dm, n)
  return args


def test_naive_matches_the_formula_written_out():
  # Grouped B/C (G=2 over Dm=4) pins the channel -> group map: channel d reads group d // (Dm / G).
  args = make_inputs(0, batch=1, length=3, dm=4, n=2, groups=2)
  y, state = jax.jit(reference.selective_scan_naive)(**args)
  a = {k: np.asarray(v, np.float64) for k, v in args.items()}
  softplus = lambda v: np.log1p(np.exp(v))
  silu = lambda v: v / (1 + np.exp(-v))
  h = a["initial_state"][0].copy()
  expected = np.zeros((3, 4))
  for t in range(3):
    for d in range(4):
      g = d // 2
      delta = softplus(a["dt"][0, t, d] + a["dt_bias"][d])
      for s in range(2):
        h[d, s] = np.exp(delta * a["A"][d, s]) * h[d, s] + delta * a["B"][0, t, g, s] * a["x"][0, t, d]
      out = sum(a["C"][0, t, g, s] * h[d, s] for s in range(2)) + a["D"][d] * a["x"][0, t, d]
      expected[t, d] = out * silu(a["z"][0, t, d])
  assert_close(y[0], expected, 1e-5, "y")
  assert_close(state[0], h, 1e-5, "state")


CASES = {
    # L not a multiple of the chunk, every optional input, ungrouped B/C.
    "all_options": dict(length=37, n=4, chunk_size=16),
    # L shorter than one chunk, N=16, grouped B/C, no optional inputs, dt used as delta directly.
    "grouped_bare": dict(length=5, n=16, groups=2, chunk_size=16, with_d=False, with_z=False,
                         with_dt_bias=False, with_state=False, positive_dt=True, dt_softplus=False),
}


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_naive_values_and_gradients(case):
  opts = dict(CASES[case])
  chunk_size = opts.pop("chunk_size")
  dt_softplus = opts.pop("dt_softplus", True)
  args = make_inputs(1, **opts)
  batch, length, dm = args["x"].shape
  cotangents = make_inputs(2, batch=batch, length=length, dm=dm, n=args["A"].shape[1])
  gy, gs = cotangents["x"], cotangents["initial_state"]

  def chunked(args):
    return selective_scan(**args, dt_softplus=dt_softplus, return_final_state=True, impl="xla",
                          chunk_size=chunk_size)

  def naive(args):
    return reference.selective_scan_naive(**args, dt_softplus=dt_softplus)

  def values_and_grads(fn):
    # Random cotangents on both outputs, so every gradient path (through y and the final state) is used.
    outputs, vjp = jax.vjp(fn, args)
    return outputs, vjp((gy, gs))[0]

  (y, state), grads = jax.jit(values_and_grads, static_argnums=0)(chunked)
  (y_ref, state_ref), grads_ref = jax.jit(values_and_grads, static_argnums=0)(naive)
  chex.assert_shape(y, (batch, length, dm))
  chex.assert_type(state, jnp.float32)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state, state_ref, 1e-5, "state")
  for name in args:
    assert_close(grads[name], grads_ref[name], 1e-5, f"gradient of {name}")


def test_prefill_then_steps_equals_full_pass():
  args = make_inputs(3, length=13, n=4, groups=4)
  prefill = 9
  scan = jax.jit(selective_scan, static_argnames=("return_final_state", "chunk_size"))
  step = jax.jit(selective_scan_step)
  y_full, state_full = scan(**args, return_final_state=True, chunk_size=4)
  head = {k: (v[:, :prefill] if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
  y_head, state = scan(**head, return_final_state=True, chunk_size=4)
  ys = [y_head]
  for t in range(prefill, 13):
    token = {k: args[k][:, t] for k in ("x", "dt", "B", "C", "z")}
    y_t, state = step(**token, A=args["A"], state=state, D=args["D"], dt_bias=args["dt_bias"])
    chex.assert_shape(y_t, args["x"][:, t].shape)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), y_full, 1e-5, "prefill + step outputs")
  assert_close(state, state_full, 1e-5, "state")


def _largest_array(jaxpr) -> int:
  """Elements in the largest value any equation of `jaxpr` (or of a sub-jaxpr: scan, remat, ...) produces."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          largest = max(largest, _largest_array(sub))
  return largest


def test_forward_and_backward_never_hold_every_state():
  # A full [B, L, Dm, N] state history is 32x a chunk's [B, Q, Dm, N] and 16x the inputs [B, L, Dm].
  args = make_inputs(4, batch=1, length=512, dm=8, n=16)
  full_history = 512 * 8 * 16

  def loss(args):
    y, state = selective_scan(**args, return_final_state=True, chunk_size=16)
    return jnp.sum(y) + jnp.sum(state)

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(args).jaxpr
  assert _largest_array(jaxpr) <= full_history // 8


def test_bf16_inputs():
  args = make_inputs(5, length=19, n=16)
  args_bf16 = {k: v.astype(jnp.bfloat16) if k != "initial_state" else v for k, v in args.items()}
  y, state = jax.jit(lambda a: selective_scan(**a, return_final_state=True, chunk_size=8))(args_bf16)
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_type(state, jnp.float32)
  y_ref, state_ref = jax.jit(lambda a: reference.selective_scan_naive(**a))(args_bf16)
  assert_close(y, y_ref, 1e-2, "y")
  assert_close(state, state_ref, 1e-5, "state")


@pytest.mark.parametrize(
    "name, change",
    [
        ("x", dict(x=jnp.zeros((2, 0, 8)))),
        ("dt", dict(dt=jnp.zeros((2, 6, 4)))),
        ("A", dict(A=-jnp.ones((3, 4)))),
        ("B", dict(B=jnp.zeros((2, 7, 3, 4)), C=jnp.zeros((2, 7, 3, 4)))),  # G=3 does not divide Dm=8
        ("C", dict(C=jnp.zeros((2, 7, 5)))),
        ("D", dict(D=jnp.ones((4,)))),
        ("z", dict(z=jnp.zeros((2, 7, 4)))),
        ("dt_bias", dict(dt_bias=jnp.ones((8, 1)))),
        ("initial_state", dict(initial_state=jnp.zeros((2, 8, 5)))),
        ("impl", dict(impl="cudnn")),
        ("chunk_size", dict(chunk_size=0)),
    ],
)
def test_invalid_arguments_name_the_argument(name, change):
  args = dict(x=jnp.zeros((2, 7, 8)), dt=jnp.zeros((2, 7, 8)), A=-jnp.ones((8, 4)),
              B=jnp.zeros((2, 7, 4)), C=jnp.zeros((2, 7, 4)))
  with pytest.raises(ValueError, match=rf"^{name}[.=]"):
    selective_scan(**(args | change))


def test_invalid_step_state_names_state():
  with pytest.raises(ValueError, match=r"^state\.shape"):
    selective_scan_step(jnp.zeros((2, 8)), jnp.zeros((2, 8)), -jnp.ones((8, 4)), jnp.zeros((2, 4)),
                        jnp.zeros((2, 4)), jnp.zeros((2, 8, 3)))
