"""Compressive Transformer attention (Rae et al. 2020): segments attend to a FIFO memory and a compressed memory.

The sequence is split into segments of `segment_length` positions (S), and the paper defines the layer
sequentially, one segment at a time, carrying two memories:

- the FIFO memory: the layer inputs x of the last `memory_length` positions (as in Transformer-XL, the layer
  stores its input hidden states and projects them to keys/values with its own projections);
- the compressed memory: `compressed_memory_length` slots, each `f_c` of `compression_rate` consecutive
  activations that fell out of the FIFO memory.

A segment's queries attend to [compressed memory; memory; segment], causally within the segment. Both memories
start as empty (masked) slots, as the paper's fixed-size memories start at zeros; so every step pushes the
segment's S activations into the FIFO, evicts its S oldest slots (empty ones at first) and compresses them
into S / c slots. A compressed slot is a memory if any position it summarises held a real token. Memory
contents are held under `stop_gradient` (the paper does not back-propagate into memories), so the task loss
trains neither earlier segments through the memory nor the compression network.

That loop is not truly recurrent, though: no step reads an earlier step's output, and the memories are
functions of the stopped layer inputs alone. Call the stream the M empty slots the FIFO starts with followed by
the stopped inputs (stream index n holds position n - M). Segment i's FIFO memory is stream[i S : i S + M] and
step i evicts stream[i S : (i + 1) S]; f_c works chunk by chunk and c divides S, so the S / c slots step i
compresses are slots [i S / c, (i + 1) S / c) of f_c applied to the whole stream at once, and segment i's
compressed memory is the last Ncm of [Ncm empty slots; the slots of steps 0 .. i - 1]. So the full pass
(`_parallel`) handles every segment at once: one key/value projection of the stream, one call of f_c, each
segment's windows of both cut with static slices, and one softmax attention with the segments folded into the
batch; the reconstruction loss batches over segments the same way. `_step` keeps the sequential definition:
decoding runs it, and the tests check the parallel pass against a scan of it.

Positions: rotary embeddings at absolute positions, so scores depend on query-key distance (the paper's
relative positions, done the simple way). A compressed slot sits at the position of the last activation it
summarises, its most recent one, which keeps every memory slot strictly before every query of the segment.

The compression network trains on the paper's attention-reconstruction loss (Algorithm 2): for each segment h
and the activations `old` it evicts, || attn(h, old) - attn(h, f_c(old)) ||^2 with attn(h, m) =
softmax(h W_q (m W_k)^T / sqrt(D)) m W_v per head (content only, no rotary), with h, `old` and W_q, W_k, W_v
under stop_gradient so that only f_c learns from it. `CompressiveAttention.compression_loss(x, mask=mask)`
returns it (mean over real query positions, heads and head dims); with `sow_compression_loss=True`, every call
also sows it, so a training step adds it to the task loss as

    (logits, captured) = nnx.capture(model, nnx.Intermediate)(tokens)
    aux = sum(jax.tree.leaves(captured))          # one `reconstruction_loss` per compressive layer
    loss = task_loss(logits) + weight * aux

Memory: scores [B, T / S, H, S, Ncm + M + S] and keys/values [B, T / S, Ncm + M + S, Hkv, D]; nothing is T x T.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import check_decodable, zero_index
from efficient_attention.config import AttentionConfig
from efficient_attention.layers import (
    QKVProjection, check_no_mask_with_cache, check_padding_mask, output_projection, rotary_embedding,
)
from efficient_attention.registry import register
from efficient_attention.validation import check_at_least, check_choice, check_divisible, check_positive
from efficient_attention.variants.full import softmax_attention

COMPRESSIONS = ("conv", "mean_pool", "max_pool")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressiveConfig(AttentionConfig):
  variant = "compressive"
  supports_bidirectional = False
  # S: positions per segment; a segment's queries attend causally within it plus to both memories.
  segment_length: int = 64
  # M (n_m in the paper): FIFO memory of the layer inputs at the last M positions before the segment.
  memory_length: int = 64
  # Ncm (n_cm): compressed memory slots; 0 keeps only the FIFO memory (Transformer-XL).
  compressed_memory_length: int = 32
  # c: activations evicted from the FIFO memory are compressed c to one slot; must divide segment_length.
  compression_rate: int = 4
  # f_c: "conv" (learned strided conv1d, kernel = stride = c), "mean_pool" or "max_pool" over each c.
  compression: str = "conv"
  # True: every call also sows the attention-reconstruction loss as nnx.Intermediate "reconstruction_loss"
  # (collect it with nnx.capture; see the module docstring).
  sow_compression_loss: bool = False

  def __post_init__(self):
    if not self.causal:
      raise ValueError(
          "causal=False is not valid for variant 'compressive': its memories only hold earlier segments, "
          "so no position could see later segments; use causal=True"
      )
    super().__post_init__()
    check_positive("segment_length", self.segment_length)
    check_at_least("memory_length", self.memory_length, 0)
    check_at_least("compressed_memory_length", self.compressed_memory_length, 0)
    check_positive("compression_rate", self.compression_rate)
    check_choice("compression", self.compression, COMPRESSIONS)
    if self.compressed_memory_length:
      # Each step evicts exactly S slots; c | S makes every evicted slot land in one compressed slot.
      check_divisible("segment_length", self.segment_length, "compression_rate", self.compression_rate)


class Slots(NamedTuple):
  """Activations x [B, N, C], valid [B, N] (False: empty or padding) and absolute positions [N]."""

  x: jax.Array
  valid: jax.Array
  positions: jax.Array


def _concat(*parts: Slots) -> Slots:
  return Slots(
      jnp.concatenate([p.x for p in parts], axis=1),
      jnp.concatenate([p.valid for p in parts], axis=1),
      jnp.concatenate([p.positions for p in parts], axis=0),
  )


def _take(slots: Slots, start: int, stop: int) -> Slots:
  return Slots(slots.x[:, start:stop], slots.valid[:, start:stop], slots.positions[start:stop])


def _empty(batch: int, length: int, width: int, dtype: Any) -> Slots:
  """Empty (masked) slots, placed at the positions just before the sequence."""
  return Slots(
      jnp.zeros((batch, length, width), dtype),
      jnp.zeros((batch, length), bool),
      jnp.arange(-length, 0, dtype=jnp.int32),
  )


def _windows(a: jax.Array, block: int, width: int, count: int) -> jax.Array:
  """a [B, N, ...] -> [B, count, width, ...] whose window i is a[:, i * block : i * block + width].

  N must be at least (count - 1) * block + width. Built from slices of `a` reshaped into blocks rather than from
  a gather, so the backward pass adds shifted copies instead of scattering.
  """
  spans = -(-width // block)  # blocks a window touches
  n = (count + spans - 1) * block
  a = jnp.pad(a[:, :n], [(0, 0), (0, max(n - a.shape[1], 0))] + [(0, 0)] * (a.ndim - 2))
  blocks = a.reshape(a.shape[0], count + spans - 1, block, *a.shape[2:])
  return jnp.concatenate([blocks[:, j : j + count] for j in range(spans)], axis=2)[:, :, :width]


class MemoryCompressor(nnx.Module):
  """f_c: x [B, S, C] with valid [B, S] -> S/c slots [B, S/c, C] and their validity [B, S/c].

  Slot j summarises positions [j c, (j + 1) c). Invalid positions are zeroed before the convolution and left
  out of the pools, so padding content never reaches a slot; a slot is valid if any of its positions is.
  """

  def __init__(self, kind: str, rate: int, width: int, *, use_bias: bool, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.kind = kind
    self.rate = rate
    if kind == "conv":
      self.conv = nnx.Conv(
          width, width, kernel_size=(rate,), strides=(rate,), padding="VALID", use_bias=use_bias,
          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      )

  def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, s, c = x.shape
    chunk_valid = valid.reshape(b, s // self.rate, self.rate)
    slot_valid = chunk_valid.any(axis=-1)
    if self.kind == "conv":
      return self.conv(jnp.where(valid[..., None], x, 0)), slot_valid
    chunks = x.reshape(b, s // self.rate, self.rate, c).astype(jnp.float32)
    keep = chunk_valid[..., None]
    if self.kind == "mean_pool":
      total = jnp.where(keep, chunks, 0).sum(axis=2)
      y = total / jnp.maximum(chunk_valid.sum(axis=-1), 1)[..., None]
    else:
      y = jnp.where(slot_valid[..., None], jnp.where(keep, chunks, -jnp.inf).max(axis=2), 0)
    return y.astype(x.dtype), slot_valid


class CompressiveCache(NamedTuple):
  """Decoding cache: the FIFO memory and compressed memory as of the current segment's start, that segment's
  inputs so far segment [B, S, C], and the position index."""

  memory: Slots
  compressed: Slots
  segment: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


def _frozen(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose parameters are under stop_gradient."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


@register(CompressiveConfig)
class CompressiveAttention(nnx.Module):
  """Softmax attention of each segment over [compressed memory; FIFO memory; segment], all segments at once."""

  def __init__(self, config: CompressiveConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.qkv = QKVProjection(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = output_projection(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.compressed_memory_length:
      self.compressor = MemoryCompressor(
          config.compression, config.compression_rate, width, use_bias=config.use_bias, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs,
      )

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, cache: "CompressiveCache | None" = None):
    """x [B, T, C] -> [B, T, C]; with a cache, (y, the cache advanced by T)."""
    mask = check_padding_mask(mask, x)
    if cache is not None:
      check_no_mask_with_cache(mask)
      return self._decode(x, cache)
    y, loss = self._parallel(x, mask, attend=True, reconstruct=self.config.sow_compression_loss)
    if self.config.sow_compression_loss:
      self.sow(nnx.Intermediate, "reconstruction_loss", loss)
    return self.out(y)

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> "CompressiveCache":
    """Both memories as of the current segment's start plus that segment's inputs so far; constant in size."""
    cfg = self.config
    check_decodable(cfg, max_len)
    width = self.qkv.query.in_features
    return CompressiveCache(
        _empty(batch, cfg.memory_length, width, dtype), _empty(batch, cfg.compressed_memory_length, width, dtype),
        jnp.zeros((batch, cfg.segment_length, width), dtype), zero_index(),
    )

  def _decode(self, x: jax.Array, cache: "CompressiveCache") -> tuple[jax.Array, "CompressiveCache"]:
    """One token at a time through `_step`, the sequential definition the full pass is tested against.

    A token at segment offset o attends as row o of its segment (rows past o are masked out as padding, as at the
    end of a sequence); the memories advance when the segment's last token arrives. Each token recomputes its
    segment's S query rows: O(S (Ncm + M + S)) per token, the price of reusing `_step` unchanged.
    """
    s = self.config.segment_length
    b = x.shape[0]

    def token(carry, x_t):
      memory, compressed, buffer, index = carry
      offset = index % s
      buffer = jax.lax.dynamic_update_slice_in_dim(buffer, x_t[:, None].astype(buffer.dtype), offset, axis=1)
      valid = jnp.broadcast_to(jnp.arange(s) <= offset, (b, s))
      segment = Slots(jnp.where(valid[..., None], buffer, 0), valid, index - offset + jnp.arange(s, dtype=jnp.int32))
      (new_memory, new_compressed), y = self._step((memory, compressed), segment)
      # The memories move on only when the segment is complete, as in the full pass.
      pick = lambda new, old: jax.tree.map(lambda a, c: jnp.where(offset == s - 1, a, c), new, old)
      carry = (pick(new_memory, memory), pick(new_compressed, compressed), buffer, index + 1)
      return carry, jax.lax.dynamic_index_in_dim(y, offset, axis=1, keepdims=False)

    carry, y = jax.lax.scan(token, tuple(cache), x.swapaxes(0, 1))
    return self.out(y.swapaxes(0, 1)), CompressiveCache(*carry)

  def compression_loss(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """The attention-reconstruction loss (fp32 scalar) of this layer on its input x [B, T, C].

    Its gradient reaches only the compression network; 0 when nothing is ever compressed.
    """
    return self._parallel(x, check_padding_mask(mask, x), attend=False, reconstruct=True)[1]

  def _parallel(self, x: jax.Array, mask: jax.Array | None, *, attend: bool, reconstruct: bool):
    """x [B, T, C] -> (attention output [B, T, H * D] or None, reconstruction loss or None), every segment at once.

    Equal to `_step` run over the segments in order: see the module docstring for why.
    """
    cfg = self.config
    b, t, c = x.shape
    s, m, ncm, rate = cfg.segment_length, cfg.memory_length, cfg.compressed_memory_length, cfg.compression_rate
    steps = -(-t // s)
    length = steps * s
    valid = jnp.ones((b, t), bool) if mask is None else mask
    # Masks already exclude padded keys and memory slots; zeroing them as well keeps even non-finite padding
    # out of the arithmetic (a masked value still meets a zero weight). The pad to whole segments is masked
    # like padding and comes after every real position.
    x = jnp.where(valid[..., None], x, 0)
    x = jnp.pad(x, ((0, 0), (0, length - t), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, length - t)))
    fold = lambda a: a.reshape(b * steps, -1, *a.shape[2:])  # [B, steps * n, ...] -> [B * steps, n, ...]
    own = Slots(x, valid, jnp.arange(length, dtype=jnp.int32))
    # Memories hold activations without their gradient paths, as in the paper. The stream (index n holds
    # position n - M) is the FIFO's M initial empty slots followed by the stopped inputs: step i evicts
    # stream[i S : (i + 1) S], and segment i's FIFO memory is stream[i S : i S + M].
    stream = (_empty(b, m, c, x.dtype), Slots(jax.lax.stop_gradient(x), valid, own.positions))
    evicted = _take(_concat(*stream), 0, length)
    if ncm:
      # One call compresses every step's evictions: c divides S, so no chunk straddles two steps.
      slots, slots_valid = self.compressor(evicted.x, evicted.valid)
      new = Slots(slots, slots_valid, evicted.positions.reshape(-1, rate)[:, -1])

    y = None
    if attend:
      keys, values, key_valid = [], [], []

      def add(block: int, width: int, *pieces: Slots):
        """Appends segment i's window [i block, i block + width) of the pieces, concatenated, projected once."""
        project = lambda linear, rotate: jnp.concatenate(
            [self._heads(linear, p, self.qkv.num_kv_heads, rotate=rotate) for p in pieces], axis=1)
        joined_valid = jnp.concatenate([p.valid for p in pieces], axis=1)
        for parts, a in ((keys, project(self.qkv.key, True)), (values, project(self.qkv.value, False)),
                         (key_valid, joined_valid)):
          parts.append(_windows(a, block, width, steps))

      if ncm:
        # f_c's output is stopped too, so only the reconstruction loss trains f_c. Segment i's compressed memory
        # is the last Ncm of [Ncm empty slots; the S / c slots of each earlier step].
        add(s // rate, ncm, _empty(b, ncm, c, x.dtype), jax.lax.stop_gradient(new))
      if m:
        # The stopped inputs are projected apart from the empty slots, so the projection runs on the same array
        # as the segment's own keys and XLA shares it in the forward pass; the stop still keeps x's gradient out.
        add(s, m, *stream)
      add(s, s, own)
      q = self._heads(self.qkv.query, own, self.qkv.num_heads)
      joined = lambda parts: fold(jnp.concatenate(parts, axis=2).reshape(b, -1, *parts[0].shape[3:]))
      # Segments folded into the batch: the causal mask aligns each segment to the end of its keys, so every
      # memory slot is visible and the segment is causal within itself.
      y = softmax_attention(fold(q), joined(keys), joined(values), causal=True, key_mask=joined(key_valid))
      y = y.reshape(b, length, -1)[:, :t]

    loss = None
    if reconstruct:
      total, count = jnp.zeros(()), jnp.zeros(())
      if ncm:
        # Each (batch row, segment) pair is a row here: the segment's inputs, what its step evicts and f_c of that.
        total, count = self._reconstruction_errors(
            _frozen(self.qkv), fold(x), fold(valid), fold(evicted.x), fold(evicted.valid), fold(new.x),
            fold(new.valid),
        )
      loss = total / jnp.maximum(count, 1)
    return y, loss

  def _step(self, carry: tuple[Slots, Slots], segment: Slots):
    """The sequential definition of the layer, one segment [B, S, C] given (memory, compressed memory) as of its
    start: (both memories as of the next segment's start, attention output [B, S, H * D])."""
    cfg = self.config
    memory, compressed = carry
    s = cfg.segment_length
    context = _concat(compressed, memory, segment)
    q = self._heads(self.qkv.query, segment, self.qkv.num_heads)
    k = self._heads(self.qkv.key, context, self.qkv.num_kv_heads)
    v = self._heads(self.qkv.value, context, self.qkv.num_kv_heads, rotate=False)
    # The causal mask aligns the segment to the end of the keys: every memory slot is visible.
    y = softmax_attention(q, k, v, causal=True, key_mask=context.valid)
    y = y.reshape(*y.shape[:2], -1)
    # Memories hold activations without their gradient paths, as in the paper; f_c's output is stopped too,
    # so only the reconstruction loss trains f_c.
    stream = jax.lax.stop_gradient(_concat(memory, segment))
    evicted = _take(stream, 0, s)
    memory = _take(stream, s, s + cfg.memory_length)
    if cfg.compressed_memory_length:
      slots, slots_valid = self.compressor(evicted.x, evicted.valid)
      new = Slots(slots, slots_valid, evicted.positions.reshape(-1, cfg.compression_rate)[:, -1])
      fresh = s // cfg.compression_rate
      compressed = _take(_concat(compressed, new), fresh, fresh + cfg.compressed_memory_length)
      compressed = jax.lax.stop_gradient(compressed)
    return (memory, compressed), y

  def _heads(self, linear: nnx.Linear, slots: Slots, heads: int, *, rotate: bool = True) -> jax.Array:
    """Projects slots.x [B, N, C] to [B, N, heads, D], rotated to slots.positions when configured."""
    b, n, _ = slots.x.shape
    y = linear(slots.x).reshape(b, n, heads, self.qkv.head_dim)
    if rotate and self.config.rotary:
      y = rotary_embedding(y, slots.positions, self.config.rotary_base)
    return y

  def _reconstruction_errors(self, frozen_qkv: nnx.Module, h: jax.Array, h_valid: jax.Array, old: jax.Array,
                             old_valid: jax.Array, new: jax.Array, new_valid: jax.Array):
    """Summed squared error attn(h, old) - attn(h, new) over real queries, and how many terms it sums.

    Per batch row: segment inputs h [B, S, C], the activations old [B, S, C] it evicts and their compressed
    slots new [B, S / c, C] = f_c(old), each with its validity [B, N]. h and old are held constant and
    frozen_qkv carries stopped parameters, so only f_c gets a gradient.
    """
    h = jax.lax.stop_gradient(h)
    b, s, _ = h.shape
    q = frozen_qkv.query(h).reshape(b, s, frozen_qkv.num_heads, frozen_qkv.head_dim)

    def attend(x, valid):
      n = x.shape[1]
      k = frozen_qkv.key(x).reshape(b, n, frozen_qkv.num_kv_heads, frozen_qkv.head_dim)
      v = frozen_qkv.value(x).reshape(b, n, frozen_qkv.num_kv_heads, frozen_qkv.head_dim)
      return softmax_attention(q, k, v, causal=False, key_mask=valid).astype(jnp.float32)

    diff = attend(old, old_valid) - attend(new, new_valid)
    # Queries with no real evicted activation to reconstruct add nothing.
    counted = h_valid & old_valid.any(axis=1, keepdims=True)
    total = jnp.sum(jnp.where(counted[..., None, None], diff**2, 0))
    return total, counted.sum() * diff.shape[2] * diff.shape[3]
