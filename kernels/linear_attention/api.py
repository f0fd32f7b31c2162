"""Public linear-attention ops: validate arguments, pick an implementation, wire the Pallas kernels' VJP.

impl="xla" differentiates the reference by autodiff; impl="pallas" and impl="triton" have their own backward kernels.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import backend
from kernels.linear_attention import pallas_gpu, pallas_tpu, reference

# "xla": the chunked jnp reference. "pallas": the Pallas kernels (interpret mode off GPU). "triton": the
# Triton-language kernels through jax-triton (GPU only). "auto": GPU_AUTO_IMPL on GPU, the Pallas kernels on TPU,
# the reference elsewhere (and wherever the kernels decline the inputs).
IMPLEMENTATIONS = ("xla", "auto", "pallas", "triton")
# Which GPU path impl="auto" takes: the faster of "pallas" and "triton" in experiments/bench/linear_attention.py
# (fwd+bwd, bf16, B=4, H=16, K=V=128, one H200, benchmarks/results/linear_attention.md): triton 2.55 ms vs
# pallas 3.35 ms at T=16K, 9.16 vs 11.84 ms at 64K (forward alone within 11% either way). Falls back to
# "pallas" without jax-triton.
GPU_AUTO_IMPL = "triton"
# Widest key/feature dim K for which impl="auto" takes the GPU kernels; wider ones take the chunked XLA path, whose
# batched matmuls handle wide K x V states better. Measured (one H200, commit b60d9b7, experiments.scaling
# --variants=performer at the MQAR model: width 128, 4 heads, 256 features of a 32-dim head, fp32, batch 64):
# training step 6.2 / 11.2 ms at T=256 / 512 with "xla" against 20.7 / 39.2 ms with "triton" and 57.1 / 111.0
# ms with "pallas". Only K <= 128 has been measured in the kernels' favour (benchmarks/results/linear_attention.md).
GPU_KERNEL_MAX_KEY_DIM = 128
_PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DEFAULT_CHUNK_SIZE = 64


def _check_floating(name: str, array: jax.Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={array.dtype} is not valid; it must be a floating-point dtype")


def _check_shape(name: str, array: jax.Array, expected: tuple[int, ...], letters: str) -> None:
  if tuple(array.shape) != tuple(expected):
    raise ValueError(f"{name}.shape={tuple(array.shape)} is not valid; expected {letters}={tuple(expected)}")


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, lead_letters: str) -> None:
  """q/k [*lead, K], v [*lead, V] with lead = [B, T, H] (sequence) or [B, H] (one step)."""
  rank = len(lead_letters.split(",")) + 1
  if q.ndim != rank:
    raise ValueError(f"q.shape={tuple(q.shape)} is not valid; expected [{lead_letters}, K]")
  _check_shape("k", k, q.shape, f"[{lead_letters}, K]")
  if v.ndim != rank or v.shape[:-1] != q.shape[:-1]:
    raise ValueError(
        f"v.shape={tuple(v.shape)} is not valid; expected [{lead_letters}, V] with "
        f"[{lead_letters}]={tuple(q.shape[:-1])}"
    )
  for name, array in (("q", q), ("k", k), ("v", v)):
    _check_floating(name, array)
  if q.dtype != k.dtype:
    raise ValueError(f"k.dtype={k.dtype} is not valid; it must match q.dtype={q.dtype}")


def _check_decay(decay: jax.Array | None, q: jax.Array, lead_letters: str) -> None:
  """decay: None, [*lead] (one log rate per head) or [*lead, K] (one per key channel)."""
  if decay is None:
    return
  if tuple(decay.shape) not in (tuple(q.shape[:-1]), tuple(q.shape)):
    raise ValueError(
        f"decay.shape={tuple(decay.shape)} is not valid; expected [{lead_letters}]={tuple(q.shape[:-1])} "
        f"or [{lead_letters}, K]={tuple(q.shape)} (log decay, <= 0)"
    )
  _check_floating("decay", decay)


def _check_state(name: str, state: jax.Array | None, expected: tuple[int, ...]) -> None:
  if state is None:
    return
  _check_shape(name, state, expected, "[B, H, K, V]")
  if state.dtype != jnp.float32:
    raise ValueError(f"{name}.dtype={state.dtype} is not valid; recurrent states are float32")


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_sizes: pallas_gpu.BlockSizes | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal linear attention with an optional data-dependent decay, as a prefix scan.

  S_t = diag(exp(decay_t)) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t, starting from S_0 = initial_state.
  Feature maps, normalisers and scaling belong to the caller; this op is the scan only.

  Args:
    q, k: [B, T, H, K] (same dtype). v: [B, T, H, V].
    decay: None (no decay), [B, T, H] (one log rate per head, RetNet/GLA-style) or [B, T, H, K]
      (one per key channel, RWKV-6-style); log space, every entry <= 0.
    initial_state: optional [B, H, K, V] float32; zeros when None.
    return_final_state: also return the state after the last token, [B, H, K, V] float32.
    impl: one of IMPLEMENTATIONS: "xla" (reference), "pallas" (kernels: `pallas_tpu` on a TPU backend, else
      `pallas_gpu`; interpret mode off their platform), "triton" (the Triton-language kernels of `triton.py`
      through jax-triton; GPU only), "auto" (on GPU `GPU_AUTO_IMPL`, on TPU Pallas, the reference elsewhere
      or for inputs the kernels do not take).
    chunk_size: tokens per chunk of the reference; see `reference.linear_attention_chunked` for memory.
    block_sizes: chunk and tiles of the Pallas and Triton GPU kernels (default `pallas_gpu.BlockSizes.get_default`;
      on a TPU backend a `pallas_tpu.BlockSizes`, default `pallas_tpu.BlockSizes.get_default`).
      Differentiated, the Pallas path keeps the state entering every chunk of C tokens for the backward,
      [B, H, T / C, K, V] in the input dtype (as large as q when C = V); the reference keeps more.

  Returns:
    o [B, T, H, V] in v.dtype, or (o, final_state) if return_final_state.
  """
  _check_qkv(q, k, v, "B, T, H")
  _check_decay(decay, q, "B, T, H")
  _check_state("initial_state", initial_state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} is not valid; it must be a positive int")
  if impl == "auto":
    impl = auto_impl(q, v, decay)
  if impl == "pallas":
    o, state = _pallas_linear_attention(q, k, v, decay, initial_state, block_sizes, interpret=not backend.on_gpu())
  elif impl == "triton":
    o, state = _triton_linear_attention(q, k, v, decay, initial_state, block_sizes)
  else:
    o, state = reference.linear_attention_chunked(
        q, k, v, decay=decay, initial_state=initial_state, chunk_size=chunk_size
    )
  return (o, state) if return_final_state else o


