"""Which accelerator the kernels are on, read by every op's api.py when it picks an implementation.

Tests patch `pallas_platform` to run the TPU kernels in interpret mode on a CPU host.
"""

import jax


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def pallas_platform() -> str:
  """Whose Pallas kernels impl="pallas" runs: "tpu" on a TPU backend, else "gpu" (interpret mode off a GPU)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def has_pallas_kernels() -> bool:
  """Whether impl="auto" takes the Pallas kernels (GPU or TPU) rather than the reference."""
  return on_gpu() or pallas_platform() == "tpu"
