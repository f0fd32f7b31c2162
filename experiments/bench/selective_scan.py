"""Selective-scan (Mamba-1) benchmark: ms forward and forward+backward against XLA baselines and mamba_ssm.

  python -m experiments.bench.selective_scan --out_dir=benchmarks/results [--sweep] [--mamba_ssm_src=DIR]

Rows: B=4, Dm=1536, N=16, L in {2K, 8K, 32K}, fp32 and bf16 (x, dt, z, B, C in that dtype; A, D, dt_bias fp32,
as Mamba keeps its parameters), with D, z, dt_bias and softplus. Implementations:
  ours        kernels.selective_scan(impl="pallas")
  ours[seg=S] the same with BlockSizes(segment=S), time split into segments scanned in parallel (--segments;
              an entry S:field=value:... also sets other BlockSizes fields, e.g. 512:num_warps=2:block_d=8)
  triton      kernels.selective_scan(impl="triton"), the chunk-parallel Triton-language kernels (jax-triton)
  triton[S]   the same with triton_config.BlockSizes(**S) for each --triton_blocks entry S, e.g.
              block_d=8:chunk=8:block_d_bwd=16:chunk_bwd=8:num_warps_bwd=2:atomic_bc=1
  xla         kernels.selective_scan(impl="xla"), the chunked jnp reference
  assoc_scan  jax.lax.associative_scan over the full [B, L, Dm, N] state history (the textbook JAX baseline)
  mamba_ssm   mamba_ssm's CUDA kernels (csrc/selective_scan), built with torch.utils.cpp_extension.load when
              --mamba_ssm_src points at the extracted sdist (about 3 minutes to build on 16 cores)
The memory floor is the time to read every input once and write y once at the measured copy rate.
--sweep also times a few BlockSizes of ours (at L=8K by default), for choosing the defaults.
"""

import os
import sys

if any(arg.startswith("--mamba_ssm_src") for arg in sys.argv):
  # torch allocates beside JAX in this process; without this JAX preallocates 75% of the GPU first.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench import timing  # noqa: E402
from experiments.bench.timing import environment, median_ms, write_results  # noqa: E402
from kernels.selective_scan import selective_scan  # noqa: E402
from kernels.selective_scan.pallas_gpu import BlockSizes  # noqa: E402
from kernels.selective_scan.triton_config import BlockSizes as TritonBlockSizes  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON and markdown go.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192", "32768"], "Sequence lengths L.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Dtypes of x, dt, z, B, C.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "triton", "xla", "assoc_scan", "mamba_ssm"],
                           "Implementations to time.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed samples per measurement (median reported).")
_BACK_TO_BACK = timing.define_back_to_back_flag()
_SEGMENTS = flags.DEFINE_list("segments", [], "Also time ours with BlockSizes(segment=S) for each S, as rows "
                               "ours[seg=S], e.g. 256,512,1024; S:field=value:... sets other BlockSizes fields.")
_TRITON_BLOCKS = flags.DEFINE_list("triton_blocks", [], "Also time impl='triton' with these tiles, as rows "
                                    "triton[S]; S is field=value:field=value:... of triton_config.BlockSizes.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also time a few BlockSizes of ours at L=--sweep_len.")
_SWEEP_LEN = flags.DEFINE_integer("sweep_len", 8192, "Sequence length of the BlockSizes sweep.")
_MAMBA_SRC = flags.DEFINE_string("mamba_ssm_src", None, "Extracted mamba_ssm sdist (the folder holding csrc/).")
_BATCH, _DM, _N = 4, 1536, 16
SWEEP = [
    BlockSizes(),
    BlockSizes(block_d=8),
    BlockSizes(block_d=8, num_warps=2),
    BlockSizes(block_d=32, num_warps=4),
    BlockSizes(block_d=4, num_warps=2),
    BlockSizes(chunk=8),
    BlockSizes(chunk=32),
    BlockSizes(num_stages=3),
]


