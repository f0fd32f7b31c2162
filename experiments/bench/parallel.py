"""Scaling beyond one device: data-parallel training throughput, and the longest sequence that trains.

  python -m experiments.bench.parallel --out=benchmarks/results

Part 1 (data parallelism): tokens/s of the full training step (experiments.trainer.train_step: forward,
backward, AdamW update) of one decoder at a fixed batch per device, on 1 device and on meshes data:N; the
speedup is throughput(N) / throughput(1), measured in the same process.

Part 2 (ring attention): the longest sequence (batch 1) whose training step runs, on 1 device and with the
sequence split over N devices (mesh sequence:N, ring attention in every layer). On 1 device lengths double
from --start_len until a step fails for lack of memory (or halve until one runs), then bisect --bisect times;
on N devices the search starts at N times the 1-device length. To make the search short,
run with XLA_PYTHON_CLIENT_MEM_FRACTION set (e.g. 0.25): every device then has the same smaller memory, and
the ratio between the lengths is what the result is about. The JSON records the fraction used.

Parts split over processes (one device count each, side by side on one machine: the search is mostly
compilation) come together with --merge_from=a/parallel.json,b/parallel.json --parts= (same flags), which writes
one table with the ratios to the 1-device row.
"""

import gc
import json
import os
import time
import traceback

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from efficient_attention import DecoderConfig, parallel
from experiments.bench.timing import (device_memory_limit, environment, is_out_of_memory, joined_environment,
                                      program_bytes, write_results)
from experiments.configs.common import base_config
from experiments.data import shard_batch
from experiments.trainer import create, train_step

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command line, in `flag_values` (the rest of this module reads FLAGS); defined only when run as a script, so
  tests can import this module beside other scripts (a test may define them in a FlagValues of its own and run main
  in-process)."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("out", "benchmarks/results", "Directory the JSON and markdown go to.", **define)
  flags.DEFINE_string("variant", "flash", "Sequence mixer of every layer.", **define)
  flags.DEFINE_integer("width", 1024, "Model width C.", **define)
  flags.DEFINE_integer("num_layers", 4, "Decoder layers.", **define)
  flags.DEFINE_integer("num_heads", 8, "Attention heads (head_dim = width / heads).", **define)
  flags.DEFINE_integer("seq_len", 2048, "Part 1: sequence length.", **define)
  flags.DEFINE_integer("batch_per_device", 8, "Part 1: sequences per device.", **define)
  flags.DEFINE_integer("iters", 20, "Part 1: timed steps per mesh (median reported).", **define)
  flags.DEFINE_list("devices", [], "Device counts to measure; default 1, 2, 4, ... up to all devices.", **define)
  flags.DEFINE_integer("start_len", 32768, "Part 2: first sequence length tried on 1 device.", **define)
  flags.DEFINE_integer("bisect", 3, "Part 2: bisection steps after the first failing length.", **define)
  flags.DEFINE_integer("max_len", 1 << 22, "Part 2: stop doubling here.", **define)
  flags.DEFINE_bool("remat", False, "Gradient checkpointing per block (DecoderConfig.remat) in both parts.", **define)
  flags.DEFINE_bool("fsdp", False, "Both parts: parameters and optimizer state split over every device "
                    "(train.fsdp) instead of a full copy per device.", **define)
  flags.DEFINE_list("parts", ["throughput", "longest"], "Which parts to run.", **define)
  flags.DEFINE_list("merge_from", [], "parallel.json files of runs split over processes (say, one "
                    "device count each, side by side): their rows join this run's in one table.", **define)


# Part 2 runs a step only if its compiled memory analysis needs at most this share of the device's memory:
# the allocator also needs room for fragmentation, and a step that runs out mid-way hangs the other devices.
_HEADROOM = 0.95

_VOCAB = 256


def _model_config(max_len: int) -> DecoderConfig:
  return DecoderConfig(
      vocab_size=_VOCAB, width=FLAGS.width, num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads,
      variant=FLAGS.variant, position="rope", max_len=max_len, mlp_ratio=4.0, dtype="bfloat16",
      param_dtype="float32", remat=FLAGS.remat,
  )


def _train_config(batch_size: int):
  train = base_config().train
  train.batch_size = batch_size
  train.fsdp = FLAGS.fsdp
  return train


def _batch(rng: np.random.Generator, batch: int, seq_len: int) -> dict[str, np.ndarray]:
  """A byte-LM batch of fresh random tokens (no padding): inputs, targets the next token, every token scored."""
  tokens = rng.integers(0, _VOCAB, (batch, seq_len + 1), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "mask": np.ones((batch, seq_len), bool), "weights": np.ones((batch, seq_len), np.float32),
  }


