"""Ring attention: exact softmax attention over a sequence split across the `sequence` axis of a mesh.

Each device keeps its queries; key/value blocks travel between devices with `jax.lax.ppermute` inside
`jax.shard_map`. Every step calls the flash kernel (`kernels.flash_attention` with return_lse=True) on the
local queries and the visiting block, and the partial results are merged by log-sum-exp. Steps whose block
the mask rules out entirely (causal future, outside a window) are dropped when the plan is built, so a
sliding window touches only the neighbours it reaches.

Layouts:
- contiguous: device d holds positions [d * c, (d + 1) * c), c = T / N. Used without a causal mask (every
  step has the same work) and for windows (only nearby blocks are visited).
- zig-zag (causal without a window, `load_balance=True`): the sequence is cut into 2N chunks and device d
  holds chunks d and 2N - 1 - d, so every device does the same causal work at every step (one early and one
  late chunk). The switch to and from this order is two ppermutes of the local block each way.

Head groups: the ring keeps fp32 accumulators the size of the local q/k/v (the merged output in the forward;
dQ, dK, dV in the backward) beside the visiting blocks, a cost the one-device kernel does not have. Measured on
two H200s (flash decoder, width 1024, 4 layers): at equal tokens per device the ring step needed 2.5 GiB more
than the one-device step at 57K tokens per device, most of it fp32 [c, H, D] buffers. With long local blocks the
heads therefore go round the ring in groups, one group after the other (`_in_turn`), so those buffers hold only
H / groups heads; a group still gives the kernel b * c * H / groups >= 2^16 query rows, enough programs to fill
a GPU, so short blocks (where memory is not the limit) keep all heads in one ring. With the barrier in the
backward (below) and the decoder's gradient fence, the ring step at 57K tokens per device needs 7.94 GiB against
the one-device step's 7.73 GiB, on 2 and on 4 H200s (benchmarks/results/parallel_longest.md).

Backward: a custom VJP whose backward runs the same ring. Autodiff through the forward would also be exact
(ppermute transposes to the reverse ppermute), but it would keep every visiting K/V block and every partial
output alive until the backward, O(N) times the local K/V per layer, which defeats training sequences N times
longer. Here the residuals are the local q, k, v, o and lse only; the backward fetches each block again,
recomputes the block's forward (one extra flash forward per step, the price of using the kernel's own VJP for
any implementation) and sends the block's dK/dV back to the device that owns it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from efficient_attention.parallel.sharding import SequenceLayout
from kernels.flash_attention import flash_attention

f32 = jnp.float32
# Query rows (batch x local tokens x heads) below which the heads are not split into groups (see Head groups).
_ROWS_PER_HEAD_GROUP = 1 << 16
Window = tuple[int | None, int | None] | None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one ring: mesh axis, mask, kernel, layout."""

  axis: str
  size: int
  causal: bool
  window: Window
  sm_scale: float
  impl: str
  zigzag: bool

  def bounds(self) -> tuple[float, float]:
    """(left, right): keys at k_pos - q_pos in [-left, right] are attended (inf where unbounded)."""
    left, right = (None, None) if self.window is None else self.window
    left = float("inf") if left is None else left
    right = float("inf") if right is None else right
    return left, (min(right, 0) if self.causal else right)

  def visibility(self, shift: int, block: int) -> str:
    """'none', 'full' or 'partial': how much of a block `shift` devices back (negative: ahead) is attended."""
    left, right = self.bounds()
    delta = shift * block  # q_start - k_start
    lowest, highest = -(block - 1) - delta, (block - 1) - delta  # k_pos - q_pos over the block
    if lowest > right or highest < -left:
      return "none"
    return "full" if lowest >= -left and highest <= right else "partial"

  def shifts(self, block: int) -> tuple[int, ...]:
    if self.zigzag:
      return tuple(range(self.size))
    candidates = sorted(range(-(self.size - 1), self.size), key=abs)
    return tuple(s for s in candidates if self.visibility(s, block) != "none")


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: SequenceLayout,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    window: Window = None,
    kv_lengths: jax.Array | None = None,
    impl: str = "auto",
    load_balance: bool = True,
    head_groups: int | None = None,
) -> jax.Array:
  """Softmax attention with T split over `layout.axis`; same result as `kernels.flash_attention`.

  Args:
    q: [B, T, H, D] queries; k, v: [B, T, Hkv, D] (self-attention: S = T), H % Hkv == 0.
    layout: the mesh and axes (`sharding.SequenceLayout`); T must divide by N (2N when zig-zag is used).
    causal, sm_scale, window: as in `kernels.flash_attention` (window = (left, right), None = unbounded).
    kv_lengths: int [B] valid keys per row (right padding).
    impl: kernel of each step: "xla" (reference), "pallas", or "auto" (Pallas on GPU, the reference
      elsewhere). "cudnn" runs the Pallas kernel: cuDNN's public entry point returns no log-sum-exp.
    load_balance: zig-zag order for causal attention without a window.
    head_groups: rings run one after the other, each over H / head_groups query heads and their kv heads (must
      divide Hkv); None picks the most groups that still give each kernel call >= 2^16 query rows.

  Returns:
    o [B, T, H, D] in q's dtype, sharded like q.
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"ring_attention needs q [B, T, H, D] and k/v [B, T, Hkv, D]; got {q.shape=}, {k.shape=}, "
                     f"{v.shape=}")
  if impl not in ("auto", "xla", "pallas", "cudnn"):
    raise ValueError(f"impl={impl!r} is not valid; choose one of 'auto', 'xla', 'pallas', 'cudnn'")
  n = layout.size
  zigzag = bool(causal and window is None and load_balance and n > 1)
  parts = 2 * n if zigzag else n
  if q.shape[1] % parts:
    raise ValueError(
        f"sequence length T={q.shape[1]} is not valid for ring attention over {n} devices: it must divide by "
        f"{parts}" + (" (zig-zag uses 2 chunks per device)" if zigzag else "")
    )
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "gpu" else "xla"
  hkv = k.shape[2]
  if head_groups is None:
    head_groups = _head_groups(q.shape[0] * (q.shape[1] // n) * q.shape[2], hkv)
  elif head_groups < 1 or hkv % head_groups:
    raise ValueError(f"head_groups={head_groups} is not valid; it must divide Hkv={hkv} "
                     f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})")
  plan = _Plan(
      axis=layout.axis, size=n, causal=causal, window=None if window is None else tuple(window),
      sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale),
      impl="xla" if impl == "xla" else "pallas", zigzag=zigzag,
  )
  lengths = jnp.full(q.shape[:1], q.shape[1], jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
  spec = layout.spec(None, None)
  local = jax.shard_map(
      functools.partial(_grouped_heads, plan=plan, groups=head_groups), mesh=layout.mesh,
      in_specs=(spec, spec, spec, layout.batch_spec()), out_specs=spec, check_vma=False,
  )
  return local(q, k, v, lengths)


def _head_groups(rows: int, hkv: int) -> int:
  """Most groups dividing Hkv whose kernel calls keep >= _ROWS_PER_HEAD_GROUP query rows (1 if none)."""
  return max(g for g in range(1, hkv + 1) if hkv % g == 0 and (g == 1 or rows // g >= _ROWS_PER_HEAD_GROUP))


def _grouped_heads(q, k, v, lengths, *, plan: _Plan, groups: int):
  """_local_attention over `groups` slices of the heads in turn; contiguous slices keep GQA's pairing (query
  head i reads kv head i // (H / Hkv)) because groups divides Hkv.

  The groups are a Python loop chained by `_in_turn`, not a `lax.map`: a map stacks its per-group residuals into
  [groups, ...] buffers that XLA allocates up front. On two H200s with gradient checkpointing, XLA initialised
  every layer's stacked buffers in one fusion at the start of the step, 5 GiB alive from the forward to the
  backward that checkpointing was meant to free.
  """
  if groups == 1:
    return _local_attention(q, k, v, lengths, plan=plan)
  # One split per input (not a slice per group): its transpose is one concatenation of the groups' gradients,
  # where slices would each transpose to a zero-padded full-size array to be summed.
  split = [jnp.split(x, groups, axis=2) for x in (q, k, v)]
  outputs = []
  for g in range(groups):
    qkv = tuple(parts[g] for parts in split)
    if outputs:
      outputs[-1], qkv = _in_turn(outputs[-1], qkv)
    outputs.append(_local_attention(*qkv, lengths, plan=plan))
  return jnp.concatenate(outputs, axis=2)


@jax.custom_vjp
def _in_turn(done, following):
  """(done, following) unchanged, with an optimization barrier forward and backward: the next group's ring
  starts after this group's output exists, and this group's backward ring after the next group's gradients
  exist, so one group's fp32 ring buffers are alive at a time in both directions."""
  return jax.lax.optimization_barrier((done, following))


