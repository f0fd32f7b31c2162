"""Position-wise feed-forward blocks."""

from typing import Any

import jax
from flax import nnx

MLP_KINDS = ("gelu", "swiglu")


class MLP(nnx.Module):
  """x [B, T, C] -> [B, T, C]: GELU MLP, or SwiGLU (Shazeer 2020) with the same parameter count (2/3 hidden)."""

  def __init__(self, width: int, hidden: int, kind: str, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.kind = kind
    if kind == "swiglu":
      hidden = max(1, 2 * hidden // 3)
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = linear(width, hidden)
    self.gate = linear(width, hidden) if kind == "swiglu" else None
    self.down = linear(hidden, width)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.up(x)
    h = jax.nn.silu(self.gate(x)) * h if self.kind == "swiglu" else jax.nn.gelu(h)
    return self.down(h)
