"""Linear-attention benchmark: ms forward and forward+backward of our Pallas scan, our Triton-language scan
(impl="triton", through jax-triton), the XLA reference and flash-linear-attention (fla, PyTorch + Triton), in one
process.

  python -m experiments.bench.linear_attention --out_dir=benchmarks/results

Rows: bf16, B=4, H=16, K=V=128, T in {4K, 16K, 64K}; decay none (fla `chunk_linear_attn`), per head
(fla `chunk_simple_gla`) or per key channel (fla `chunk_gla`), chosen with --decays. Gradients are taken
with respect to q, k, v (and the decay when there is one). Peak memory: XLA's temporary buffers of the
compiled program for the JAX rows, torch's peak allocation above the inputs for fla.
"""

import os

# JAX and torch share the card: leave torch room (XLA otherwise preallocates 75% of it).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import dataclasses  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench import timing  # noqa: E402
from experiments.bench.timing import environment, median_ms, write_results  # noqa: E402
from kernels.linear_attention import linear_attention  # noqa: E402
from kernels.linear_attention.pallas_gpu import BlockSizes  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON and markdown go.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "16384", "65536"], "Sequence lengths T.")
_DECAYS = flags.DEFINE_list("decays", ["none"], "Decay kinds: none, head, channel.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "ours_2pass", "triton", "xla", "fla"],
                           "Implementations to time (ours: Pallas; ours_2pass: ours with the two-pass forward; "
                           "triton: impl='triton').")
_TILES = flags.DEFINE_list(
    "tiles", [],
    "Extra rows of ours with other launch settings of the chunk walks, each V_TILE/WARPS/STAGES, e.g. 64/8/2.")
_BATCH = flags.DEFINE_integer("batch", 4, "B.")
_HEADS = flags.DEFINE_integer("heads", 16, "H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "K = V.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed samples per measurement (median reported).")
_BACK_TO_BACK = timing.define_back_to_back_flag()


def _jax_impls(decay_kind: str) -> dict:
  """name -> (q, k, v, g) -> o for the JAX implementations."""
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  two_pass = dataclasses.replace(BlockSizes.get_default(decay_kind, b * h, d, d), fused_forward=False)
  impls = {
      "ours": lambda q, k, v, g: linear_attention(q, k, v, decay=g, impl="pallas"),
      # Differs from "ours" in the forward alone: training always takes the two-pass forward.
      "ours_2pass": lambda q, k, v, g: linear_attention(q, k, v, decay=g, impl="pallas", block_sizes=two_pass),
      "triton": lambda q, k, v, g: linear_attention(q, k, v, decay=g, impl="triton"),
      "xla": lambda q, k, v, g: linear_attention(q, k, v, decay=g, impl="xla"),
  }
  impls = {name: fn for name, fn in impls.items() if name in _IMPLS.value}
  for spec in _TILES.value:
    tile, warps, stages = map(int, spec.split("/"))
    channel = decay_kind == "channel"  # per-channel decay keeps its short chunks
    blocks = BlockSizes(chunk=16 if channel else 64, block_v=tile, num_warps=warps, num_stages=stages)
    impls[f"ours_{tile}/{warps}/{stages}"] = lambda q, k, v, g, blocks=blocks: linear_attention(
        q, k, v, decay=g, impl="pallas", block_sizes=blocks)
  return impls


def _jax_inputs(b, t, h, d, decay_kind, count=3):
  sets = []
  for seed in range(count):
    kq, kk, kv, kg, kd = jax.random.split(jax.random.key(seed), 5)
    shape = (b, t, h, d)
    # Scaled as a model would feed them, so outputs stay O(1) and bf16 is representative.
    q, k = (jax.random.normal(key, shape, jnp.bfloat16) * d**-0.5 for key in (kq, kk))
    v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kv, kd))
    g = None
    if decay_kind != "none":
      # log sigmoid of a standard normal plus 3: per-step rates mostly in (0.9, 1), as gated models learn.
      g = jax.nn.log_sigmoid(3.0 + jax.random.normal(kg, shape if decay_kind == "channel" else shape[:3]))
    sets.append((q, k, v, g, do))
  return sets


def _measure_jax(attention, inputs, iters):
  fwd = jax.jit(lambda q, k, v, g, do: attention(q, k, v, g))
  argnums = (0, 1, 2) if inputs[0][3] is None else (0, 1, 2, 3)

  def loss(q, k, v, g, do):
    return jnp.sum(attention(q, k, v, g).astype(jnp.float32) * do.astype(jnp.float32))

  # Compiled ahead of time once each: the compiled program is both what is timed and what reports memory.
  fwd = fwd.lower(*inputs[0]).compile()
  fwd_bwd = jax.jit(jax.grad(loss, argnums=argnums)).lower(*inputs[0]).compile()
  memory = fwd_bwd.memory_analysis()
  peak_mb = None if memory is None else memory.temp_size_in_bytes / 2**20
  timed = lambda fn: median_ms(fn, inputs, iters=iters, back_to_back=_BACK_TO_BACK.value)
  return timed(fwd), timed(fwd_bwd), peak_mb


