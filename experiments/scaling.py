"""Training-step time, tokens/s and device memory of every variant against sequence length.

  python -m experiments.scaling --out_dir=benchmarks/results
  python -m experiments.scaling --variants=full,flash,mamba --lengths=1024,4096,16384

One fixed model (width, layers, heads from the flags; bf16 compute, fp32 parameters, AdamW) per variant, one
sequence per step of random tokens with a next-token loss. Causal where the variant has a causal form, otherwise
bidirectional (linformer, local): the step costs the same either way. For each variant the lengths run from short
to long until one does not fit (out of device memory) or a step takes longer than --max_step_s; the rest of that
variant's lengths are recorded as skipped, so the table shows where each variant hits its wall.

Memory is the compiled step's own account (arguments + outputs + temporaries - donated aliases, from XLA's
memory analysis): unlike the allocator's peak it is per program, so rows do not inherit earlier rows' peaks.
Writes scaling.json, scaling.md and (with matplotlib) scaling.png.

With --longest_bisect, each variant whose timed lengths ended by running out of memory or by running out of
lengths is searched further for the longest T whose compiled step fits the device: only compiled (XLA's memory
analysis), never run, so a search is minutes even where a step at that length would take seconds. Those lengths
are rows with status "fits" or "too big" and make the table's last column.

A sweep split over several GPUs or time-limited calls comes together with --merge_from: the rows of earlier
scaling.json files (same model and lengths) are taken as measured, only the other variants run, and the table
and plot cover all of them, e.g. `--merge_from=run0/scaling.json,run1/scaling.json` with nothing left to run
just merges. With --longest_bisect too, merged variants that have no search yet are searched (compile only), so
the longest-T column can be added to an earlier sweep without timing it again. --remeasure=NAME drops NAME's
rows from the merged files, so one variant of a finished table is measured (and searched) again, e.g. after a
change to its kernels.
"""

import dataclasses
import functools
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from efficient_attention import Decoder, DecoderConfig, config_class, variant_names
from experiments.bench.timing import (device_memory_limit, environment, is_out_of_memory, joined_environment,
                                      median_ms, program_bytes, write_results)
