"""Block-sparse attention benchmark: sliding windows and BigBird against dense flash, cuDNN and FlexAttention.

  python -m experiments.bench.block_sparse --out_dir=benchmarks/results

Rows: bf16, B=1, H=16, D=128, T in {8K, 16K, 32K}; causal sliding windows of 256/1024/4096 keys and a
bidirectional BigBird (128-position blocks, 3 sliding, 1 global, 3 random). FLOPs as FlashAttention counts them
(forward 4*B*H*T*S*D, backward 2.5x forward), for sparse masks over attended pairs only; "block TFLOP/s" counts
every element of the non-empty tiles (the work the kernel does), and the issue's bar is block TFLOP/s >= 0.8x our
dense flash TFLOP/s (kernels.flash_attention, non-causal) at the same T: each block-sparse kernel is set against
the dense flash of the same lowering (impl="pallas" for ours, impl="mosaic" for mosaic). Peers in the same process:
cuDNN sliding window (`jax.nn.dot_product_attention(local_window_size=...)`) and PyTorch FlexAttention when torch
is importable. Results are rewritten after every row, so a run cut short still leaves the rows it finished.
"""

import os

# JAX would otherwise take 75% of the GPU up front and leave PyTorch (FlexAttention) nothing.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench import timing  # noqa: E402
from experiments.bench.timing import environment, median_ms, write_results  # noqa: E402
from kernels.block_sparse import bigbird, block_sparse_attention, local  # noqa: E402
from kernels.block_sparse import mosaic_gpu as block_sparse_mosaic  # noqa: E402
from kernels.block_sparse import mosaic_gpu_bwd as block_sparse_mosaic_bwd  # noqa: E402
from kernels.block_sparse.mask import bigbird_block_layout  # noqa: E402
from kernels.flash_attention import flash_attention, pallas_gpu  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON and markdown go.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "16384", "32768"], "Sequence lengths T (= S).")
_PATTERNS = flags.DEFINE_list("patterns", ["sliding-256", "sliding-1024", "sliding-4096", "bigbird"],
                              "Sparse patterns to time.")
_IMPLS = flags.DEFINE_list(
    "impls", ["ours", "mosaic", "cudnn", "flex"],
    "Sparse implementations to time (besides dense flash): ours (impl='pallas', the Triton lowering), mosaic "
    "(impl='mosaic', the Mosaic GPU kernels for Hopper, default config; any mosaic kernel also adds a dense flash "
    "row with impl='mosaic' to compare against), mosaic-qbuf1 (its forward with one Q buffer and a 2-deep mask "
    "ring), mosaic-lateq (the next row's Q loaded after a row's first step), mosaic-overlap (S_j issued with "
    "P_{j-1} V_{j-1}, softmax under the P V product), mosaic-band / mosaic-band3 (window "
    "masks computed in the kernels, with two Q buffers / one Q buffer and three K/V stages), mosaic-band-bwd4 "
    "(mosaic-band with a 4-deep dk/dv ring in the backward, which fits without the bias ring), mosaic-grid (one CTA "
    "per row or key tile instead of persistent kernels), cudnn, flex.")
_BATCH = flags.DEFINE_integer(
    "batch", 1, "B, the batch size (H = 16, D = 128). Runs at B = 1, 2, 4 split a call's fixed cost (launch, the "
    "first ring fills, the last wave) from the per-row cost that grows with B.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed samples per measurement (median reported).")
_BACK_TO_BACK = timing.define_back_to_back_flag()
_TILE = flags.DEFINE_integer("mask_tile", 128, "The BlockMask's tile (block_q = block_k), a power of two >= 16.")
_BLOCKS = flags.DEFINE_list(
    "blocks", [], "Overrides of our kernels' tiles and launch parameters, field=value each (fields of "
    "kernels.flash_attention.pallas_gpu.BlockSizes, e.g. block_q=64,num_warps=4), applied to the defaults for D; "
    "tiles are still capped at the mask tile. Dense flash keeps its defaults.")