def _fla_op(decay_kind: str):
  """fla's chunked kernel for the decay kind: (q, k, v, g) -> o, unscaled (scale=1) like ours."""
  if decay_kind == "none":
    from fla.ops.linear_attn import chunk_linear_attn

    return lambda q, k, v, g: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]
  if decay_kind == "head":
    from fla.ops.simple_gla import chunk_simple_gla

    return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]
  from fla.ops.gla import chunk_gla

  return lambda q, k, v, g: chunk_gla(q, k, v, g=g, scale=1.0)[0]


def _measure_fla(decay_kind, b, t, h, d, iters):
  import torch

  op = _fla_op(decay_kind)
  sets = []
  for seed in range(3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    q, k = randn(b, t, h, d) * d**-0.5, randn(b, t, h, d) * d**-0.5
    v, do = randn(b, t, h, d), randn(b, t, h, d)
    g = None
    if decay_kind != "none":
      shape = (b, t, h, d) if decay_kind == "channel" else (b, t, h)
      g = torch.nn.functional.logsigmoid(3.0 + torch.randn(*shape, generator=gen, device="cuda"))
    leaves = [x.requires_grad_() for x in (q, k, v, g) if x is not None]
    sets.append((q, k, v, g, do, leaves))

  def fwd(q, k, v, g, do, leaves):
    with torch.no_grad():
      op(q, k, v, g)

  def fwd_bwd(q, k, v, g, do, leaves):
    grads = torch.autograd.grad(op(q, k, v, g), leaves, grad_outputs=do)
    del grads

  fwd_ms = timing.torch_median_ms(torch, fwd, sets, iters=iters, back_to_back=_BACK_TO_BACK.value)
  torch.cuda.synchronize()
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  fwd_bwd_ms = timing.torch_median_ms(torch, fwd_bwd, sets, iters=iters, back_to_back=_BACK_TO_BACK.value)
  peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
  del sets
  torch.cuda.empty_cache()
  return fwd_ms, fwd_bwd_ms, peak_mb


def main(argv):
  del argv
  env = environment() | {"back_to_back": _BACK_TO_BACK.value}
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  rows = []
  for decay_kind in _DECAYS.value:
    impls = _jax_impls(decay_kind)
    for t in map(int, _SEQ_LENS.value):
      inputs = _jax_inputs(b, t, h, d, decay_kind)
      # fla first: after jax-triton has launched a kernel in this process, fla's Triton backend failed to start
      # on an H200 ("Could not create or locate cache dir"; 2026-11-28), so it runs before ours.
      names = (["fla"] if "fla" in _IMPLS.value else []) + list(impls)
      for name in names:
        row = dict(impl=name, decay=decay_kind, T=t, B=b, H=h, D=d)
        try:
          if name == "fla":
            fwd_ms, fwd_bwd_ms, peak_mb = _measure_fla(decay_kind, b, t, h, d, _ITERS.value)
          else:
            fwd_ms, fwd_bwd_ms, peak_mb = _measure_jax(impls[name], inputs, _ITERS.value)
          row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, peak_mb=peak_mb)
        except ImportError as e:
          row["error"] = f"not importable: {e}"
        except Exception as e:  # a peer that cannot run a row (OOM, unsupported) is reported, not fatal
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          traceback.print_exc(limit=2)
        rows.append(row)
        print(row, flush=True)
        # Rewritten after every row, so a run cut short keeps what it measured.
        write_results(_OUT_DIR.value, "linear_attention", env, rows, _table(rows))
      del inputs


def _table(rows):
  names = list(dict.fromkeys(r["impl"] for r in rows))
  lines = [f"ms fwd / fwd+bwd (bf16, B={rows[0]['B']}, H={rows[0]['H']}, K=V={rows[0]['D']}); "
           f"peak MB of the fwd+bwd in brackets; "
           f"{timing.describe_timing(_ITERS.value, _BACK_TO_BACK.value)}", "",
           "| decay, T | " + " | ".join(names) + " | ours / fla |", "|---" * (len(names) + 2) + "|"]
  for decay, t in dict.fromkeys((r["decay"], r["T"]) for r in rows):
    by_name = {r["impl"]: r for r in rows if (r["decay"], r["T"]) == (decay, t)}
    cells = []
    for name in names:
      r = by_name.get(name, {})
      if "fwd_ms" not in r:
        cells.append("n/a")
        continue
      peak = "" if r["peak_mb"] is None else f" [{r['peak_mb']:.0f}]"
      cells.append(f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f}{peak}")
    ours, fla = by_name.get("ours", {}), by_name.get("fla", {})
    ratio = (f"{ours['fwd_ms'] / fla['fwd_ms']:.2f} / {ours['fwd_bwd_ms'] / fla['fwd_bwd_ms']:.2f}"
             if "fwd_ms" in ours and "fwd_ms" in fla else "n/a")
    length = f"{t // 1024}K" if t % 1024 == 0 else str(t)
    lines.append(f"| {decay}, {length} | " + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