def _inputs(length, dtype, seed):
  """Mamba-like inputs: softplus(dt + dt_bias) mostly in [1e-3, 1e-1], A = -(1..N), unit-scale x, z, B, C."""
  ks = jax.random.split(jax.random.key(seed), 7)
  seq = (_BATCH, length, _DM)
  bc = (_BATCH, length, _N)
  return dict(
      x=jax.random.normal(ks[0], seq, dtype),
      dt=(0.5 * jax.random.normal(ks[1], seq, jnp.float32)).astype(dtype),
      A=-jnp.broadcast_to(jnp.arange(1, _N + 1, dtype=jnp.float32), (_DM, _N)),
      B=jax.random.normal(ks[2], bc, dtype),
      C=jax.random.normal(ks[3], bc, dtype),
      D=jax.random.normal(ks[4], (_DM,), jnp.float32),
      z=jax.random.normal(ks[5], seq, dtype),
      dt_bias=jax.random.uniform(ks[6], (_DM,), jnp.float32, -6.0, -2.0),
      dy=jax.random.normal(jax.random.fold_in(ks[0], 1), seq, dtype),
  )


def _assoc_scan(x, dt, A, B, C, *, D, z, dt_bias):
  """The whole [B, L, Dm, N] history through jax.lax.associative_scan, fp32 inside."""
  delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
  decay = jnp.exp(delta[..., None] * A)
  inject = (delta * x.astype(jnp.float32))[..., None] * B.astype(jnp.float32)[:, :, None, :]

  def compose(earlier, later):
    return earlier[0] * later[0], later[0] * earlier[1] + later[1]

  _, states = jax.lax.associative_scan(compose, (decay, inject), axis=1)
  y = jnp.sum(states * C.astype(jnp.float32)[:, :, None, :], axis=-1) + D * x.astype(jnp.float32)
  zf = z.astype(jnp.float32)
  return (y * zf * jax.nn.sigmoid(zf)).astype(x.dtype)


def _ours(blocks=None):
  return lambda x, dt, A, B, C, D, z, dt_bias: selective_scan(
      x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, impl="pallas", block_sizes=blocks)


def _triton(blocks=None):
  return lambda x, dt, A, B, C, D, z, dt_bias: selective_scan(
      x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, impl="triton", block_sizes=blocks)


def _int_fields(fields: list[str]) -> dict[str, int]:
  """['block_d=8', 'chunk=32'] -> {'block_d': 8, 'chunk': 32}: the field=value parts of a tile spec."""
  return {k: int(v) for k, v in (field.split("=") for field in fields)}


def _triton_blocks(spec: str) -> TritonBlockSizes:
  """'block_d=8:chunk=32:atomic_bc=1' -> TritonBlockSizes(block_d=8, chunk=32, atomic_bc=True)."""
  fields = _int_fields(spec.split(":"))
  return TritonBlockSizes(**{k: bool(v) if k in ("atomic_bc", "prefetch") else v for k, v in fields.items()})


def _segmented_blocks(spec: str) -> BlockSizes:
  """'512' or '512:num_warps=2:block_d=8' -> BlockSizes(segment=512, num_warps=2, block_d=8)."""
  segment, *fields = spec.split(":")
  return BlockSizes(segment=int(segment), **_int_fields(fields))


def _jax_impls(names, segments, triton_specs):
  impls = {
      "ours": _ours(),
      "triton": _triton(),
      "xla": lambda x, dt, A, B, C, D, z, dt_bias: selective_scan(
          x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, impl="xla"),
      "assoc_scan": lambda x, dt, A, B, C, D, z, dt_bias: _assoc_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias),
  }
  impls = {name: fn for name, fn in impls.items() if name in names}
  impls.update({f"ours[seg={spec}]": _ours(_segmented_blocks(spec)) for spec in segments})
  impls.update({f"triton[{spec}]": _triton(_triton_blocks(spec)) for spec in triton_specs})
  return impls


_ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _measure_jax(scan, input_sets, iters, back_to_back):
  """(fwd ms, fwd+bwd ms); fwd+bwd is the gradient of sum(y * dy) with respect to all eight inputs."""
  sets = [tuple(s[k] for k in _ARG_NAMES) + (s["dy"],) for s in input_sets]
  fwd = jax.jit(lambda *a: scan(*a[:-1]))

  def loss(*a):
    return jnp.sum(scan(*a[:-1]).astype(jnp.float32) * a[-1].astype(jnp.float32))

  fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(_ARG_NAMES)))))
  return (median_ms(fwd, sets, iters=iters, back_to_back=back_to_back),
          median_ms(fwd_bwd, sets, iters=iters, back_to_back=back_to_back))


def _copy_rate() -> float:
  """Bytes per second of a read+write streaming pass over 1 GiB, the floor's denominator."""
  a = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.float32)
  ms = median_ms(jax.jit(lambda a: a + 1.0), [(a,)], iters=20)
  return 2 * a.nbytes / (ms * 1e-3)


def _floor_ms(length, dtype, rate):
  itemsize = jnp.dtype(dtype).itemsize
  # Read x, dt, z, B, C once (A, D, dt_bias are tiny), write y once.
  moved = (4 * _BATCH * length * _DM + 2 * _BATCH * length * _N) * itemsize
  return moved / rate * 1e3


class _MambaSsm:
  """mamba_ssm's CUDA selective scan, called directly (its layout is channel-first: [B, Dm, L], [B, G, N, L])."""

  def __init__(self, src):
    import glob

    import torch
    from torch.utils import cpp_extension

    csrc = os.path.join(src, "csrc", "selective_scan")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    if not sources:
      raise FileNotFoundError(f"no .cpp/.cu files under {csrc}")
    # The flags of mamba_ssm's setup.py, for Hopper only.
    self.module = cpp_extension.load(
        name="selective_scan_cuda", sources=sources, verbose=False,
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                           "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                           "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
                           "-gencode", "arch=compute_90,code=sm_90"],
    )
    self.torch = torch

  def measure(self, length, dtype, iters, back_to_back):
    torch = self.torch
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape, dt=tdtype: torch.randn(*shape, device="cuda", dtype=dt, generator=gen)
    u, z, dout = (randn(_BATCH, _DM, length) for _ in range(3))
    delta = (0.5 * randn(_BATCH, _DM, length, dt=torch.float32)).to(tdtype)
    # Input-dependent B/C go in as [B, G, N, L] (G=1 here).
    b, c = randn(_BATCH, 1, _N, length), randn(_BATCH, 1, _N, length)
    a = -torch.arange(1, _N + 1, device="cuda", dtype=torch.float32).expand(_DM, _N).contiguous()
    d = randn(_DM, dt=torch.float32)
    bias = torch.rand(_DM, device="cuda", generator=gen) * 4 - 6
    m = self.module

    def fwd():
      return m.fwd(u, delta, a, b, c, d, z, bias, True)

    def fwd_bwd():
      out, x, *rest = m.fwd(u, delta, a, b, c, d, z, bias, True)
      return m.bwd(u, delta, a, b, c, d, z, bias, dout, x, out, None, True, False)

    median = lambda fn: timing.torch_median_ms(torch, fn, [()], iters=iters, back_to_back=back_to_back)
    return median(fwd), median(fwd_bwd)