_H, _D = 16, 128
# impl='mosaic' kernels by name: the default config, the forward with one Q buffer (the next row's Q loads only
# after this row's O has left) and two slots for partial tiles' masks, the next row's Q loaded after a row's first
# step (late_q_prefetch) rather than at its start, FA3's intra-warpgroup pipelining (overlap), window masks from
# band bounds in the kernels with two Q buffers, or with one and three K/V stages (BigBird's tiles are all full: no
# masks to load either way), the band-mask kernels with a 4-deep dk/dv ring, and one CTA per row or key tile.
_MOSAIC_KERNELS = {"mosaic": None, "mosaic-qbuf1": block_sparse_mosaic.Config(q_buffers=1),
                   "mosaic-lateq": block_sparse_mosaic.Config(late_q_prefetch=True),
                   "mosaic-overlap": block_sparse_mosaic.Config(overlap=True),
                   "mosaic-band": block_sparse_mosaic.Config(band_masks=True),
                   "mosaic-band3": block_sparse_mosaic.Config(band_masks=True, num_stages=3, q_buffers=1),
                   "mosaic-band-bwd4": block_sparse_mosaic.Config(
                       band_masks=True, backward_config=block_sparse_mosaic_bwd.Config(num_stages_dkv=4)),
                   "mosaic-grid": block_sparse_mosaic.Config(persistent=False)}
_BIGBIRD = dict(block_size=128, num_sliding_blocks=3, num_global_blocks=1, num_random_blocks=3, seed=0, causal=False)


def kernel_blocks(overrides: list[str], head_dim: int = _D) -> pallas_gpu.BlockSizes:
  """The default GPU BlockSizes for head_dim with `field=value` overrides; ValueError names a bad entry."""
  blocks = pallas_gpu.BlockSizes.get_default(head_dim)
  fields = {f.name for f in dataclasses.fields(blocks)}
  changes = {}
  for entry in overrides:
    name, _, value = entry.partition("=")
    if name not in fields or not value.isdigit():
      raise ValueError(f"--blocks entry {entry!r} is not valid; use field=int with field one of {sorted(fields)}")
    changes[name] = int(value)
  return dataclasses.replace(blocks, **changes)


def _window(pattern: str) -> int | None:
  return int(pattern.split("-")[1]) if pattern.startswith("sliding-") else None


def _mask(pattern: str, t: int):
  window = _window(pattern)
  tiles = dict(block_q=_TILE.value, block_k=_TILE.value)
  return local(t, window, **tiles) if window is not None else bigbird(t, **_BIGBIRD, **tiles)


def _input_sets(t, count=2):
  sets = []
  for seed in range(count):
    keys = jax.random.split(jax.random.key(seed), 4)
    sets.append(tuple(jax.random.normal(key, (_BATCH.value, t, _H, _D), jnp.bfloat16) for key in keys))
  return sets


def _measure_jax(attention, inputs, iters):
  """(fwd ms, fwd+bwd ms) of attention(q, k, v) -> o."""
  fwd = jax.jit(lambda q, k, v, do: attention(q, k, v))

  def loss(q, k, v, do):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return (median_ms(fwd, inputs, iters=iters, back_to_back=_BACK_TO_BACK.value),
          median_ms(fwd_bwd, inputs, iters=iters, back_to_back=_BACK_TO_BACK.value))


def _flex():
  """(torch, flex_attention, create_block_mask) or None when PyTorch with a GPU is not importable."""
  # Imported after JAX has started its GPU backend (main calls environment() first), so JAX loads its own
  # CUDA libraries (cuDNN above all) and PyTorch shares them rather than the other way round.
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except Exception as e:  # ImportError, or a CUDA library clash: the peer is skipped, the run goes on
    print(f"torch (FlexAttention) not importable ({type(e).__name__}: {e}); skipped")
    return None
  if not torch.cuda.is_available():
    print("torch sees no GPU; FlexAttention skipped")
    return None
  return torch, torch.compile(flex_attention), create_block_mask


