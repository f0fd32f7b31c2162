"""RWKV-6 "Finch" (Peng et al. 2024): time mixing with a data-dependent per-channel decay, then channel mixing.

Time mixing, per head (r, k, w [B, T, H, K], v [B, T, H, V], state S [K, V] in fp32):
  o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(w_t) S_{t-1} + k_t v_t^T,
  w_t = exp(-exp(d + tanh(x_w A) B)) in (0, 1), a low-rank data-dependent decay per channel.
The inputs of r, k, v, w and the gate g are interpolations between x_t and x_{t-1} (token shift) whose
mixing weights are themselves low-rank functions of the input (ddlerp). Output: group norm per head,
times silu(g), projected back to the width.

Channel mixing: sigmoid(R x_r) * V relu(K x_k)^2 on token-shifted inputs.

The mixer is a whole RWKV-6 block on its input u (the decoder's pre-normed stream), minus the outer
residual: mixer(u) = h + cm(LN(u + h)) with h = tm(u). In the decoder, x + mixer(LN(x)) therefore is an
RWKV block whose channel-mixing residual stream is LN(x) + h instead of x + h, and the decoder's MLP
after it is an extra feed-forward layer. Causal only.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import check_decodable, zero_index
from efficient_attention.config import MixerConfig
from efficient_attention.layers import check_no_mask_with_cache, check_padding_mask
from efficient_attention.parallel import sequence_linear_attention
from efficient_attention.registry import register
from efficient_attention.validation import check_choice, check_divisible, check_positive
from kernels.linear_attention import linear_attention, linear_attention_step
from kernels.linear_attention.api import IMPLEMENTATIONS

f32 = jnp.float32
# A mixer does not know its depth; initialise as RWKV-6 does its middle layer
# (ratio_0_to_1 = layer / (layers - 1), ratio_1_to_almost0 = 1 - layer / layers).
_RATIO_0_TO_1 = 0.5
_RATIO_1_TO_ALMOST0 = 0.5
# RWKV-6 normalises each head's output with epsilon 1e-5 * head_size_divisor^2, head_size_divisor = 8.
_HEAD_NORM_EPS = 64e-5
# r, k, v, w and the gate each get their own ddlerp interpolation.
_MIXED_INPUTS = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKVConfig(MixerConfig):
  variant = "rwkv"
  # The state carries information forward in time only.
  supports_bidirectional = False
  # Heads of the time-mixing state; each holds a [D, D] state, D = width // num_heads (RWKV-6 uses D = 64).
  num_heads: int = 4
  # Rank of the low-rank maps behind the data-dependent token-shift interpolation (32 in RWKV-6).
  mix_rank: int = 32
  # Rank of the low-rank map behind the data-dependent decay (64 in RWKV-6).
  decay_rank: int = 64
  # Hidden width of channel mixing as a multiple of the model width (3.5 in RWKV-6).
  ffn_multiplier: float = 3.5
  # Prefix-scan implementation (kernels.linear_attention): "xla" (the jnp reference), "pallas"
  # (the kernels; interpret mode off GPU), "triton" (Triton-language kernels via jax-triton; GPU only) or "auto"
  # (the faster GPU kernels on GPU, the reference elsewhere).
  impl: str = "auto"
  # Tokens per chunk of the scan; with a per-channel decay the reference holds [chunk, chunk, D] per head.
  chunk_size: int = 32

  def __post_init__(self):
    super().__post_init__()
    check_positive("num_heads", self.num_heads)
    check_positive("mix_rank", self.mix_rank)
    check_positive("decay_rank", self.decay_rank)
    check_positive("ffn_multiplier", self.ffn_multiplier)
    check_choice("impl", self.impl, IMPLEMENTATIONS)
    check_positive("chunk_size", self.chunk_size)

  def check_width(self, width: int) -> None:
    super().check_width(width)
    check_divisible("width", width, "num_heads", self.num_heads)


def token_shift(x: jax.Array, previous: jax.Array | None = None) -> jax.Array:
  """x_{t-1} for x [B, T, C]: at t = 0 zeros, or previous [B, C] (the token before x, when decoding)."""
  if previous is None:
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  return jnp.concatenate([previous[:, None].astype(x.dtype), x[:, :-1]], axis=1)


def rwkv6_recurrence(
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_w: jax.Array,
    u: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 32,
) -> jax.Array:
  """o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(exp(log_w_t)) S_{t-1} + k_t v_t^T, S_0 = 0.

  r/k/log_w [B, T, H, K], v [B, T, H, V], u [H, K] -> [B, T, H, V] fp32. The kernel computes
  q_t^T S'_t with S'_t = diag(a_t) S'_{t-1} + k'_t v'_t^T; feeding it k, v and log_w delayed by one
  step makes S'_t = S_{t-1}, and the bonus term is added per token.
  """
  delay = lambda x: jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
  # Split over the sequence axis when a sequence-parallel mesh is active (efficient_attention.parallel).
  past = sequence_linear_attention(r, delay(k), delay(v), decay=delay(log_w), impl=impl, chunk_size=chunk_size)
  bonus = jnp.sum(r.astype(f32) * u.astype(f32) * k.astype(f32), axis=-1, keepdims=True) * v.astype(f32)
  return past.astype(f32) + bonus


def rwkv6_recurrence_cached(
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_w: jax.Array,
    u: jax.Array,
    state: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 32,
) -> tuple[jax.Array, jax.Array]:
  """`rwkv6_recurrence` continued from state [B, H, K, V] fp32, the S after the previous token.

  Returns (o [B, T, H, V] fp32, S after the last of the T tokens).
  """
  t = r.shape[1]
  if t == 1:
    r1, k1, v1, w1 = r[:, 0], k[:, 0], v[:, 0], log_w[:, 0]
    # r^T (S + (u * k) v^T) is the output with its bonus term; the state step itself has no bonus.
    o, _ = linear_attention_step(r1, k1 * u.astype(k1.dtype), v1, state)
    _, state = linear_attention_step(r1, k1, v1, state, decay=w1)
    return o.astype(f32)[:, None], state
  delay = lambda x: jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
  # As in rwkv6_recurrence; the scan then ends at S_{T-1}, and one more update folds in the last token.
  past, state = linear_attention(r, delay(k), delay(v), decay=delay(log_w), initial_state=state,
                                 return_final_state=True, impl=impl, chunk_size=min(chunk_size, t))
  last_kv = k[:, -1].astype(f32)[..., :, None] * v[:, -1].astype(f32)[..., None, :]
  state = jnp.exp(log_w[:, -1].astype(f32))[..., None] * state + last_kv
  bonus = jnp.sum(r.astype(f32) * u.astype(f32) * k.astype(f32), axis=-1, keepdims=True) * v.astype(f32)
  return past.astype(f32) + bonus, state


class RWKVState(NamedTuple):
  """Decoding cache, constant in size: the time-mixing state [B, H, D, D] fp32 and the last inputs of time
  and channel mixing [B, C] fp32 (their token shift)."""

  state: jax.Array
  time_shift: jax.Array
  channel_shift: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


def _channel_fraction(width: int) -> jax.Array:
  return jnp.arange(width, dtype=f32) / width


def _param(value: jax.Array, param_dtype: Any) -> nnx.Param:
  # A copy: two parameters built from one array (mix_k and mix_r) must not share a buffer, or a training step
  # that donates its parameters fails ("Attempt to donate the same buffer twice").
  return nnx.Param(jnp.array(value, param_dtype, copy=True))


def _low_rank_init(rngs: nnx.Rngs, shape: tuple[int, ...], param_dtype: Any) -> nnx.Param:
  """RWKV-6's second low-rank factors: small uniform values (the first factors start at zero)."""
  return nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype, -0.01, 0.01))


