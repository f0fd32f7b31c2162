"""Sweeps the flash-attention kernels' tile sizes and Triton launch parameters on the current GPU.

  python -m experiments.bench.flash_attention_tune --head_dims=64,128

Times each kernel (forward, dq, dk/dv) on its own for every candidate and prints the best per kernel and
shape, which is what `BlockSizes.get_default` should return on this card.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench.timing import environment, median_ms
from kernels.flash_attention import pallas_gpu

_HEAD_DIMS = flags.DEFINE_list("head_dims", ["128", "64"], "Head dims to tune.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "T = S.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed runs per candidate.")

FORWARD = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
           for bq, bk, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))]
DQ = [dict(block_q_dq=bq, block_k_dq=bk, num_warps_dq=w, num_stages_dq=st)
      for bq, bk, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
DKV = [dict(block_q_dkv=bq, block_k_dkv=bk, num_warps_dkv=w, num_stages_dkv=st)
       for bq, bk, w, st in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3))]


def _tune(name, candidates, run, inputs, iters):
  results = []
  for candidate in candidates:
    blocks = dataclasses.replace(pallas_gpu.BlockSizes(), **candidate)
    try:
      ms = median_ms(jax.jit(lambda *a, blocks=blocks: run(*a, blocks=blocks)), inputs, warmup=2, iters=iters)
    except Exception as e:  # candidates that exceed shared memory or registers fail to compile
      print(f"{name} {candidate}: {type(e).__name__}")
      continue
    results.append((ms, candidate))
  results.sort(key=lambda r: r[0])
  for ms, candidate in results[:3]:
    print(f"  {name}: {ms:.3f} ms {candidate}", flush=True)
  return results


def main(argv):
  del argv
  print(environment())
  t = _SEQ_LEN.value
  for d in map(int, _HEAD_DIMS.value):
    b, h = 16384 // t, 2048 // d
    for causal in (False, True):
      print(f"T={t} D={d} causal={causal}", flush=True)
      static = pallas_gpu._Static(
          sm_scale=d**-0.5, causal=causal, window=None, offset=0,
          has_kv_length=False, group=1, precision=None)
      inputs = []
      for seed in range(2):
        ks = jax.random.split(jax.random.key(seed), 4)
        q, k, v, do = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in ks)
        lengths = jnp.full((b,), t, jnp.int32)
        o, lse = pallas_gpu.forward(q, k, v, lengths, static=static, blocks=pallas_gpu.BlockSizes(),
                                    interpret=False)
        delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
        inputs.append((q, k, v, do, lse * pallas_gpu.LOG2_E, delta, lengths))
      fwd = lambda q, k, v, do, lse2, delta, lengths, blocks: pallas_gpu.forward(
          q, k, v, lengths, static=static, blocks=blocks, interpret=False)
      dq = lambda *a, blocks: pallas_gpu.backward_dq(*a, static=static, blocks=blocks, interpret=False)
      dkv = lambda *a, blocks: pallas_gpu.backward_dkv(*a, static=static, blocks=blocks, interpret=False)
      flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
      best = {}
      for name, candidates, run, work in (("forward", FORWARD, fwd, flops), ("dq", DQ, dq, 1.25 * flops),
                                          ("dkv", DKV, dkv, 1.25 * flops)):
        results = _tune(name, candidates, run, inputs, _ITERS.value)
        if results:
          best[name] = results[0]
          print(f"  best {name}: {work / results[0][0] / 1e9:.0f} TFLOP/s", flush=True)
      print(f"BEST T={t} D={d} causal={causal}: {best}", flush=True)


if __name__ == "__main__":
  app.run(main)
