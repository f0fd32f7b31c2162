"""Runs tests/parallel_checks.py (4 forced CPU devices) in a subprocess, once per pytest run.

The checks take about two minutes of mostly single-threaded compiling. Without pytest-xdist the fixture runs them
when first needed. Under xdist every worker collects every test, so the first worker to find the checks among
the collected tests starts them in the background as collection ends (`start_in_background`), the suite's other
tests run beside them, and each worker's fixture waits for the one result (`wait_for_results`) instead of
running its own copy.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
_STDOUT, _STDERR, _RETURNCODE = "stdout", "stderr", "returncode"


def _env() -> dict:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                              if not flag.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _parse(returncode: int, stdout: str, stderr: str) -> dict:
  """The checks' results {check: results}; AssertionError with the end of stderr when the process failed."""
  assert returncode == 0, f"tests/parallel_checks.py exited with {returncode}:\n{stderr[-4000:]}"
  return json.loads(stdout.strip().splitlines()[-1])


def run_now() -> dict:
  done = subprocess.run([sys.executable, "-m", "tests.parallel_checks"], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)
  return _parse(done.returncode, done.stdout, done.stderr)


def shared_dir(config) -> Path | None:
  """The directory every pytest-xdist worker of this run (same testrunuid) uses for the checks' output; None
  when pytest runs without xdist."""
  workerinput = getattr(config, "workerinput", None)
  if workerinput is None:
    return None
  path = Path(tempfile.gettempdir()) / f"efficient-attention-parallel-checks-{workerinput['testrunuid']}"
  path.mkdir(exist_ok=True)
  return path


def start_in_background(directory: Path) -> None:
  """Starts the checks writing into `directory` unless another worker already did.

  A shell writes the exit status after the process ends, so the result does not depend on the starting worker
  still running; `timeout` bounds a run that the suite was stopped under.
  """
  try:
    os.close(os.open(directory / "claim", os.O_CREAT | os.O_EXCL))
  except FileExistsError:
    return
  q = lambda path: shlex.quote(str(path))
  command = (f"timeout {TIMEOUT_S} {shlex.quote(sys.executable)} -m tests.parallel_checks "
             f"> {q(directory / _STDOUT)} 2> {q(directory / _STDERR)}; "
             f"echo $? > {q(directory / (_RETURNCODE + '.partial'))} && "
             f"mv {q(directory / (_RETURNCODE + '.partial'))} {q(directory / _RETURNCODE)}")
  subprocess.Popen(["sh", "-c", command], cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_results(directory: Path) -> dict:
  """The results of the checks started in `directory`, once they finished (AssertionError if they failed)."""
  deadline = time.monotonic() + TIMEOUT_S + 60
  returncode = directory / _RETURNCODE
  while not returncode.exists():
    assert time.monotonic() < deadline, "tests/parallel_checks.py started in the background did not finish"
    time.sleep(1)
  return _parse(int(returncode.read_text()), (directory / _STDOUT).read_text(), (directory / _STDERR).read_text())