class TimeMix(nnx.Module):
  """RWKV-6 time mixing: x [B, T, C] -> [B, T, C]."""

  def __init__(self, config: RWKVConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.num_heads = config.num_heads
    self.head_dim = width // config.num_heads
    fraction = _channel_fraction(width)
    shift_keep = 1.0 - fraction**_RATIO_1_TO_ALMOST0
    receptance_keep = 1.0 - fraction ** (0.5 * _RATIO_1_TO_ALMOST0)
    # Static interpolation weights (towards x_t) for the ddlerp input, then for w, k, v, r, g.
    self.mix_x = _param(shift_keep, param_dtype)
    self.mix = _param(
        jnp.stack([shift_keep, shift_keep, shift_keep - 0.3 * _RATIO_0_TO_1, receptance_keep, receptance_keep]),
        param_dtype,
    )
    self.mix_down = _param(jnp.zeros((width, _MIXED_INPUTS * config.mix_rank)), param_dtype)
    self.mix_up = _low_rank_init(rngs, (_MIXED_INPUTS, config.mix_rank, width), param_dtype)
    # log(-log w) before the data-dependent part: channels spread from slow (-6) to fast (-1) decay.
    position = jnp.arange(width, dtype=f32) / max(width - 1, 1)
    self.decay = _param(-6.0 + 5.0 * position ** (0.7 + 1.3 * _RATIO_0_TO_1), param_dtype)
    self.decay_down = _param(jnp.zeros((width, config.decay_rank)), param_dtype)
    self.decay_up = _low_rank_init(rngs, (config.decay_rank, width), param_dtype)
    bonus = _RATIO_0_TO_1 * (1.0 - position) + ((jnp.arange(width) + 1) % 3 - 1) * 0.1
    self.bonus = _param(bonus.reshape(self.num_heads, self.head_dim), param_dtype)
    linear = lambda: nnx.Linear(width, width, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.receptance, self.key, self.value, self.gate, self.output = (linear() for _ in range(5))
    self.norm_scale = _param(jnp.ones((width,)), param_dtype)
    self.norm_bias = _param(jnp.zeros((width,)), param_dtype)

  def _head_norm(self, y: jax.Array) -> jax.Array:
    """Group norm with one group per head, per token (so it mixes no positions): fp32 [B, T, H, D] -> [B, T, C]."""
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + _HEAD_NORM_EPS)).reshape(*y.shape[:2], -1)
    return y * self.norm_scale[...].astype(f32) + self.norm_bias[...].astype(f32)

  def __call__(self, x: jax.Array, mask: jax.Array | None, carry: tuple[jax.Array, jax.Array] | None = None):
    """x [B, T, C] -> [B, T, C]; with carry = (state [B, H, D, D], previous input [B, C]) when decoding,
    (y, the state after the last token)."""
    b, t, c = x.shape
    x = x.astype(self.dtype)
    delta = token_shift(x, None if carry is None else carry[1]) - x
    # ddlerp: the interpolation weights between x_t and x_{t-1} depend on the data through a low-rank map.
    probe = x + delta * self.mix_x[...].astype(self.dtype)
    low = jnp.tanh(probe @ self.mix_down[...].astype(self.dtype)).reshape(b, t, _MIXED_INPUTS, -1)
    dynamic = jnp.einsum("btir,irc->btic", low, self.mix_up[...].astype(self.dtype))
    mixed = x[:, :, None] + delta[:, :, None] * (self.mix[...].astype(self.dtype) + dynamic)
    x_w, x_k, x_v, x_r, x_g = (mixed[:, :, i] for i in range(_MIXED_INPUTS))

    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    r, k, v = heads(self.receptance(x_r)), heads(self.key(x_k)), heads(self.value(x_v))
    gate = jax.nn.silu(self.gate(x_g))
    decay_logit = self.decay[...].astype(f32) + (
        jnp.tanh(x_w @ self.decay_down[...].astype(self.dtype)) @ self.decay_up[...].astype(self.dtype)
    ).astype(f32)
    log_w = heads(-jnp.exp(decay_logit))
    if mask is not None:
      # A padded step adds nothing to the state and does not decay it: it is skipped.
      keep = mask[:, :, None, None]
      k = jnp.where(keep, k, 0)
      log_w = jnp.where(keep, log_w, 0.0)

    if carry is None:
      y = rwkv6_recurrence(r, k, v, log_w, self.bonus[...], impl=self.config.impl,
                           chunk_size=self.config.chunk_size)
    else:
      y, state = rwkv6_recurrence_cached(r, k, v, log_w, self.bonus[...], carry[0], impl=self.config.impl,
                                         chunk_size=self.config.chunk_size)
    out = self.output((self._head_norm(y) * gate.astype(f32)).astype(self.dtype))
    return out if carry is None else (out, state)


