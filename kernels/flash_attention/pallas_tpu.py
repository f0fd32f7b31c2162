"""Flash attention (forward, dq, dk/dv) as Pallas kernels for TPUs (Mosaic TPU lowering), interpretable on CPU.

TPU-natural layout: the Mosaic lowering needs the last two dimensions of every block to be (multiples of 8,
multiples of 128) or whole, so a (row tile, head) slice of the channel-last [B, T, H, D] cannot be a block (its
head dimension would be a block of 1 in the second-minor place). Every kernel sees 2-D (rows, D) tiles of one
head, cut from one of two views (see `_RowView`): when D is a multiple of 128 lanes, the free reshape
[B, T, H * D] whose (rows, D) blocks are whole lane columns, so nothing is transposed; otherwise heads moved in
front, [B, H, T, D], at the cost of a transpose in and out.

Each kernel is a grid over (batch, head, row tile, reduction tile) with the reduction axis last and
"arbitrary": its running statistics and accumulators live in VMEM scratch, set at the first reduction step and
written out at the last. The blocks' index_maps clamp the reduction tile into the range that holds attended
pairs, so steps outside it re-address the block already in VMEM (no DMA) and `pl.when` skips their compute;
tiles entirely attended skip the element mask. kv_lengths reach the index_maps and kernels as a scalar-prefetch
operand (SMEM). GQA: query head h reads key/value head h // (H / Hkv) through the index_map, and the dk/dv grid
walks (query head of the group, query tile) as its reduction, so K/V are never repeated and there are no atomics.

Numerics: natural-log online softmax in fp32 (the MXU accumulates in fp32 for bf16 inputs), and the same
residual convention as pallas_gpu (lse natural log [B, H, T], -inf on rows that attend nothing).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.flash_attention.masking import allowed, key_tiles_for_query_tile, query_tiles_for_key_tile
from kernels.flash_attention.pallas_gpu import _Static

# Smallest tile: bf16 packs two rows per sublane, so 16 rows fill a native (16, 128) bf16 tile.
MIN_BLOCK = 16
LANES = 128


@dataclasses.dataclass(frozen=True)
class _RowView:
  """How [B, T, H, D] (or [B, S, Hkv, D]) is laid out for the kernels: `flat` [B, T, H * D] or heads first."""

  flat: bool

  @classmethod
  def for_head_dim(cls, d: int) -> "_RowView":
    return cls(flat=d % LANES == 0)

  def to_kernel(self, x):
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d) if self.flat else x.transpose(0, 2, 1, 3)

  def from_kernel(self, y, heads: int):
    if self.flat:
      b, t, hd = y.shape
      return y.reshape(b, t, heads, hd // heads)
    return y.transpose(0, 2, 1, 3)

  def shape(self, b, t, h, d):
    return (b, t, h * d) if self.flat else (b, h, t, d)

  def spec(self, rows: int, d: int, index):
    """BlockSpec of (rows, D) tiles; index(*grid_indices, *prefetch_refs) -> (batch, head, row tile)."""
    if self.flat:
      return pl.BlockSpec((None, rows, d), lambda *a: _flat_index(*index(*a)))
    return pl.BlockSpec((None, None, rows, d), lambda *a: (*index(*a), 0))


def _flat_index(b, head, tile):
  return b, tile, head


def stat_spec(rows: int, index):
  """BlockSpec of a (rows, 1) tile of per-row statistics [B, H, T, 1]; index as in `_RowView.spec`."""
  return pl.BlockSpec((None, None, rows, 1), lambda *a: (*index(*a), 0))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Row tiles of the three kernels (powers of two >= 16 so the largest divides the padded length)."""

  block_q: int = 128
  block_k: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 128
  block_q_dkv: int = 128
  block_k_dkv: int = 128

  @classmethod
  def get_default(cls, head_dim: int, itemsize: int = 2) -> "BlockSizes":
    """128-row tiles match the MXU (128x128 on v2-v5, 256x256 on v6 where 256 may be faster); a (128, D) fp32
    accumulator and double-buffered inputs stay far below VMEM for every D up to 256."""
    del head_dim, itemsize  # one default fits every supported head width in VMEM
    return cls()

  def scaled_for(self, t: int, s: int) -> "BlockSizes":
    """Shrinks tiles for short sequences (power-of-two tiles no larger than the padded length)."""
    fit_q = lambda b: min(b, max(MIN_BLOCK, pl.next_power_of_2(t)))
    fit_k = lambda b: min(b, max(MIN_BLOCK, pl.next_power_of_2(s)))
    return dataclasses.replace(
        self,
        block_q=fit_q(self.block_q), block_k=fit_k(self.block_k),
        block_q_dq=fit_q(self.block_q_dq), block_k_dq=fit_k(self.block_k_dq),
        block_q_dkv=fit_q(self.block_q_dkv), block_k_dkv=fit_k(self.block_k_dkv),
    )


