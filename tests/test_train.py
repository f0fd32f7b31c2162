"""The training script: CLI for every variant, learning, resumption after SIGKILL, NaN stop, bad flags."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx

from efficient_attention import Decoder, DecoderConfig, config_class, variant_names
from experiments import train
from experiments.checkpoint import Checkpointer
from experiments.configs import listops_small
from experiments.metrics import read_metrics
from experiments.tasks import build_task
from experiments.trainer import NonFiniteLossError, eval_step, train_and_evaluate, train_step

REPO = Path(__file__).resolve().parents[1]

# A tiny ListOps (depth <= 2, <= 16 tokens) and a one-layer width-16 model: compiles and steps in seconds.
TINY_TASK = dict(num_train=256, num_valid=32, num_test=32, max_depth=2, max_args=3, max_length=16)
TINY_MODEL = dict(width=16, num_layers=1, num_heads=2)
TINY_TRAIN = dict(batch_size=8, num_steps=6, log_every=2, eval_every=4, checkpoint_every=2, warmup_steps=2)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("task_cache")


def tiny_config(cache_dir: Path, **train) -> ml_collections.ConfigDict:
  config = listops_small.get_config()
  config.cache_dir = str(cache_dir)
  config.task.update(TINY_TASK)
  config.model.update(TINY_MODEL)
  config.train.update({**TINY_TRAIN, **train})
  return config


def overrides(section: str, values: dict) -> list[str]:
  return [f"--config.{section}.{key}={value}" for key, value in values.items()]


def run_cli(*args: str, cache_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "experiments.train", *args, f"--config.cache_dir={cache_dir}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def tiny_cli_args(workdir: Path, **train) -> list[str]:
  return [
      f"--workdir={workdir}",
      *overrides("task", TINY_TASK),
      *overrides("model", TINY_MODEL),
      *overrides("train", {**TINY_TRAIN, **train}),
  ]


def run_cli_in_process(*args: str, cache_dir: Path, monkeypatch) -> None:
  """`python -m experiments.train *args` in this process (its flags parsed from the same command line into a
  FlagValues of their own): no interpreter start, imports and compiles of what this worker compiled already."""
  argv = ["experiments.train", *args, f"--config.cache_dir={cache_dir}"]
  values = flags.FlagValues()
  train.define_flags(values, argv)
  values(argv)
  monkeypatch.setattr(train, "FLAGS", values)
  train.main(argv[:1])


@pytest.mark.parametrize("variant", variant_names())
def test_cli_trains_every_variant(variant, tmp_path, cache_dir, monkeypatch, capsys):
  run_cli_in_process(f"--variant={variant}", *tiny_cli_args(tmp_path, num_steps=2), cache_dir=cache_dir,
                     monkeypatch=monkeypatch)
  assert "final metrics at step 2" in capsys.readouterr().out
  resolved = json.loads((tmp_path / "config.json").read_text())
  assert resolved["decoder"]["variant"] == variant
  assert resolved["decoder"]["causal"] == (not config_class(variant).supports_bidirectional)
  records = read_metrics(tmp_path)
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  assert all(np.isfinite(r["loss"]) for r in records)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_loss_falls_and_beats_majority_with_bf16_compute(tmp_path, cache_dir):
  config = tiny_config(cache_dir, num_steps=150, log_every=50, eval_every=150, checkpoint_every=150)
  config.train.learning_rate = 3e-3
  config.task.update(num_train=2000, num_valid=96, num_test=256, max_depth=2, max_args=4)
  config.model.update(width=32, dtype="bfloat16")
  results = train_and_evaluate(config, tmp_path)
  train_losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert train_losses[-1] < 0.8 * train_losses[0], train_losses
  # Depth-2 ListOps (one operator over 2-4 digits) is learnable far beyond always answering the majority class.
  assert results["test"]["accuracy"] > max(0.3, results["majority_baseline_accuracy"] + 0.15), results


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, cache_dir):
  args = dict(num_steps=40, checkpoint_every=5, eval_every=20, log_every=5)
  reference = tmp_path / "reference"
  train_and_evaluate(tiny_config(cache_dir, **args), reference)

  killed = tmp_path / "killed"
  command = [sys.executable, "-m", "experiments.train", "--variant=full", *tiny_cli_args(killed, **args),
             f"--config.cache_dir={cache_dir}"]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = killed / "checkpoints"
  deadline = time.monotonic() + 240
  while not (checkpoints / "10").is_dir() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert not (killed / "results.json").exists()
  saved = Checkpointer(checkpoints, max_to_keep=2).latest_step()
  assert saved is not None and saved < 40

  # Rerunning resumes from the last complete checkpoint, data position included.
  actual = train_and_evaluate(tiny_config(cache_dir, **args), killed)
  assert actual["step"] == 40
  assert actual == json.loads((reference / "results.json").read_text())
  # Training records after the resume point continue the reference run exactly.
  ref_train = {r["step"]: r["loss"] for r in read_metrics(reference) if r["split"] == "train"}
  resumed = [r for r in read_metrics(killed) if r["split"] == "train" and r["step"] > saved]
  assert resumed and all(r["loss"] == ref_train[r["step"]] for r in resumed)


def test_half_written_checkpoint_is_never_loaded(tmp_path, cache_dir):
  config = tiny_config(cache_dir, num_steps=4)
  expected = train_and_evaluate(config, tmp_path)
  checkpoints = tmp_path / "checkpoints"
  # What a kill during orbax's save of step 6 leaves: a temporary directory with partial contents.
  partial = checkpoints / "6.orbax-checkpoint-tmp"
  partial.mkdir()
  (partial / "state").mkdir()
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00truncated")
  # Resuming restores step 4 (restoring the partial step 6 would fail) and orbax deletes the leftover.
  assert train_and_evaluate(config, tmp_path) == expected
  assert not partial.exists()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
  train_and_evaluate(tiny_config(cache_dir, num_steps=4), tmp_path)
  # Resume with an absurd learning rate: the parameters overflow within a step or two.
  config = tiny_config(cache_dir, num_steps=8, schedule="constant", warmup_steps=0, learning_rate=1e30)
  with pytest.raises(NonFiniteLossError, match="non-finite loss at step [56].*last good one \\(step 4"):
    train_and_evaluate(config, tmp_path)
  assert Checkpointer(tmp_path / "checkpoints", max_to_keep=2).all_steps() == [2, 4]


def test_eval_only_reports_the_checkpoint(tmp_path, cache_dir):
  config = tiny_config(cache_dir, num_steps=2)
  trained = train_and_evaluate(config, tmp_path)
  assert train_and_evaluate(config, tmp_path, eval_only=True) == trained
  with pytest.raises(ValueError, match="no checkpoint"):
    train_and_evaluate(config, tmp_path / "empty", eval_only=True)


def test_changed_model_in_old_workdir_is_refused(tmp_path, cache_dir):
  train_and_evaluate(tiny_config(cache_dir, num_steps=2), tmp_path)
  config = tiny_config(cache_dir, num_steps=2)
  config.model.num_layers = 2
  with pytest.raises(ValueError, match="different config \\(model"):
    train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task=nope"], "--task='nope' is not valid; choose one of"),
        (["--variant=nope"], "--variant='nope' is not valid; choose one of"),
        (["--config.model.num_layer=4"], "num_layer"),
        (["--config.model.num_layers=four"], "num_layers"),
        (["--config.model.position=nope"], "position='nope' is not valid"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(args, message, tmp_path, cache_dir):
  result = run_cli(*tiny_cli_args(tmp_path), *args, cache_dir=cache_dir, check=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


# One process of a distributed run: the training command line (its flags parsed as `python -m experiments.train`
# parses them; main joins the processes with jax.distributed), then how a batch splits over this process's devices.
DISTRIBUTED_RUN = """
import json, sys
import jax
from experiments import train
from experiments.data import make_mesh, shard_batch, eval_batches
from experiments.tasks import build_task

