"""Shared test set-up: GPU-marked tests run only where jax sees a GPU."""

import jax
import pytest


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on an H100/H200 with `pytest -m gpu`)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
