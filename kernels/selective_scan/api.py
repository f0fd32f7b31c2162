"""Public selective-scan ops: validate arguments, pick an implementation, wire the Pallas kernels' VJP."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import backend
from kernels.selective_scan import pallas_gpu, pallas_tpu, reference, triton_config

# "xla": the chunked jnp reference (autodiff for gradients). "pallas": the fused Pallas kernels with their own
# backward (`pallas_tpu` on a TPU backend, else `pallas_gpu`; interpret mode off their platform). "triton": the
# Triton-language kernels of `triton.py` through jax-triton (GPU only; parallel along L inside a chunk). "auto":
# on GPU the Triton kernels where jax-triton is installed and they take the inputs (else Pallas), Pallas on TPU
# (where the TPU kernels take the group layout), the reference elsewhere.
IMPLEMENTATIONS = ("xla", "pallas", "triton", "auto")
# Why "auto" prefers the Triton kernels on GPU: experiments/bench/selective_scan.py on one H200 (B=4, L=8K,
# Dm=1536, N=16), ms fwd / fwd+bwd: at commit 8c7c45e (benchmarks/results/selective_scan_triton.md of that commit)
# fp32 triton 1.19 / 5.22 vs pallas 2.54 / 16.84, bf16 1.13 / 5.17 vs 2.59 / 15.16; the Triton tiles have been
# retuned since (commit 0653aaa: bf16 0.81 / 4.15 against mamba_ssm's 1.00 / 4.59, GPU tests: 6 passed).
_TRITON_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DEFAULT_CHUNK_SIZE = 64


def _check_shape(name: str, array: jax.Array | None, expected: tuple[int, ...], letters: str) -> None:
  if array is not None and tuple(array.shape) != tuple(expected):
    raise ValueError(f"{name}.shape={tuple(array.shape)} is not valid; expected {letters}={tuple(expected)}")


def _check_bc(name: str, array: jax.Array, lead: tuple[int, ...], lead_letters: str, dm: int, n: int) -> None:
  """B/C: lead + [N] or lead + [G, N] with Dm divisible by G."""
  shape = tuple(array.shape)
  if shape == (*lead, n):
    return
  if len(shape) == len(lead) + 2 and shape[: len(lead)] == lead and shape[-1] == n:
    groups = shape[-2]
    if groups >= 1 and dm % groups == 0:
      return
    raise ValueError(
        f"{name}.shape={shape} is not valid; its group count G={groups} must divide Dm={dm} "
        f"(valid G: {[g for g in range(1, dm + 1) if dm % g == 0]})"
    )
  raise ValueError(
      f"{name}.shape={shape} is not valid; expected [{lead_letters}, N]={(*lead, n)} "
      f"or grouped [{lead_letters}, G, N]={(*lead, 'G', n)}"
  )


def _check_common(x, dt, A, B, C, D, z, dt_bias, state, state_name, lead, lead_letters) -> None:
  """Checks shared by the sequence op (lead = [B, L]) and the one-token step (lead = [B])."""
  dm = x.shape[-1]
  _check_shape("dt", dt, x.shape, f"[{lead_letters}, Dm]")
  _check_shape("z", z, x.shape, f"[{lead_letters}, Dm]")
  if A.ndim != 2 or A.shape[0] != dm:
    raise ValueError(f"A.shape={tuple(A.shape)} is not valid; expected [Dm, N] with Dm={dm}")
  n = A.shape[1]
  _check_bc("B", B, lead, lead_letters, dm, n)
  _check_bc("C", C, lead, lead_letters, dm, n)
  if B.shape != C.shape:
    raise ValueError(f"B.shape={tuple(B.shape)} and C.shape={tuple(C.shape)} are not valid; they must match")
  _check_shape("D", D, (dm,), "[Dm]")
  _check_shape("dt_bias", dt_bias, (dm,), "[Dm]")
  _check_shape(state_name, state, (x.shape[0], dm, n), "[B, Dm, N]")


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_sizes: pallas_gpu.BlockSizes | triton_config.BlockSizes | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Mamba-1 selective scan over a sequence.

  h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = (C_t . h_t + D x_t) * silu(z_t), with
  delta = softplus(dt + dt_bias) (no softplus when dt_softplus=False).

  Args:
    x, dt: [B, L, Dm] inputs and step sizes before discretisation.
    A: [Dm, N] state matrix diagonal (real; negative for a decaying state).
    B, C: [B, L, N], or [B, L, G, N] where channel d uses group d // (Dm / G).
    D: optional [Dm] skip connection. z: optional [B, L, Dm] gate. dt_bias: optional [Dm].
    initial_state: optional [B, Dm, N] (computed in fp32); zeros when None.
    return_final_state: also return the state after the last token, [B, Dm, N] fp32.
    impl: "xla" (the reference), "pallas" (fused kernels: `pallas_tpu` on a TPU backend, else `pallas_gpu`;
      interpret mode off their platform), "triton" (the Triton-language kernels of `triton.py` through
      jax-triton; GPU only) or "auto" (on GPU the Triton kernels where jax-triton is installed, else Pallas;
      Pallas on TPU; the reference elsewhere).
    chunk_size: tokens per chunk of the reference scan; memory is O(B * chunk_size * Dm * N).
    block_sizes: tiles of the Pallas kernels (default `BlockSizes.get_default(N)`, block_d shrunk to divide
      Dm / G; on a TPU backend a `pallas_tpu.BlockSizes`); the backward keeps B * ceil(L / block_sizes.chunk)
      * Dm * N fp32 checkpoint states. `block_sizes.segment` splits time into independently scanned segments
      (more GPU programs; see `pallas_gpu`). With impl="triton" a `triton_config.BlockSizes` (default
      `get_default(N)` fitted to Dm / G); the backward keeps B * ceil(L / chunk_bwd) * Dm * N fp32 states.

  Returns:
    y [B, L, Dm] in x.dtype, or (y, final_state) if return_final_state.
  """
  if x.ndim != 3 or x.shape[1] < 1:
    raise ValueError(f"x.shape={tuple(x.shape)} is not valid; expected [B, L, Dm] with L >= 1")
  _check_common(x, dt, A, B, C, D, z, dt_bias, initial_state, "initial_state", tuple(x.shape[:2]), "B, L")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} is not valid; it must be a positive int")
  if impl == "auto":
    on_tpu = backend.pallas_platform() == "tpu"
    groups = 1 if B.ndim == 3 else B.shape[2]
    impl = "pallas" if backend.on_gpu() or (on_tpu and pallas_tpu.unsupported(x.shape[2], groups) is None) else "xla"
    if impl == "pallas" and backend.on_gpu() and _triton_takes(x, dt, B, C, z, block_sizes):
      impl = "triton"
  if impl == "pallas":
    y, state = _pallas_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                            initial_state=initial_state, block_sizes=block_sizes)
    return (y, state) if return_final_state else y
  if impl == "triton":
    y, state = _triton_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                            initial_state=initial_state, block_sizes=block_sizes)
    return (y, state) if return_final_state else y
  y, state = reference.selective_scan_chunked(
      x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
      initial_state=initial_state, chunk_size=chunk_size,
  )
  return (y, state) if return_final_state else y