def _error(e):
  traceback.print_exc(limit=1)
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def main(argv):
  del argv
  env = environment()
  impls = _jax_impls(_IMPLS.value, _SEGMENTS.value, _TRITON_BLOCKS.value)
  mamba = None
  if "mamba_ssm" in _IMPLS.value and _MAMBA_SRC.value:
    try:
      mamba = _MambaSsm(_MAMBA_SRC.value)
    except Exception as e:  # a peer that cannot build is reported and skipped
      print(f"mamba_ssm skipped: {_error(e)}")
  elif "mamba_ssm" in _IMPLS.value:
    print("mamba_ssm skipped: pass --mamba_ssm_src=DIR (extracted sdist) to build its CUDA scan")
  rate = _copy_rate()
  env["copy_rate_gb_s"] = rate / 1e9
  env["back_to_back"] = _BACK_TO_BACK.value
  rows, names = [], list(impls) + (["mamba_ssm"] if mamba else [])
  for dtype in _DTYPES.value:
    for length in map(int, _SEQ_LENS.value):
      input_sets = [_inputs(length, jnp.dtype(dtype), seed) for seed in range(2)]
      floor = _floor_ms(length, dtype, rate)
      for name in names:
        row = dict(impl=name, L=length, dtype=dtype, B=_BATCH, Dm=_DM, N=_N, floor_ms=floor)
        try:
          if name == "mamba_ssm":
            fwd_ms, fwd_bwd_ms = mamba.measure(length, dtype, _ITERS.value, _BACK_TO_BACK.value)
          else:
            fwd_ms, fwd_bwd_ms = _measure_jax(impls[name], input_sets, _ITERS.value, _BACK_TO_BACK.value)
          row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms)
        except Exception as e:  # OOM (assoc_scan at 32K) or an unsupported row is reported, not fatal
          row["error"] = _error(e)
        rows.append(row)
        print(row, flush=True)
      del input_sets
      # Written after every length, so a run cut short still leaves the rows it measured.
      write_results(_OUT_DIR.value, "selective_scan", env, rows, _table(rows, names, []))
  sweep_rows = []
  if _SWEEP.value:
    for dtype in _DTYPES.value:
      input_sets = [_inputs(_SWEEP_LEN.value, jnp.dtype(dtype), seed) for seed in range(2)]
      for blocks in SWEEP:
        row = dict(impl="ours", L=_SWEEP_LEN.value, dtype=dtype, blocks=str(blocks))
        try:
          row["fwd_ms"], row["fwd_bwd_ms"] = _measure_jax(_ours(blocks), input_sets, _ITERS.value,
                                                          _BACK_TO_BACK.value)
        except Exception as e:  # a tile choice Triton rejects is reported, not fatal
          row["error"] = _error(e)
        sweep_rows.append(row)
        print(row, flush=True)
        write_results(_OUT_DIR.value, "selective_scan", env, rows + sweep_rows, _table(rows, names, sweep_rows))
      del input_sets


def _table(rows, names, sweep_rows):
  cell = lambda r: f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f}" if "fwd_ms" in r else "n/a"
  # Every variant of ours and of triton against mamba_ssm, the plain one against assoc_scan.
  pairs = [("ours", "assoc_scan")] + [(name, "mamba_ssm") for name in names if name.startswith(("ours", "triton"))]
  lines = [f"ms fwd / fwd+bwd (B={_BATCH}, Dm={_DM}, N={_N}, with D, z, dt_bias, softplus); "
           f"{timing.describe_timing(_ITERS.value, _BACK_TO_BACK.value)}", "",
           "| dtype, L | " + " | ".join(names) + " | floor (fwd) | "
           + " | ".join(f"{mine} / {peer}" for mine, peer in pairs) + " |",
           "|---" * (len(names) + 2 + len(pairs)) + "|"]
  for dtype, length in sorted({(r["dtype"], r["L"]) for r in rows}):
    by_name = {r["impl"]: r for r in rows if (r["dtype"], r["L"]) == (dtype, length)}
    ratios = []
    for mine, peer in pairs:
      ours, other = by_name.get(mine, {}), by_name.get(peer, {})
      ratios.append(f"{ours['fwd_ms'] / other['fwd_ms']:.2f} / {ours['fwd_bwd_ms'] / other['fwd_bwd_ms']:.2f}"
                    if "fwd_ms" in ours and "fwd_ms" in other else "n/a")
    floor = next(iter(by_name.values()))["floor_ms"]
    label = f"{length // 1024}K" if length >= 1024 else str(length)
    lines.append(f"| {dtype}, {label} | " + " | ".join(cell(by_name.get(n, {})) for n in names)
                 + f" | {floor:.3f} | " + " | ".join(ratios) + " |")
  if sweep_rows:
    lines += ["", f"Block sizes of ours at L={sweep_rows[0]['L']}, ms fwd / fwd+bwd", "",
              "| dtype | BlockSizes | ms |", "|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['blocks']} | {cell(r)} |" for r in sweep_rows]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