def auto_impl(q: jax.Array, v: jax.Array, decay: jax.Array | None = None) -> str:
  """The implementation impl="auto" takes for q [B, T, H, K], v [B, T, H, V] on this platform."""
  if not backend.has_pallas_kernels() or not _pallas_supports(q, v, decay):
    return "xla"
  if backend.on_gpu():
    if q.shape[-1] > GPU_KERNEL_MAX_KEY_DIM:
      return "xla"
    if GPU_AUTO_IMPL == "triton" and backend.has_jax_triton():
      return "triton"
  return "pallas"


def _triton_linear_attention(q, k, v, decay, initial_state, block_sizes):
  """impl="triton": the Triton-language kernels of `triton.py` (same block sizes as the Pallas GPU kernels)."""
  backend.check_triton_runs()
  if not _pallas_supports(q, v, decay):
    raise NotImplementedError(
        f"impl='triton' takes float32, bfloat16 or float16; got q.dtype={q.dtype}, v.dtype={v.dtype}"
        + ("" if decay is None else f", decay.dtype={decay.dtype}")
    )
  from kernels.linear_attention import triton as triton_kernels  # noqa: PLC0415 (imports triton: GPU only)

  return triton_kernels.linear_attention(q, k, v, decay, initial_state, block_sizes)


def _pallas_supports(q, v, decay) -> bool:
  dtypes = [q.dtype, v.dtype] + ([] if decay is None else [decay.dtype])
  return all(dtype in _PALLAS_DTYPES for dtype in dtypes)


