"""Compressive Transformer attention: what the paper's algorithm computes, checked against plain references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import build_mixer
from efficient_attention.variants.compressive import (
    CompressiveConfig, MemoryCompressor, Slots, _concat, _empty, _frozen, _take,
)
from efficient_attention.variants.full import FullAttentionConfig
from tests.helpers import assert_close

WIDTH, HEADS, KV_HEADS = 16, 4, 2


def _mixer(seed=0, **fields):
  config = CompressiveConfig(**{"num_heads": HEADS, "num_kv_heads": KV_HEADS, "rotary": True, "use_bias": True,
                                **fields})
  return build_mixer(config, WIDTH, rngs=nnx.Rngs(seed))


def _inputs(b, t, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, WIDTH))


# Jitted once per module structure: eager calls would run op by op.
_forward = nnx.jit(lambda mixer, x, mask=None: mixer(x, mask=mask))


@pytest.mark.parametrize(
    "segment_length,memory_length",
    [pytest.param(16, 0, id="one-segment"), pytest.param(4, 12, id="memory-holds-all-past")],
)
def test_equals_full_causal_attention_when_memory_covers_the_past(segment_length, memory_length):
  t = 13
  mixer = _mixer(segment_length=segment_length, memory_length=memory_length, compressed_memory_length=2,
                 compression_rate=2)
  full = build_mixer(
      FullAttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS, rotary=True, use_bias=True), WIDTH,
      rngs=nnx.Rngs(5),
  )
  nnx.update(full.qkv, nnx.state(mixer.qkv))
  nnx.update(full.out, nnx.state(mixer.out))
  x = _inputs(2, t)
  assert_close(_forward(mixer, x), _forward(full, x), 1e-5, "compressive vs full")


def _rotate(x, positions, base=10_000.0):
  """Half-split rotary embedding of x [N, H, D] at positions [N], in float64."""
  half = x.shape[-1] // 2
  angles = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attend(q, k, v):
  """Softmax attention of one position q [H, D] over k/v [N, Hkv, D] (query heads grouped per kv head)."""
  group = q.shape[0] // k.shape[1]
  k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
  scores = np.einsum("hd,nhd->hn", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(scores - scores.max(axis=-1, keepdims=True))
  return np.einsum("hn,nhd->hd", p / p.sum(axis=-1, keepdims=True), v)


def _naive(mixer, x, mask):
  """Outputs [B, T, C] and reconstruction loss by an explicit loop over segments with list memories.

  Memories are lists of (activation, position, real) items. The FIFO starts as M empty items, each segment
  (padded to S with empty items) is appended, and the S oldest items fall out and are compressed c at a time.
  """
  cfg = mixer.config
  s, m, ncm, c = cfg.segment_length, cfg.memory_length, cfg.compressed_memory_length, cfg.compression_rate
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(mixer)))
  x, mask = np.asarray(x, np.float64), np.asarray(mask)
  b, t, width = x.shape
  d = width // HEADS

  def project(name, rows, heads):
    rows = np.stack(rows)
    return (rows @ params["qkv"][name]["kernel"] + params["qkv"][name]["bias"]).reshape(len(rows), heads, d)

  def compress(chunk):
    rows = np.stack([item[0] for item in chunk])
    real = np.array([item[2] for item in chunk])
    if cfg.compression == "conv":
      conv = params["compressor"]["conv"]
      value = np.einsum("kc,kco->o", rows * real[:, None], conv["kernel"]) + conv["bias"]
    elif cfg.compression == "mean_pool":
      value = rows[real].mean(axis=0) if real.any() else np.zeros(width)
    else:
      value = rows[real].max(axis=0) if real.any() else np.zeros(width)
    return value, chunk[-1][1], real.any()

  y = np.zeros((b, t, HEADS * d))
  total, count = 0.0, 0
  for batch in range(b):
    memory = [(np.zeros(width), p, False) for p in range(-m, 0)]
    compressed = []
    for start in range(0, t, s):
      real = [p < t and bool(mask[batch, p]) for p in range(start, start + s)]
      segment = [(x[batch, p] if r else np.zeros(width), p, r) for p, r in zip(range(start, start + s), real)]
      evicted = (memory + segment)[:s]
      new = [compress(evicted[j : j + c]) for j in range(0, s, c)]
      old_keys = [item for item in evicted if item[2]]
      for i, (row, p, real) in enumerate(segment):
        if not real:
          continue
        visible = [item for item in compressed + memory + segment[: i + 1] if item[2]]
        q = _rotate(project("query", [row], HEADS), [p])[0]
        k = _rotate(project("key", [item[0] for item in visible], KV_HEADS), [item[1] for item in visible])
        v = project("value", [item[0] for item in visible], KV_HEADS)
        y[batch, p] = _attend(q, k, v).reshape(-1)
        new_keys = [item for item in new if item[2]]
        if ncm and old_keys:
          plain_q = project("query", [row], HEADS)[0]
          target = _attend(plain_q, *(project(n, [it[0] for it in old_keys], KV_HEADS) for n in ("key", "value")))
          approx = _attend(plain_q, *(project(n, [it[0] for it in new_keys], KV_HEADS) for n in ("key", "value")))
          total += np.sum((target - approx) ** 2)
          count += target.size
      memory = (memory + segment)[s:]
      compressed = (compressed + new)[len(compressed) + len(new) - ncm :]
  out = y @ params["out"]["kernel"] + params["out"]["bias"]
  return out, total / max(count, 1)


@pytest.mark.parametrize("compression", ["conv", "mean_pool", "max_pool"])
def test_matches_a_naive_loop_over_segments(compression):
  # M = 5 is neither a multiple of S nor of c, so chunk boundaries and FIFO boundaries do not line up;
  # Ncm = 3 overflows, T = 23 ends in a partial segment, and row 1 has left, middle and right padding.
  mixer = _mixer(segment_length=4, memory_length=5, compressed_memory_length=3, compression_rate=2,
                 compression=compression, sow_compression_loss=True)
  t = 23
  x = _inputs(2, t)
  mask = np.ones((2, t), bool)
  mask[1, [0, 1, 9, 10, 11, 21, 22]] = False
  # NaN at padded positions: the reference never reads them, so agreement shows they cannot leak in.
  x = jnp.where(mask[..., None], x, jnp.nan)
  capture = nnx.jit(lambda m, x, mask: nnx.capture(lambda m: m(x, mask=mask), nnx.Intermediate)(m))
  y, captured = capture(mixer, x, jnp.asarray(mask))
  expected_y, expected_loss = _naive(mixer, x, mask)
  assert_close(np.asarray(y)[mask], expected_y[mask], 1e-5, "outputs")
  assert_close(jax.tree.leaves(captured), [expected_loss], 1e-5, "sown reconstruction loss")


def test_memory_is_detached_but_used():
  s = 4
  mixer = _mixer(segment_length=s, memory_length=4, compressed_memory_length=4, compression_rate=2)
  x = _inputs(1, 4 * s)
  probe = jax.random.normal(jax.random.key(2), (1, s, WIDTH))

  def second_segment(model, x):
    return jnp.sum(model(x)[:, s : 2 * s] * probe)

  # One jitted call gives d(segment 2 output)/dx and d(task loss)/d(parameters).
  grad_x, grads = nnx.jit(
      lambda m, x: (nnx.grad(second_segment, argnums=1)(m, x), nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m))
  )(mixer, x)
  assert float(jnp.abs(grad_x[:, :s]).max()) == 0.0, "gradient flows into the memory"
  assert float(jnp.abs(grad_x[:, s : 2 * s]).max()) > 0.0
  before = _forward(mixer, x)
  moved = _forward(mixer, x.at[:, :s].add(1.0))
  assert not np.allclose(before[:, s : 2 * s], moved[:, s : 2 * s]), "segment 2 ignores its memory"

  # The task loss does not train f_c, though segment 3 reads segment 1 through the compressed memory.
  assert float(jnp.abs(grads["compressor"]["conv"]["kernel"][...]).max()) == 0.0
  mixer.compressor.conv.kernel[...] = mixer.compressor.conv.kernel[...] * 2.0
  after = _forward(mixer, x)
  np.testing.assert_array_equal(before[:, : 2 * s], after[:, : 2 * s])
  assert not np.allclose(before[:, 2 * s :], after[:, 2 * s :]), "no segment reads the compressed memory"


@pytest.mark.parametrize("kind", ["conv", "mean_pool", "max_pool"])
def test_compression_makes_one_slot_per_rate_positions(kind):
  rate, s = 4, 12
  compressor = MemoryCompressor(kind, rate, WIDTH, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                                rngs=nnx.Rngs(0))
  x = _inputs(2, s)
  valid = np.ones((2, s), bool)
  valid[0, 4:8] = False  # a slot with no real position
  valid[1, [0, 3]] = False  # a slot with some
  slots, slots_valid = compressor(x, jnp.asarray(valid))
  chex.assert_shape(slots, (2, s // rate, WIDTH))
  np.testing.assert_array_equal(slots_valid, [[True, False, True], [True, True, True]])
  garbage = jnp.where(valid[..., None], x, 1e3)
  np.testing.assert_array_equal(compressor(garbage, jnp.asarray(valid))[0], slots)
  if kind != "conv":
    chunk = np.asarray(x[1, 1:3])
    expected = chunk.mean(axis=0) if kind == "mean_pool" else chunk.max(axis=0)
    np.testing.assert_allclose(slots[1, 0], expected, rtol=1e-6)


def test_reconstruction_loss_trains_only_the_compressor():
  # M < S: each step evicts some of the segment's own activations, which must still not pass a gradient to x.
  mixer = _mixer(segment_length=4, memory_length=2, compressed_memory_length=4, compression_rate=2)
  x = _inputs(2, 15)
  loss, (grads, grad_x) = nnx.jit(nnx.value_and_grad(lambda m, x: m.compression_loss(x), argnums=(0, 1)))(mixer, x)
  assert float(loss) > 0
  assert_close(loss, _naive(mixer, x, np.ones(x.shape[:2], bool))[1], 1e-5, "reconstruction loss")
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
    trains = jax.tree_util.keystr(path).startswith("['compressor']")
    assert (float(jnp.abs(g).max()) > 0) == trains, jax.tree_util.keystr(path)
  assert float(jnp.abs(grad_x).max()) == 0.0


def _sequential(mixer, x, mask):
  """The layer's sequential definition: (output [B, T, C], reconstruction loss) from `_step` run by a scan over
  the segments, carrying both memories, each step adding the reconstruction errors of what it evicts."""
  cfg = mixer.config
  s = cfg.segment_length
  b, t, width = x.shape
  steps = -(-t // s)
  x = jnp.pad(jnp.where(mask[..., None], x, 0), ((0, 0), (0, steps * s - t), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, steps * s - t)))
  segments = (
      x.reshape(b, steps, s, width).swapaxes(0, 1), mask.reshape(b, steps, s).swapaxes(0, 1),
      jnp.arange(steps * s, dtype=jnp.int32).reshape(steps, s),
  )
  memories = (_empty(b, cfg.memory_length, width, x.dtype), _empty(b, cfg.compressed_memory_length, width, x.dtype))
  frozen_qkv = _frozen(mixer.qkv)

  def step(carry, segment):
    segment = Slots(*segment)
    advanced, y = mixer._step(carry, segment)
    errors = (jnp.zeros(()), jnp.zeros((), jnp.int32))
    if cfg.compressed_memory_length:
      evicted = _take(jax.lax.stop_gradient(_concat(carry[0], segment)), 0, s)
      new, new_valid = mixer.compressor(evicted.x, evicted.valid)
      errors = mixer._reconstruction_errors(frozen_qkv, segment.x, segment.valid, evicted.x, evicted.valid, new,
                                            new_valid)
    return advanced, (y, errors)

  _, (y, (total, count)) = jax.lax.scan(step, memories, segments)
  y = y.swapaxes(0, 1).reshape(b, steps * s, -1)[:, :t]
  return mixer.out(y), total.sum() / jnp.maximum(count.sum(), 1)


def _full_pass(mixer, x, mask):
  return mixer(x, mask=mask), mixer.compression_loss(x, mask=mask)


def _outputs_and_grads(run, mixer, x, mask, probe):
  """(output, reconstruction loss) and the gradients of sum(output * probe) + loss w.r.t. parameters and x."""

  def objective(mixer, x):
    y, loss = run(mixer, x, mask)
    return jnp.sum(y * probe) + loss, (y, loss)

  (_, outputs), grads = nnx.jit(nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True))(mixer, x)
  return outputs, grads


@pytest.mark.parametrize(
    "t,fields,padded",
    [
        pytest.param(14, dict(segment_length=4, memory_length=2, compressed_memory_length=3, compression_rate=2),
                     True, id="memory-shorter-than-segment"),
        pytest.param(16, dict(segment_length=4, memory_length=6, compressed_memory_length=2, compression_rate=4,
                              compression="mean_pool", num_kv_heads=None), True, id="memory-not-a-multiple-mha"),
        pytest.param(11, dict(segment_length=2, memory_length=5, compressed_memory_length=4, compression_rate=2,
                              compression="max_pool", rotary=False), False, id="memory-of-several-segments"),
        pytest.param(13, dict(segment_length=4, memory_length=5, compressed_memory_length=0), True,
                     id="transformer-xl"),
        pytest.param(12, dict(segment_length=4, memory_length=0, compressed_memory_length=3, compression_rate=2,
                              rotary=False), True, id="no-fifo-memory"),
        pytest.param(10, dict(segment_length=4, memory_length=0, compressed_memory_length=0), False,
                     id="segments-only"),
        pytest.param(5, dict(segment_length=8, memory_length=3, compressed_memory_length=2, compression_rate=2),
                     True, id="one-partial-segment"),
    ],
)
def test_parallel_pass_equals_the_sequential_definition(t, fields, padded):
  mixer = _mixer(**fields)
  x = _inputs(2, t)
  mask = np.ones((2, t), bool)
  if padded:
    mask[1, [0, 1, t // 2, t - 1]] = False  # left, middle and right padding
  probe = jax.random.normal(jax.random.key(3), (2, t, WIDTH))
  (y, loss), (grads, grad_x) = _outputs_and_grads(_full_pass, mixer, x, jnp.asarray(mask) if padded else None, probe)
  (expected_y, expected_loss), (expected_grads, expected_grad_x) = _outputs_and_grads(
      _sequential, mixer, x, jnp.asarray(mask), probe)
  assert_close(y, expected_y, 1e-5, "outputs")
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7, err_msg="reconstruction loss")
  assert_close(grad_x, expected_grad_x, 1e-5, "d/dx")
  grads, expected_grads = nnx.to_pure_dict(grads), nnx.to_pure_dict(expected_grads)
  chex.assert_trees_all_equal_structs(grads, expected_grads)
  # Some gradients vanish in exact arithmetic (the key bias without rotary shifts every score of a query
  # alike), leaving rounding noise on both sides; errors are measured against the whole gradient's scale.
  scale = np.sqrt(np.mean(np.concatenate([np.ravel(e) for e in jax.tree.leaves(expected_grads)]) ** 2))
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
    err = np.sqrt(np.mean((np.asarray(g, np.float64) - np.asarray(e, np.float64)) ** 2))
    bound = 1e-5 * max(np.sqrt(np.mean(np.asarray(e, np.float64) ** 2)), scale)
    assert err <= bound, f"d/d{jax.tree_util.keystr(path)} RMS error {err:.3g} > {bound:.3g}"


def test_full_pass_has_no_loop_over_segments():
  mixer = _mixer(segment_length=4, memory_length=6, compressed_memory_length=3, compression_rate=2)
  x = _inputs(2, 10 * 4)
  graphdef, state = nnx.split(mixer)

  def loss(state, x):
    mixer = nnx.merge(graphdef, state)
    return jnp.sum(mixer(x) ** 2) + mixer.compression_loss(x)

  jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(state, x))
  assert "scan" not in jaxpr and "while" not in jaxpr


def _shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval.shape
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _shapes(sub)


def test_forward_and_backward_never_hold_a_t_by_t_array():
  t = 128
  config = CompressiveConfig(num_heads=2, segment_length=8, memory_length=8, compressed_memory_length=4,
                             compression_rate=2, rotary=True)
  mixer = build_mixer(config, WIDTH, rngs=nnx.Rngs(0))
  x = _inputs(1, t)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(mixer(x) ** 2)))(x)
  largest = max(int(np.prod(shape)) for shape in _shapes(jaxpr.jaxpr))
  assert largest < t * t, f"an intermediate has {largest} elements >= T^2 = {t * t}"


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(segment_length=0), "segment_length=0"),
        (dict(compression_rate=0), "compression_rate=0"),
        (dict(compression="avg"), "compression='avg'.*'conv'"),
        (dict(memory_length=-1), "memory_length=-1"),
        (dict(segment_length=6, compression_rate=4), "segment_length=6 .*compression_rate=4"),
        (dict(causal=False), "causal=False .*earlier segments"),
    ],
)
def test_bad_configs_raise_naming_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    CompressiveConfig(**fields)
