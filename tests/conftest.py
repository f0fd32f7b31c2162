"""Shared test set-up: GPU-marked tests run only where jax sees a GPU; fast XLA compiles on CPU."""

import os

# The CPU suite is dominated by XLA compile time for many small programs; skipping LLVM's optimisation
# passes makes it about a third faster and changes no result beyond rounding. Set before jax starts.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  # Tests marked slow run first within their module (a stable sort: the order is otherwise kept, and each module's
  # tests stay together). The module's quick tests then come last, the suite's last module included, so pytest-xdist's
  # workers run out of tests at about the same time instead of one idling while the other finishes a long run.
  modules = {}
  module_index = lambda item: modules.setdefault(item.nodeid.split("::")[0], len(modules))
  items.sort(key=lambda item: (module_index(item), "slow" not in item.keywords))
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on an H100/H200 with `pytest -m gpu`)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def pytest_collection_finish(session):
  """Under pytest-xdist, starts the multi-device checks of tests/test_parallel.py in the background as soon as a
  worker has collected tests that need them, so the rest of the suite runs beside them (tests/parallel_runner.py).
  """
  if not any("multi_device_results" in getattr(item, "fixturenames", ()) for item in session.items):
    return
  from tests import parallel_runner  # noqa: PLC0415 (only runs that collect those tests need it)

  directory = parallel_runner.shared_dir(session.config)
  if directory is not None:
    parallel_runner.start_in_background(directory)
