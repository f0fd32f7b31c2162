r"""Trains a decoder with any registered sequence mixer on a long-range task.

  python -m experiments.train --variant=performer
  python -m experiments.train --task=listops --variant=linformer --config.model.num_layers=4
  python -m experiments.train --config=path/to/my_config.py --workdir=/tmp/run1

With no flags it trains on a small ListOps (experiments/configs/listops_small.py) in a few minutes on a
CPU. Rerunning a command resumes from the newest checkpoint in its --workdir (default
./workdir/<config name>-<variant>-s<seed>, e.g. workdir/listops_small-performer-s0); a finished run
is evaluated again.
"""

import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from efficient_attention import variant_names
from experiments import configs
from experiments.checkpoint import quiet_orbax_logs
from experiments.trainer import NonFiniteLossError, train_and_evaluate

DEFAULT_TASK = "listops_small"


def _default_config(argv: list[str]) -> str:
  """experiments/configs/<task>.py for the --task in argv.

  config_flags loads the --config default while flags are being defined, before --task is parsed,
  so the task is read from argv the same way config_flags reads its overrides. An unknown task
  falls back to the default one here; main() then rejects it with the list of tasks.
  """
  task = DEFAULT_TASK
  for i, arg in enumerate(argv):
    if arg.startswith("--task="):
      task = arg.split("=", 1)[1]
    elif arg == "--task" and i + 1 < len(argv):
      task = argv[i + 1]
  return str(configs.config_path(task if task in configs.config_names() else DEFAULT_TASK))


def _unknown_override(error: Exception) -> str:
  """The message of a --config.* override naming no field ("'num_layer' Did you mean "num_layers"...")."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = " ".join(str(error.args[0] if error.args else error).split())
  return f"error: a --config override names no field of the config: {text}"


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> None:
  """The command line, in `flag_values` (main reads FLAGS); --config's default and the --config.* overrides it
  defines come from `argv` (None: sys.argv, as the script runs). Defined only when run as a script: a test may
  define them in a FlagValues of its own, for its own argv, and run main in-process."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string(
      "task", DEFAULT_TASK, f"Task config in experiments/configs/: one of {', '.join(configs.config_names())}.",
      **define,
  )
  try:
    config_flags.DEFINE_config_file(
        "config",
        _default_config(sys.argv if argv is None else argv),
        "Config file with get_config(); default: experiments/configs/<task>.py. Override fields with "
        "--config.<section>.<field>=value, e.g. --config.model.num_layers=4.",
        sys_argv=argv,
        **define,
    )
  except (AttributeError, KeyError) as error:
    # The default config and its --config.* overrides are parsed right here, at definition; an override
    # naming no field of the config fails before absl could report it.
    sys.exit(_unknown_override(error))
  flags.DEFINE_string(
      "variant", None, f"Sequence mixer, overriding config.model.variant: one of {', '.join(variant_names())}.",
      **define,
  )
  flags.DEFINE_string(
      "workdir", None,
      "Output directory (metrics, checkpoints, config); default ./workdir/<config name>-<variant>-s<seed>.",
      **define,
  )
  flags.DEFINE_integer("seed", None, "Overrides config.seed (parameters, dropout and data order).", **define)
  flags.DEFINE_string(
      "mesh", None,
      "Device mesh, overriding config.train.mesh: e.g. data:2,sequence:2 (ring attention / sequence-parallel scans "
      "over `sequence`); sizes multiply to the device count, and one may be -1.",
      **define,
  )
  flags.DEFINE_bool("fsdp", None, "Overrides config.train.fsdp: shard parameters and optimizer state over "
                    "every device.", **define)
  flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoint in --workdir without training.", **define)
  flags.DEFINE_string(
      "coordinator_address", None, "Multi-host: host:port of process 0; calls jax.distributed.initialize.", **define
  )
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", **define)
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.", **define)


def _run_name(config) -> str:
  """<config>-<variant>-s<seed>, where <config> is the config file's name (and its argument, if any)."""
  path, _, argument = config_flags.get_config_filename(FLAGS["config"]).partition(":")
  source = "-".join(filter(None, (Path(path).stem, argument)))
  model = config.model.layer_pattern.replace(",", "+") or config.model.variant
  return f"{source}-{model}-s{config.seed}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    sys.exit(_unknown_override(error))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.task not in configs.config_names():
    raise app.UsageError(f"--task={FLAGS.task!r} is not valid; choose one of {', '.join(configs.config_names())}")
  if FLAGS.variant is not None and FLAGS.variant not in variant_names():
    raise app.UsageError(f"--variant={FLAGS.variant!r} is not valid; choose one of {', '.join(variant_names())}")
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  quiet_orbax_logs()
  config = FLAGS.config
  with config.unlocked():
    if FLAGS.variant is not None:
      config.model.variant = FLAGS.variant
    if FLAGS.seed is not None:
      config.seed = FLAGS.seed
    if FLAGS.mesh is not None:
      config.train.mesh = FLAGS.mesh
    if FLAGS.fsdp is not None:
      config.train.fsdp = FLAGS.fsdp
  workdir = FLAGS.workdir or f"workdir/{_run_name(config)}"
  logging.info("workdir: %s", workdir)
  try:
    results = train_and_evaluate(config, workdir, eval_only=FLAGS.eval_only)
  except (ValueError, NonFiniteLossError) as error:
    logging.debug("stopped", exc_info=True)
    raise SystemExit(f"error: {error}") from None
  print(f"final metrics at step {results['step']} ({workdir}):")
  for split in ("valid", "test"):
    print(f"  {split}: " + " ".join(f"{name}={value:.4f}" for name, value in results[split].items()))
  if "majority_baseline_accuracy" in results:
    print(f"  majority-class baseline accuracy: {results['majority_baseline_accuracy']:.4f}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