from experiments.cli import literal

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command line, in `flag_values` (main reads FLAGS); defined only when run as a script, so tests can import
  this module beside other scripts (a test may define them in a FlagValues of its own and run main in-process)."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("out_dir", "benchmarks/results", "Where scaling.{json,md,png} go.", **define)
  flags.DEFINE_list("variants", [], "Variants to measure (default: every registered one).", **define)
  flags.DEFINE_list("lengths", [str(2**p) for p in range(10, 18)], "Sequence lengths, ascending (default 1K to 128K).",
                    **define)
  flags.DEFINE_integer("width", 512, "Model width C.", **define)
  flags.DEFINE_integer("num_layers", 4, "Residual blocks.", **define)
  flags.DEFINE_integer("num_heads", 8, "Attention heads.", **define)
  flags.DEFINE_integer("batch_size", 1, "Sequences per step.", **define)
  flags.DEFINE_integer("vocab_size", 256, "Token vocabulary (bytes).", **define)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (parameters stay fp32).", **define)
  flags.DEFINE_integer("iters", 10, "Timed steps per length (median reported).", **define)
  flags.DEFINE_float("max_step_s", 5.0, "Stop a variant after a step slower than this.", **define)
  flags.DEFINE_integer("longest_bisect", 0, "After a variant's timed lengths, search the longest T whose compiled "
                       "step fits the device (doubling past the last length that ran, then this many bisection steps; "
                       "compile only, nothing runs). 0: no search.", **define)
  flags.DEFINE_integer("longest_max", 1 << 22, "Upper end of the longest-T search.", **define)
  flags.DEFINE_float("memory_limit_gib", 0.0, "Device memory the search measures against (0: the device's own "
                     "allocator limit; CPU devices report none, so tests set one).", **define)
  flags.DEFINE_list("merge_from", [], "Earlier scaling.json files whose variants are taken as measured "
                    "(same model and lengths); only the other variants run.", **define)
  flags.DEFINE_list("remeasure", [], "Variants of this run whose rows in the --merge_from files are dropped, so "
                    "they are measured again.", **define)
  flags.DEFINE_multi_string(
      "option", [], "Per-variant mixer option, variant.field=value (e.g. full.impl=cudnn); repeatable.", **define)


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The fixed model every variant is measured in."""

  width: int = 512
  num_layers: int = 4
  num_heads: int = 8
  batch_size: int = 1
  vocab_size: int = 256
  dtype: str = "bfloat16"

  def describe(self) -> str:
    return (f"width {self.width}, {self.num_layers} layers, {self.num_heads} heads, batch {self.batch_size}, "
            f"{self.dtype} compute, fp32 params, AdamW")


# What each variant runs as on a GPU unless --option says otherwise: `full` stays on XLA to show the quadratic
# wall the others are measured against; `flash` is the Pallas kernel by definition; the banded and sparse
# variants run their Pallas kernels.
GPU_DEFAULTS = {"full": {"impl": "xla"}, "sliding_window": {"impl": "pallas"},
                "local": {"impl": "pallas"}, "longformer": {"impl": "pallas"},
                "bigbird": {"impl": "pallas"}}


# Statuses of the compile-only longest-T search's rows (lengths beyond the timed grid).
SEARCHED = ("fits", "too big")


@dataclasses.dataclass(frozen=True)
class Row:
  variant: str
  seq_len: int
  status: str  # "ok", "oom", "slow" (a shorter length already took longer than --max_step_s), "error: ...";
  # from the longest-T search: "fits" / "too big" (compiled memory within / over the device's)
  step_ms: float | None = None
  tokens_per_s: float | None = None
  memory_gib: float | None = None


def parse_options(specs: list[str]) -> dict[str, dict[str, object]]:
  """["full.impl=cudnn", "performer.num_features=128"] -> {"full": {"impl": "cudnn"}, ...} with literal values."""
  options: dict[str, dict[str, object]] = {}
  for spec in specs:
    name, sep, value = spec.partition("=")
    variant, dot, field = name.partition(".")
    if not sep or not dot:
      raise ValueError(f"--option={spec!r} is not valid; expected variant.field=value, e.g. full.impl=cudnn")
    options.setdefault(variant, {})[field] = literal(value)
  return options




def model_config(variant: str, seq_len: int, options: dict[str, object], size: ModelSize) -> DecoderConfig:
  return DecoderConfig(
      vocab_size=size.vocab_size, width=size.width, num_layers=size.num_layers, num_heads=size.num_heads,
      variant=variant, mixer_options={variant: options} if options else (),
      causal=config_class(variant).supports_causal, max_len=seq_len, dtype=size.dtype, param_dtype="float32",
  )


def make_step(config: DecoderConfig):
  """-> (jitted step(params, opt_state, rest, tokens) -> (params, opt_state, loss), params, opt_state, rest)."""
  model = Decoder(config, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(params, rest, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()

  def step(params, opt_state, rest, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), params, opt_state, rest


def compile_step(variant: str, seq_len: int, options: dict[str, object], size: ModelSize):
  """-> (compiled step, params, opt_state, rest, bytes it needs by XLA's memory analysis or None)."""
  step, params, opt_state, rest = make_step(model_config(variant, seq_len, options, size))
  # +1: inputs are tokens[:, :-1] and targets tokens[:, 1:], so the model sees exactly seq_len positions.
  tokens = jax.ShapeDtypeStruct((size.batch_size, seq_len + 1), jnp.int32)
  compiled = step.lower(params, opt_state, rest, tokens).compile()
  return compiled, params, opt_state, rest, program_bytes(compiled)


def measure(
    variant: str, seq_len: int, options: dict[str, object], size: ModelSize, iters: int, max_step_s: float
) -> Row:
  compiled, params, opt_state, rest, memory = compile_step(variant, seq_len, options, size)
  tokens = [jax.random.randint(jax.random.key(i), (size.batch_size, seq_len + 1), 0, size.vocab_size) for i in range(3)]
  limit = device_memory_limit()
  if memory is not None and limit is not None and memory > limit:
    return Row(variant, seq_len, "oom", memory_gib=memory / 2**30)
  state = {"params": params, "opt": opt_state}

  def run(tokens):
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], rest, tokens)
    return loss

  start = time.perf_counter()
  jax.block_until_ready(run(tokens[0]))
  if time.perf_counter() - start > 3 * max_step_s:
    iters = 1  # Already far past the limit: one more timed step says enough.
  step_ms = median_ms(run, [(t,) for t in tokens], warmup=1, iters=iters)
  return Row(variant, seq_len, "ok", step_ms, size.batch_size * seq_len / (step_ms / 1e3),
             None if memory is None else memory / 2**30)