class ChannelMix(nnx.Module):
  """RWKV-6 channel mixing: sigmoid(R x_r) * V relu(K x_k)^2 with token-shifted x_r, x_k; [B, T, C] -> [B, T, C]."""

  def __init__(self, config: RWKVConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dtype = dtype
    hidden = max(1, int(width * config.ffn_multiplier))
    keep = 1.0 - _channel_fraction(width) ** _RATIO_1_TO_ALMOST0
    self.mix_k = _param(keep, param_dtype)
    self.mix_r = _param(keep, param_dtype)
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.key, self.value, self.receptance = dense(width, hidden), dense(hidden, width), dense(width, width)

  def __call__(self, x: jax.Array, previous: jax.Array | None = None) -> jax.Array:
    """previous [B, C]: the input before x when decoding (zeros at the sequence start otherwise)."""
    x = x.astype(self.dtype)
    delta = token_shift(x, previous) - x
    x_k = x + delta * self.mix_k[...].astype(self.dtype)
    x_r = x + delta * self.mix_r[...].astype(self.dtype)
    return jax.nn.sigmoid(self.receptance(x_r)) * self.value(jnp.square(jax.nn.relu(self.key(x_k))))


@register(RWKVConfig)
class RWKV(nnx.Module):
  """RWKV-6 block minus its outer residual: h = time_mix(u), returns h + channel_mix(LN(u + h))."""

  def __init__(self, config: RWKVConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.time_mix = TimeMix(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(width, dtype=f32, param_dtype=param_dtype, rngs=rngs)
    self.channel_mix = ChannelMix(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, cache: RWKVState | None = None):
    """x [B, T, C] -> [B, T, C]; with a cache, (y, the cache advanced by T)."""
    mask = check_padding_mask(mask, x)
    if cache is not None:
      check_no_mask_with_cache(mask)
      h, state = self.time_mix(x, None, carry=(cache.state, cache.time_shift))
      between = self.norm(x.astype(f32) + h.astype(f32))
      y = h + self.channel_mix(between, previous=cache.channel_shift)
      return y, RWKVState(state, x[:, -1].astype(f32), between[:, -1].astype(f32), cache.index + x.shape[1])
    if mask is not None:
      # Token shift reads x_{t-1}: a padded neighbour must look like the zero before the sequence start.
      x = jnp.where(mask[..., None], x, 0)
    h = self.time_mix(x, mask)
    between = self.norm(x.astype(f32) + h.astype(f32))
    if mask is not None:
      between = jnp.where(mask[..., None], between, 0)
    return h + self.channel_mix(between)

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> RWKVState:
    """Constant-size state (max_len only bounds the positions); dtype is unused, every part is fp32."""
    check_decodable(self.config, max_len)
    heads, head_dim = self.time_mix.num_heads, self.time_mix.head_dim
    width = heads * head_dim
    return RWKVState(jnp.zeros((batch, heads, head_dim, head_dim), f32), jnp.zeros((batch, width), f32),
                     jnp.zeros((batch, width), f32), zero_index())
