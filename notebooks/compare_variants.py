# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Comparing the attention variants
#
# What this notebook shows, for every registered sequence mixer built at one width:
#
# 1. **Who attends to whom**: the dense form of the sparse masks (sliding window, local, Longformer,
#    BigBird), Linformer's learned sequence projection, and how Performer's random-feature estimate
#    approaches exact softmax attention as the number of features grows.
# 2. **What it costs**: wall time and peak memory of one forward + backward pass against sequence length,
#    measured on whatever device JAX runs on, on log-log axes next to O(n^2) and O(n) slopes.
#
# How long it takes: about 15 minutes on a 2-core CPU at the default sizes (measured: 17.5 minutes while the
# machine also ran the test suite), mostly XLA compiling one program per variant and length (not yet timed on a GPU).
# Set `NOTEBOOK_SMALL=1` in the environment for the tiny sizes the test suite runs (well under a minute).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from efficient_attention import build_mixer, config_class, make_config, variant_names
from efficient_attention.variants.bigbird import bigbird_pattern
from efficient_attention.variants.full import softmax_attention
from efficient_attention.variants.longformer import longformer_pattern
from efficient_attention.variants.performer import orthogonal_gaussian_features, performer_attention
from efficient_attention.variants.sliding_window import band_pattern

# %% [markdown]
# ## Sizes
#
# `NOTEBOOK_SMALL=1` shrinks everything so the notebook runs in CI; edit these to explore.

# %%
SMALL = os.environ.get("NOTEBOOK_SMALL", "0") == "1"

