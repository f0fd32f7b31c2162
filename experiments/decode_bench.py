"""Decoding benchmark: tokens/s of one cached decoding step and cache memory against context length.

  python -m experiments.decode_bench --out=benchmarks/results --contexts=1024,4096,16384,65536,131072

Two parts, both in one process:
- models: a `Decoder` per variant (and full attention as MHA / GQA / MQA) with a cache of max_len = L, filled
  with random contents, then the jitted step (cache donated, as in a real decoding loop) timed over >= 20
  consecutive tokens ending at position L - 1: tokens/s = batch / median step time.
- kernel: `kernels.decode_attention` (Pallas split-KV) against `jax.nn.dot_product_attention` with XLA and
  with cuDNN (when it runs), one query token over one layer's cache of L keys, in ms and GB/s of K/V read.
Writes decode_bench.json, decode_bench.md and (matplotlib permitting) decode_bench.png to --out.
"""

import statistics
import time
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from efficient_attention import Decoder, DecoderConfig
from efficient_attention.cache import DecoderCache, cache_bytes
from experiments.bench.timing import environment, median_ms, write_results
from kernels.decode_attention import decode_attention

_OUT = flags.DEFINE_string("out", "benchmarks/results", "Directory for the JSON, markdown table and plot.")
_CONTEXTS = flags.DEFINE_list(
    "contexts", ["1024", "2048", "4096", "8192", "16384", "32768", "65536", "131072"], "Context lengths L.")
_VARIANTS = flags.DEFINE_list(
    "variants",
    ["full-mha", "full-gqa", "full-mqa", "sliding_window", "longformer", "bigbird", "linear", "performer", "rwkv",
     "mamba", "compressive"],
    "Rows: a variant name (bigbird too), or full-mha / full-gqa / full-mqa.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences decoded together.")
_WIDTH = flags.DEFINE_integer("width", 2048, "Model width C (heads of 128).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed decoding steps per measurement (median reported).")
_KERNEL = flags.DEFINE_bool("kernel", True, "Also time the decode-attention kernel against its peers.")

_HEADS = 16
_KV_HEADS = {"full-mha": 16, "full-gqa": 4, "full-mqa": 1}
_OPTIONS = {
    "sliding_window": {"window": 4096},
    "longformer": {"window": 512, "global_tokens": (0,)},
    "performer": {"num_features": 128},
    "rwkv": {"num_heads": 16},
    "compressive": {"segment_length": 64, "memory_length": 1024, "compressed_memory_length": 256},
    "bigbird": {"block_size": 64, "num_random_blocks": 3},
}


def _model(row: str) -> Decoder:
  variant = "full" if row in _KV_HEADS else row
  config = DecoderConfig(
      vocab_size=32000, width=_WIDTH.value, num_layers=_LAYERS.value, num_heads=_HEADS,
      num_kv_heads=_KV_HEADS.get(row), variant=variant, mixer_options={variant: _OPTIONS.get(variant, {})},
      position="rope", dtype="bfloat16", param_dtype="bfloat16", max_len=1 << 20,
  )
  return Decoder(config, rngs=nnx.Rngs(0))


def _filled(cache: DecoderCache, length: int, seed: int) -> DecoderCache:
  """The cache with random float contents (never zeros) and every index at `length`: a context of L tokens."""
  leaves, treedef = jax.tree.flatten(cache)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  fill = lambda leaf, key: (jax.random.normal(key, leaf.shape, jnp.float32) * 0.5).astype(leaf.dtype) \
      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  cache = jax.tree.unflatten(treedef, [fill(leaf, key) for leaf, key in zip(leaves, keys)])
  # One index array per layer: the step donates the cache, and a buffer cannot be donated twice.
  index = lambda: jnp.array(length, jnp.int32)
  return DecoderCache(tuple(layer._replace(index=index()) for layer in cache.layers), index(), cache.max_len)


_WARMUP = 3


def _time_steps(step, state, cache, batch, vocab, iters, warmup=_WARMUP) -> float:
  """Median ms of consecutive decoding steps; the cache is donated and replaced every step."""
  times = []
  for i in range(warmup + iters):
    tokens = jax.random.randint(jax.random.key(i), (batch, 1), 0, vocab)
    start = time.perf_counter()
    logits, cache = step(state, tokens, cache)
    jax.block_until_ready(logits)
    if i >= warmup:
      times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _model_rows(contexts, iters) -> list[dict]:
  rows = []
  batch = _BATCH.value
  for name in _VARIANTS.value:
    try:
      model = _model(name)
    except Exception as e:  # a variant the flags configure badly is reported, not fatal
      rows.append(dict(part="model", variant=name, error=f"{type(e).__name__}: {e}"[:200]))
      continue
    graphdef, state = nnx.split(nnx.view(model, deterministic=True))
    step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state)(tokens, cache=cache), donate_argnums=2)
    for length in contexts:
      row = dict(part="model", variant=name, context=length, batch=batch)
      try:
        # The timed steps end at position L - 1, so every one of them fits the max_len = L cache.
        cache = _filled(model.init_cache(batch, length), length - _WARMUP - iters, seed=length)
        row["cache_bytes"] = cache_bytes(cache)
        ms = _time_steps(step, state, cache, batch, model.config.vocab_size, iters)
        row.update(step_ms=ms, tokens_per_s=batch * 1e3 / ms)
      except Exception as e:  # OOM or an unsupported size: reported in the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        traceback.print_exc(limit=1)
      rows.append(row)
      print(row, flush=True)
  return rows