def _in_turn_fwd(done, following):
  return _in_turn(done, following), None


def _in_turn_bwd(_, cotangents):
  return jax.lax.optimization_barrier(cotangents)


_in_turn.defvjp(_in_turn_fwd, _in_turn_bwd)


def _local_attention(q, k, v, lengths, *, plan: _Plan):
  """Per device: q [b, c, H, D], k/v [b, c, Hkv, D] contiguous blocks, lengths [b] global valid keys."""
  if not plan.zigzag:
    return _ring(q, k, v, lengths, plan)
  q, k, v = (_to_zigzag(x, plan) for x in (q, k, v))
  return _from_zigzag(_ring(q, k, v, lengths, plan), plan)


def _owner(chunk: int, n: int) -> int:
  """Device that holds global chunk `chunk` (of 2n) in zig-zag order."""
  return chunk if chunk < n else 2 * n - 1 - chunk


def _to_zigzag(x, plan: _Plan):
  """Contiguous block (chunks 2d, 2d + 1) -> zig-zag block (chunks d, 2n - 1 - d)."""
  n, c = plan.size, x.shape[1] // 2
  even = jax.lax.ppermute(x[:, :c], plan.axis, [(i, _owner(2 * i, n)) for i in range(n)])
  odd = jax.lax.ppermute(x[:, c:], plan.axis, [(i, _owner(2 * i + 1, n)) for i in range(n)])
  # Chunk d arrived through the even permutation when d is even; it goes first.
  d_even = jax.lax.axis_index(plan.axis) % 2 == 0
  return jnp.concatenate([jnp.where(d_even, even, odd), jnp.where(d_even, odd, even)], axis=1)


