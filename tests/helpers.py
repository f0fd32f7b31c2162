"""Helpers shared by the tests: numeric comparisons, and running a script's main in this process."""

import jax.numpy as jnp
import numpy as np
from absl import flags


def relative_rms(actual, expected) -> float:
  """rms(actual - expected) / rms(expected), in float64 on the host."""
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  return float(np.sqrt(np.mean((a - e) ** 2)) / max(np.sqrt(np.mean(e**2)), 1e-30))


def assert_close(actual, expected, tol: float, what: str = "") -> None:
  """Fails with the measured error when relative RMS error exceeds tol (NaN always fails)."""
  err = relative_rms(actual, expected)
  assert np.isfinite(err) and err <= tol, f"{what} relative RMS error {err:.3g} > {tol:.3g}"


def run_script_main(module, monkeypatch, *args: str) -> None:
  """`python -m <module> *args` without a new process (no interpreter start, jax import or task set-up again): the
  flags of module.define_flags in a FlagValues of their own (scripts sharing flag names do not collide), parsed from
  args, become the module's FLAGS for one call of module.main."""
  values = flags.FlagValues()
  module.define_flags(values)
  values([module.__name__, *args])
  monkeypatch.setattr(module, "FLAGS", values)
  module.main([module.__name__])