def _measure_flex(flex, pattern, t, iters):
  torch, attention, create_block_mask = flex
  window = _window(pattern)
  if window is not None:
    mask_mod = lambda b, h, q, k: (q >= k) & (q - k < window)
  else:
    layout = torch.as_tensor(bigbird_block_layout(t // _BIGBIRD["block_size"], **{
        k: v for k, v in _BIGBIRD.items() if k != "block_size"}), device="cuda")
    size = _BIGBIRD["block_size"]
    mask_mod = lambda b, h, q, k: layout[q // size, k // size]
  block_mask = create_block_mask(mask_mod, None, None, t, t, device="cuda")
  sets = [tuple(torch.randn(_BATCH.value, _H, t, _D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                for i in range(4)) for _ in range(2)]

  def fwd(q, k, v, do):
    with torch.no_grad():
      return attention(q, k, v, block_mask=block_mask)

  def fwd_bwd(q, k, v, do):
    attention(q, k, v, block_mask=block_mask).backward(do)

  median = lambda fn: timing.torch_median_ms(torch, fn, sets, iters=iters, back_to_back=_BACK_TO_BACK.value)
  return median(fwd), median(fwd_bwd)


def _row(rows, env, name, pattern, t, flops, block_flops, measure):
  """Measures one row, appends it and rewrites the results, so a run cut short keeps every finished row."""
  row = dict(impl=name, pattern=pattern, T=t, B=_BATCH.value, H=_H, D=_D)
  try:
    fwd_ms, fwd_bwd_ms = measure()
    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
               fwd_bwd_tflops=3.5 * flops / fwd_bwd_ms / 1e9)
    if block_flops is not None:
      row.update(fwd_block_tflops=block_flops / fwd_ms / 1e9, fwd_bwd_block_tflops=3.5 * block_flops / fwd_bwd_ms / 1e9)
  except Exception as e:  # a peer that cannot run a row (OOM, unsupported) is reported, not fatal
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    traceback.print_exc(limit=1)
  print(row, flush=True)
  rows.append(row)
  write_results(_OUT_DIR.value, "block_sparse", env, rows, _table(rows))


def main(argv):
  del argv
  blocks = kernel_blocks(_BLOCKS.value)
  env = environment()
  env["blocks"] = dataclasses.asdict(blocks)
  env["back_to_back"] = _BACK_TO_BACK.value
  flex = _flex() if "flex" in _IMPLS.value else None
  rows, pattern_flops = [], {}
  for t in map(int, _SEQ_LENS.value):
    inputs = _input_sets(t)
    per_pair = 4 * _BATCH.value * _H * _D  # FLOPs of one attended (query, key) pair over the batch and heads
    dense_flops = per_pair * t * t
    for causal in (False, True):
      name = "flash-causal" if causal else "flash-dense"
      _row(rows, env, name, "dense", t, dense_flops * (0.5 if causal else 1.0), None, lambda: _measure_jax(
          lambda q, k, v: flash_attention(q, k, v, causal=causal, impl="pallas"), inputs, _ITERS.value))
    if set(_MOSAIC_KERNELS) & set(_IMPLS.value):
      _row(rows, env, "flash-dense-mosaic", "dense", t, dense_flops, None, lambda: _measure_jax(
          lambda q, k, v: flash_attention(q, k, v, impl="mosaic"), inputs, _ITERS.value))
    for pattern in _PATTERNS.value:
      start = time.perf_counter()
      mask = _mask(pattern, t)
      print(f"{pattern} T={t}: {mask} built in {time.perf_counter() - start:.1f}s", flush=True)
      flops = pattern_flops[pattern, t] = per_pair * mask.attended_pairs() // mask.num_heads
      block_flops = per_pair * mask.nonempty_blocks() * mask.block_q * mask.block_k // mask.num_heads
      if "ours" in _IMPLS.value:
        _row(rows, env, "ours", pattern, t, flops, block_flops, lambda: _measure_jax(
            lambda q, k, v: block_sparse_attention(q, k, v, mask, impl="pallas", block_sizes=blocks), inputs,
            _ITERS.value))
      for kernel, config in _MOSAIC_KERNELS.items():
        if kernel in _IMPLS.value:
          _row(rows, env, kernel, pattern, t, flops, block_flops, lambda: _measure_jax(
              lambda q, k, v: block_sparse_attention(q, k, v, mask, impl="mosaic", block_sizes=blocks,
                                                     mosaic_config=config), inputs, _ITERS.value))
      window = _window(pattern)
      if "cudnn" in _IMPLS.value and window is not None:
        _row(rows, env, "cudnn", pattern, t, flops, None, lambda: _measure_jax(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0),
                                                         implementation="cudnn"), inputs, _ITERS.value))
  # FlexAttention last: torch.compile recompiles per pattern and length, and the JAX rows matter most.
  if flex is not None:
    for (pattern, t), flops in pattern_flops.items():
      _row(rows, env, "flex", pattern, t, flops, None, lambda: _measure_flex(flex, pattern, t, _ITERS.value))