def _setup(n: int, spec: str, batch: int, seq_len: int):
  mesh = parallel.make_mesh(spec, devices=jax.devices()[:n])
  train = _train_config(batch)
  model, optimizer = create(_model_config(seq_len), 0, train, mesh)
  return mesh, model, optimizer


def throughput(devices: list[int]) -> list[dict]:
  rows = []
  rng = np.random.default_rng(0)
  for n in devices:
    batch = FLAGS.batch_per_device * n
    try:
      mesh, model, optimizer = _setup(n, f"data:{n},sequence:1", batch, FLAGS.seq_len)
      batches = [shard_batch(_batch(rng, batch, FLAGS.seq_len), mesh) for _ in range(3)]
      key = jax.random.key(0)
      # As in the trainer: cached_partial skips nnx.jit's per-call graph traversal, which is not device work.
      step = nnx.cached_partial(train_step, model, optimizer)
      with parallel.sequence_parallel(mesh):
        for i in range(3):
          jax.block_until_ready(step(batches[i % 3], key, 1.0))
        times = []
        for i in range(FLAGS.iters):
          start = time.perf_counter()
          jax.block_until_ready(step(batches[i % 3], key, 1.0))
          times.append(time.perf_counter() - start)
      seconds = float(np.median(times))
      rows.append({"devices": n, "global_batch": batch, "seq_len": FLAGS.seq_len, "step_ms": seconds * 1e3,
                   "tokens_per_sec": batch * FLAGS.seq_len / seconds})
      print(rows[-1], flush=True)
    except Exception:  # noqa: BLE001 - one failing mesh must not lose the others' rows
      traceback.print_exc()
      rows.append({"devices": n, "error": traceback.format_exc(limit=1)[-400:]})
    finally:
      gc.collect()
  return rows


def _trains(n: int, seq_len: int) -> bool:
  """Whether one training step at batch 1, length seq_len, sequence split over n devices, fits and runs.

  The compiled step's own memory analysis (per device: arguments, outputs and XLA's temporary buffer) decides
  first; only a step that fits is run. Running one that does not would stop one device with an out-of-memory
  error while the others wait in a collective for it, for good.
  """
  spec = f"data:1,sequence:{n}"
  try:
    mesh, model, optimizer = _setup(n, spec, 1, seq_len)
    batch = shard_batch(_batch(np.random.default_rng(seq_len), 1, seq_len), mesh)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch, key):
      model, optimizer = nnx.merge(graphdef, state)
      return train_step(model, optimizer, batch, key, 1.0)

    with parallel.sequence_parallel(mesh):
      compiled = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
    needed = program_bytes(compiled)
    # CPU devices report no memory limit: every step is then run.
    limit = device_memory_limit() or float("inf")
    if needed > _HEADROOM * limit:
      print(f"  {n} device(s), T={seq_len}: needs {needed / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB", flush=True)
      return False
    metrics = jax.block_until_ready(compiled(state, batch, jax.random.key(0)))
    ok = bool(np.isfinite(float(metrics["loss"])))
    print(f"  {n} device(s), T={seq_len}: {'trains' if ok else 'non-finite loss'} "
          f"({needed / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB)", flush=True)
    return ok
  except Exception as error:  # noqa: BLE001 - out of memory (in compilation, say) is the answer being searched
    if not is_out_of_memory(error):
      raise
    print(f"  {n} device(s), T={seq_len}: out of memory", flush=True)
    return False
  finally:
    jax.clear_caches()
    gc.collect()


