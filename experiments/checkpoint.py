"""Orbax checkpoints of the model, the optimizer and the data position, with resume.

Orbax writes each checkpoint into a temporary directory and renames it to its step number only
once every file is written, so a process killed mid-save leaves a temporary directory that
`latest_step` ignores (and the next manager deletes); the previous complete checkpoint is the one
restored.
"""

import logging as std_logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

# Everything but the RNG streams: dropout keys are re-derived from (seed, step) at every step, so a
# resumed run draws the same masks without storing keys.
_SAVED = nnx.Not(nnx.RngState)


class Checkpointer:
  """Saves and restores (model, optimizer, data position) under `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: Path, *, max_to_keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data: dict[str, Any]) -> None:
    """Starts an asynchronous save of `step`; `wait` (or the next save) completes it."""
    state = {"model": nnx.state(model, _SAVED), "optimizer": nnx.state(optimizer, _SAVED)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
    """Loads `step` into `model` and `optimizer` in place (keeping their shardings) -> the saved data position."""
    state = {"model": nnx.state(model, _SAVED), "optimizer": nnx.state(optimizer, _SAVED)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    )
    nnx.update(model, restored.state["model"])
    nnx.update(optimizer, restored.state["optimizer"])
    return restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def quiet_orbax_logs() -> None:
  """Drops orbax's per-save INFO records (dozens per checkpoint), keeping its warnings and errors."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno > std_logging.INFO or "/orbax/" not in record.pathname
  )
