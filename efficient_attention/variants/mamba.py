"""Mamba (Gu & Dao 2023): a gated, input-dependent (selective) state-space mixer.

x [B, T, C] -> in-projection to x' and gate z [B, T, E] (E = expand * C) -> causal depthwise conv + SiLU
-> per-token delta [B, T, E], B_t/C_t [B, T, N] from x' -> selective scan with A = -exp(A_log) [E, N]
and skip D -> times silu(z) -> out-projection to [B, T, C].

Bidirectional (causal=False, for encoders), as in Vision Mamba and Caduceus: a second branch with its own
convolution, projections, A and D scans the reversed sequence; the two gated outputs are summed before the
shared out-projection. A causal model (what language modelling and decoding need) has the forward branch only.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import check_decodable, zero_index
from efficient_attention.config import MixerConfig
from efficient_attention.layers import check_no_mask_with_cache, check_padding_mask
from efficient_attention.parallel import sequence_selective_scan
from efficient_attention.registry import register
from efficient_attention.validation import check_choice, check_positive
from kernels.selective_scan import selective_scan, selective_scan_step
from kernels.selective_scan.api import IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig(MixerConfig):
  variant = "mamba"
  # State size N per channel.
  d_state: int = 16
  # Kernel width of the causal depthwise convolution before the scan.
  d_conv: int = 4
  # Inner width E = expand * C.
  expand: int = 2
  # Rank of the low-rank delta projection: "auto" = ceil(C / 16), or a positive int.
  dt_rank: int | str = "auto"
  # Initial step sizes delta are sampled log-uniformly in [dt_min, dt_max].
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  # Selective-scan implementation (kernels.selective_scan): "xla" (the jnp reference), "pallas" (fused
  # kernels; interpret mode off GPU) or "auto" (Pallas on GPU, the reference elsewhere).
  impl: str = "auto"
  # Bias on the depthwise convolution.
  conv_bias: bool = True
  # Bias on the in- and out-projections.
  use_bias: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_positive("d_state", self.d_state)
    check_positive("d_conv", self.d_conv)
    check_positive("expand", self.expand)
    if isinstance(self.dt_rank, str):
      check_choice("dt_rank", self.dt_rank, ("auto",))
    elif isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 1:
      raise ValueError(f"dt_rank={self.dt_rank!r} is not valid; use 'auto' (ceil(width / 16)) or a positive int")
    check_positive("dt_min", self.dt_min)
    check_positive("dt_max", self.dt_max)
    if self.dt_min > self.dt_max:
      raise ValueError(f"dt_min={self.dt_min} is not valid; it must be <= dt_max={self.dt_max}")
    check_choice("impl", self.impl, IMPLEMENTATIONS)

  def dt_rank_for(self, width: int) -> int:
    return math.ceil(width / 16) if self.dt_rank == "auto" else self.dt_rank


def _uniform(bound: float):
  """Initializer drawing from U(-bound, bound)."""

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def _dt_bias_init(dt_min: float, dt_max: float):
  """Initializer for the delta bias: softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""

  def init(key, shape, dtype):
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max)))
    # Inverse of softplus: softplus(dt + log(1 - exp(-dt))) = dt.
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


class CausalDepthwiseConv(nnx.Module):
  """y_t = bias + sum_k w_k * x_{t - K + 1 + k} per channel; x, y [B, T, E], kernel w [K, E]."""

  def __init__(self, features: int, kernel_size: int, *, use_bias: bool, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    # PyTorch's Conv1d default, as in Mamba: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = K for depthwise.
    init = _uniform(1.0 / math.sqrt(kernel_size))
    self.kernel_size = kernel_size
    self.dtype = dtype
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, features), param_dtype))
    self.bias = nnx.Param(init(rngs.params(), (features,), param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array, previous: jax.Array | None = None) -> jax.Array:
    """previous [B, K - 1, E]: the inputs before x when decoding; zeros (the sequence start) otherwise."""
    t = x.shape[1]
    if previous is None:
      # Left zero padding: the first tokens see zeros, never later tokens.
      padded = jnp.pad(x.astype(self.dtype), [(0, 0), (self.kernel_size - 1, 0), (0, 0)])
    else:
      padded = jnp.concatenate([previous.astype(self.dtype), x.astype(self.dtype)], axis=1)
    kernel = self.kernel[...].astype(self.dtype)
    y = sum(padded[:, k : k + t] * kernel[k] for k in range(self.kernel_size))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _init_scan_branch(module: nnx.Module, config: MambaConfig, inner: int, dt_rank: int, *, dtype, param_dtype,
                      rngs: nnx.Rngs) -> None:
  """Gives `module` the parameters of one scan direction: conv, x_proj, dt_proj, dt_bias, A_log, D."""
  n = config.d_state
  module.conv = CausalDepthwiseConv(
      inner, config.d_conv, use_bias=config.conv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
  )
  module.x_proj = nnx.Linear(inner, dt_rank + 2 * n, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  # Mamba scales the delta projection so that its output starts with unit-order variance.
  module.dt_proj = nnx.Linear(dt_rank, inner, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                              kernel_init=_uniform(dt_rank**-0.5))
  # Kept apart from dt_proj so the bias is added in fp32, right before the softplus.
  module.dt_bias = nnx.Param(_dt_bias_init(config.dt_min, config.dt_max)(rngs.params(), (inner,), param_dtype))
  # S4D-real initialisation: A = -(1, 2, ..., N) for every channel, stored as log(-A).
  a_log = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))
  module.A_log = nnx.Param(jnp.broadcast_to(a_log, (inner, n)).astype(param_dtype))
  module.D = nnx.Param(jnp.ones((inner,), param_dtype))


