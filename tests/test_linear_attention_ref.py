"""The chunked linear-attention reference against the token-by-token recurrence, and the op's checks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_attention, linear_attention_step
from kernels.linear_attention.reference import linear_attention_recurrent
from tests.helpers import assert_close

B, T, H, K, V = 2, 37, 3, 8, 5
CHUNK = 16  # T is not a multiple of it


def _inputs(decay_kind: str):
  """q, k, v, decay (None, per head or per channel) and an initial state."""
  # numpy draws: eager jax.random calls would each compile a program.
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
  decay = None
  if decay_kind != "none":
    shape = (B, T, H) if decay_kind == "head" else (B, T, H, K)
    # log sigmoid(2 + z) spreads per-step rates over roughly (0.5, 1), the range gated models live in.
    decay = -jnp.asarray(np.log1p(np.exp(-2.0 - rng.standard_normal(shape))), jnp.float32)
  state = normal(B, H, K, V)
  return q, k, v, decay, state


def _outputs_and_grads(fn, q, k, v, decay, state):
  """(o, final state) and the gradients of a random projection of them wrt q, k, v, decay, state."""
  o_shape, s_shape = (*q.shape[:3], v.shape[-1]), state.shape
  o_cot = jax.random.normal(jax.random.key(11), o_shape)
  s_cot = jax.random.normal(jax.random.key(12), s_shape)

  def loss(q, k, v, decay, state):
    o, final = fn(q, k, v, decay, state)
    return jnp.sum(o * o_cot) + jnp.sum(final * s_cot), (o, final)

  grads, outputs = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, decay, state)
  return outputs, grads


def _chunked(q, k, v, decay, state):
  return linear_attention(q, k, v, decay=decay, initial_state=state, return_final_state=True, chunk_size=CHUNK)


def _recurrent(q, k, v, decay, state):
  return linear_attention_recurrent(q, k, v, decay=decay, initial_state=state)


# Compiled once per input shape and shared by the tests (compilation dominates this file's run time).
chunked, recurrent = jax.jit(_chunked), jax.jit(_recurrent)
step = jax.jit(linear_attention_step)
chunked_with_grads = jax.jit(functools.partial(_outputs_and_grads, _chunked))
recurrent_with_grads = jax.jit(functools.partial(_outputs_and_grads, _recurrent))


def _assert_matches_recurrence(q, k, v, decay, state):
  (o, final), grads = chunked_with_grads(q, k, v, decay, state)
  (o_ref, final_ref), grads_ref = recurrent_with_grads(q, k, v, decay, state)
  chex.assert_tree_all_finite((o, final, grads))
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(final, final_ref, 1e-5, "final state")
  for name, g, g_ref in zip(("q", "k", "v", "decay", "state"), grads, grads_ref):
    assert_close(g, g_ref, 1e-5, f"d{name}")


@pytest.mark.parametrize("decay_kind", ["head", "channel"])
def test_chunked_matches_recurrence_outputs_state_and_gradients(decay_kind):
  _assert_matches_recurrence(*_inputs(decay_kind))


def test_no_decay_matches_recurrence():
  q, k, v, _, state = _inputs("none")
  o, final = chunked(q, k, v, None, state)
  o_ref, final_ref = recurrent(q, k, v, None, state)
  chex.assert_shape(o, (B, T, H, V))
  chex.assert_shape(final, (B, H, K, V))
  chex.assert_type(final, jnp.float32)
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(final, final_ref, 1e-5, "final state")


@pytest.mark.parametrize("decay_kind", ["head", "channel"])
def test_strong_decay_stays_finite_and_exact(decay_kind):
  # Each chunk opens with four exp(-100) steps, then decays gently: the running log-decay total
  # reaches -400 within a chunk, which overflows any exp(-cumsum) factorisation, and differences
  # of such totals would lose the gentle steps' precision (a relative error of 5e-5 here).
  q, k, v, _, state = _inputs("none")
  shape = (B, T, H) if decay_kind == "head" else (B, T, H, K)
  strong = (jnp.arange(T) % CHUNK < 4).reshape((1, T) + (1,) * (len(shape) - 2))
  decay = jnp.broadcast_to(jnp.where(strong, -100.0, -0.05), shape).astype(jnp.float32)
  _assert_matches_recurrence(q, k, v, decay, state)


def test_prefill_then_steps_equals_one_pass():
  q, k, v, decay, state = _inputs("channel")
  prefix = 21
  o_full, final_full = chunked(q, k, v, decay, state)
  o_prefix, carried = linear_attention(
      q[:, :prefix], k[:, :prefix], v[:, :prefix], decay=decay[:, :prefix], initial_state=state,
      return_final_state=True, chunk_size=CHUNK,
  )
  outputs = [o_prefix]
  for t in range(prefix, T):
    o_t, carried = step(q[:, t], k[:, t], v[:, t], carried, decay=decay[:, t])
    outputs.append(o_t[:, None])
  assert_close(jnp.concatenate(outputs, axis=1), o_full, 1e-5, "o")
  assert_close(carried, final_full, 1e-5, "final state")


def test_output_follows_v_dtype_and_state_stays_fp32():
  q, k, v, decay, _ = _inputs("head")
  o, final = linear_attention(
      q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), decay=decay,
      return_final_state=True,
  )
  chex.assert_type(o, jnp.bfloat16)
  chex.assert_type(final, jnp.float32)
  o_ref, _ = recurrent(q, k, v, decay, jnp.zeros((B, H, K, V)))
  assert_close(o, o_ref, 2e-2, "bf16 o")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": jnp.zeros((B, T, H, K + 1))}, r"k\.shape"),
        ({"v": jnp.zeros((B, T + 1, H, V))}, r"v\.shape"),
        ({"decay": jnp.zeros((B, T, H, V + K))}, r"decay\.shape"),
        ({"initial_state": jnp.zeros((B, H, V, K))}, r"initial_state\.shape"),
        ({"initial_state": jnp.zeros((B, H, K, V), jnp.bfloat16)}, r"initial_state\.dtype"),
        ({"impl": "cudnn"}, r"impl='cudnn' is not valid; choose one of 'xla', 'auto'"),
        ({"chunk_size": 0}, r"chunk_size=0"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
  q, k, v, _, _ = _inputs("none")
  args = {"q": q, "k": k, "v": v, **kwargs}
  with pytest.raises(ValueError, match=match):
    linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_step_checks_state_shape():
  q = jnp.zeros((B, H, K))
  with pytest.raises(ValueError, match=r"state\.shape"):
    linear_attention_step(q, q, jnp.zeros((B, H, V)), jnp.zeros((B, H, K, K)))
