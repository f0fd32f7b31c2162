"""The configurable decoder: every variant and hybrid builds, trains, and rejects bad configs clearly."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from efficient_attention import Decoder, DecoderConfig, config_class, variant_names
from efficient_attention import decoder as decoder_module

VOCAB = 17


def _config_for(name: str, **kwargs) -> DecoderConfig:
  causal = config_class(name).supports_causal
  defaults = dict(vocab_size=VOCAB, width=32, num_layers=2, num_heads=4, variant=name, causal=causal, max_len=64)
  return DecoderConfig(**{**defaults, **kwargs})


def _overfit(config: DecoderConfig, steps: int = 40) -> tuple[float, float]:
  """Trains on one fixed batch; returns (first loss, last loss)."""
  model = Decoder(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, VOCAB)
  labels = jax.random.randint(jax.random.key(2), (4,), 0, max(config.num_classes, 2))

  def loss_fn(model):
    logits = model(tokens)
    if config.head == "classifier":
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    # Causal LM predicts the next token; a bidirectional model reconstructs its input.
    targets = tokens[:, 1:] if config.causal else tokens
    logits = logits[:, :-1] if config.causal else logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return losses[0], losses[-1]


@pytest.mark.parametrize("name", variant_names())
def test_every_variant_overfits_a_tiny_batch(name):
  first, last = _overfit(_config_for(name))
  assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f} did not fall clearly"


@pytest.mark.parametrize("pattern", ["mamba,mamba,full", "rwkv,sliding_window", "performer,linear,compressive"])
def test_hybrid_patterns_build_and_train(pattern):
  config = DecoderConfig(vocab_size=VOCAB, width=32, num_layers=len(pattern.split(",")), layer_pattern=pattern)
  model = Decoder(config, rngs=nnx.Rngs(0))
  assert config.layer_variants == tuple(pattern.split(","))
  assert [block.mixer.config.variant for block in model.blocks] == pattern.split(",")
  first, last = _overfit(config, steps=30)
  assert last < 0.6 * first


def test_pattern_is_tiled_over_layers():
  config = DecoderConfig(vocab_size=VOCAB, num_layers=6, layer_pattern="mamba,mamba,full")
  assert config.layer_variants == ("mamba", "mamba", "full") * 2


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal", "none"])
@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_classifier_heads_and_positions(position, pooling):
  config = _config_for(
      "full", causal=False, position=position, head="classifier", num_classes=3, pooling=pooling, mlp="swiglu"
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, VOCAB)
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
  logits = model(tokens, mask=mask)
  chex.assert_shape(logits, (2, 3))
  chex.assert_type(logits, jnp.float32)
  if pooling != "first":
    # Padding must not change the pooled prediction of the padded row.
    changed = tokens.at[1, 7:].set((tokens[1, 7:] + 1) % VOCAB)
    chex.assert_trees_all_close(model(changed, mask=mask)[1], logits[1], atol=1e-5)


def test_positions_make_a_bidirectional_model_order_aware():
  tokens = jnp.arange(8)[None] % VOCAB
  for position, order_aware in [("rope", True), ("learned", True), ("sinusoidal", True), ("none", False)]:
    model = Decoder(_config_for("full", causal=False, position=position, head="classifier", num_classes=2),
                    rngs=nnx.Rngs(0))
    same = jnp.allclose(model(tokens), model(tokens[:, ::-1]), atol=1e-5)
    assert bool(same) != order_aware, position


def test_fp32_params_bf16_compute():
  config = _config_for("full", dtype="bfloat16", param_dtype="float32")
  model = Decoder(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = model(jnp.zeros((2, 8), jnp.int32))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  first, last = _overfit(config, steps=30)
  assert last < 0.6 * first


def test_dropout_is_active_only_in_train_mode():
  model = Decoder(_config_for("full", dropout_rate=0.5), rngs=nnx.Rngs(0, dropout=1))
  tokens = jnp.arange(8)[None] % VOCAB
  model.eval()
  chex.assert_trees_all_close(model(tokens), model(tokens))
  model.train()
  assert not jnp.allclose(model(tokens), model(tokens))


def test_learned_positions_reject_longer_sequences():
  model = Decoder(_config_for("full", position="learned", max_len=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="T=9 exceeds max_len=8"):
    model(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="nope"), "variant='nope' is not valid; choose one of"),
        (dict(layer_pattern="full,nope"), "variant='nope' is not valid"),
        (dict(num_layers=4, layer_pattern="full,mamba,full"), "must divide num_layers=4"),
        (dict(num_heads=4, num_kv_heads=3), "divisible by num_kv_heads=3"),
        (dict(head="classifier"), "num_classes=0 is not valid"),
        (dict(position="alibi"), "position='alibi' is not valid; choose one of 'rope', 'learned'"),
        (dict(variant="linformer", causal=True), "causal=True is not valid for variant 'linformer'"),
        (dict(variant="rwkv", causal=False), "causal=False is not valid for variant 'rwkv'"),
        (dict(mixer_options={"sliding_window": {"window": 0}}, variant="sliding_window"), "window"),
        (dict(dropout_rate=1.0), "dropout_rate"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DecoderConfig(**{"vocab_size": VOCAB, **kwargs})


def test_tokens_must_be_two_dimensional():
  model = Decoder(_config_for("full"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens.shape"):
    model(jnp.zeros((8,), jnp.int32))


def test_remat_gives_the_same_step_and_saves_memory():
  """Gradient checkpointing per block, through the trainer's step: the same loss, gradient norm and updated
  parameters (dropout included: the recomputed forward draws the same masks; the compressive layer's sown
  auxiliary loss included), and a smaller compiled step."""
  from experiments.trainer import train_step

  tokens = jax.random.randint(jax.random.key(3), (2, 65), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 64), bool),
           "weights": jnp.ones((2, 64), jnp.float32)}

  def one_step(remat):
    config = _config_for("mamba", num_layers=2, width=32, dropout_rate=0.1, remat=remat,
                         layer_pattern="mamba,compressive", max_len=64)
    model = Decoder(config, rngs=nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state):
      model, optimizer = nnx.merge(graphdef, state)
      metrics = train_step(model, optimizer, batch, jax.random.key(4))
      return metrics, nnx.state(model, nnx.Param)

    compiled = jax.jit(step).lower(state).compile()
    return compiled(state), compiled.memory_analysis().temp_size_in_bytes

  (metrics, params), memory = one_step(False)
  (metrics_remat, params_remat), memory_remat = one_step(True)
  for name in ("loss", "aux_loss", "grad_norm"):
    chex.assert_trees_all_close(metrics_remat[name], metrics[name], rtol=1e-5)
  # Adam divides by the gradient's own scale, so parameters whose gradient is near zero move by up to lr=1e-3
  # whatever its rounding: compare them at a fraction of the learning rate.
  chex.assert_trees_all_close(params_remat, params, atol=5e-5)
  assert memory_remat < memory


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in jaxpr and, per call site, in the jaxprs its equations call."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_primitive(inner, name)
  return count


@pytest.mark.parametrize("remat", [False, True])
def test_each_block_releases_its_input_gradient_with_its_parameter_gradients(remat):
  """The gradient fence: in the backward, one optimization barrier per block joins the gradient that flows to the
  block below with the block's parameter gradients (so XLA cannot postpone a block's weight-gradient matmuls, and
  keep its activations alive, to the end of the step), and it leaves the gradients themselves unchanged."""
  config = _config_for("full", num_layers=3, remat=remat)
  model = Decoder(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, VOCAB)
  loss = lambda model: jnp.mean(model(tokens) ** 2)
  barriers = _count_primitive(jax.make_jaxpr(nnx.grad(loss))(model).jaxpr, "optimization_barrier")
  assert barriers >= config.num_layers
  block = model.blocks[0]
  x = jax.random.normal(jax.random.key(2), (2, 16, config.width))
  fenced = nnx.jit(nnx.grad(lambda block: jnp.sum(decoder_module._call_block(block, x, None) ** 2)))(block)
  plain = nnx.jit(nnx.grad(lambda block: jnp.sum(block(x, None) ** 2)))(block)
  chex.assert_trees_all_close(fenced, plain, rtol=1e-6)