train.define_flags()
train.main(train._parse_flags(sys.argv))
config = train.FLAGS.config
batch = shard_batch(next(eval_batches(build_task(config.task, config.cache_dir).splits["train"], 8)), make_mesh())
shards = [shard.data.shape for shard in batch["inputs"].addressable_shards]
print(json.dumps({"devices": jax.device_count(), "local_devices": jax.local_device_count(), "shards": shards}))
"""


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_runs_match_one_device(tmp_path, cache_dir):
  """Two processes joined by jax.distributed, each with two forced host devices, train like one device."""
  config = tiny_config(cache_dir, num_steps=2)
  # Built before the processes start, so that they only read it.
  build_task(config.task, config.cache_dir)
  # One pair of processes checks both the devices of one process and the processes of a run: each is mostly a jax
  # import and compiles, so a separate two-device process and a pair of one-device ones took twice as long.
  # The suite's own XLA flags (tests/conftest.py: fast CPU compiles) with two devices per process.
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  args = [*tiny_cli_args(tmp_path / "hosts", num_steps=2), f"--config.cache_dir={cache_dir}",
          f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
  # Output to files: a process blocked on a full pipe would stall the other in a collective.
  logs = [tmp_path / f"host{i}.log" for i in range(2)]
  hosts = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as out:
        hosts.append(subprocess.Popen([sys.executable, "-c", DISTRIBUTED_RUN, *args, f"--process_id={i}"],
                                      cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    # The one-device run meanwhile, in this process.
    single = train_and_evaluate(config, tmp_path / "one")
    for host in hosts:
      host.wait(timeout=300)
  finally:
    for host in hosts:
      host.kill()  # a failure above must not leave them running; once they have exited, nothing happens
  assert [host.returncode for host in hosts] == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
  reports = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
  # Every process holds half of each batch of 8, split again over its two devices.
  assert reports == [{"devices": 4, "local_devices": 2, "shards": [[2, 16], [2, 16]]}] * 2
  resolved = json.loads((tmp_path / "hosts" / "config.json").read_text())
  assert len(resolved["devices"]) == 4
  distributed = json.loads((tmp_path / "hosts" / "results.json").read_text())
  for split in ("valid", "test"):
    np.testing.assert_allclose(distributed[split]["loss"], single[split]["loss"], rtol=1e-4)


def test_compressive_reconstruction_loss_trains_the_compressor():
  """The sown attention-reconstruction loss reaches the training step and trains the compressor."""
  config = DecoderConfig(
      vocab_size=11, width=32, num_layers=1, variant="compressive", head="classifier", num_classes=3,
      mixer_options={"compressive": dict(segment_length=4, memory_length=4, compressed_memory_length=4,
                                         compression_rate=2, sow_compression_loss=True)},
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 11)
  batch = {"inputs": tokens, "mask": jnp.ones((2, 16), bool), "targets": jnp.array([0, 1]),
           "weights": jnp.ones((2,))}
  compressor = lambda: jax.tree.map(jnp.copy, nnx.state(model.blocks[0].mixer.compressor, nnx.Param))
  before = compressor()
  without = train_step(model, optimizer, batch, jax.random.key(1), 0.0)
  assert float(without["aux_loss"]) > 0
  unchanged = compressor()
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(unchanged)):
    assert bool(jnp.all(a == b)), "with weight 0 the task loss alone must not move the compressor"
  train_step(model, optimizer, batch, jax.random.key(1), 1.0)
  moved = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(compressor())))
  assert moved, "the reconstruction loss must train the compression network"


def test_eval_steps_leave_no_sown_values_in_the_model():
  """What mixers sow at evaluation must not stay in the model: it changed the graph at every call, so each eval
  batch of a compressive model compiled again."""
  config = DecoderConfig(
      vocab_size=11, width=32, num_layers=1, variant="compressive", head="classifier", num_classes=3,
      mixer_options={"compressive": dict(segment_length=4, memory_length=4, compressed_memory_length=4,
                                         compression_rate=2, sow_compression_loss=True)},
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  model.eval()
  batch = {"inputs": jax.random.randint(jax.random.key(0), (2, 16), 0, 11), "mask": jnp.ones((2, 16), bool),
           "targets": jnp.array([0, 1]), "weights": jnp.ones((2,))}
  first = eval_step(model, batch)
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
  second = eval_step(model, batch)
  np.testing.assert_array_equal(first["loss"], second["loss"])
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
