"""Long-range tasks, generated (seeded and cached) or loaded from files, by registry name."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.tasks import bytes_lm, induction_heads, listops, lra_files, mqar, pathfinder, selective_copy
from experiments.tasks.base import PAD_ID, Split, TaskData
from experiments.tasks.cache import default_cache_dir

_BUILDERS: dict[str, Callable[[Mapping[str, Any], Path], TaskData]] = {
    "bytes_lm": bytes_lm.build,
    "induction_heads": induction_heads.build,
    "listops": listops.build,
    "lra_files": lra_files.build,
    "mqar": mqar.build,
    "pathfinder": pathfinder.build,
    "selective_copy": selective_copy.build,
}


def task_names() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def build_task(params: Mapping[str, Any], cache_dir: str | Path | None = None) -> TaskData:
  """params: the task's config section; `name` picks the generator, the rest are its parameters."""
  params = dict(params)
  name = params.pop("name")
  if name not in _BUILDERS:
    raise ValueError(f"task name={name!r} is not valid; choose one of {', '.join(task_names())}")
  return _BUILDERS[name](params, Path(cache_dir) if cache_dir else default_cache_dir())


__all__ = ["PAD_ID", "Split", "TaskData", "build_task", "task_names"]
