"""The configurable decoder: embeddings, N pre-norm blocks of (mixer + MLP), and an LM or classifier head."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import DecoderCache, zero_index
from efficient_attention.layers import check_no_mask_with_cache
from efficient_attention.mlp import MLP, MLP_KINDS
from efficient_attention.positions import POSITION_KINDS, LearnedPositions, SinusoidalPositions
from efficient_attention.registry import build_mixer, make_config, variant_names
from efficient_attention.validation import check_at_least, check_choice, check_positive

HEAD_KINDS = ("lm", "classifier")
POOLING_KINDS = ("mean", "first", "last")
NORM_KINDS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")


def _freeze_options(options: Mapping[str, Mapping[str, Any]] | tuple) -> tuple:
  """{variant: {field: value}} -> a sorted tuple of pairs, so the config stays hashable (nnx static data)."""
  if isinstance(options, tuple):
    return options
  return tuple(sorted((name, tuple(sorted(dict(fields).items()))) for name, fields in options.items()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Everything needed to build a `Decoder`."""

  # Token vocabulary size (embedding rows; LM head outputs).
  vocab_size: int
  # Model width C.
  width: int = 128
  # Number of residual blocks.
  num_layers: int = 2
  # Attention heads (and kv heads: None = MHA, 1 = MQA) passed to every mixer that has heads.
  num_heads: int = 4
  num_kv_heads: int | None = None
  # Sequence mixer of every layer, a registry name (see `variant_names()`).
  variant: str = "full"
  # Hybrids: comma-separated variant names, e.g. "mamba,mamba,full"; tiled to num_layers (whose multiple it must
  # divide). Overrides `variant` when set.
  layer_pattern: str = ""
  # Per-variant config fields, e.g. {"performer": {"num_features": 128}}; override the shared settings above.
  mixer_options: Mapping[str, Mapping[str, Any]] | tuple = ()
  # True: causal LM/decoder; False: bidirectional encoder (classification).
  causal: bool = True
  # Position information: rotary in the attention mixers, a learned or sinusoidal table added to embeddings, or none.
  position: str = "rope"
  # Longest sequence: the learned position table size and the bound for fixed-length mixers (linformer).
  max_len: int = 2048
  # Feed-forward block kind and hidden size as a multiple of width.
  mlp: str = "gelu"
  mlp_ratio: float = 4.0
  norm: str = "layernorm"
  # Dropout on embeddings and on each residual branch (active in nnx train mode only).
  dropout_rate: float = 0.0
  # "lm": logits [B, T, vocab]; "classifier": pooled logits [B, num_classes].
  head: str = "lm"
  num_classes: int = 0
  # How the classifier pools the sequence: mean over real tokens, the first token (CLS), or the last real token.
  pooling: str = "mean"
  # LM head shares the token embedding matrix.
  tie_embeddings: bool = True
  # Parameters are stored in param_dtype; activations are computed in dtype (fp32 params + bf16 compute works).
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Base seed for per-layer fixed randomness inside mixers (BigBird random blocks); layer i gets seed + i.
  seed: int = 0
  # Gradient checkpointing: each block keeps only its input for the backward and recomputes the rest, so training
  # memory per layer falls from the block's activations (MLP hidden, attention residuals, ...) to one [B, T, C]
  # tensor, for one extra forward pass.
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "mixer_options", _freeze_options(self.mixer_options))
    check_positive("vocab_size", self.vocab_size)
    check_positive("width", self.width)
    check_positive("num_layers", self.num_layers)
    check_positive("max_len", self.max_len)
    check_choice("position", self.position, POSITION_KINDS)
    check_choice("mlp", self.mlp, MLP_KINDS)
    check_positive("mlp_ratio", self.mlp_ratio)
    check_choice("norm", self.norm, NORM_KINDS)
    check_choice("head", self.head, HEAD_KINDS)
    check_choice("pooling", self.pooling, POOLING_KINDS)
    check_choice("dtype", self.dtype, DTYPES)
    check_choice("param_dtype", self.param_dtype, DTYPES)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate!r} is not valid; it must be in [0, 1)")
    if self.head == "classifier":
      check_at_least("num_classes", self.num_classes, 2)
    if self.position == "sinusoidal" and self.width % 2:
      raise ValueError(f"width={self.width} is not valid with position='sinusoidal'; it must be even")
    pattern = self.layer_variants
    names = variant_names()
    for name in set(pattern) | {name for name, _ in self.mixer_options}:
      check_choice("variant", name, names)
    # Building every layer's mixer config validates heads, windows, directions, ... up front.
    for name in set(pattern):
      self.mixer_config(name)

  @property
  def layer_variants(self) -> tuple[str, ...]:
    """The variant of each layer."""
    if not self.layer_pattern:
      return (self.variant,) * self.num_layers
    pattern = tuple(name.strip() for name in self.layer_pattern.split(","))
    if self.num_layers % len(pattern):
      raise ValueError(
          f"layer_pattern={self.layer_pattern!r} has {len(pattern)} entries, which must divide "
          f"num_layers={self.num_layers}"
      )
    return pattern * (self.num_layers // len(pattern))

  def mixer_config(self, name: str, layer: int = 0):
    shared = dict(
        causal=self.causal,
        num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads,
        rotary=self.position == "rope",
        max_len=self.max_len,
        seed=self.seed + layer,
    )
    shared.update(dict(dict(self.mixer_options).get(name, ())))
    return make_config(name, **shared)


def _norm(config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
  cls = nnx.RMSNorm if config.norm == "rmsnorm" else nnx.LayerNorm
  return cls(config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Block(nnx.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x)), with residual dropout."""

  def __init__(self, config: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.mixer_norm = _norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mixer = build_mixer(
        config.mixer_config(config.layer_variants[layer], layer), config.width,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.mlp_norm = _norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(
        config.width, int(config.mlp_ratio * config.width), config.mlp,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, cache: Any = None):
    """x [B, T, C] -> [B, T, C]; with the mixer's cache, (x, the cache advanced by T)."""
    if cache is not None:
      y, cache = self.mixer(self.mixer_norm(x), cache=cache)
      x = x + self.dropout(y)
      return x + self.dropout(self.mlp(self.mlp_norm(x))), cache
    x = x + self.dropout(self.mixer(self.mixer_norm(x), mask=mask))
    return x + self.dropout(self.mlp(self.mlp_norm(x)))


@jax.custom_vjp
def _gradient_fence(x, params):
  """Identity on (x, params) whose backward releases the gradient for x (to the block below) only together with
  the block's parameter gradients, through an optimization barrier.

  Without it XLA may compute a block's weight gradients (dW = x^T dy) whenever it likes before their use, and
  under a mesh that use is the all-reduce over devices at the very end of the step: on two H200s (ring attention,
  4 layers, 73.7K tokens per device) the scheduler put every layer's weight-gradient matmuls there, keeping
  each layer's [T, 4C] MLP activations alive until then, 4.5 GiB of the step's 11.2 GiB. With the fence each
  block's activations are freed before the block below starts its backward, as on one device.
  """
  return x, params


def _gradient_fence_fwd(x, params):
  return (x, params), None


def _gradient_fence_bwd(_, cotangents):
  return jax.lax.optimization_barrier(cotangents)


_gradient_fence.defvjp(_gradient_fence_fwd, _gradient_fence_bwd)


def _call_block(block: Block, x: jax.Array, mask: jax.Array | None) -> jax.Array:
  x, params = _gradient_fence(x, nnx.state(block, nnx.Param))
  nnx.update(block, params)
  return block(x, mask)


class Decoder(nnx.Module):
  """tokens [B, T] int -> logits [B, T, vocab] (head="lm") or [B, num_classes] (head="classifier")."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = nnx.Embed(
        config.vocab_size, config.width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
    )
    if config.position == "learned":
      self.positions = LearnedPositions(config.max_len, config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    elif config.position == "sinusoidal":
      self.positions = SinusoidalPositions(config.width, dtype=dtype)
    else:
      self.positions = None
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = _norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.head == "classifier":
      self.head = nnx.Linear(config.width, config.num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    elif not config.tie_embeddings:
      self.head = nnx.Linear(config.width, config.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.head = None

  def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None, cache: DecoderCache | None = None):
    """tokens [B, T] int, mask bool [B, T] (True at real tokens) -> fp32 logits.

    With a cache (from `init_cache`; LM head only), the tokens sit at positions cache.index .. + T - 1 and the
    call returns (logits [B, T, vocab], the cache advanced by T): a prefill for T > 1, a decoding step for T = 1.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens.shape={tokens.shape} is not valid; expected [B, T]")
    if cache is not None:
      return self._decode(tokens, mask, cache)
    t = tokens.shape[1]
    if t > self.config.max_len and (self.config.position == "learned" or "linformer" in self.config.layer_variants):
      raise ValueError(f"sequence length T={t} exceeds max_len={self.config.max_len} of this model")
    if mask is not None and mask.shape != tokens.shape:
      raise ValueError(f"mask.shape={mask.shape} is not valid; expected tokens.shape={tokens.shape}")
    x = self.embed(tokens)
    if self.positions is not None:
      x = x + self.positions(t)[None]
    x = self.dropout(x)
    run_block = nnx.remat(_call_block) if self.config.remat else _call_block
    for block in self.blocks:
      x = run_block(block, x, mask)
    x = self.final_norm(x)
    if self.config.head == "classifier":
      return self.head(self._pool(x, mask)).astype(jnp.float32)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> DecoderCache:
    """An empty cache for `batch` sequences of up to max_len tokens (prompt plus generated ones).

    Each layer's mixer sizes its own part: a KV cache, a ring of the window, or a constant recurrent state.
    Raises ValueError for models that cannot generate (bidirectional, classifier head, non-causal mixers).
    """
    cfg = self.config
    if cfg.head != "lm":
      raise ValueError(f"head={cfg.head!r} is not valid for decoding; it needs head='lm'")
    if not cfg.causal:
      raise ValueError("causal=False is not valid for decoding; generation needs a causal decoder")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
      raise ValueError(f"max_len={max_len!r} is not valid; it must be a positive int")
    if cfg.position == "learned" and max_len > cfg.max_len:
      raise ValueError(f"max_len={max_len} is not valid; the learned position table has config.max_len="
                       f"{cfg.max_len} rows")
    layers = []
    for name, block in zip(cfg.layer_variants, self.blocks):
      if not hasattr(block.mixer, "init_cache"):
        raise ValueError(f"variant {name!r} cannot decode token by token (it has no cache)")
      layers.append(block.mixer.init_cache(batch, max_len, dtype=jnp.dtype(cfg.dtype)))
    return DecoderCache(tuple(layers), zero_index(), max_len)

  def _decode(self, tokens: jax.Array, mask: jax.Array | None, cache: DecoderCache):
    """The forward pass of tokens [B, T] at positions cache.index .. + T - 1 -> (fp32 logits, new cache)."""
    check_no_mask_with_cache(mask)
    t = tokens.shape[1]
    x = self.embed(tokens)
    if self.positions is not None:
      x = x + self.positions.at(cache.index, t, cache.max_len)[None]
    x = self.dropout(x)
    layers = []
    for block, layer_cache in zip(self.blocks, cache.layers):
      x, layer_cache = block(x, None, layer_cache)
      layers.append(layer_cache)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32), DecoderCache(tuple(layers), cache.index + t, cache.max_len)

  def _pool(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, T, C] -> [B, C] over real tokens."""
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    if self.config.pooling == "first":
      return x[:, 0]
    if self.config.pooling == "last":
      last = jnp.maximum(mask.sum(axis=1) - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    weights = mask.astype(jnp.float32)[..., None]
    pooled = (x.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    return pooled.astype(x.dtype)
