"""Timing and reporting shared by the benchmark scripts."""

import datetime
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import jax
from absl import flags


def median_ms(fn: Callable, input_sets: Sequence[tuple], *, warmup: int = 3, iters: int = 20,
              back_to_back: int = 1, sync: Callable = jax.block_until_ready) -> float:
  """Median wall time in ms of fn(*inputs), rotating over several input sets so caches do not flatter it.

  Each sample times `back_to_back` consecutive calls and synchronises (`sync` on the last result) before the clock
  stops, then divides by their number. With 1 every call pays the host's dispatch cost in full; with several the
  host enqueues the next call while the device runs the last one, so for device-bound ops the sample is device
  time per call (how the op runs inside a larger program), whatever the framework's per-call overhead.
  """
  for i in range(warmup):
    sync(fn(*input_sets[i % len(input_sets)]))
  times, calls = [], 0
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(back_to_back):
      result = fn(*input_sets[calls % len(input_sets)])
      calls += 1
    sync(result)
    times.append((time.perf_counter() - start) * 1e3 / back_to_back)
  return statistics.median(times)


def define_back_to_back_flag() -> flags.FlagHolder:
  """The --back_to_back flag of the benchmark scripts: calls per timed sample (see `median_ms`)."""
  return flags.DEFINE_integer(
      "back_to_back", 10, "Calls per timed sample, synchronised once at the end (timing.median_ms): with several the "
      "samples are device time per call for JAX and PyTorch alike; 1 times every call with its dispatch.")


def describe_timing(iters: int, back_to_back: int) -> str:
  """How median_ms timed a table's cells, for its header."""
  return f"per call, median of {iters} samples of {back_to_back} back-to-back calls each"


def torch_median_ms(torch, fn: Callable, input_sets: Sequence[tuple], *, iters: int, back_to_back: int) -> float:
  """median_ms for a PyTorch peer: synchronises its CUDA stream instead of blocking on a JAX array."""
  return median_ms(fn, input_sets, iters=iters, back_to_back=back_to_back, sync=lambda _: torch.cuda.synchronize())


def program_bytes(compiled) -> int | None:
  """Device memory one run of a compiled program needs, by XLA's own account: arguments + outputs + its
  temporary buffer - donated aliases (per device for a sharded program); None where the backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
          - analysis.alias_size_in_bytes)


def device_memory_limit() -> int | None:
  """Bytes the allocator may hand out on the first device; None where it reports none (CPU)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def joined_environment(env: dict | None, other: dict, what: str, same: tuple[str, ...] = ("device",)) -> dict:
  """The environment of results from `env` and `other` in one table (env None: other's): equal in the `same`
  fields, else ValueError naming `what` and the fields; the commit lists every commit either was measured at."""
  if env is None:
    return dict(other)
  differs = [key for key in same if other.get(key) != env.get(key)]
  if differs:
    raise ValueError(f"{what} is not valid here: its {', '.join(differs)} "
                     f"({', '.join(repr(other.get(key)) for key in differs)}) differ from this table's "
                     f"({', '.join(repr(env.get(key)) for key in differs)})")
  commits = env["commit"].split(", ")
  return env | {"commit": ", ".join(commits + [c for c in other["commit"].split(", ") if c not in commits])}


def environment() -> dict:
  """Device, versions, date and commit for the results header."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or os.environ.get("BENCH_COMMIT", "unknown")
  except OSError:
    commit = os.environ.get("BENCH_COMMIT", "unknown")
  return {
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
      "commit": os.environ.get("BENCH_COMMIT", commit),
  }


def write_results(out_dir: str, name: str, env: dict, rows: list[dict], table: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({"environment": env, "rows": rows}, f, indent=1)
  header = f"{env['device']}, jax {env['jax']}, {env['date']}, commit {env['commit']}\n\n"
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(header + table + "\n")
  print(header + table)
