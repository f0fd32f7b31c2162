r"""Trains every variant on one task and writes the accuracy table, with published numbers beside it.

  python -m experiments.compare --task=listops --seeds=0,1,2
  python -m experiments.compare --task=mqar --sweep=task.train_seq_len=64,128,256,512 --variants=full,mamba
  python -m experiments.compare --task=induction_heads --eval_lengths=256,1024,4096,16384

Each (sweep value, variant, seed) is an ordinary training run in its own workdir
(<workdir>/<task>[/<field>=<value>]/<variant>-s<seed>), so an interrupted comparison resumes where it stopped
and finished runs are only evaluated again. `--eval_lengths` re-evaluates each trained model on test sets
generated at other lengths (tasks with `test_seq_len`: MQAR, induction heads, selective copying), which is
how length extrapolation is measured without retraining. `--set=train.num_steps=200` (repeatable) changes the
task's configuration for every run, e.g. for a quick smoke run. `--parallel_gpus=4` runs four at a time, one per
GPU of the machine (the first four of CUDA_VISIBLE_DEVICES when it is set), in worker processes that each take
the next run no other has claimed (each writes under <out_dir>/worker_<i>/), and merges their tables;
`--runs_per_gpu=3` puts three workers on each GPU (for small models, which leave the GPU idle between launches).
A comparison split over machines that do not share a workdir (say, time-limited calls, each with a --variants
subset) comes together with `--merge_from=a/compare_listops.json,b/compare_listops.json`: runs in those tables
count as done and join the new table (with nothing left to run, or with --merge_only, the command only merges,
listing the planned runs without a result as not run); --retry_failed runs their failed runs again.

Writes compare_<task>[_<field>].json and .md under --out_dir: test accuracy per variant, mean and standard
deviation over seeds, and for ListOps the Long Range Arena paper's numbers (Tay et al., 2021, Table 1); and
compare_<task>[_<field>].png (with matplotlib; experiments/compare_plot.py): accuracy against the swept value or the
test length, or a bar per variant.
"""

import copy
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging

from efficient_attention import variant_names
from experiments import compare_plot, configs, modeling
from experiments.bench.timing import environment, joined_environment, write_results
from experiments.checkpoint import Checkpointer, quiet_orbax_logs
from experiments.cli import literal
from experiments.data import make_mesh
from experiments.tasks import build_task
from experiments.trainer import NonFiniteLossError, create, evaluate, train_and_evaluate

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command line, in `flag_values` (main reads FLAGS); defined only when run as a script, so tests can import
  this module beside other scripts (a test may define them in a FlagValues of its own and run main in-process)."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("task", "listops", "Task config in experiments/configs/.", **define)
  flags.DEFINE_list("variants", [], "Variants to train (default: every registered one).", **define)
  flags.DEFINE_list("seeds", ["0"], "Seeds per variant (parameters, dropout and data order).", **define)
  flags.DEFINE_multi_string("set", [], "Config override section.field=value for every run; repeatable.", **define)
  flags.DEFINE_string("sweep", "", "One config field and its values, e.g. task.train_seq_len=64,128,256.", **define)
  flags.DEFINE_list("eval_lengths", [], "Extra test lengths (sets task.test_seq_len) per trained model.", **define)
  flags.DEFINE_string("workdir", "workdir/compare", "Root of the runs' workdirs.", **define)
  flags.DEFINE_string("out_dir", "benchmarks/results", "Where the table goes.", **define)
  flags.DEFINE_integer("parallel_gpus", 1, "Runs at a time, each in its own process on one local GPU "
                       "(CUDA_VISIBLE_DEVICES); the table merges them. 1: one after another in this process.", **define)
  flags.DEFINE_integer("runs_per_gpu", 1, "With --parallel_gpus: worker processes per GPU (small models leave a "
                       "GPU idle between their kernel launches, which other processes fill). Each worker gets "
                       "1/runs_per_gpu of the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.", **define)
  flags.DEFINE_string("claim_dir", "", "Set by --parallel_gpus for its worker processes: a worker takes the next "
                      "planned run nobody has claimed in this folder, so a slow run never holds up a queue of others.",
                      **define)
  flags.DEFINE_bool("retry_failed", False, "With --merge_from: runs that failed in those tables (an error status) "
                    "are run again instead of counting as done, and their new results replace the failures.", **define)
  flags.DEFINE_bool("merge_only", False, "With --merge_from: write the merged table without running what is "
                    "missing; the table lists the planned runs that have no result as not run.", **define)
  flags.DEFINE_list("merge_from", [], "compare_<task>.json files of earlier comparisons of the same task, overrides "
                    "and sweep on the same device: their runs count as done (not run again) and join the table.",
                    **define)