def _triton_takes(x, dt, B, C, z, block_sizes) -> bool:
  """Whether impl="auto" may run the Triton kernels: jax-triton installed, dtypes they take, and no Pallas-kernel
  block sizes asked for."""
  dtypes_ok = all(a is None or a.dtype in _TRITON_DTYPES for a in (x, dt, B, C, z))
  tiles_ok = block_sizes is None or isinstance(block_sizes, triton_config.BlockSizes)
  return dtypes_ok and tiles_ok and backend.has_jax_triton()


def _triton_scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, initial_state, block_sizes):
  """impl="triton": the Triton-language kernels of `triton.py` (chunk-parallel scans, their own backward)."""
  for name, array in (("x", x), ("dt", dt), ("B", B), ("C", C), ("z", z)):
    if array is not None and array.dtype not in _TRITON_DTYPES:
      raise ValueError(f"{name}.dtype={array.dtype} is not valid for impl='triton'; it takes float32, bfloat16 "
                       "or float16")
  per_group = x.shape[2] // (1 if B.ndim == 3 else B.shape[2])
  if block_sizes is None:
    block_sizes = triton_config.BlockSizes.get_default(pl.next_power_of_2(A.shape[1])).fitted(per_group)
  elif isinstance(block_sizes, triton_config.BlockSizes):
    block_sizes.validate(per_group)
  else:
    raise ValueError(f"block_sizes={block_sizes!r} is not valid for impl='triton'; pass a "
                     "kernels.selective_scan.triton_config.BlockSizes")
  backend.check_triton_runs()
  from kernels.selective_scan import triton as triton_kernels  # noqa: PLC0415 (imports triton: GPU only)

  return triton_kernels.selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                       initial_state=initial_state, blocks=block_sizes)