def _dot(a, b, static: _Static, contract=((1,), (0,))):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                         precision=static.precision)


def _dot_t(a, b, static: _Static):  # a @ b.T, the form the MXU takes directly
  return _dot(a, b, static, ((1,), (1,)))


def _element_mask(x, fill, first_q, first_k, static: _Static, kv_length):
  """x [bq, bk] with `fill` where the pair (first_q + row, first_k + column) is not attended."""
  q_idx = first_q + lax.broadcasted_iota(jnp.int32, x.shape, 0)
  k_idx = first_k + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  mask = allowed(q_idx, k_idx, offset=static.offset, causal=static.causal, window=static.window,
                 kv_length=kv_length)
  return x if mask is None else jnp.where(mask, x, fill)


def _key_tiles(static: _Static, lengths_ref, b, q_tile, block_q, block_k, num_k_tiles):
  kv_length = lengths_ref[b] if static.has_kv_length else None
  return key_tiles_for_query_tile(q_tile, block_q, block_k, num_k_tiles, offset=static.offset,
                                  causal=static.causal, window=static.window, kv_length=kv_length)


def _query_tiles(static: _Static, lengths_ref, b, k_tile, block_q, block_k, num_q_tiles):
  kv_length = lengths_ref[b] if static.has_kv_length else None
  return query_tiles_for_key_tile(k_tile, block_q, block_k, num_q_tiles, offset=static.offset,
                                  causal=static.causal, window=static.window, kv_length=kv_length)


def _clamp(index, tiles, num_tiles):
  """`index` moved into the tiles [lo, hi) that hold attended pairs (a valid tile even when none does)."""
  return jnp.minimum(jnp.clip(index, tiles.lo, jnp.maximum(tiles.hi - 1, tiles.lo)), num_tiles - 1)


def _run_tile(index, tiles, step):
  """Calls step(masked) for a reduction tile inside [lo, hi); only tiles outside [full_lo, full_hi) are masked."""
  inside = (index >= tiles.lo) & (index < tiles.hi)
  full = (index >= tiles.full_lo) & (index < tiles.full_hi)
  pl.when(inside & full)(functools.partial(step, False))
  pl.when(inside & jnp.logical_not(full))(functools.partial(step, True))


def online_softmax_init(m_ref, l_ref, acc_ref):
  """Running max m [bq, 1], normaliser l [bq, 1] and output accumulator [bq, D] (fp32 VMEM) before the first
  key tile; shared with kernels/block_sparse/pallas_tpu.py."""
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def online_softmax_update(s, v_ref, m_ref, l_ref, acc_ref, static):
  """Folds one tile of logits s [bq, bk] (masked entries -inf) and its values [bk, D] into m, l and acc.

  static: the kernel's static settings (flash's or block-sparse's `_Static`); only its matmul precision is read.
  """
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing attended yet stays at zero weight
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
  v = v_ref[...]
  acc_ref[...] = acc_ref[...] * alpha + _dot(p.astype(v.dtype), v, static)
  m_ref[...] = m_new


def online_softmax_finalize(m_ref, l_ref, acc_ref, o_ref, lse_ref):
  """o = acc / l and the natural-log lse after the last key tile; rows that attended nothing get 0 and -inf."""
  l = l_ref[...]
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc_ref[...] / safe_l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe_l))