# Long Range Arena (Tay et al., 2021), Table 1, ListOps test accuracy (%), by our variant names; "S4" is the
# state-space reference (Gu et al., 2022) the issue asks to show beside them.
PUBLISHED = {
    "listops": {
        "full": 36.37, "performer": 18.01, "linformer": 35.70, "longformer": 35.63, "bigbird": 36.05,
        "local": 15.82, "sliding_window": 15.82, "linear": 16.13,
    },
}
REFERENCE_ROWS = {"listops": {"S4 (Gu et al., 2022)": 59.60}}


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  seed: int
  sweep_value: Any
  status: str  # "ok" or "error: <message>"
  step: int = 0
  test_accuracy: float | None = None
  # {test length: accuracy} from --eval_lengths; None where the model cannot take that length.
  length_accuracy: dict[int, float | None] = dataclasses.field(default_factory=dict)
  # {test length: error} where evaluating at that length failed on the device (e.g. out of memory).
  length_errors: dict[int, str] = dataclasses.field(default_factory=dict)




def parse_assignment(spec: str, flag: str) -> tuple[list[str], str]:
  """"train.num_steps=200" -> (["train", "num_steps"], "200")."""
  path, sep, value = spec.partition("=")
  if not sep or "." not in path:
    raise ValueError(f"--{flag}={spec!r} is not valid; expected section.field=value, e.g. train.num_steps=200")
  return path.split("."), value


def assign(config: ml_collections.ConfigDict, path: list[str], value: Any) -> None:
  node = config
  for key in path[:-1]:
    node = node[key]
  if path[-1] not in node:
    raise ValueError(f"config field {'.'.join(path)!r} does not exist in this task's config")
  node[path[-1]] = value


def load_config(task: str) -> ml_collections.ConfigDict:
  if task not in configs.config_names():
    raise ValueError(f"--task={task!r} is not valid; choose one of {', '.join(configs.config_names())}")
  return importlib.import_module(f"experiments.configs.{task}").get_config()


def evaluate_at_length(config: ml_collections.ConfigDict, workdir: Path, test_seq_len: int) -> float | None:
  """Test accuracy of the newest checkpoint in `workdir` on a test set generated at `test_seq_len`.

  None when the model cannot run at that length (a parameter shape depends on it: learned positions,
  linformer's projections).
  """
  config = copy.deepcopy(config)
  config.task.test_seq_len = test_seq_len
  if config.model.max_len == 0:
    config.model.max_len = test_seq_len
  task = build_task(config.task, config.cache_dir or None)
  model_config, _ = modeling.decoder_config(config.model, task, config.seed)
  mesh = make_mesh()
  model, optimizer = create(model_config, config.seed, config.train, mesh)
  checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
  try:
    checkpoints.restore(checkpoints.latest_step(), model, optimizer)
  except ValueError:
    logging.info("%s cannot be evaluated at length %d: its parameters depend on the length", workdir, test_seq_len)
    return None
  finally:
    checkpoints.close()
  return evaluate(model, task.splits["test"], task, length_batch_size(config, test_seq_len), -1, mesh)["accuracy"]


