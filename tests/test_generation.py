"""Decoding with caches: prefill + token-by-token steps reproduce one full forward pass, caches keep their promised
sizes, and generation samples as asked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_attention import Decoder, DecoderConfig, build_mixer, make_config
from efficient_attention.cache import cache_bytes
from efficient_attention.generation import decode_step, generate, prefill, sample_logits
from tests.helpers import assert_close

VOCAB = 37
TOTAL = 11

# variant, its options, the position kind (every kind is covered by some variant), kv heads, prefill chunks.
# One layer each (CPU time); the hybrid case checks layering, RWKV and full attention with GQA. The sliding
# window's second prefill chunk starts after its ring has wrapped and is longer than the ring.
CAUSAL_CASES = [
    pytest.param("rwkv,full", {}, "rope", 2, (6,), id="hybrid-rwkv-full-gqa"),
    pytest.param("flash", {}, "learned", 1, (6,), id="flash-mqa-learned"),
    pytest.param("sliding_window", {"window": 3}, "sinusoidal", 2, (5, 4), id="sliding_window-ring"),
    pytest.param("linear", {}, "rope", 2, (6,), id="linear"),
    pytest.param("performer", {"num_features": 16}, "rope", 1, (6,), id="performer"),
    pytest.param("mamba", {}, "none", None, (6,), id="mamba"),
    pytest.param("longformer", {"window": 2, "dilation": (1, 1, 2, 3), "global_tokens": (0, 3)}, "rope", 2, (6,),
                 id="longformer-dilated-globals"),
    pytest.param("bigbird", {"block_size": 2, "num_random_blocks": 1}, "rope", 1, (6,), id="bigbird"),
    pytest.param("compressive", {"segment_length": 4, "memory_length": 4, "compressed_memory_length": 2,
                                 "compression_rate": 2}, "rope", None, (6,), id="compressive"),
]


def _model(variant, options=None, position="rope", kv_heads=None, num_layers=1, **kwargs) -> Decoder:
  config = DecoderConfig(
      vocab_size=VOCAB, width=32, num_layers=num_layers, num_heads=4, num_kv_heads=kv_heads, variant=variant,
      mixer_options={variant: options or {}}, position=position, max_len=32, **kwargs,
  )
  return Decoder(config, rngs=nnx.Rngs(0))


def _tokens(batch=2, length=TOTAL, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


@pytest.mark.parametrize("variant,options,position,kv_heads,chunks", CAUSAL_CASES)
def test_prefill_then_steps_match_the_full_forward_pass(variant, options, position, kv_heads, chunks):
  if "," in variant:
    model = Decoder(DecoderConfig(vocab_size=VOCAB, width=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                                  layer_pattern=variant, position=position, max_len=32), rngs=nnx.Rngs(0))
  else:
    model = _model(variant, options, position, kv_heads)
  tokens = _tokens()
  full = nnx.jit(lambda model, tokens: model(tokens))(model, tokens)
  cache = model.init_cache(2, 16)
  steps, done = [], 0
  for chunk in chunks:
    logits, cache = prefill(model, tokens[:, done:done + chunk], cache)
    steps.append(logits)
    done += chunk
  for i in range(done, TOTAL):
    logits, cache = decode_step(model, tokens[:, i], cache)
    steps.append(logits[:, None])
  assert int(cache.index) == TOTAL
  assert_close(jnp.concatenate(steps, axis=1), full, 1e-5, f"{variant} decoded logits")


def _kv_bytes(cache) -> int:
  return sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)


def test_gqa_and_mqa_caches_hold_only_the_kv_heads():
  sizes = {kv: _kv_bytes(_model("full", kv_heads=kv).init_cache(2, 64)) for kv in (4, 2, 1)}
  assert sizes[2] * 2 == sizes[4] and sizes[1] * 4 == sizes[4]
  mha = _model("full", kv_heads=4).init_cache(2, 64).layers[0]
  assert mha.k.shape == (2, 64, 4, 8)


@pytest.mark.parametrize("variant", ["linear", "performer", "rwkv", "mamba", "sliding_window", "compressive"])
def test_state_caches_do_not_grow_with_length(variant):
  model = _model(variant, {"window": 4} if variant == "sliding_window" else {})
  assert cache_bytes(model.init_cache(2, 16)) == cache_bytes(model.init_cache(2, 4096))


def test_kv_cache_grows_linearly_with_length():
  model = _model("full")
  assert _kv_bytes(model.init_cache(1, 2048)) == 2 * _kv_bytes(model.init_cache(1, 1024))


def test_greedy_generation_picks_the_argmax_of_the_full_pass():
  model = _model("full", kv_heads=2)
  prompt = _tokens(length=4)
  out = generate(model, prompt, max_new_tokens=5)
  assert out.shape == (2, 9) and bool(jnp.all(out[:, :4] == prompt))
  logits = model(out)
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:-1], axis=-1))


def test_top_k_sampling_stays_in_the_top_k():
  model = _model("full")
  prompt = _tokens(length=3)
  out = generate(model, prompt, max_new_tokens=6, temperature=1.5, top_k=3, rng=jax.random.key(7))
  logits = model(out)[:, 2:-1]
  third = jnp.sort(logits, axis=-1)[..., -3]
  chosen = jnp.take_along_axis(logits, out[:, 3:, None], axis=-1)[..., 0]
  assert bool(jnp.all(chosen >= third))


def test_sample_logits_greedy_top_k_and_temperature():
  logits = jnp.array([[0.0, 3.0, 1.0, -2.0]] * 500)
  np.testing.assert_array_equal(sample_logits(logits, None), np.ones(500))
  top2 = sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=2)
  assert set(np.asarray(top2).tolist()) == {1, 2}
  hot = sample_logits(logits, jax.random.key(0), temperature=100.0)
  assert len(set(np.asarray(hot).tolist())) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="linformer", causal=False), "causal=False is not valid for decoding"),
        (dict(variant="full", causal=False), "causal=False is not valid for decoding"),
        (dict(variant="full", head="classifier", num_classes=3), "head='classifier' is not valid for decoding"),
    ],
)
def test_models_that_cannot_decode_raise(kwargs, match):
  model = _model(**kwargs)
  with pytest.raises(ValueError, match=match):
    model.init_cache(1, 8)


def test_longformer_global_row_beyond_the_ring_is_loud():
  # Global token 9 arrives after the ring (window 2: 2 slots) has dropped positions it must attend.
  mixer = build_mixer(make_config("longformer", num_heads=4, window=2, global_tokens=(0, 9)), 32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 10, 32))
  cached = nnx.jit(lambda mixer, x, cache: mixer(x, cache=cache))
  _, cache = cached(mixer, x[:, :9], mixer.init_cache(1, 16))
  y, _ = cached(mixer, x[:, 9:], cache)
  assert bool(jnp.all(jnp.isnan(y)))
  with pytest.raises(ValueError, match="separate_global_projections=True is not valid for decoding"):
    build_mixer(make_config("longformer", num_heads=4, separate_global_projections=True), 32,
                rngs=nnx.Rngs(0)).init_cache(1, 8)


def test_bidirectional_mixer_cache_raises():
  mixer = build_mixer(make_config("local", num_heads=4), 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal=False is not valid for decoding with variant 'local'"):
    mixer.init_cache(1, 8)


def test_bad_generation_arguments_raise():
  model = _model("full")
  prompt = _tokens(length=3)
  with pytest.raises(ValueError, match="rng=None is not valid"):
    generate(model, prompt, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="top_k=0 is not valid"):
    generate(model, prompt, max_new_tokens=2, temperature=1.0, top_k=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="max_len=4 is not valid"):
    generate(model, prompt, max_new_tokens=2, max_len=4)
  with pytest.raises(ValueError, match="exceed the cache's max_len=4"):
    prefill(model, _tokens(length=5), model.init_cache(2, 4))
  with pytest.raises(ValueError, match="mask is not valid together with cache"):
    model(prompt, mask=jnp.ones(prompt.shape, bool), cache=model.init_cache(2, 8))
  with pytest.raises(ValueError, match="max_len=64 is not valid; the learned position table"):
    _model("full", position="learned").init_cache(1, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("variant,kv_heads", [("flash", 2), ("full", 1), ("sliding_window", 4)])
def test_gpu_bf16_decoding_matches_the_full_pass(variant, kv_heads):
  config = DecoderConfig(vocab_size=256, width=256, num_layers=2, num_heads=8, num_kv_heads=kv_heads, variant=variant,
                         mixer_options={"sliding_window": {"window": 64}}, dtype="bfloat16", max_len=512)
  model = Decoder(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (4, 300), 0, 256)
  full = nnx.jit(lambda model, tokens: model(tokens))(model, tokens)
  cache = model.init_cache(4, 512)
  logits, cache = prefill(model, tokens[:, :200], cache)
  steps = [logits]
  for i in range(200, 300):
    logits, cache = decode_step(model, tokens[:, i], cache)
    steps.append(logits[:, None])
  assert_close(jnp.concatenate(steps, axis=1), full, 3e-2, f"{variant} bf16 decoded logits")