def _pallas_linear_attention(q, k, v, decay, initial_state, block_sizes, *, interpret):
  """Pads to the kernels' layout (T a multiple of the chunk, K and V powers of two >= 16) and back.

  Padding is exact: zero key/query channels add nothing to q.k, zero value channels are sliced off, and
  the padded tokens (k = v = 0, decay 0) leave the state unchanged.
  """
  if not _pallas_supports(q, v, decay):
    raise NotImplementedError(
        f"impl='pallas' takes float32, bfloat16 or float16; got q.dtype={q.dtype}, v.dtype={v.dtype}"
        + ("" if decay is None else f", decay.dtype={decay.dtype}")
    )
  if backend.pallas_platform() == "tpu":
    if block_sizes is not None and not isinstance(block_sizes, pallas_tpu.BlockSizes):
      raise ValueError(f"block_sizes={block_sizes!r} is not valid on TPU; pass a pallas_tpu.BlockSizes")
    return pallas_tpu.linear_attention(q, k, v, decay, initial_state, block_sizes,
                                       interpret=jax.default_backend() != "tpu")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  k_pad, v_pad = max(16, pl.next_power_of_2(dk)), max(16, pl.next_power_of_2(dv))
  kind = "none" if decay is None else ("head" if decay.ndim == 3 else "channel")
  blocks = block_sizes or pallas_gpu.BlockSizes.get_default(kind, b * h, k_pad, v_pad)
  blocks = blocks.fitted(t, k_pad, v_pad)
  t_pad = -(-t // blocks.chunk) * blocks.chunk
  dtype = jnp.result_type(q.dtype, v.dtype)

  def pad(x, width):  # [B, T, H(, X)] -> [B, t_pad, H(, width)], zeros appended
    widths = [(0, 0), (0, t_pad - t), (0, 0)] + ([(0, width - x.shape[3])] if x.ndim == 4 else [])
    return jnp.pad(x, widths) if any(w for _, w in widths) else x

  state = jnp.zeros((b, h, k_pad, v_pad), jnp.float32) if initial_state is None else jnp.pad(
      initial_state, ((0, 0), (0, 0), (0, k_pad - dk), (0, v_pad - dv)))
  g = None if decay is None else pad(decay.astype(jnp.float32), k_pad)
  static = pallas_gpu.Static(decay=kind, chunk=blocks.chunk, block_k=blocks.block_k, dtype=jnp.dtype(dtype))
  o, final = _scan(pad(q.astype(dtype), k_pad), pad(k.astype(dtype), k_pad), pad(v.astype(dtype), v_pad), g,
                   state, static, blocks, interpret)
  return o[:, :t, :, :dv].astype(v.dtype), final[:, :, :dk, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _scan(q, k, v, g, initial_state, static, blocks, interpret):
  """Padded inputs, g the raw log decay (fp32) or None -> (o, final state)."""
  b = None if g is None else pallas_gpu.chunk_cumsum(g, static.chunk)
  o, final = pallas_gpu.forward(q, k, v, b, initial_state, st=static, blocks=blocks, interpret=interpret)
  return o, final


def _scan_fwd(q, k, v, g, initial_state, static, blocks, interpret):
  b = None if g is None else pallas_gpu.chunk_cumsum(g, static.chunk)
  o, final, states = pallas_gpu.forward(q, k, v, b, initial_state, st=static, blocks=blocks, interpret=interpret,
                                        store_states=True)
  return (o, final), (q, k, v, b, states, final)


def _scan_bwd(static, blocks, interpret, residuals, cotangents):
  q, k, v, b, states, final = residuals
  do, dfinal = cotangents
  dq, dk, dv, dinitial = pallas_gpu.backward(
      q, k, v, b, states, do.astype(static.dtype), dfinal, st=static, blocks=blocks, interpret=interpret
  )
  dg = None
  if b is not None:
    dg = pallas_gpu.decay_gradient(q, k, dq, dk, final, dfinal, per_head=b.ndim == 3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, dinitial


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    decay: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `linear_attention`.

  q/k [B, H, K], v [B, H, V], state [B, H, K, V] float32, decay None | [B, H] | [B, H, K]
  -> (o [B, H, V] in v.dtype, new state [B, H, K, V] float32).
  """
  _check_qkv(q, k, v, "B, H")
  _check_decay(decay, q, "B, H")
  if state is None:
    raise ValueError("state=None is not valid; pass the [B, H, K, V] float32 state (zeros to start)")
  _check_state("state", state, (*q.shape, v.shape[-1]))
  return reference.linear_attention_step(q, k, v, state, decay=decay)
