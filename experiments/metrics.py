"""Where metrics go: JSON lines, TensorBoard event files, and a progress bar on the terminal."""

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from absl import logging

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends {"step", "split", metrics...} lines to workdir/metrics.jsonl and scalars to TensorBoard.

  TensorBoard event files need tensorboardX (the `dev` extra); without it only the JSON lines are
  written, and a warning says so once.
  """

  def __init__(self, workdir: Path, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      logging.warning("tensorboardX is not installed: metrics go to %s only", workdir / METRICS_FILE)
    else:
      self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in metrics.items():
        self._tensorboard.add_scalar(f"{split}/{name}", float(value), step)
      self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict]:
  """Every record of workdir/metrics.jsonl, in order."""
  path = Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
  """A one-line bar (step, steps/s, tokens/s, loss, ETA) redrawn in place on a terminal.

  When the stream is not a terminal (a log file, a test) nothing is drawn; the trainer's periodic
  log lines carry the same numbers.
  """

  def __init__(self, total: int, initial: int, tokens_per_step: int, stream: TextIO = sys.stderr, width: int = 24):
    self.total, self.tokens_per_step, self.stream, self.width = total, tokens_per_step, stream, width
    self.enabled = stream.isatty()
    self._start_step, self._start_time = initial, time.perf_counter()
    self._last_draw = 0.0
    self.loss = math.nan

  def update(self, step: int, loss: float | None = None) -> None:
    if loss is not None:
      self.loss = loss
    now = time.perf_counter()
    if not self.enabled or (now - self._last_draw < 0.2 and step < self.total):
      return
    self._last_draw = now
    elapsed = max(now - self._start_time, 1e-9)
    rate = (step - self._start_step) / elapsed
    eta = (self.total - step) / rate if rate > 0 else math.inf
    filled = int(self.width * step / max(self.total, 1))
    bar = "#" * filled + "." * (self.width - filled)
    self.stream.write(
        f"\r[{bar}] {step}/{self.total} {rate:.2f} steps/s {rate * self.tokens_per_step:,.0f} tokens/s "
        f"loss {self.loss:.4f} eta {_duration(eta)}  "
    )
    self.stream.flush()

  def newline(self) -> None:
    """Ends the bar's line so a log message starts on a fresh one."""
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()
      self._last_draw = 0.0


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes}:{seconds:02d}"
