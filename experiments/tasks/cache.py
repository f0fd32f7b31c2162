"""Generated task arrays cached as .npz files, keyed by the generator's name, version and parameters."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

# Environment variable that moves the default cache (for example onto a larger disk).
CACHE_ENV = "EFFICIENT_ATTENTION_CACHE"


def default_cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "efficient_attention" / "tasks")


def cache_key(name: str, version: int, params: Mapping[str, Any]) -> str:
  blob = json.dumps({"name": name, "version": version, "params": dict(params)}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_arrays(
    cache_dir: str | Path,
    name: str,
    version: int,
    params: Mapping[str, Any],
    build: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
  """Loads `name`'s arrays for `params` from the cache, or builds and stores them.

  The file is written under a temporary name and renamed into place, so a reader (or a second
  process generating the same task) never sees a half-written cache entry. Bump `version` whenever
  the generator's output changes for the same parameters.
  """
  cache_dir = Path(cache_dir)
  path = cache_dir / f"{name}-{cache_key(name, version, params)}.npz"
  if path.exists():
    with np.load(path) as stored:
      return {key: stored[key] for key in stored.files}
  logging.info("generating %s %s (cached at %s)", name, dict(params), path)
  arrays = {key: np.asarray(value) for key, value in build().items()}
  cache_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return arrays