def scan_variant(
    variant: str, lengths: list[int], measure_length: Callable[[int], Row], max_step_s: float
) -> list[Row]:
  """Rows for ascending `lengths` (each from `measure_length(seq_len)`), stopping at the first that does not
  fit or is too slow."""
  rows: list[Row] = []
  for i, seq_len in enumerate(lengths):
    try:
      row = measure_length(seq_len)
    except Exception as error:  # noqa: BLE001 - one variant's failure must not end the sweep
      if not is_out_of_memory(error):
        traceback.print_exc()
      row = Row(variant, seq_len, "oom" if is_out_of_memory(error) else f"error: {type(error).__name__}")
    rows.append(row)
    print(f"{variant:>15} T={seq_len:>7}: {row.status:>6} "
          + (f"{row.step_ms:9.2f} ms {row.tokens_per_s:11.0f} tok/s" if row.step_ms else ""), flush=True)
    too_slow = row.step_ms is not None and row.step_ms > 1e3 * max_step_s
    if row.status != "ok" or too_slow:
      rows.extend(Row(variant, t, "slow" if too_slow else "skipped") for t in lengths[i + 1:])
      break
  return rows


def compiled_memory(variant: str, seq_len: int, options: dict[str, object], size: ModelSize) -> float:
  """GiB the compiled training step at seq_len needs (XLA's memory analysis); inf where compiling runs out."""
  try:
    memory = compile_step(variant, seq_len, options, size)[-1]
  except Exception as error:  # noqa: BLE001 - out of memory while compiling is a "does not fit"
    if not is_out_of_memory(error):
      raise
    return float("inf")
  finally:
    jax.clear_caches()
  return float("inf") if memory is None else memory / 2**30