def _forward_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, static: _Static,
                    num_k_tiles: int):
  b, q_tile, k_tile = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  pl.when(k_tile == 0)(functools.partial(online_softmax_init, m_ref, l_ref, acc_ref))

  def step(masked):
    s = _dot_t(q_ref[...], k_ref[...], static) * static.sm_scale
    if masked:
      kv_length = lengths_ref[b] if static.has_kv_length else None
      s = _element_mask(s, -jnp.inf, q_tile * block_q, k_tile * block_k, static, kv_length)
    online_softmax_update(s, v_ref, m_ref, l_ref, acc_ref, static)

  _run_tile(k_tile, _key_tiles(static, lengths_ref, b, q_tile, block_q, block_k, num_k_tiles), step)

  pl.when(k_tile == num_k_tiles - 1)(functools.partial(online_softmax_finalize, m_ref, l_ref, acc_ref, o_ref, lse_ref))


def _probabilities(q, k, lse, first_q, first_k, static: _Static, kv_length, masked):
  """Recomputed softmax tile P [bq, bk] from the natural-log LSE [bq, 1] (+inf on empty rows, giving P = 0)."""
  p = jnp.exp(_dot_t(q, k, static) * static.sm_scale - lse)
  return _element_mask(p, 0.0, first_q, first_k, static, kv_length) if masked else p


