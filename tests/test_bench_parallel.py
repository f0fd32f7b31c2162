"""experiments.bench.parallel: the longest-T search runs end to end, and runs split over processes merge."""

import json
import os
import subprocess
import sys

import pytest
from absl import app

from experiments.bench import parallel
from tests.helpers import run_script_main

# The search and the merge are the same for every variant; linear's step (its scan state passed between the devices
# of the sequence axis) compiles in about half the time of flash's ring with the Pallas kernel in interpret mode.
# Ring attention and the kernels have tests of their own (tests/test_parallel.py and the kernel tests).
SMALL = ["--variant=linear", "--width=32", "--num_layers=1", "--num_heads=2", "--start_len=1024", "--max_len=1024",
         "--bisect=0"]


def _bench(*args, devices=1) -> subprocess.Popen:
  """`python -m experiments.bench.parallel` started, not waited for (its output comes back on stdout)."""
  # The suite's own XLA flags (tests/conftest.py: fast CPU compiles) with this run's device count.
  xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
               if not flag.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"]),
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "experiments.bench.parallel", *SMALL, *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_longest_runs_split_over_processes_merge_into_one_table(tmp_path, monkeypatch):
  # Side by side, as the script's own workflow runs them: the 2-device run is the command line end to end (a process
  # of its own, for the forced device count), while the 1-device run calls main in this process, with the flags as
  # the command line gives them (no interpreter start and jax import).
  with _bench("--parts=longest", "--devices=2", f"--out={tmp_path / 'two'}", devices=2) as two:
    try:
      run_script_main(parallel, monkeypatch, *SMALL, "--parts=longest", "--devices=1", f"--out={tmp_path / 'one'}")
      output = two.communicate(timeout=600)[0]
    finally:
      two.kill()  # a failure here must not leave it running; once it has exited, nothing happens
  assert two.returncode == 0, output
  # The merges measure nothing, and run in this process too.
  merged = f"--merge_from={tmp_path / 'one' / 'parallel.json'},{tmp_path / 'two' / 'parallel.json'}"
  run_script_main(parallel, monkeypatch, *SMALL, "--parts=", merged, f"--out={tmp_path / 'merged'}")
  rows = json.loads((tmp_path / "merged" / "parallel.json").read_text())["rows"]
  # CPU devices report no memory limit, so every length tried trains (2 devices start at their smallest
  # length, 2048: the search keeps T divisible by 1024 * devices, as the ring needs).
  assert [(r["part"], r["devices"], r["longest_seq_len"], r["vs_one_device"]) for r in rows] == [
      ("longest", 1, 1024, 1.0), ("longest", 2, 2048, 2.0)]
  assert "| 2 | 2048 | None | 2.00x |" in (tmp_path / "merged" / "parallel.md").read_text()
  # Rows of another setting (here: with gradient checkpointing) are refused, naming the file (a usage error: the
  # command line exits with it).
  with pytest.raises(app.UsageError, match="--merge_from file"):
    run_script_main(parallel, monkeypatch, *SMALL, "--parts=", merged, "--remat", f"--out={tmp_path / 'bad'}")


def test_nothing_to_run_and_nothing_to_merge_is_refused(tmp_path, monkeypatch):
  with pytest.raises(app.UsageError, match="--parts="):
    run_script_main(parallel, monkeypatch, *SMALL, "--parts=", f"--out={tmp_path}")
