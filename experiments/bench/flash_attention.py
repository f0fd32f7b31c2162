"""Flash-attention benchmark: TFLOP/s forward and forward+backward against XLA, cuDNN, tokamax and FA3.

  python -m experiments.bench.flash_attention --out_dir=benchmarks/results

Rows: bf16, B*T = 16K tokens, H*D = 2048, T in {2K, 4K, 8K, 16K}, D in {64, 128}, causal or not. FLOPs are
counted as FlashAttention does: forward 4*B*H*T*S*D (halved when causal), backward 2.5x forward.
"""

import traceback

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench import timing
from experiments.bench.timing import environment, median_ms, write_results
from kernels.flash_attention import flash_attention, mosaic_gpu, mosaic_gpu_bwd
from kernels.flash_attention.api import _mosaic_attention, _mosaic_bwd_attention

_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON and markdown go.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384"], "Sequence lengths T (= S).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims D.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "mosaic", "mosaic_bwd", "cudnn", "xla", "tokamax", "fa3"],
                           "Implementations to time.")
_MOSAIC_CONFIGS = flags.DEFINE_list(
    "mosaic_configs", [], "Extra configs of the Mosaic GPU forward, "
    "block_q:block_k:num_stages[:registers[:overlap[:heads_inner]]] each (e.g. 64:128:3, 64:128:2:240:1, "
    "64:128:2:232:0:1; see mosaic_gpu.Config.parse); each adds a row 'mosaic[64:128:3]' "
    "(timed when 'mosaic' is in --impls). The plain 'mosaic' row uses mosaic_gpu.Config.get_default.")
_MOSAIC_BWD_CONFIGS = flags.DEFINE_list(
    "mosaic_bwd_configs", [], "Extra tiles for the Mosaic GPU backward (Triton forward), "
    "bq_dkv:bk_dkv:bq_dq:bk_dq:stages_dkv:stages_dq each (e.g. 64:64:64:128:3:3, see mosaic_gpu_bwd.BlockSizes); "
    "each adds a row 'mosaic_bwd[...]' (timed when 'mosaic_bwd' is in --impls) and a row 'mosaic[bwd=...]' with the "
    "Mosaic forward (timed when 'mosaic' is).")
_MOSAIC_PAIRS = flags.DEFINE_list(
    "mosaic_pairs", [], "Forward and backward configs of impl='mosaic' together, FWD+BWD each in the --mosaic_configs "
    "and --mosaic_bwd_configs formats (e.g. 64:128:2:240:1+64:64:64:64:3:3:0:1:240); each adds a row "
    "'mosaic[FWD+BWD]' (timed when 'mosaic' is in --impls).")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed samples per measurement (median reported).")
_BACK_TO_BACK = timing.define_back_to_back_flag()
_TOKENS = 16384
_WIDTH = 2048


def _peers() -> dict:
  """Attention functions (q, k, v, causal) -> o of every importable implementation."""
  impls = {
      "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, impl="pallas"),
      "cudnn": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                    implementation="cudnn"),
      "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
      "mosaic": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, impl="mosaic"),
  }
  for spec in _MOSAIC_CONFIGS.value:
    config = mosaic_gpu.Config.parse(spec)
    impls[f"mosaic[{spec}]"] = lambda q, k, v, causal, config=config: flash_attention(
        q, k, v, causal=causal, impl="mosaic", mosaic_config=config)
  impls["mosaic_bwd"] = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, impl="mosaic_bwd")
  for spec in _MOSAIC_BWD_CONFIGS.value:
    blocks = mosaic_gpu_bwd.BlockSizes.parse(spec)
    impls[f"mosaic_bwd[{spec}]"] = lambda q, k, v, causal, blocks=blocks: _mosaic_bwd_attention(
        q, k, v, causal=causal, sm_scale=q.shape[-1] ** -0.5, window=None, kv_lengths=None, block_sizes=None,
        bwd_blocks=blocks)[0]
    # The same backward tiles behind the Mosaic forward: the pairing impl="mosaic" runs.
    impls[f"mosaic[bwd={spec}]"] = lambda q, k, v, causal, blocks=blocks: _mosaic_attention(
        q, k, v, causal=causal, sm_scale=q.shape[-1] ** -0.5, window=None, kv_lengths=None, block_sizes=None,
        config=None, bwd_blocks=blocks)[0]
  for spec in _MOSAIC_PAIRS.value:
    fwd_spec, plus, bwd_spec = spec.partition("+")
    if not plus:
      raise ValueError(f"--mosaic_pairs entry {spec!r} must be FWD+BWD (e.g. 64:128:2:240:1+64:64:64:64:3:3)")
    config, blocks = mosaic_gpu.Config.parse(fwd_spec), mosaic_gpu_bwd.BlockSizes.parse(bwd_spec)
    impls[f"mosaic[{spec}]"] = lambda q, k, v, causal, config=config, blocks=blocks: _mosaic_attention(
        q, k, v, causal=causal, sm_scale=q.shape[-1] ** -0.5, window=None, kv_lengths=None, block_sizes=None,
        config=config, bwd_blocks=blocks)[0]
  try:
    import tokamax

    impls["tokamax"] = lambda q, k, v, causal: tokamax.dot_product_attention(
        q, k, v, is_causal=causal, implementation="mosaic")
  except ImportError:
    print("tokamax not importable; skipped")
  try:
    from flash_attn3_jax import flash_mha

    impls["fa3"] = lambda q, k, v, causal: flash_mha(q, k, v, is_causal=causal)
  except ImportError:
    print("flash_attn3_jax not importable; skipped")
  return impls