def _dq_kernel(lengths_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc_ref, *,
               static: _Static, num_k_tiles: int):
  b, q_tile, k_tile = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when(k_tile == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  def step(masked):
    kv_length = lengths_ref[b] if static.has_kv_length else None
    k, v = k_ref[...], v_ref[...]
    p = _probabilities(q_ref[...], k, lse_ref[...], q_tile * block_q, k_tile * block_k, static, kv_length, masked)
    ds = p * (_dot_t(do_ref[...], v, static) - delta_ref[...])
    dq_acc_ref[...] += _dot(ds.astype(k.dtype), k, static)

  _run_tile(k_tile, _key_tiles(static, lengths_ref, b, q_tile, block_q, block_k, num_k_tiles), step)

  @pl.when(k_tile == num_k_tiles - 1)
  def _finalize():
    dq_ref[...] = (dq_acc_ref[...] * static.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(lengths_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref,
                *, static: _Static, num_q_tiles: int):
  b, k_tile, g, q_tile = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]

  @pl.when((g == 0) & (q_tile == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def step(masked):
    kv_length = lengths_ref[b] if static.has_kv_length else None
    q, do = q_ref[...], do_ref[...]
    p = _probabilities(q, k_ref[...], lse_ref[...], q_tile * block_q, k_tile * block_k, static, kv_length, masked)
    # Transposed-LHS products as an explicit transpose then a plain matmul: the form Mosaic lowers everywhere.
    dv_acc_ref[...] += _dot(p.astype(do.dtype).T, do, static)
    ds = p * (_dot_t(do, v_ref[...], static) - delta_ref[...])
    dk_acc_ref[...] += _dot(ds.astype(q.dtype).T, q, static)

  _run_tile(q_tile, _query_tiles(static, lengths_ref, b, k_tile, block_q, block_k, num_q_tiles), step)

  @pl.when((g == static.group - 1) & (q_tile == num_q_tiles - 1))
  def _finalize():
    dk_ref[...] = (dk_acc_ref[...] * static.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _compiler_params(num_parallel: int, num_arbitrary: int, interpret):
  """Megacore may split the independent axes; the reduction axes carry scratch, so they run in order."""
  if interpret:
    return None
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def forward(q, k, v, kv_lengths, *, static: _Static, blocks: BlockSizes, interpret):
  """Padded inputs q [B, T, H, D], k/v [B, S, Hkv, D], kv_lengths int32 [B] -> o, lse [B, H, T] (natural log).

  T and S are multiples of the tiles. interpret: False on a TPU, else True or a `pltpu.InterpretParams`.
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  nq, nk = t // bq, s // bk
  view = _RowView.for_head_dim(d)

  def kv_index(bi, hi, i, j, lengths_ref):
    tiles = _key_tiles(static, lengths_ref, bi, i, bq, bk, nk)
    return bi, hi // static.group, _clamp(j, tiles, nk)

  row_index = lambda bi, hi, i, j, _: (bi, hi, i)
  kv_spec = view.spec(bk, d, kv_index)
  o, lse = pl.pallas_call(
      functools.partial(_forward_kernel, static=static, num_k_tiles=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=[view.spec(bq, d, row_index), kv_spec, kv_spec],
          out_specs=[view.spec(bq, d, row_index), stat_spec(bq, row_index)],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(view.shape(b, t, h, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
      compiler_params=_compiler_params(3, 1, interpret),
      interpret=interpret,
      name="flash_attention_forward_tpu",
  )(kv_lengths, view.to_kernel(q), view.to_kernel(k), view.to_kernel(v))
  return view.from_kernel(o, h), lse[..., 0]


def backward(q, k, v, o, lse, do, kv_lengths, *, dlse, static: _Static, blocks: BlockSizes, interpret):
  """Padded inputs, the forward's o/lse and the cotangents do [B, T, H, D], dlse [B, H, T] -> dq, dk, dv.

  With P the softmax, dS = P * (dP - delta) where delta = rowsum(dO * O) - dLSE (LSE's gradient is P).
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  view = _RowView.for_head_dim(d)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  # +inf on rows that attend nothing makes their recomputed probabilities exactly 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  args = (view.to_kernel(q), view.to_kernel(k), view.to_kernel(v), view.to_kernel(do), lse[..., None],
          delta[..., None], kv_lengths)
  dims = (b, t, s, h, hkv, d)
  dq = _backward_dq(*args, dims=dims, view=view, static=static, blocks=blocks, interpret=interpret)
  dk, dv = _backward_dkv(*args, dims=dims, view=view, static=static, blocks=blocks, interpret=interpret)
  return view.from_kernel(dq, h), view.from_kernel(dk, hkv), view.from_kernel(dv, hkv)


def _backward_dq(q, k, v, do, lse, delta, kv_lengths, *, dims, view: _RowView, static: _Static,
                 blocks: BlockSizes, interpret):
  """q/do, k/v in `view`, lse/delta [B, H, T, 1] -> dq in `view`; dims = (B, T, S, H, Hkv, D)."""
  b, t, s, h, _, d = dims
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  nq, nk = t // bq, s // bk

  def kv_index(bi, hi, i, j, lengths_ref):
    tiles = _key_tiles(static, lengths_ref, bi, i, bq, bk, nk)
    return bi, hi // static.group, _clamp(j, tiles, nk)

  row_index = lambda bi, hi, i, j, _: (bi, hi, i)
  row_spec, kv_spec, stats = view.spec(bq, d, row_index), view.spec(bk, d, kv_index), stat_spec(bq, row_index)
  return pl.pallas_call(
      functools.partial(_dq_kernel, static=static, num_k_tiles=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=[row_spec, kv_spec, kv_spec, row_spec, stats, stats],
          out_specs=row_spec,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(3, 1, interpret),
      interpret=interpret,
      name="flash_attention_dq_tpu",
  )(kv_lengths, q, k, v, do, lse, delta)


def _backward_dkv(q, k, v, do, lse, delta, kv_lengths, *, dims, view: _RowView, static: _Static,
                  blocks: BlockSizes, interpret):
  """Inputs as in `_backward_dq` -> dk, dv in `view`, summed over each group's query heads."""
  b, t, s, _, hkv, d = dims
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  nq, nk = t // bq, s // bk

  def q_index(bi, hi, j, g, i, lengths_ref):
    tiles = _query_tiles(static, lengths_ref, bi, j, bq, bk, nq)
    return bi, hi * static.group + g, _clamp(i, tiles, nq)

  row_spec, stats = view.spec(bq, d, q_index), stat_spec(bq, q_index)
  kv_spec = view.spec(bk, d, lambda bi, hi, j, g, i, _: (bi, hi, j))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, num_q_tiles=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hkv, nk, static.group, nq),
          in_specs=[row_spec, kv_spec, kv_spec, row_spec, stats, stats],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(3, 2, interpret),
      interpret=interpret,
      name="flash_attention_dkv_tpu",
  )(kv_lengths, q, k, v, do, lse, delta)