WIDTH = 32 if SMALL else 128  # model width C of every mixer
NUM_HEADS = 2 if SMALL else 4
SEQ_LENS = [64, 128, 256] if SMALL else [256, 512, 1024, 2048, 4096]  # lengths T timed
BATCH = 1 if SMALL else 4
# Variants timed: all of them by default; a few cheap ones in the small run (each compile costs seconds on CPU).
# Off GPU, `flash` runs its Pallas kernel in interpret mode, whose time says nothing about the kernel.
TIMED_VARIANTS = ["full", "linear"] if SMALL else [
    name for name in variant_names() if name != "flash" or jax.default_backend() == "gpu"
]
PATTERN_LEN = 64 if SMALL else 256  # length T of the drawn patterns
PERFORMER_FEATURES = [4, 16, 64, 256] if SMALL else [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
PERFORMER_TRIALS = 2 if SMALL else 8  # feature draws averaged per point
TIMING_REPEATS = 2 if SMALL else 5

print("device:", jax.devices()[0].device_kind, "| width", WIDTH, "| lengths", SEQ_LENS)

# %% [markdown]
# ## Every variant at one width
#
# Each mixer is built in the direction the training script uses for it: bidirectional where the variant
# supports it, causal otherwise (sliding window, Mamba, RWKV ... are causal-only). Parameter counts come
# from abstract builds (`nnx.eval_shape`, no arrays allocated); only the mixers used below get real weights.

# %%
MAX_LEN = max(SEQ_LENS + [PATTERN_LEN])


def variant_config(name: str, **overrides):
  causal = not config_class(name).supports_bidirectional
  return make_config(name, causal=causal, num_heads=NUM_HEADS, max_len=MAX_LEN, **overrides)


def count_params(module) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def build(name: str):
  return build_mixer(variant_config(name), WIDTH, rngs=nnx.Rngs(0))


abstract_mixers = {name: nnx.eval_shape(lambda name=name: build(name)) for name in variant_names()}
print(f"{'variant':16s} {'direction':14s} {'parameters':>10s}")
for name, mixer in abstract_mixers.items():
  direction = "causal" if mixer.config.causal else "bidirectional"
  print(f"{name:16s} {direction:14s} {count_params(mixer):10,d}")

# %% [markdown]
# ## Attention patterns
#
# White cells are the (query, key) pairs a variant computes; full attention fills the whole square (or
# its lower triangle when causal). Longformer's heads may use different dilations: head 0 is drawn.

# %%
patterns = {
    "sliding_window (causal)": band_pattern(variant_config("sliding_window", window=8), PATTERN_LEN),
    "local (bidirectional)": band_pattern(variant_config("local", window=8), PATTERN_LEN),
    "longformer": longformer_pattern(variant_config("longformer", window=4, dilation=(2,)), PATTERN_LEN)[0],
    "bigbird": bigbird_pattern(variant_config("bigbird", block_size=PATTERN_LEN // 16), PATTERN_LEN),
}
fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 4))
for ax, (title, pattern) in zip(axes, patterns.items()):
  ax.imshow(pattern, cmap="gray", interpolation="nearest")
  ax.set_title(f"{title}\n{pattern.mean():.0%} of pairs")
  ax.set_xlabel("key s")
  ax.set_ylabel("query t")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Linformer's projection
#
# Linformer attends to `projected_length` mixtures of the keys: row p of E [P, max_len] says how much of
# each position goes into projected key p. At initialisation the rows are random (training shapes them).

# %%
projection = np.asarray(build("linformer").key_projection.weight[...])[:, :PATTERN_LEN]
fig, ax = plt.subplots(figsize=(8, 3))
image = ax.imshow(projection, aspect="auto", cmap="RdBu", interpolation="nearest")
ax.set_xlabel("key position s")
ax.set_ylabel("projected key p")
ax.set_title(f"Linformer key projection E[:, :{PATTERN_LEN}] (initial)")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# ### Performer's approximation of softmax attention
#
# FAVOR+ estimates exp(q . k / sqrt(D)) with M positive random features; the relative RMS error of the
# attention output against exact softmax attention falls like 1 / sqrt(M) (the dashed line), from a level
# that rises steeply with the size of the queries and keys.

# %%
HEAD_DIM = 16
max_features = max(PERFORMER_FEATURES)
assert max_features % HEAD_DIM == 0, "each trial's features must be whole blocks of orthogonal rows"
# One draw of whole orthogonal blocks for all trials (drawing costs a QR compilation); the first M rows of
# a trial's block are themselves a valid M-feature draw, so every M reuses it.
features = orthogonal_gaussian_features(jax.random.key(0), PERFORMER_TRIALS * max_features, HEAD_DIM)
features = features.reshape(PERFORMER_TRIALS, max_features, HEAD_DIM)
q, k, v = jax.random.normal(jax.random.key(1), (3, PERFORMER_TRIALS, 1, PATTERN_LEN, 1, HEAD_DIM))
# RMS of the query and key components: FAVOR+'s variance grows like exp(|q + k|^2 / sqrt(D)), so larger
# logits need many more features for the same error.
INPUT_SCALES = [0.25, 0.5, 1.0]


@jax.jit
def performer_errors(w: jax.Array, scale: jax.Array) -> jax.Array:
  """w [trials, M, D] -> relative RMS error of FAVOR+ (bidirectional) against exact softmax, one per trial,
  on random queries and keys of RMS `scale` per component."""

  def error(q, k, v, w):
    exact = softmax_attention(q * scale, k * scale, v, causal=False)
    approx = performer_attention(q * scale, k * scale, v, w, causal=False, impl="xla")
    return jnp.sqrt(jnp.mean((approx - exact) ** 2) / jnp.mean(exact**2))

  return jax.vmap(error)(q, k, v, w)


errors = np.array([[performer_errors(features[:, :m], scale) for m in PERFORMER_FEATURES] for scale in INPUT_SCALES])
fig, ax = plt.subplots(figsize=(6, 4))
m = np.array(PERFORMER_FEATURES, float)
for scale, error in zip(INPUT_SCALES, errors):
  ax.errorbar(m, error.mean(1), yerr=error.std(1), marker="o", label=f"q, k ~ N(0, {scale}^2)")
ax.plot(m, errors[0].mean(1)[0] * np.sqrt(m[0] / m), "k--", label="1 / sqrt(M)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("random features M")
ax.set_ylabel("relative RMS error vs softmax")
ax.set_title(f"Performer (FAVOR+, orthogonal) vs softmax, T={PATTERN_LEN}, D={HEAD_DIM}")
ax.legend()
plt.show()

# %% [markdown]
# ## Time and peak memory of forward + backward against sequence length
#
# One step is the gradient of sum(y^2) with respect to the parameters and the input. Time is the best of
# a few runs after compilation; peak memory is what XLA's compiled program reserves (temporaries +
# arguments + outputs, from `memory_analysis()`), which works on CPU as well as GPU.

# %%
def forward_backward(name: str, length: int):
  """-> (compiled step, its arguments) for variant `name` at sequence length `length`."""
  graphdef, params, rest = nnx.split(build(name), nnx.Param, ...)

  def loss(params, x):
    y = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  x = jax.random.normal(jax.random.key(0), (BATCH, length, WIDTH))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return compiled, (params, x)


def measure(name: str, length: int) -> tuple[float, int]:
  """-> (seconds per forward + backward, peak bytes)."""
  compiled, args = forward_backward(name, length)
  memory = compiled.memory_analysis()
  peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
  jax.block_until_ready(compiled(*args))  # the first run pays one-time allocation costs
  times = []
  for _ in range(TIMING_REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return min(times), peak


measurements = {name: [measure(name, length) for length in SEQ_LENS] for name in TIMED_VARIANTS}
print(f"{'variant':16s} " + " ".join(f"{'T=' + str(t):>18s}" for t in SEQ_LENS))
for name, rows in measurements.items():
  print(f"{name:16s} " + " ".join(f"{s * 1e3:8.2f}ms {b / 2**20:6.1f}MiB" for s, b in rows))

# %%
def add_slopes(ax, values: np.ndarray):
  """Dashed O(n^2) and dotted O(n) lines through the smallest length's median value."""
  n = np.array(SEQ_LENS, float)
  anchor = np.median(values[:, 0])
  ax.plot(n, anchor * (n / n[0]) ** 2, "k--", linewidth=1, label="O(n^2)")
  ax.plot(n, anchor * (n / n[0]), "k:", linewidth=1, label="O(n)")


seconds = np.array([[s for s, _ in measurements[name]] for name in TIMED_VARIANTS])
peak_mib = np.array([[b / 2**20 for _, b in measurements[name]] for name in TIMED_VARIANTS])
fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 5))
panels = ((time_ax, seconds * 1e3, "forward + backward (ms)"), (memory_ax, peak_mib, "peak memory (MiB)"))
for ax, values, label in panels:
  for name, row in zip(TIMED_VARIANTS, values):
    ax.plot(SEQ_LENS, row, marker="o", label=name)
  add_slopes(ax, values)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length T")
  ax.set_ylabel(label)
time_ax.set_title(f"time on {jax.devices()[0].device_kind} (batch {BATCH}, width {WIDTH})")
memory_ax.set_title("peak memory (XLA memory analysis)")
memory_ax.legend(fontsize="small", ncol=2)
fig.tight_layout()
plt.show()
