"""Which accelerator the kernels are on, read by every op's api.py when it picks an implementation.

Tests patch `pallas_platform` to run the TPU kernels in interpret mode on a CPU host.
"""

import importlib.util

import jax


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def pallas_platform() -> str:
  """Whose Pallas kernels impl="pallas" runs: "tpu" on a TPU backend, else "gpu" (interpret mode off a GPU)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def has_pallas_kernels() -> bool:
  """Whether impl="auto" takes the Pallas kernels (GPU or TPU) rather than the reference."""
  return on_gpu() or pallas_platform() == "tpu"


def has_jax_triton() -> bool:
  """Whether the Triton-language kernels (impl="triton") can be imported: triton and jax-triton installed."""
  return all(importlib.util.find_spec(name) is not None for name in ("triton", "jax_triton"))


def check_triton_runs() -> None:
  """Raises NotImplementedError, saying what is missing, unless impl="triton" can run here (a CUDA GPU and
  jax-triton); impl="auto" never gets here without both."""
  if not on_gpu() or not has_jax_triton():
    raise NotImplementedError(
        "impl='triton' needs a CUDA GPU and jax-triton (pip install 'jax-triton==0.3.1', or this package's [gpu] "
        f"extra); here jax's default backend is {jax.default_backend()!r} and jax-triton is "
        f"{'' if has_jax_triton() else 'not '}installed. Use impl='pallas' or impl='auto'"
    )