def search_longest(
    variant: str, rows: list[Row], memory_gib: Callable[[int], float], limit_gib: float, max_len: int,
    bisect: int, unit: int = 1024, on_row: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
  """Rows "fits" / "too big" for lengths past the last timed one that ran: doubling until the compiled step needs
  more than limit_gib (or max_len), then `bisect` halvings of the gap on multiples of `unit`. A timed length that
  ran out of memory is the first "too big" already; a variant stopped for time ("slow") or by an error is not
  searched (memory is not its wall). on_row sees each row as it is found (a search cut short by a time limit
  keeps what it found)."""
  ran = [r.seq_len for r in rows if r.status == "ok"]
  if not ran or any(r.status == "slow" or r.status.startswith("error") for r in rows):
    return []
  good = max(ran)
  bad = min((r.seq_len for r in rows if r.status == "oom" and r.seq_len > good), default=None)
  found: list[Row] = []

  def fits(seq_len: int) -> bool:
    needed = memory_gib(seq_len)
    ok = needed <= limit_gib
    found.append(Row(variant, seq_len, "fits" if ok else "too big", memory_gib=None if needed == float("inf")
                     else needed))
    print(f"{variant:>15} T={seq_len:>7}: {found[-1].status} ({needed:.2f} of {limit_gib:.2f} GiB)", flush=True)
    on_row(found[-1])
    return ok

  while bad is None and good * 2 <= max_len:
    if fits(good * 2):
      good *= 2
    else:
      bad = good * 2
  for _ in range(bisect if bad else 0):
    middle = (good + bad) // 2 // unit * unit
    if middle in (good, bad):
      break
    if fits(middle):
      good = middle
    else:
      bad = middle
  return found


def _longest(rows: list[Row], variant: str) -> str:
  """Table cell: the longest length known to fit (ran, or compiled within memory) and the first known not to."""
  fitting = [r.seq_len for r in rows if r.variant == variant and r.status in ("ok", "fits")]
  too_big = [r.seq_len for r in rows if r.variant == variant and r.status in ("oom", "too big")]
  if not any(r.variant == variant and r.status in SEARCHED for r in rows) or not fitting:
    return ""
  good = max(fitting)
  bad = min((t for t in too_big if t > good), default=None)
  return f"{_length(good)}" + (f" ({_length(bad)} does not)" if bad else " (the longest tried)")


def _length(t: int) -> str:
  return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def markdown(rows: list[Row], lengths: list[int], model: str) -> str:
  """One table: variants down, lengths across, each cell 'step ms / memory'."""
  searched = any(r.status in SEARCHED for r in rows)
  header = f"Model: {model}.\n\n"
  header += "| variant | " + " | ".join(f"T={t // 1024}K" if t >= 1024 else f"T={t}" for t in lengths)
  header += " | longest T that fits |" if searched else " |"
  lines = [header, "|---" * (len(lengths) + 1 + searched) + "|"]
  for variant in sorted({row.variant for row in rows}):  # name order, however the rows were merged
    cells = []
    for t in lengths:
      row = next((r for r in rows if r.variant == variant and r.seq_len == t), None)
      if row is None:
        cells.append("")
      elif row.status == "ok":
        cells.append(f"{row.step_ms:.1f} ms" + (f" / {_size(row.memory_gib)}" if row.memory_gib is not None else ""))
      else:
        cells.append(row.status)
    if searched:
      cells.append(_longest(rows, variant))
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  note = "\n\nCells: median training-step time / compiled step memory; oom = does not fit."
  if searched:
    note += (" Longest T that fits: the longest length whose compiled training step fits the device's memory by "
             "XLA's account (searched by compiling only).")
  return "\n".join(lines) + note


def _size(gib: float) -> str:
  return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def plot(rows: list[Row], path: str) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not importable; no plot")
    return
  fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 5))
  # Twelve variants outrun the default ten-colour cycle: distinct colours and markers keep every line apart.
  colors, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*XP"
  for i, variant in enumerate(sorted({row.variant for row in rows})):
    ok = [r for r in rows if r.variant == variant and r.status == "ok"]
    if not ok:
      continue
    style = dict(marker=markers[i % len(markers)], color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], label=variant)
    lengths = np.array([r.seq_len for r in ok])
    ax_time.plot(lengths, [r.step_ms for r in ok], **style)
    if all(r.memory_gib is not None for r in ok):
      ax_memory.plot(lengths, [r.memory_gib for r in ok], **style)
  for ax, label in ((ax_time, "training step (ms)"), (ax_memory, "step memory (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_time.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def load_measured(paths: list[str], model: str, lengths: list[int],
                  drop: Iterable[str] = ()) -> tuple[list[Row], dict | None]:
  """Rows of earlier runs (scaling.json files), less those of the variants in `drop`, and the environment they
  ran in; the files must describe the same model, lengths and device, or their numbers would not belong in one
  table."""
  drop = set(drop)
  rows: list[Row] = []
  env = None
  for path in paths:
    with open(path) as f:
      saved = json.load(f)
    their_lengths = sorted({r["seq_len"] for r in saved["rows"] if r["status"] not in SEARCHED})
    if saved["environment"].get("model") != model or not set(their_lengths) <= set(lengths):
      raise ValueError(f"--merge_from file {path} is not valid here: it measured model "
                       f"{saved['environment'].get('model')!r} at lengths {their_lengths}, this run {model!r} at "
                       f"{lengths}")
    env = joined_environment(env, saved["environment"], f"--merge_from file {path}")
    # A (variant, length) already read is kept as first read: files that each extend one earlier sweep (say, one
    # variant's longest-T search per GPU) all repeat that sweep's rows.
    known = {(row.variant, row.seq_len) for row in rows}
    rows.extend(Row(**r) for r in saved["rows"]
                if (r["variant"], r["seq_len"]) not in known and r["variant"] not in drop)
  return rows, env


def checked_remeasure(remeasure: list[str], names: list[str]) -> list[str]:
  """--remeasure entries, each one of the variants this run measures (else its rows would silently vanish)."""
  for name in remeasure:
    if name not in names:
      raise app.UsageError(f"--remeasure entry {name!r} is not valid; it must be one of this run's variants "
                           f"({', '.join(names)})")
  return remeasure


def main(argv):
  del argv
  names = FLAGS.variants or list(variant_names())
  for name in names:
    if name not in variant_names():
      raise app.UsageError(f"--variants entry {name!r} is not valid; choose from {', '.join(variant_names())}")
  lengths = sorted(int(t) for t in FLAGS.lengths)
  try:
    user_options = parse_options(FLAGS.option)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  size = ModelSize(width=FLAGS.width, num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads,
                   batch_size=FLAGS.batch_size, vocab_size=FLAGS.vocab_size, dtype=FLAGS.dtype)
  on_gpu = jax.default_backend() == "gpu"
  try:
    rows, merged_env = load_measured(FLAGS.merge_from, size.describe(), lengths,
                                     drop=checked_remeasure(FLAGS.remeasure, names))
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  measured = {row.variant for row in rows}
  to_measure = [name for name in names if name not in measured]
  # Merged variants whose rows have no longest-T search yet get one (compile only) when it is asked for.
  to_search = [name for name in names if FLAGS.longest_bisect and (name in to_measure or not any(
      row.variant == name and row.status in SEARCHED for row in rows))]
  env = merged_env
  if to_measure or to_search:
    try:
      env = joined_environment(merged_env, environment(), "this run")
    except ValueError as error:
      raise app.UsageError(str(error)) from None
  limit = FLAGS.memory_limit_gib or (device_memory_limit() or 0) / 2**30
  if FLAGS.longest_bisect and not limit:
    raise app.UsageError("--longest_bisect needs a memory limit: this device reports none; set --memory_limit_gib")
  for name in names:
    if name not in to_measure and name not in to_search:
      continue
    options = {**(GPU_DEFAULTS.get(name, {}) if on_gpu else {}), **user_options.get(name, {})}
    if name in to_measure:
      measure_length = functools.partial(measure, name, options=options, size=size, iters=FLAGS.iters,
                                         max_step_s=FLAGS.max_step_s)
      rows.extend(scan_variant(name, lengths, measure_length, FLAGS.max_step_s))
    if name in to_search:
      timed = [row for row in rows if row.variant == name]
      # The same rule as the timed rows' "oom": XLA's account of the compiled step against the device's limit.
      memory_gib = functools.partial(compiled_memory, name, options=options, size=size)

      def keep(row: Row) -> None:  # rewritten after each length, so a search stopped by a time limit keeps it
        rows.append(row)
        _write(rows, lengths, size, user_options, env)

      search_longest(name, timed, memory_gib, limit, FLAGS.longest_max, FLAGS.longest_bisect, on_row=keep)
    # Rewritten after every variant, so a sweep stopped by a time limit keeps what it measured.
    _write(rows, lengths, size, user_options, env)
  if not to_measure and not to_search:  # a merge only
    _write(rows, lengths, size, user_options, env)
  plot(rows, os.path.join(FLAGS.out_dir, "scaling.png"))


def _write(rows: list[Row], lengths: list[int], size: ModelSize, options: dict, env: dict) -> None:
  env = env | {"model": size.describe(), "options": options}
  write_results(FLAGS.out_dir, "scaling", env, [dataclasses.asdict(r) for r in rows],
                markdown(rows, lengths, size.describe()))


if __name__ == "__main__":
  define_flags()
  app.run(main)