def longest(devices: list[int]) -> list[dict]:
  """Per device count: the longest T that trains. After the first count, the search starts at n times the
  first count's result (the length the claim is about), which saves most of the doubling."""
  rows, base = [], None
  for n in devices:
    # Ring zig-zag needs T divisible by 2n; a multiple of 1024 * n keeps kernel tiles whole too.
    unit = 1024 * n
    try:
      start = base * n // devices[0] if base else FLAGS.start_len
      seq_len = max(unit, start // unit * unit)
      good, bad = 0, None
      if _trains(n, seq_len):
        good = seq_len
        while bad is None and good * 2 <= FLAGS.max_len:
          if _trains(n, good * 2):
            good *= 2
          else:
            bad = good * 2
      else:
        bad = seq_len
        while not good and bad > unit:
          candidate = max(unit, bad // 2 // unit * unit)
          if _trains(n, candidate):
            good = candidate
          else:
            bad = candidate
      for _ in range(FLAGS.bisect if bad and good else 0):
        middle = (good + bad) // 2 // unit * unit
        if middle in (good, bad):
          break
        if _trains(n, middle):
          good = middle
        else:
          bad = middle
      rows.append({"devices": n, "longest_seq_len": good, "first_failing": bad})
      base = base or good
    except Exception:  # noqa: BLE001 - keep the other device counts' rows
      traceback.print_exc()
      rows.append({"devices": n, "error": traceback.format_exc(limit=1)[-400:]})
    print(rows[-1], flush=True)
  return rows


def _with_ratios(rows: list[dict], value: str, ratio: str) -> list[dict]:
  """Sets row[ratio] = row[value] / the 1-device row's value (when there is one), rows sorted by device count."""
  rows = sorted(rows, key=lambda r: r["devices"])
  base = next((r[value] for r in rows if r["devices"] == 1 and r.get(value)), None)
  for row in rows:
    if base and row.get(value):
      row[ratio] = row[value] / base
  return rows


def _merged(paths: list[str], env: dict) -> tuple[list[dict], list[dict], dict]:
  """Rows of earlier parallel.json files, checked to be of env's device and setting, split by part; the
  environment lists every commit."""
  throughput_rows, longest_rows = [], []
  for path in paths:
    with open(path) as f:
      saved = json.load(f)
    env = joined_environment(env, saved["environment"], f"--merge_from file {path}", same=("device", "setting"))
    for row in saved["rows"]:
      part = row.pop("part")
      (throughput_rows if part == "throughput" else longest_rows).append(row)
  return throughput_rows, longest_rows, env


def _table(throughput_rows: list[dict], longest_rows: list[dict], setting: str) -> str:
  lines = [setting, ""]
  if throughput_rows:
    lines += ["| devices | global batch | step ms | tokens/s | speedup vs 1 |", "|---|---|---|---|---|"]
    for r in throughput_rows:
      if "error" in r:
        lines.append(f"| {r['devices']} | error: {r['error'].splitlines()[-1][:80]} | | | |")
      else:
        lines.append(f"| {r['devices']} | {r['global_batch']} | {r['step_ms']:.1f} | {r['tokens_per_sec']:.0f} | "
                     f"{r.get('speedup', float('nan')):.2f}x |")
    lines.append("")
  if longest_rows:
    lines += ["| devices (sequence axis) | longest T that trains | first T out of memory | vs 1 device |",
              "|---|---|---|---|"]
    for r in longest_rows:
      if "error" in r:
        lines.append(f"| {r['devices']} | error: {r['error'].splitlines()[-1][:80]} | | |")
      else:
        lines.append(f"| {r['devices']} | {r['longest_seq_len']} | {r['first_failing']} | "
                     f"{r.get('vs_one_device', float('nan')):.2f}x |")
  return "\n".join(lines)


def main(argv):
  del argv
  available = jax.device_count()
  devices = [int(d) for d in FLAGS.devices] or [n for n in (1, 2, 4, 8, 16) if n <= available]
  devices = [n for n in devices if n <= available]
  measuring = any(part in FLAGS.parts for part in ("throughput", "longest"))
  if measuring:
    env = environment()
    env.update(device_count=available, mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default"))
  elif FLAGS.merge_from:  # a merge only: the table is the files' (device, commit, memory fraction)
    with open(FLAGS.merge_from[0]) as f:
      env = {key: value for key, value in json.load(f)["environment"].items() if key != "setting"}
  else:
    raise app.UsageError(f"--parts={','.join(FLAGS.parts)} is not valid without --merge_from; choose from "
                         "throughput, longest")
  extras = "".join(text for on, text in ((FLAGS.remat, ", gradient checkpointing per block"),
                                          (FLAGS.fsdp, ", parameters and optimizer state split over the devices "
                                                        "(FSDP)")) if on)
  setting = (f"variant {FLAGS.variant}, width {FLAGS.width}, {FLAGS.num_layers} layers, {FLAGS.num_heads} heads, bf16 "
             f"compute / fp32 params, AdamW{extras}; throughput at T={FLAGS.seq_len}, {FLAGS.batch_per_device} "
             f"sequences per device; longest T at batch 1, memory fraction {env['mem_fraction']}")
  try:
    merged_throughput, merged_longest, env = _merged(FLAGS.merge_from, {**env, "setting": setting})
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  throughput_rows, longest_rows = [], []

  def write():
    both = (_with_ratios(merged_throughput + throughput_rows, "tokens_per_sec", "speedup"),
            _with_ratios(merged_longest + longest_rows, "longest_seq_len", "vs_one_device"))
    rows = [{"part": "throughput", **r} for r in both[0]] + [{"part": "longest", **r} for r in both[1]]
    write_results(FLAGS.out, "parallel", env, rows, _table(*both, setting))

  # Written after each part, so a run stopped by a time limit keeps what it measured.
  if "throughput" in FLAGS.parts:
    throughput_rows = throughput(devices)
    write()
  if "longest" in FLAGS.parts:
    longest_rows = longest(devices)
    write()
  if not measuring:
    write()


if __name__ == "__main__":
  define_flags()
  app.run(main)