def _pallas_scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, initial_state, block_sizes):
  """Pads N to a power of two (Triton tiles), adds the group axis to B/C, and calls the custom-VJP kernels.

  On a TPU backend the TPU kernels take over (they need no padding of N; see `pallas_tpu.selective_scan`).
  """
  if backend.pallas_platform() == "tpu":
    return pallas_tpu.selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     initial_state=initial_state, block_sizes=block_sizes,
                                     interpret=jax.default_backend() != "tpu")
  n = A.shape[1]
  B, C = reference.as_grouped(B, 2), reference.as_grouped(C, 2)
  per_group = x.shape[2] // B.shape[2]
  n_pad = pl.next_power_of_2(n) - n
  if block_sizes is None:
    blocks = pallas_gpu.BlockSizes.get_default(n + n_pad).fitted(per_group)
  elif isinstance(block_sizes, pallas_gpu.BlockSizes):
    blocks = block_sizes
    blocks.validate(per_group)
  else:
    raise ValueError(f"block_sizes={block_sizes!r} is not valid; pass a kernels.selective_scan.pallas_gpu.BlockSizes")
  if n_pad:
    # Zero A columns keep the padded states at exp(0) h = h, zero B rows never feed them, zero C rows never
    # read them, so they stay at their (zero) initial value and add nothing.
    pad_last = lambda a: None if a is None else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n_pad)])
    A, B, C, initial_state = map(pad_last, (A, B, C, initial_state))
  static = pallas_gpu.Static(
      length=x.shape[1], chunk=blocks.chunk, channels_per_group=per_group, dt_softplus=dt_softplus,
      has_d=D is not None, has_z=z is not None, has_bias=dt_bias is not None,
      has_initial_state=initial_state is not None, segment=blocks.segment,
  )
  y, state = _scan(x, dt, A, B, C, D, z, dt_bias, initial_state, _Config(static, blocks, not backend.on_gpu()))
  return y, state[..., :n]


@dataclasses.dataclass(frozen=True)
class _Config:
  static: pallas_gpu.Static
  blocks: pallas_gpu.BlockSizes
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _scan(x, dt, A, B, C, D, z, dt_bias, initial_state, config: _Config):
  y, state, _ = pallas_gpu.forward(x, dt, A, B, C, D, z, dt_bias, initial_state, static=config.static,
                                   blocks=config.blocks, save_states=False, interpret=config.interpret)
  return y, state


def _scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, config: _Config):
  inputs = (x, dt, A, B, C, D, z, dt_bias, initial_state)
  y, state, saved = pallas_gpu.forward(*inputs, static=config.static, blocks=config.blocks, save_states=True,
                                       interpret=config.interpret)
  return (y, state), (inputs, saved)


def _scan_bwd(config: _Config, residuals, cotangents):
  inputs, saved = residuals
  dy, dstate = cotangents
  return pallas_gpu.backward(*inputs, saved, dy, dstate, static=config.static, blocks=config.blocks,
                             interpret=config.interpret)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_step(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    state: jax.Array,
    *,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `selective_scan`.

  x/dt/z [B, Dm], A [Dm, N], B/C [B, N] or [B, G, N], state [B, Dm, N]
  -> (y [B, Dm] in x.dtype, new state [B, Dm, N] fp32).
  """
  if x.ndim != 2:
    raise ValueError(f"x.shape={tuple(x.shape)} is not valid; expected [B, Dm]")
  _check_common(x, dt, A, B, C, D, z, dt_bias, state, "state", (x.shape[0],), "B")
  return reference.selective_scan_step(x, dt, A, B, C, state, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