def _from_zigzag(x, plan: _Plan):
  """Inverse of `_to_zigzag`."""
  n, c = plan.size, x.shape[1] // 2
  d_even = jax.lax.axis_index(plan.axis) % 2 == 0
  even_chunk, odd_chunk = jnp.where(d_even, x[:, :c], x[:, c:]), jnp.where(d_even, x[:, c:], x[:, :c])
  # Device i holds the even chunk i (i even) or 2n - 1 - i (i odd); chunk g belongs to device g // 2.
  even_of = lambda i: i if i % 2 == 0 else 2 * n - 1 - i
  first = jax.lax.ppermute(even_chunk, plan.axis, [(i, even_of(i) // 2) for i in range(n)])
  second = jax.lax.ppermute(odd_chunk, plan.axis, [(i, (2 * n - 1 - even_of(i)) // 2) for i in range(n)])
  return jnp.concatenate([first, second], axis=1)


def _shift(x, shift: int, plan: _Plan):
  """The block of the device `shift` places back along the axis (cyclically)."""
  if shift % plan.size == 0:
    return x
  return jax.lax.ppermute(x, plan.axis, [(i, (i + shift) % plan.size) for i in range(plan.size)])


def _valid(lengths, start, count):
  """Valid keys among `count` keys starting at global position `start`: int32 [b]."""
  return jnp.clip(lengths - start, 0, count).astype(jnp.int32)


def _flash(q, k, v, lengths, plan: _Plan, *, causal=False, window=None):
  return flash_attention(q, k, v, causal=causal, sm_scale=plan.sm_scale, window=window, kv_lengths=lengths,
                         return_lse=True, impl=plan.impl)


def _step(q, kb, vb, lengths, shift: int, plan: _Plan):
  """Partial attention of the local queries on the block from `shift` devices back.

  q [b, c, H, D], kb/vb [b, c, Hkv, D] -> (o [b, c, H, D], lse [b, H, c]).
  """
  d = jax.lax.axis_index(plan.axis)
  c = q.shape[1]
  if plan.zigzag:
    return _zigzag_step(q, kb, vb, lengths, shift, d, plan)
  source = d - shift
  block_lengths = jnp.where((source >= 0) & (source < plan.size), _valid(lengths, source * c, c), 0)
  if plan.visibility(shift, c) == "full":
    return _flash(q, kb, vb, block_lengths, plan)
  # The kernel places query i at key position i + S - T. Padding keys (masked by their length) or queries
  # (sliced off) by |delta| makes that offset the blocks' true distance delta = q_start - k_start.
  delta = shift * c
  if delta > 0:
    pad = ((0, 0), (0, delta), (0, 0), (0, 0))
    return _flash(q, jnp.pad(kb, pad), jnp.pad(vb, pad), block_lengths, plan, causal=plan.causal, window=plan.window)
  if delta < 0:
    o, lse = _flash(jnp.pad(q, ((0, 0), (0, -delta), (0, 0), (0, 0))), kb, vb, block_lengths, plan,
                    causal=plan.causal, window=plan.window)
    return o[:, :c], lse[:, :, :c]
  return _flash(q, kb, vb, block_lengths, plan, causal=plan.causal, window=plan.window)


def _zigzag_step(q, kb, vb, lengths, shift, d, plan: _Plan):
  n, c = plan.size, q.shape[1] // 2
  source = (d - shift) % n
  # Valid keys of a zig-zag block: right padding is a global prefix, so within the block's two chunks (early
  # one first) the valid keys are a prefix too.
  prefix = lambda device: _valid(lengths, device * c, c) + _valid(lengths, (2 * n - 1 - device) * c, c)
  if shift == 0:
    return _flash(q, kb, vb, prefix(d), plan, causal=True)

  def earlier_source(q, kb, vb):
    # Its early chunk precedes both local chunks; its late chunk follows both.
    return _flash(q, kb[:, :c], vb[:, :c], _valid(lengths, source * c, c), plan)

  def later_source(q, kb, vb):
    # Only the local late chunk sees it, and sees both of its chunks.
    o, lse = _flash(q[:, c:], kb, vb, prefix(source), plan)
    o = jnp.concatenate([jnp.zeros_like(o), o], axis=1)
    return o, jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=2)

  return jax.lax.cond(source < d, earlier_source, later_source, q, kb, vb)


def _merge(o_acc, lse_acc, o, lse):
  """Log-sum-exp merge of two normalised partial results (fp32 o [b, c, H, D], lse [b, H, c])."""
  top = jnp.maximum(lse_acc, lse)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w_acc, w = jnp.exp(lse_acc - top), jnp.exp(lse - top)
  total = w_acc + w
  scale = lambda weight: (weight / jnp.where(total > 0, total, 1.0)).transpose(0, 2, 1)[..., None]
  return o_acc * scale(w_acc) + o.astype(f32) * scale(w), top + jnp.log(total)


def _around_the_ring(k, v, plan: _Plan, step, carry):
  """carry = step(carry, shift, K block, V block) for every block that visits this device, in ring order.

  Each block is passed on from the previous one (a chain of ppermutes), and the transfer of the next block is
  issued before the current step runs, so communication overlaps compute. The optimization barrier then ties
  the step's result to the block in flight: no later step starts before this one ends. Without it the steps
  are independent to XLA, which may run all transfers and kernels at once and keep every visiting block and
  partial result alive, memory that grows with the number of devices (measured: +29 MiB instead of +8 MiB
  over one device's step at 2K tokens per device on 4 devices), which ring attention exists to avoid.
  """
  shifts = plan.shifts(k.shape[1])
  kb, vb = _shift(k, shifts[0], plan), _shift(v, shifts[0], plan)
  for shift, following in zip(shifts, (*shifts[1:], None)):
    in_flight = None if following is None else (_shift(kb, following - shift, plan),
                                                _shift(vb, following - shift, plan))
    carry = step(carry, shift, kb, vb)
    if in_flight is not None:
      carry, (kb, vb) = jax.lax.optimization_barrier((carry, in_flight))
  return carry


def _forward(q, k, v, lengths, plan: _Plan):
  b, c, h, dh = q.shape

  def step(carry, shift, kb, vb):
    return _merge(*carry, *_step(q, kb, vb, lengths, shift, plan))

  initial = (jnp.zeros((b, c, h, dh), f32), jnp.full((b, h, c), -jnp.inf, f32))
  o, lse = _around_the_ring(k, v, plan, step, initial)
  return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, lengths, plan: _Plan):
  return _forward(q, k, v, lengths, plan)[0]


def _ring_fwd(q, k, v, lengths, plan: _Plan):
  o, lse = _forward(q, k, v, lengths, plan)
  return o, (q, k, v, lengths, o, lse)


def _ring_bwd(plan: _Plan, residuals, do):
  # The barrier makes the blocks' recomputed forward below a new computation to XLA, as jax.checkpoint does for
  # its recomputation: otherwise XLA may merge it (common subexpressions) with the forward pass's identical kernel
  # calls, and keep every step's partial output and log-sum-exp of every layer alive from the forward to here.
  q, k, v, lengths, o, lse, do = jax.lax.optimization_barrier((*residuals, do))
  do_f32 = do.astype(f32)
  dot_o = jnp.sum(do_f32 * o.astype(f32), axis=-1).transpose(0, 2, 1)  # [b, H, c]

  def step(carry, shift, kb, vb):
    dq, dk, dv = carry
    (o_s, lse_s), pullback = jax.vjp(lambda q, kb, vb: _step(q, kb, vb, lengths, shift, plan), q, kb, vb)
    # o = sum_s w_s o_s with w_s = exp(lse_s - lse): o_s gets w_s do, and lse_s gets w_s (do.o_s - do.o).
    weight = jnp.where(jnp.isfinite(lse_s) & jnp.isfinite(lse), jnp.exp(lse_s - lse), 0.0)  # [b, H, c]
    dot_o_s = jnp.sum(do_f32 * o_s.astype(f32), axis=-1).transpose(0, 2, 1)
    do_s = (do_f32 * weight.transpose(0, 2, 1)[..., None]).astype(o_s.dtype)
    dq_s, dkb, dvb = pullback((do_s, weight * (dot_o_s - dot_o)))
    # dK/dV go home in the kernel's output dtype (k's: half the bytes of fp32 for bf16) and are summed in fp32.
    return (dq + dq_s.astype(f32), dk + _shift(dkb, -shift, plan).astype(f32),
            dv + _shift(dvb, -shift, plan).astype(f32))

  initial = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  dq, dk, dv = _around_the_ring(k, v, plan, step, initial)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
