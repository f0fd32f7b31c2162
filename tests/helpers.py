"""Numeric helpers shared by the tests."""

import jax.numpy as jnp
import numpy as np


def relative_rms(actual, expected) -> float:
  """rms(actual - expected) / rms(expected), in float64 on the host."""
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  return float(np.sqrt(np.mean((a - e) ** 2)) / max(np.sqrt(np.mean(e**2)), 1e-30))


def assert_close(actual, expected, tol: float, what: str = "") -> None:
  """Fails with the measured error when relative RMS error exceeds tol (NaN always fails)."""
  err = relative_rms(actual, expected)
  assert np.isfinite(err) and err <= tol, f"{what} relative RMS error {err:.3g} > {tol:.3g}"