def _scan_inputs(branch: nnx.Module, config: MambaConfig, dt_rank: int, xs: jax.Array,
                 previous: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """conv + SiLU, then the scan's inputs: (x [B, T, E], delta [B, T, E] fp32, A [E, N] fp32, B, C [B, T, N]).
  previous: the convolution's cached inputs when decoding."""
  n = config.d_state
  xs = jax.nn.silu(branch.conv(xs, previous=previous))
  dt, b, c = jnp.split(branch.x_proj(xs), [dt_rank, dt_rank + n], axis=-1)
  delta = jax.nn.softplus(branch.dt_proj(dt).astype(jnp.float32) + branch.dt_bias[...].astype(jnp.float32))
  return xs, delta, -jnp.exp(branch.A_log[...].astype(jnp.float32)), b, c


def _scan_branch(branch: nnx.Module, config: MambaConfig, dt_rank: int, xs: jax.Array, z: jax.Array,
                 mask: jax.Array | None) -> jax.Array:
  """One direction: conv + SiLU, delta/B/C, the selective scan gated by silu(z). xs, z [B, T, E] -> [B, T, E]."""
  xs, delta, a, b, c = _scan_inputs(branch, config, dt_rank, xs)
  if mask is not None:
    # delta = 0 makes a token the identity update (exp(0 A) = 1, 0 B x = 0): the state passes
    # through padding unchanged, whether it is on the left, right or in between.
    delta = jnp.where(mask[..., None], delta, 0.0)
  # Split over the sequence axis when a sequence-parallel mesh is active (efficient_attention.parallel).
  return sequence_selective_scan(xs, delta, a, b, c, D=branch.D[...], z=z, dt_softplus=False, impl=config.impl)


class MambaBackwardBranch(nnx.Module):
  """The parameters of a bidirectional Mamba's reversed-sequence scan (the same set as the forward one's)."""

  def __init__(self, config: MambaConfig, inner: int, dt_rank: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    _init_scan_branch(self, config, inner, dt_rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class MambaState(NamedTuple):
  """Decoding cache, constant in size: the convolution's last K - 1 inputs [B, K - 1, E] and the scan state
  [B, E, N] fp32."""

  conv: jax.Array
  ssm: jax.Array
  index: jax.Array  # int32 [], tokens seen so far


@register(MambaConfig)
class Mamba(nnx.Module):
  """Mamba-1 mixer: y = out_proj(selective_scan(silu(conv(x')), delta, A, B, C, D) * silu(z))."""

  def __init__(self, config: MambaConfig, width: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.inner = config.expand * width
    self.dt_rank = config.dt_rank_for(width)
    linear = lambda fan_in, fan_out, use_bias, **init: nnx.Linear(
        fan_in, fan_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **init
    )
    self.in_proj = linear(width, 2 * self.inner, config.use_bias)
    _init_scan_branch(self, config, self.inner, self.dt_rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The reversed-sequence branch of a bidirectional mixer (module docstring).
    self.backward = None if config.causal else MambaBackwardBranch(
        config, self.inner, self.dt_rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out_proj = linear(self.inner, width, config.use_bias)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, cache: MambaState | None = None):
    """x [B, T, C], mask bool [B, T] (True at real tokens) -> [B, T, C]; with a cache, (y, the cache advanced
    by T)."""
    mask = check_padding_mask(mask, x)
    if cache is not None:
      check_no_mask_with_cache(mask)
      return self._decode(x, cache)
    xs, z = jnp.split(self.in_proj(x), 2, axis=-1)  # [B, T, E] each
    if mask is not None:
      # Padded tokens enter the convolution as zeros, exactly like the zeros before the first token.
      xs = jnp.where(mask[..., None], xs, 0)
    y = _scan_branch(self, self.config, self.dt_rank, xs, z, mask)
    if self.backward is not None:
      # The reversed sequence through the second branch, flipped back: position t sees positions >= t. Padding
      # (wherever it is) stays an identity update, so leading pads of the reversed sequence change nothing.
      flip = lambda a: None if a is None else jnp.flip(a, axis=1)
      y = y + flip(_scan_branch(self.backward, self.config, self.dt_rank, flip(xs), flip(z), flip(mask)))
    return self.out_proj(y)

  def init_cache(self, batch: int, max_len: int, *, dtype=jnp.float32) -> MambaState:
    """Constant-size state; max_len only bounds the positions."""
    check_decodable(self.config, max_len)
    return MambaState(jnp.zeros((batch, self.config.d_conv - 1, self.inner), dtype),
                      jnp.zeros((batch, self.inner, self.config.d_state), jnp.float32), zero_index())

  def _decode(self, x: jax.Array, cache: MambaState) -> tuple[jax.Array, MambaState]:
    """The forward pass continued from cache: the convolution sees the cached inputs, the scan its state."""
    t = x.shape[1]
    xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
    conv_state = jnp.concatenate([cache.conv, xs.astype(cache.conv.dtype)], axis=1)[:, t:]
    xs, delta, a, b, c = _scan_inputs(self, self.config, self.dt_rank, xs, previous=cache.conv)
    if t == 1:
      y, ssm = selective_scan_step(xs[:, 0], delta[:, 0], a, b[:, 0], c[:, 0], cache.ssm, D=self.D[...], z=z[:, 0],
                                   dt_softplus=False)
      y = y[:, None]
    else:
      y, ssm = selective_scan(xs, delta, a, b, c, D=self.D[...], z=z, dt_softplus=False, initial_state=cache.ssm,
                              return_final_state=True, impl=self.config.impl)
    return self.out_proj(y), MambaState(conv_state, ssm, cache.index + t)