def length_batch_size(config: ml_collections.ConfigDict, test_seq_len: int) -> int:
  """Eval batch size at `test_seq_len`: as many tokens per batch as the configured eval batch at the training
  length (at least one sequence), so a 64x longer test does not need 64x the memory (full attention's scores
  grow with the square of the length; this keeps them to one sequence's at the longest lengths)."""
  batch_size = config.train.eval_batch_size or config.train.batch_size
  train_len = config.task.get("train_seq_len", test_seq_len)
  return max(1, batch_size * train_len // max(train_len, test_seq_len))


def run_one(config, workdir: Path, variant: str, seed: int, sweep_value: Any, eval_lengths: list[int]) -> Run:
  config = copy.deepcopy(config)
  config.model.variant = variant
  config.seed = seed
  try:
    results = train_and_evaluate(config, workdir)
  except (ValueError, NonFiniteLossError, jax.errors.JaxRuntimeError) as error:
    # JaxRuntimeError: e.g. out of device memory; the comparison goes on and the table lists the failure.
    logging.warning("%s seed %d failed: %s", variant, seed, error)
    return Run(variant, seed, sweep_value, f"error: {_first_line(error)}")
  lengths, length_errors = {}, {}
  for length in eval_lengths:
    try:
      lengths[length] = evaluate_at_length(config, workdir, length)
    except jax.errors.JaxRuntimeError as error:  # a length that does not fit keeps the trained model's results
      logging.warning("%s seed %d at length %d failed: %s", variant, seed, length, error)
      lengths[length], length_errors[length] = None, _first_line(error)
  return Run(variant, seed, sweep_value, "ok", results["step"], results["test"]["accuracy"], lengths, length_errors)


def _first_line(error: Exception) -> str:
  return str(error).splitlines()[0][:200]


def _mean_std(values: list[float]) -> str:
  if not values:
    return "failed"
  mean = 100 * statistics.fmean(values)
  if len(values) == 1:
    return f"{mean:.2f}"
  return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def markdown(task: str, runs: list[Run], sweep_field: str, eval_lengths: list[int],
             not_run: list[tuple] = ()) -> str:
  """Rows: variants (and sweep values); columns: test accuracy (%), per-length accuracy, published.

  not_run: planned (sweep value, variant, seed) that have no run (a merge of a comparison left unfinished)."""
  published = PUBLISHED.get(task, {})
  sweep_values = list(dict.fromkeys(run.sweep_value for run in runs))
  if all(isinstance(value, (int, float)) for value in sweep_values):
    sweep_values.sort()  # merged tables list their runs in the order the files had them
  columns = ["variant"] + ([sweep_field] if sweep_field else []) + ["seeds", "test accuracy (%)"]
  columns += [f"T={length}" for length in eval_lengths] + (["published (%)"] if published else [])
  lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
  any_not_applicable = False
  for variant in sorted(dict.fromkeys(run.variant for run in runs)):
    for value in sweep_values:
      group = [r for r in runs if r.variant == variant and r.sweep_value == value]
      if not group:  # this variant has no run at this sweep value (yet)
        continue
      ok = [r for r in group if r.status == "ok"]
      cells = [variant] + ([str(value)] if sweep_field else [])
      cells += [f"{len(ok)}/{len(group)}", _mean_std([r.test_accuracy for r in ok])]
      for length in eval_lengths:
        if any(r.length_accuracy.get(length) is not None for r in ok):
          cells.append(_mean_std([r.length_accuracy[length] for r in ok if r.length_accuracy.get(length) is not None]))
        elif any(length in r.length_errors for r in ok):
          cells.append("failed")
        else:
          cells.append("n/a")
          any_not_applicable = True
      if published:
        cells.append(f"{published[variant]:.2f}" if variant in published else "")
      lines.append("| " + " | ".join(cells) + " |")
  for name, accuracy in REFERENCE_ROWS.get(task, {}).items():
    cells = [name] + ([""] if sweep_field else []) + ["", ""] + [""] * len(eval_lengths) + [f"{accuracy:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  where = lambda value: f" {sweep_field}={value}" if sweep_field else ""
  notes = [f"- {r.variant} seed {r.seed}{where(r.sweep_value)}: {r.status}" for r in runs if r.status != "ok"]
  notes += [f"- {r.variant} seed {r.seed}{where(r.sweep_value)} at T={length}: error: {error}"
            for r in runs for length, error in r.length_errors.items()]
  notes += [f"- {name} seed {seed}{where(value)}: not run" for value, name, seed in not_run]
  if any_not_applicable:
    notes.append("- n/a: the model cannot take that length (its parameters depend on the length)")
  return "\n".join(lines + ([""] + notes if notes else []))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_orbax_logs()
  try:
    base = load_config(FLAGS.task)
    for spec in FLAGS.set:
      path, value = parse_assignment(spec, "set")
      assign(base, path, literal(value))
    sweep_field, sweep_values = "", [None]
    if FLAGS.sweep:
      path, values = parse_assignment(FLAGS.sweep, "sweep")
      sweep_field, sweep_values = ".".join(path), [literal(v) for v in values.split(",")]
      assign(copy.deepcopy(base), path, sweep_values[0])  # fails now, not after the first runs, if no such field
  except (ValueError, TypeError) as error:  # TypeError: ml_collections rejects a value of the wrong type
    raise app.UsageError(str(error)) from None
  if FLAGS.parallel_gpus < 1 or FLAGS.runs_per_gpu < 1:
    raise app.UsageError(f"--parallel_gpus={FLAGS.parallel_gpus} and --runs_per_gpu={FLAGS.runs_per_gpu} must both "
                         "be at least 1")
  names = FLAGS.variants or list(variant_names())
  for name in names:
    if name not in variant_names():
      raise app.UsageError(f"--variants entry {name!r} is not valid; choose from {', '.join(variant_names())}")
  eval_lengths = [int(length) for length in FLAGS.eval_lengths]
  if eval_lengths and "test_seq_len" not in base.task:
    raise app.UsageError(f"--eval_lengths needs a task with test_seq_len; {FLAGS.task!r} has none")

  name_suffix = f"_{sweep_field.split('.')[-1]}" if sweep_field else ""
  table_name = f"compare_{FLAGS.task}{name_suffix}"
  comparison = {"task": FLAGS.task, "overrides": FLAGS.set, "sweep": FLAGS.sweep}
  try:
    # Read before anything runs, against the first file's device; this machine's is checked below if it runs.
    earlier, earlier_env = load_earlier(FLAGS.merge_from, None)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  if earlier_env is not None and any(earlier_env.get(k) != v for k, v in comparison.items()):
    raise app.UsageError(f"--merge_from files compare {earlier_env.get('task')!r} with overrides "
                         f"{earlier_env.get('overrides')} and sweep {earlier_env.get('sweep')!r}; this command "
                         f"{FLAGS.task!r} with {FLAGS.set} and {FLAGS.sweep!r}")
  if FLAGS.retry_failed:
    earlier = [run for run in earlier if run.status == "ok"]
  done = {_key(run) for run in earlier}
  planned = [(value, name, seed) for value in sweep_values for name in names for seed in map(int, FLAGS.seeds)
             if (name, seed, value) not in done]
  if not planned or FLAGS.merge_only:  # a merge only
    if earlier_env is None:
      raise app.UsageError("--merge_only needs --merge_from files")
    write_table(FLAGS.out_dir, table_name, earlier_env, earlier, base, sweep_field, eval_lengths, planned)
    return
  env = environment() | comparison | {"devices": jax.device_count()}
  if earlier_env is not None:
    try:
      env = joined_environment(env, earlier_env, "--merge_from files")
    except ValueError as error:
      raise app.UsageError(str(error)) from None
  if FLAGS.parallel_gpus * FLAGS.runs_per_gpu > 1:
    _run_in_parallel(base, sweep_field, sweep_values, table_name, eval_lengths, earlier, planned, env)
    return
  # Worker processes (--claim_dir) write only the runs they claimed; their parent adds the earlier ones.
  runs = [] if FLAGS.claim_dir else list(earlier)
  for position, (value, name, seed) in enumerate(planned):
    if FLAGS.claim_dir and not claim(Path(FLAGS.claim_dir), position):
      continue
    config = copy.deepcopy(base)
    folder = Path(FLAGS.workdir) / FLAGS.task
    if sweep_field:
      assign(config, sweep_field.split("."), value)
      folder /= f"{sweep_field}={value}"
    run = run_one(config, folder / f"{name}-s{seed}", name, seed, value, eval_lengths)
    runs.append(run)
    where = f" {sweep_field}={value}" if sweep_field else ""
    print(f"{name} seed {seed}{where}: {run.status}, test accuracy {run.test_accuracy}", flush=True)
    # Rewritten after every run: a comparison stopped part-way still leaves the table of what finished.
    write_table(FLAGS.out_dir, table_name, env, runs, base, sweep_field, eval_lengths)


def write_table(out_dir: str, table_name: str, env: dict, runs: list[Run], base: ml_collections.ConfigDict,
                sweep_field: str, eval_lengths: list[int], not_run: list[tuple] = ()) -> None:
  """<table_name>.json and .md, and (except in worker processes, whose tables are only parts) the .png."""
  write_results(out_dir, table_name, env, _rows(runs), markdown(FLAGS.task, runs, sweep_field, eval_lengths, not_run))
  if not FLAGS.claim_dir:
    compare_plot.plot(str(Path(out_dir) / f"{table_name}.png"), runs, sweep_field=sweep_field,
                      eval_lengths=eval_lengths, published=PUBLISHED.get(FLAGS.task, {}),
                      reference_rows=REFERENCE_ROWS.get(FLAGS.task, {}), train_length=base.task.get("train_seq_len"))


# Environment fields that must agree for runs of two tables to share one.
_SAME_COMPARISON = ("device", "task", "overrides", "sweep")


def load_earlier(paths: list[str], env: dict | None) -> tuple[list[Run], dict | None]:
  """Runs of earlier compare tables and the environment they join: every file must match env (None: the first
  file) in device, task, overrides and sweep (else ValueError naming the file); commits are all listed. A run
  (variant, seed, sweep value) already read keeps its first row."""
  runs: list[Run] = []
  for path in paths:
    with open(path) as f:
      saved = json.load(f)
    env = joined_environment(env, saved["environment"], f"--merge_from file {path}", same=_SAME_COMPARISON)
    known = {_key(run) for run in runs}
    runs.extend(run for run in runs_from_rows(saved["rows"]) if _key(run) not in known)
  return runs, env


def _key(run: Run) -> tuple:
  return run.variant, run.seed, run.sweep_value


def _rows(runs: list[Run]) -> list[dict]:
  """JSON rows of runs (through JSON, so they compare equal to rows read back from a file)."""
  return json.loads(json.dumps([dataclasses.asdict(run) for run in runs]))


def claim(folder: Path, position: int) -> bool:
  """True for the one worker whose exclusive create of folder/<position> succeeds: that worker runs it."""
  try:
    os.close(os.open(folder / str(position), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    return False
  return True


def runs_from_rows(rows: list[dict]) -> list[Run]:
  """Runs back from their JSON rows (JSON turned the length keys into strings)."""
  return [Run(**{**row, "length_accuracy": {int(k): v for k, v in row["length_accuracy"].items()},
                "length_errors": {int(k): v for k, v in row.get("length_errors", {}).items()}}) for row in rows]


def in_planned_order(runs: list[Run], planned: list[tuple]) -> list[Run]:
  """Workers' runs, which finish in any order, sorted back into the planned (sweep value, variant, seed) order."""
  order = {(name, seed, value): k for k, (value, name, seed) in enumerate(planned)}
  return sorted(runs, key=lambda run: order.get(_key(run), len(order)))


def unfinished(planned: list[tuple], runs: list[Run]) -> list[tuple]:
  """The planned (sweep value, variant, seed) that have no run."""
  have = {_key(run) for run in runs}
  return [(value, name, seed) for value, name, seed in planned if (name, seed, value) not in have]


def gpu_ids(parallel_gpus: int, visible: str | None) -> list[str]:
  """The GPUs the workers use: the first parallel_gpus of CUDA_VISIBLE_DEVICES when set (so a comparison can be
  placed on some of a machine's GPUs), else 0 .. parallel_gpus - 1."""
  if not visible:
    return [str(i) for i in range(parallel_gpus)]
  ids = [part.strip() for part in visible.split(",") if part.strip()]
  if len(ids) < parallel_gpus:
    raise app.UsageError(f"--parallel_gpus={parallel_gpus} is not valid with CUDA_VISIBLE_DEVICES={visible!r}: "
                         f"it lists {len(ids)} GPUs")
  return ids[:parallel_gpus]


def _run_in_parallel(base, sweep_field, sweep_values, table_name, eval_lengths, earlier: list[Run],
                     planned: list[tuple], env: dict) -> None:
  """Worker processes on the GPUs (runs_per_gpu per GPU), each taking the next planned run no other worker has
  claimed (so one slow run does not hold up a queue behind it), then one merged table.

  The task data is generated here first (it is cached on disk), so the workers only read it. This process
  never starts jax on the GPUs: each worker's XLA takes most of its own GPU's memory.
  """
  for value in sweep_values:
    config = copy.deepcopy(base)
    if sweep_field:
      assign(config, sweep_field.split("."), value)
    build_task(config.task, config.cache_dir or None)
  count = min(FLAGS.parallel_gpus * FLAGS.runs_per_gpu, len(planned))
  gpus = gpu_ids(FLAGS.parallel_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
  out = Path(FLAGS.out_dir)
  worker_env = dict(os.environ)
  worker_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / FLAGS.runs_per_gpu:.3f}")
  for index in range(count):  # a worker that claims no run writes no table; an older one must not be read
    (out / f"worker_{index}" / f"{table_name}.json").unlink(missing_ok=True)
  with tempfile.TemporaryDirectory(prefix="compare-claims-") as claims:
    workers = []
    for index in range(count):
      argv = [sys.executable, "-m", "experiments.compare", *sys.argv[1:], "--parallel_gpus=1", "--runs_per_gpu=1",
              f"--claim_dir={claims}", f"--out_dir={out / f'worker_{index}'}"]
      gpu = gpus[index % FLAGS.parallel_gpus]
      workers.append(subprocess.Popen(argv, env={**worker_env, "CUDA_VISIBLE_DEVICES": gpu}))
    failed = [index for index, worker in enumerate(workers) if worker.wait() != 0]
  results = {i: out / f"worker_{i}" / f"{table_name}.json" for i in range(count)}
  parts = {i: json.loads(path.read_text()) for i, path in results.items() if path.exists()}
  if not parts:
    raise app.UsageError(f"no worker wrote results (workers {failed} failed)")
  finished = [run for part in parts.values() for run in runs_from_rows(part["rows"])]
  runs = earlier + in_planned_order(finished, planned)
  # Runs a worker claimed but never finished (it was killed, or crashed outside a run) are listed as not run.
  missing = unfinished(planned, runs)
  # This process's environment: the workers' machine, and the commits of any --merge_from tables.
  env = {**env, "devices": min(FLAGS.parallel_gpus, count), "parallel_gpus": FLAGS.parallel_gpus,
         "runs_per_gpu": FLAGS.runs_per_gpu}
  write_table(FLAGS.out_dir, table_name, env, runs, base, sweep_field, eval_lengths, missing)
  if failed:
    raise app.UsageError(f"workers {failed} failed; the table holds what the others finished")


if __name__ == "__main__":
  define_flags()
  app.run(main)