def _table(rows):
  overrides = f", our kernel tiles with {', '.join(_BLOCKS.value)}" if _BLOCKS.value else ""
  lines = [f"bf16, B={_BATCH.value}, H={_H}, D={_D}, mask tiles {_TILE.value}x{_TILE.value}{overrides}. ms fwd / "
           "fwd+bwd "
           f"({timing.describe_timing(_ITERS.value, _BACK_TO_BACK.value)}); ours: "
           "TFLOP/s on attended pairs and on non-empty tiles, and tile TFLOP/s over the same lowering's dense flash "
           "(bar: >= 0.8); kernel ours = impl='pallas' (Triton), mosaic* = impl='mosaic' (-qbuf1: one Q buffer, two "
           "mask slots; -lateq: next Q after a row's first step; -overlap: FA3 intra-warpgroup pipelining; -band / "
           "-band3: masks from band bounds, two Q buffers / one and three stages; -band-bwd4: -band with a 4-deep "
           "dk/dv ring; -grid: one CTA per row or key tile "
           "instead of persistent kernels)", "",
           "| T | pattern | kernel | ms | TFLOP/s (pairs) | TFLOP/s (tiles) | tiles / dense flash | cuDNN ms "
           "| Flex ms | dense flash ms (TFLOP/s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  fmt_ms = lambda r: f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}" if r and "fwd_ms" in r else "n/a"
  for t in sorted({r["T"] for r in rows}):
    at = {(r["impl"], r["pattern"]): r for r in rows if r["T"] == t}
    for pattern in [p for p in _PATTERNS.value if any(r["pattern"] == p for r in at.values())]:
      for kernel in ("ours", *_MOSAIC_KERNELS):
        dense_name = "flash-dense" if kernel == "ours" else "flash-dense-mosaic"
        ours, dense = at.get((kernel, pattern)), at.get((dense_name, "dense"), {})
        if ours is None:
          continue
        pairs = tiles = ratio = "n/a"
        if "fwd_ms" in ours:
          pairs = f"{ours['fwd_tflops']:.0f} / {ours['fwd_bwd_tflops']:.0f}"
          tiles = f"{ours['fwd_block_tflops']:.0f} / {ours['fwd_bwd_block_tflops']:.0f}"
          if "fwd_ms" in dense:
            ratio = (f"{ours['fwd_block_tflops'] / dense['fwd_tflops']:.2f} / "
                     f"{ours['fwd_bwd_block_tflops'] / dense['fwd_bwd_tflops']:.2f}")
        flash = (f"{fmt_ms(dense)} ({dense['fwd_tflops']:.0f} / {dense['fwd_bwd_tflops']:.0f})"
                 if "fwd_ms" in dense else "n/a")
        lines.append(f"| {t // 1024}K | {pattern} | {kernel} | {fmt_ms(ours)} | {pairs} | {tiles} | {ratio} | "
                     f"{fmt_ms(at.get(('cudnn', pattern)))} | {fmt_ms(at.get(('flex', pattern)))} | {flash} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