def _input_sets(b, t, h, d, count=3):
  sets = []
  for seed in range(count):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    shape = (b, t, h, d)
    sets.append(tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv, kd)))
  return sets


def _measure(attention, causal, inputs, iters, back_to_back):
  fwd = jax.jit(lambda q, k, v, do: attention(q, k, v, causal))

  def loss(q, k, v, do):
    return jnp.sum(attention(q, k, v, causal).astype(jnp.float32) * do.astype(jnp.float32))

  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return (median_ms(fwd, inputs, iters=iters, back_to_back=back_to_back),
          median_ms(fwd_bwd, inputs, iters=iters, back_to_back=back_to_back))


def main(argv):
  del argv
  env = environment() | {"back_to_back": _BACK_TO_BACK.value}
  peers = {name: fn for name, fn in _peers().items() if name.split("[")[0] in _IMPLS.value}
  rows = []
  for d in map(int, _HEAD_DIMS.value):
    for t in map(int, _SEQ_LENS.value):
      for causal in (False, True):
        b, h = _TOKENS // t, _WIDTH // d
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        inputs = _input_sets(b, t, h, d)
        for name, attention in peers.items():
          row = dict(impl=name, T=t, D=d, causal=causal, B=b, H=h)
          try:
            fwd_ms, fwd_bwd_ms = _measure(attention, causal, inputs, _ITERS.value, _BACK_TO_BACK.value)
            row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                       fwd_bwd_tflops=3.5 * flops / fwd_bwd_ms / 1e9)
          except Exception as e:  # a peer that cannot run a row (OOM, unsupported) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc(limit=1)
          rows.append(row)
          print(row, flush=True)
        # Rewritten after every row, so a run stopped by a time limit keeps what it measured.
        write_results(_OUT_DIR.value, "flash_attention", env, rows, _table(rows, list(peers)))


def _table(rows, names):
  lines = [f"TFLOP/s fwd / fwd+bwd (bf16, B*T = 16K, H*D = 2048); "
           f"{timing.describe_timing(_ITERS.value, _BACK_TO_BACK.value)}", "",
           "| T, D, causal | " + " | ".join(names) + " | ours / cuDNN | mosaic / cuDNN | mosaic_bwd / cuDNN |",
           "|---" * (len(names) + 4) + "|"]
  keys = sorted({(r["D"], r["T"], r["causal"]) for r in rows})
  for d, t, causal in keys:
    cells, by_name = [], {r["impl"]: r for r in rows if (r["D"], r["T"], r["causal"]) == (d, t, causal)}
    for name in names:
      r = by_name.get(name, {})
      cells.append(f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}" if "fwd_tflops" in r else "n/a")
    cudnn = by_name.get("cudnn", {})
    ratios = []
    for name in ("ours", "mosaic", "mosaic_bwd"):
      r = by_name.get(name, {})
      ratios.append(f"{r['fwd_tflops'] / cudnn['fwd_tflops']:.2f} / {r['fwd_bwd_tflops'] / cudnn['fwd_bwd_tflops']:.2f}"
                    if "fwd_tflops" in r and "fwd_tflops" in cudnn else "n/a")
    lines.append(f"| {t // 1024}K, {d}, {'yes' if causal else 'no'} | " + " | ".join(cells + ratios) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
