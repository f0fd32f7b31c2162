"""Token-by-token generation with a `Decoder` (head="lm", causal=True): prefill, decoding steps, sampling.

    cache = model.init_cache(batch, max_len)
    logits, cache = prefill(model, prompt, cache)          # the prompt [B, P] in one parallel pass
    logits, cache = decode_step(model, next_token, cache)  # then one token [B] at a time

or all at once, `generate(model, prompt, max_new_tokens=32, temperature=0.8, top_k=40, rng=key)`. Every
function is jitted once per model structure and shape; the cache is a fixed-size pytree (see
efficient_attention/cache.py), so all decoding steps share one compiled program. The model runs in evaluation
mode (no dropout, no Performer feature redraws) whatever mode it is in.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention.cache import DecoderCache
from efficient_attention.decoder import Decoder


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int | None = None) -> jax.Array:
  """Next tokens int32 [B] from logits [B, vocab]: greedy (temperature 0) or softmax(logits / temperature)
  restricted to the top_k most likely tokens (None: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, rng: jax.Array | None, vocab_size: int) -> None:
  if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
    raise ValueError(f"temperature={temperature!r} is not valid; it must be a number >= 0 (0 is greedy)")
  if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k={top_k!r} is not valid; it must be None or an int in [1, vocab_size={vocab_size}]")
  if temperature > 0 and rng is None:
    raise ValueError("rng=None is not valid with temperature > 0; pass a jax.random key to sample with")


def _eval_split(model: Decoder):
  if not isinstance(model, Decoder):
    raise ValueError(f"model={type(model).__name__} is not valid; generation needs an efficient_attention.Decoder")
  return nnx.split(nnx.view(model, deterministic=True))


def _forward_fn(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state)(tokens, cache=cache)


_forward = jax.jit(_forward_fn, static_argnums=0)
# Decoding steps donate the cache, so its update is in place rather than a copy of every buffer per token.
_forward_donating = jax.jit(_forward_fn, static_argnums=0, donate_argnums=3)


def _check_room(cache: DecoderCache, tokens: int) -> None:
  """Positions past max_len would silently overwrite (clamped) cache slots; refuse them when index is concrete."""
  try:
    index = int(cache.index)
  except jax.errors.ConcretizationTypeError:
    return
  if index + tokens > cache.max_len:
    raise ValueError(f"{tokens} more tokens at index {index} exceed the cache's max_len={cache.max_len}; "
                     "make the cache with a larger max_len")


def prefill(model: Decoder, tokens: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
  """tokens [B, T] at positions cache.index .. + T - 1 in one parallel pass -> (fp32 logits [B, T, vocab], cache)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens.shape={tokens.shape} is not valid; expected [B, T]")
  _check_room(cache, tokens.shape[1])
  graphdef, state = _eval_split(model)
  return _forward(graphdef, state, tokens, cache)


def decode_step(model: Decoder, tokens: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
  """One token per sequence, tokens int [B] -> (fp32 logits [B, vocab] for the next one, cache advanced by 1).

  The cache passed in is donated (its buffers are reused for the new one): keep only the returned cache.
  """
  if tokens.ndim != 1:
    raise ValueError(f"tokens.shape={tokens.shape} is not valid; expected [B]")
  _check_room(cache, 1)
  graphdef, state = _eval_split(model)
  logits, cache = _forward_donating(graphdef, state, tokens[:, None], cache)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, cache, max_new_tokens, temperature, top_k, rng):
  model = nnx.merge(graphdef, state)
  keys = jax.random.split(rng, max_new_tokens)
  logits, cache = model(prompt, cache=cache)
  first = sample_logits(logits[:, -1], keys[0], temperature=temperature, top_k=top_k)

  def step(carry, key):
    token, cache = carry
    logits, cache = model(token[:, None], cache=cache)
    return (sample_logits(logits[:, 0], key, temperature=temperature, top_k=top_k), cache), token

  (last, _), tokens = jax.lax.scan(step, (first, cache), keys[1:])
  return jnp.concatenate([prompt.astype(jnp.int32), tokens.T, last[:, None]], axis=1)


def generate(
    model: Decoder,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    max_len: int | None = None,
) -> jax.Array:
  """Continues every prompt row by max_new_tokens tokens: prompt int [B, P] -> int32 [B, P + max_new_tokens].

  One jitted program: prefill of the prompt, then a scan of decoding steps, each sampling its next token
  (greedy at temperature 0, else temperature / top-k sampling with rng). max_len sizes the cache (default
  P + max_new_tokens rounded up to a multiple of 128, which the GPU decode kernel reads without a padded copy).
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt.shape={prompt.shape} is not valid; expected [B, P] with P >= 1")
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} is not valid; it must be a positive int")
  _check_sampling(temperature, top_k, rng, model.config.vocab_size)
  needed = prompt.shape[1] + max_new_tokens
  if max_len is None:
    max_len = -(-needed // 128) * 128
    if model.config.position == "learned":
      max_len = max(needed, min(max_len, model.config.max_len))
  if max_len < needed:
    raise ValueError(f"max_len={max_len} is not valid; the prompt plus max_new_tokens need {needed} positions")
  cache = model.init_cache(prompt.shape[0], max_len)
  graphdef, state = _eval_split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, prompt, cache, max_new_tokens, float(temperature), top_k, rng)
