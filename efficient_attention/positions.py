"""Absolute position encodings added to token embeddings ("rope" lives in the attention mixers)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

POSITION_KINDS = ("rope", "learned", "sinusoidal", "none")


def sinusoidal_table(length: int, width: int) -> np.ndarray:
  """The fixed [T, C] table of Vaswani et al.: sin on even channels, cos on odd ones."""
  positions = np.arange(length)[:, None]
  inv_freq = np.exp(-np.log(10_000.0) * np.arange(0, width, 2) / width)
  table = np.zeros((length, width), np.float32)
  table[:, 0::2] = np.sin(positions * inv_freq)
  table[:, 1::2] = np.cos(positions * inv_freq[: width // 2])
  return table


class LearnedPositions(nnx.Module):
  """A trainable [max_len, C] table; sequences longer than max_len are rejected."""

  def __init__(self, max_len: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.max_len = max_len
    self.table = nnx.Embed(
        max_len, width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
    )

  def __call__(self, t: int) -> jax.Array:
    return self.table(jnp.arange(t))

  def at(self, start: jax.Array, t: int, max_len: int) -> jax.Array:
    """Rows start .. start + t - 1 [t, C] (decoding; the caller keeps them below max_len <= self.max_len)."""
    del max_len
    return self.table(start + jnp.arange(t))


class SinusoidalPositions(nnx.Module):
  """The fixed sinusoidal table, computed for any length at trace time (no max length)."""

  def __init__(self, width: int, *, dtype):
    self.width = width
    self.dtype = dtype

  def __call__(self, t: int) -> jax.Array:
    return jnp.asarray(sinusoidal_table(t, self.width), self.dtype)

  def at(self, start: jax.Array, t: int, max_len: int) -> jax.Array:
    """Rows start .. start + t - 1 [t, C] of the table, for a traced start below max_len (decoding)."""
    # The same host-computed table as __call__, so decoding sees bit-identical position vectors.
    table = jnp.asarray(sinusoidal_table(max_len, self.width), self.dtype)
    return jax.lax.dynamic_slice_in_dim(table, start, t)