def _kernel_peers() -> dict:
  peers = {
      "pallas": lambda q, k, v, n: decode_attention(q, k, v, n, impl="pallas"),
  }

  def peer(implementation):
    return lambda q, k, v, n: jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=n, implementation=implementation)[:, 0]

  peers["xla"] = peer("xla")
  peers["cudnn"] = peer("cudnn")
  return peers


def _kernel_rows(contexts, iters) -> list[dict]:
  rows = []
  batch, d = _BATCH.value, 128
  for hkv in (16, 4, 1):
    for length in contexts:
      inputs = []
      for seed in range(3):
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        inputs.append((jax.random.normal(kq, (batch, _HEADS, d), jnp.bfloat16),
                       jax.random.normal(kk, (batch, length, hkv, d), jnp.bfloat16),
                       jax.random.normal(kv, (batch, length, hkv, d), jnp.bfloat16),
                       jnp.full((batch,), length, jnp.int32)))
      kv_bytes = 2 * batch * length * hkv * d * 2
      for name, fn in _kernel_peers().items():
        row = dict(part="kernel", impl=name, kv_heads=hkv, context=length, batch=batch)
        try:
          ms = median_ms(jax.jit(fn), inputs, iters=iters)
          row.update(ms=ms, gb_per_s=kv_bytes / ms / 1e6)
        except Exception as e:  # a peer that cannot run a shape (cuDNN with T=1, OOM) is reported, not fatal
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(row, flush=True)
      del inputs
  return rows


def _length(c: int) -> str:
  return f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c)


def _table(rows, contexts) -> str:
  lines = [f"Decoding step, bf16, batch {_BATCH.value}, width {_WIDTH.value}, {_LAYERS.value} layers, "
           f"{_HEADS} heads of {_WIDTH.value // _HEADS}: tokens/s | cache MiB", "",
           "| variant | " + " | ".join(_length(c) for c in contexts) + " |",
           "|---" * (len(contexts) + 1) + "|"]
  model_rows = [r for r in rows if r["part"] == "model"]
  for name in dict.fromkeys(r["variant"] for r in model_rows):
    cells = []
    for c in contexts:
      r = next((r for r in model_rows if r["variant"] == name and r.get("context") == c), {})
      cells.append(f"{r['tokens_per_s']:.0f} \\| {r['cache_bytes'] / 2**20:.1f}" if "tokens_per_s" in r else "n/a")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  kernel_rows = [r for r in rows if r["part"] == "kernel"]
  if kernel_rows:
    impls = list(dict.fromkeys(r["impl"] for r in kernel_rows))
    lines += ["", "Decode attention (one layer, 16 query heads of 128, bf16): ms | GB/s of K/V read", "",
              "| kv heads, L | " + " | ".join(impls) + " | pallas / xla speed-up |", "|---" * (len(impls) + 2) + "|"]
    for hkv in dict.fromkeys(r["kv_heads"] for r in kernel_rows):
      for c in contexts:
        by = {r["impl"]: r for r in kernel_rows if r["kv_heads"] == hkv and r["context"] == c}
        cells = [f"{by[i]['ms']:.3f} \\| {by[i]['gb_per_s']:.0f}" if "ms" in by.get(i, {}) else "n/a" for i in impls]
        ratio = (f"{by['xla']['ms'] / by['pallas']['ms']:.2f}x"
                 if "ms" in by.get("xla", {}) and "ms" in by.get("pallas", {}) else "n/a")
        lines.append(f"| {hkv}, {_length(c)} | " + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines)


def _plot(rows, out_dir) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not importable; no plot")
    return
  fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
  model_rows = [r for r in rows if r["part"] == "model" and "tokens_per_s" in r]
  for name in dict.fromkeys(r["variant"] for r in model_rows):
    mine = sorted((r for r in model_rows if r["variant"] == name), key=lambda r: r["context"])
    contexts = [r["context"] for r in mine]
    speed.plot(contexts, [r["tokens_per_s"] for r in mine], marker="o", label=name)
    memory.plot(contexts, [r["cache_bytes"] / 2**20 for r in mine], marker="o", label=name)
  for ax, label in ((speed, "tokens/s"), (memory, "cache MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  speed.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(f"{out_dir}/decode_bench.png", dpi=120)


def main(argv):
  del argv
  contexts = sorted(int(c) for c in _CONTEXTS.value)
  if contexts[0] <= _WARMUP + _ITERS.value:
    raise ValueError(f"contexts={contexts} is not valid; each must exceed warm-up + iters = {_WARMUP + _ITERS.value}")
  env = environment()
  # Written after each part, so a run cut short still leaves the kernel table.
  rows = _kernel_rows(contexts, _ITERS.value) if _KERNEL.value else []
  if rows:
    write_results(_OUT.value, "decode_bench", env, rows, _table(rows, contexts))
  rows += _model_rows(contexts, _ITERS.value)
  write_results(_OUT.value, "decode_bench", env, rows, _table(rows, contexts))
  _plot(rows, _OUT.value)


if __name__ == "__main__":
  app.run(main)
