"""ml_collections config files, one per task (`--task=<file name>`), each with `get_config()`."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent
# Modules here that are helpers, not task configs.
_HELPERS = {"__init__", "common"}


def config_names() -> tuple[str, ...]:
  return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _HELPERS))


def config_path(name: str) -> Path:
  return CONFIG_DIR / f"{name}.py"
