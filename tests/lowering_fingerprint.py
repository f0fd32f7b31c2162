"""Fingerprints of the compiled Mosaic GPU kernels, for refactoring them on a machine without a GPU.

    python -m tests.lowering_fingerprint > before.txt   # then refactor, and again > after.txt; diff the two

Each line is one kernel configuration and the SHA-256 of the Mosaic GPU MLIR that its CUDA lowering embeds in the
custom call, printed without debug locations (which carry source line numbers). Equal fingerprints mean the GPU runs
exactly the same kernels, so a refactor that keeps them needs no new GPU measurement. The lowering runs on the host
(`lowering_platforms=("cuda",)`); only PTX compilation needs the GPU. The dump file name, which counts the kernels
lowered before in the process, is left out, so a line does not depend on which others ran.
"""

import dataclasses
import hashlib
import re

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import mosaic_gpu_dialect
from jax._src.lib.mlir import ir

from kernels.block_sparse import global_tokens, local, stack_heads
from kernels.block_sparse import mosaic_gpu as block_sparse_fwd
from kernels.block_sparse import mosaic_gpu_bwd as block_sparse_bwd
from kernels.flash_attention import mosaic_gpu as flash_fwd
from kernels.flash_attention import mosaic_gpu_bwd as flash_bwd


def kernel_texts(lowered) -> list[str]:
  """The Mosaic GPU modules of a `jax.stages.Lowered`, as MLIR text without debug locations."""
  texts = []

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if inner.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.operation.attributes:
            config = ir.DictAttr(inner.operation.attributes["mhlo.backend_config"])
            if "module" in config:
              with jax_mlir.make_ir_context() as context:
                mosaic_gpu_dialect.register_dialect(context)  # its types (barriers) inside memrefs must parse
                context.allow_unregistered_dialects = True
                module = ir.Module.parse(ir.StringAttr(config["module"]).value_bytes)
                text = module.operation.get_asm(enable_debug_info=False)
                # The dump file name counts the kernels lowered so far in the process: not part of the kernel.
                texts.append(re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', "", text))
          visit(inner.operation)

  visit(lowered.compiler_ir("stablehlo").operation)
  return texts


def fingerprint(fn, *args) -> str:
  """SHA-256 (16 hex digits) of the Mosaic GPU kernels that jax.jit(fn)(*args) lowers to for CUDA."""
  texts = kernel_texts(jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)))
  if not texts:
    raise ValueError("the function lowers to no Mosaic GPU kernel")
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def _cases():
  """(name, fn, args) of the kernel configurations worth pinning: every default and opt-in code path."""
  t, h, hkv, d = 1024, 4, 2, 128
  q = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, h, t), jnp.float32)
  for causal in (False, True):
    for overlap in (False, True):
      config = flash_fwd.Config(overlap=overlap)
      yield (f"flash forward causal={causal} overlap={overlap}",
             lambda q, k, v, c=causal, cfg=config: flash_fwd.forward(q, k, v, causal=c, sm_scale=0.1, config=cfg),
             (q, k, k))
    for fused in (False, True):
      blocks = dataclasses.replace(flash_bwd.BlockSizes.get_default(d), fused_launch=fused)
      yield (f"flash backward causal={causal} fused_launch={fused}",
             lambda q, k, v, o, lse, do, c=causal, b=blocks: flash_bwd.backward(q, k, v, o, lse, do, causal=c,
                                                                              sm_scale=0.1, blocks=b),
             (q, k, k, q, lse, q))
  for band in (False, True):
    windows = [local(t, w) for w in (300, 200, 100, 500)]
    mask = stack_heads(windows if band else [windows[0], global_tokens(t, (0,)), *windows[2:]])
    lists, transposed = (tuple(jnp.asarray(x, jnp.int32) for x in ls) for ls in (mask.lists, mask.transposed_lists))
    bias = block_sparse_fwd.bias_tiles(jnp.asarray(mask.tiles, jnp.int8), jnp.bfloat16)
    bands = ((block_sparse_fwd.band_bounds(mask.tiles, mask.lists.tiles),
              block_sparse_fwd.band_bounds(mask.tiles, mask.transposed_lists.tiles)) if band else (None, None))
    for overlap in (False, True):
      config = block_sparse_fwd.Config(num_ctas=132, overlap=overlap, band_masks=band)
      yield (f"block-sparse forward band={band} overlap={overlap}",
             lambda q, k, v, cfg=config, ls=lists, b=bias, bb=bands[0]: block_sparse_fwd.forward(
                 q, k, v, ls, b, sm_scale=0.1, per_head_mask=True, config=cfg, bands=bb),
             (q, k, k))
    work = block_sparse_bwd.work_schedules(mask.lists, mask.transposed_lists, h, hkv, 1, num_ctas=132)
    yield (f"block-sparse backward band={band}",
           lambda q, k, v, o, lse, do, ls=lists, tl=transposed, b=bias, w=work, bb=bands if band else None:
           block_sparse_bwd.backward(q, k, v, o, lse, do, ls, tl, b, sm_scale=0.1, per_head_mask=True, work=w,
                                     bands=bb),
           (q, k, k, q, lse, q))


def main():
  for name, fn, args in _cases():
    print(f"{fingerprint(fn, *args)}  {name}", flush=True)


if __name__ == "__main__":
  main()
