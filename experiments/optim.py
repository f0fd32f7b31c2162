"""Learning-rate schedules and the AdamW optimizer with gradient clipping."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_attention.validation import check_choice

SCHEDULES = ("cosine", "rsqrt", "constant")


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
  """step -> learning rate.

  cosine: linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * end_lr_ratio`
    at `num_steps`.
  rsqrt: LRA's "constant * linear_warmup * rsqrt_decay": learning_rate * min(1, step / warmup) /
    sqrt(max(step, warmup)), so the peak is learning_rate / sqrt(warmup) (0.05 -> 1.6e-3 for warmup 1000).
  constant: linear warmup, then `learning_rate`.
  """
  kind = train["schedule"]
  check_choice("schedule", kind, SCHEDULES)
  peak, warmup, steps = train["learning_rate"], train["warmup_steps"], train["num_steps"]
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=peak * train["end_lr_ratio"]
    )
  if kind == "constant":
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])

  def rsqrt(step):
    step = jnp.asarray(step, jnp.float32)
    return peak * jnp.minimum(1.0, step / max(warmup, 1)) / jnp.sqrt(jnp.maximum(step, max(warmup, 1)))

  return rsqrt


def _decay_mask(params):
  # Decoupled weight decay on matrices (kernels, embeddings) only: decaying norm scales and biases
  # pulls them toward 0, which no paper here intends.
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(model: nnx.Module, train: Mapping[str, Any]) -> tuple[nnx.Optimizer, optax.Schedule]:
  """AdamW on the model's nnx.Params, after clipping the global gradient norm (when grad_clip_norm > 0)."""
  schedule = learning_rate_schedule(train)
  adamw = optax.adamw(
      schedule, b1=train["b1"], b2=train["b2"], eps=train["eps"], weight_decay=train["weight_decay"], mask=_decay_mask
  )
  clip = train["grad_clip_norm"]
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  return nnx.Optimizer(model, tx, wrt=nnx.Param), schedule
