"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m experiments.train`."""

import contextlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from efficient_attention import Decoder, parallel
from experiments import modeling
from experiments.checkpoint import Checkpointer
from experiments.data import DataPosition, TrainStream, eval_batches, make_mesh, shard_batch
from experiments.metrics import MetricWriter, ProgressBar
from experiments.optim import learning_rate_schedule, make_optimizer
from experiments.tasks import build_task
from experiments.tasks.base import Split, TaskData, majority_fraction

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
# Config sections a resumed run must share with the checkpoint it continues.
_RESUME_KEYS = ("task", "model", "seed")


class NonFiniteLossError(RuntimeError):
  """The training loss, the gradient norm or the parameter norm became NaN or Inf."""


def _sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Weighted sums of cross-entropy and correct predictions over the batch (and time, for token tasks).

  logits fp32 [B, K] with targets [B], or [B, T, K] with targets [B, T]; weights match targets.
  """
  weights = batch["weights"].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {
      "loss": jnp.sum(losses * weights),
      "correct": jnp.sum(correct * weights),
      "weight": jnp.sum(weights),
  }


@nnx.jit
def train_step(
    model: Decoder, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], dropout_key: jax.Array,
    aux_loss_weight: float | jax.Array = 1.0,
):
  """One AdamW step on the batch's mean loss -> weighted sums, the gradient norm and the updated parameters' norm.

  Auxiliary losses that mixers sow as nnx.Intermediate (the compressive memory's reconstruction loss, which
  trains its compression network) are added with `aux_loss_weight` and reported as "aux_loss".
  """
  nnx.reseed(model, dropout=dropout_key)

  def loss_fn(model):
    logits, sown = nnx.capture(model, nnx.Intermediate)(batch["inputs"], mask=batch["mask"])
    sums = _sums(logits, batch)
    aux = sum((jnp.sum(leaf) for leaf in jax.tree.leaves(sown)), jnp.float32(0.0))
    sums["aux_loss"] = aux
    return sums["loss"] / jnp.maximum(sums["weight"], 1.0) + aux_loss_weight * aux, sums

  grads, sums = nnx.grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return {**sums, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(nnx.state(model, nnx.Param))}


@nnx.jit
def eval_step(model: Decoder, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  # Capturing (and dropping) what mixers sow keeps it out of the model: left in, it changed the model's graph at
  # every call, so each eval batch of the compressive memory compiled anew (minutes per evaluation).
  logits, _ = nnx.capture(model, nnx.Intermediate)(batch["inputs"], mask=batch["mask"])
  return _sums(logits, batch)


def summarize(sums: Mapping[str, float], task: TaskData) -> dict[str, float]:
  """Weighted sums -> mean loss and accuracy (and bits per token for token tasks)."""
  weight = max(float(sums["weight"]), 1.0)
  metrics = {"loss": float(sums["loss"]) / weight, "accuracy": float(sums["correct"]) / weight}
  if task.kind == "tokens":
    metrics[f"bits_per_{task.token_unit}"] = metrics["loss"] / math.log(2)
  return metrics


def evaluate(model: Decoder, split: Split, task: TaskData, batch_size: int, max_batches: int, mesh: Mesh):
  """Metrics of `model` on the first `max_batches` batches of `split` (all when -1)."""
  model.eval()
  totals = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
  for batch in eval_batches(split, batch_size, max_batches):
    sums = jax.device_get(eval_step(model, shard_batch(batch, mesh)))
    totals = {key: totals[key] + float(sums[key]) for key in totals}
  return summarize(totals, task)


def create(model_config, seed: int, train: Mapping[str, Any], mesh: Mesh) -> tuple[Decoder, nnx.Optimizer]:
  """The model and its optimizer, every variable replicated over the mesh (data parallelism keeps a full copy
  per device), or split over all devices when train.fsdp is set (XLA gathers each before use).

  Built inside jit with a sharding constraint, so each process materialises only its own devices'
  copies: that also works when the mesh spans several hosts, where device_put cannot place arrays.
  """
  return _build(model_config, seed, ml_collections.FrozenConfigDict(train), mesh)


@nnx.jit(static_argnums=(0, 1, 2, 3))
def _build(model_config, seed, train, mesh):
  model = Decoder(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  optimizer, _ = make_optimizer(model, train)
  for node in (model, optimizer):
    state = nnx.state(node)
    shardings = parallel.state_shardings(state, mesh, fsdp=bool(train.get("fsdp", False)))
    nnx.update(node, jax.lax.with_sharding_constraint(state, shardings))
  return model, optimizer


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _check_resumable(workdir: Path, config: dict[str, Any]) -> None:
  path = workdir / CONFIG_FILE
  if not path.exists():
    return
  saved = json.loads(path.read_text())["config"]
  changed = [key for key in _RESUME_KEYS if saved.get(key) != config.get(key)]
  if changed or saved["train"]["batch_size"] != config["train"]["batch_size"]:
    raise ValueError(
        f"workdir {workdir} holds checkpoints of a run with a different config "
        f"({', '.join(changed or ['train.batch_size'])} differ); pass a new --workdir or delete the old one"
    )


class _TrainLog:
  """Collects per-step device metrics and turns them into interval summaries, stopping on NaN/Inf."""

  def __init__(self, task: TaskData, tokens_per_step: int):
    self.task, self.tokens_per_step = task, tokens_per_step
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._since = time.perf_counter()

  def restart_clock(self) -> None:
    """Excludes the time since the last flush (an evaluation) from the next interval's throughput."""
    self._since = time.perf_counter()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))

  def flush(self) -> dict[str, float] | None:
    """Summary of the steps since the last flush; raises NonFiniteLossError naming the first bad step."""
    if not self.pending:
      return None
    steps = [step for step, _ in self.pending]
    values = jax.device_get([metrics for _, metrics in self.pending])
    self.pending = []
    for step, metrics in zip(steps, values):
      checked = ("loss", "aux_loss", "grad_norm", "param_norm")
      if not all(np.isfinite(metrics[key]) for key in checked):
        raise NonFiniteLossError(f"step {step} (" + ", ".join(f"{key} {float(metrics[key])}" for key in checked) + ")")
    elapsed, self._since = time.perf_counter() - self._since, time.perf_counter()
    totals = {key: sum(float(m[key]) for m in values) for key in ("loss", "correct", "weight")}
    summary = summarize(totals, self.task)
    summary["aux_loss"] = float(np.mean([m["aux_loss"] for m in values]))
    summary["grad_norm"] = float(np.mean([m["grad_norm"] for m in values]))
    summary["param_norm"] = float(values[-1]["param_norm"])
    summary["steps_per_sec"] = len(values) / elapsed
    summary["tokens_per_sec"] = len(values) * self.tokens_per_step / elapsed
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, eval_only: bool = False):
  """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluating on the validation split
  every `train.eval_every` steps and on the test split at the end.

  Writes workdir/config.json (the config and the resolved model), metrics.jsonl, tensorboard/,
  checkpoints/ and results.json. Returns {"step", "valid": metrics, "test": metrics} (and the
  majority-class baseline accuracy for classification). With eval_only, evaluates the latest
  checkpoint without training.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0
  plain = _plain(config)
  task = build_task(config.task, config.cache_dir or None)
  model_config, direction = modeling.decoder_config(config.model, task, config.seed)
  baseline = majority_fraction(task.splits["train"], task.splits["test"]) if task.kind == "classification" else None
  resolved = {
      "config": plain,
      "decoder": modeling.describe(model_config),
      "direction": direction,
      "devices": [str(d) for d in jax.devices()],
      "task": {name: {"examples": len(split), "seq_len": split.seq_len} for name, split in task.splits.items()},
      "majority_baseline_accuracy": baseline,
  }
  logging.info("task %s %s; model %s", task.name, resolved["task"], direction)

  checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
  writer = MetricWriter(workdir, enabled=lead)
  context = contextlib.ExitStack()
  try:
    latest = checkpoints.latest_step()
    if latest is not None:
      _check_resumable(workdir, plain)
    elif eval_only:
      raise ValueError(f"eval_only: no checkpoint in {checkpoints.directory} to evaluate")
    if lead:
      (workdir / CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")

    mesh = make_mesh(config.train.get("mesh", ""))
    model, optimizer = create(model_config, config.seed, config.train, mesh)
    # Steps traced from here on split whole-sequence ops over the mesh's sequence axis (if it has one).
    context.enter_context(parallel.sequence_parallel(mesh))
    schedule = learning_rate_schedule(config.train)
    step, position = 0, DataPosition()
    if latest is not None:
      position = _restore(checkpoints, latest, model, optimizer)
      step = latest

    eval_batch = config.train.eval_batch_size or config.train.batch_size

    def run_eval(split: str, at_step: int) -> dict[str, float]:
      max_batches = config.train.eval_batches if split == "valid" else -1
      metrics = evaluate(model, task.splits[split], task, eval_batch, max_batches, mesh)
      writer.write(at_step, split, metrics)
      return metrics

    if not eval_only and step < config.train.num_steps:
      step = _train_loop(config, task, model, optimizer, schedule, mesh, checkpoints, writer, run_eval, step, position)
    results = {"step": step, "valid": run_eval("valid", step), "test": run_eval("test", step)}
    if baseline is not None:
      results["majority_baseline_accuracy"] = baseline
  finally:
    context.close()
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  if lead:
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
  return results


def _restore(checkpoints: Checkpointer, step: int, model: Decoder, optimizer: nnx.Optimizer) -> DataPosition:
  try:
    data = checkpoints.restore(step, model, optimizer)
  except ValueError as error:
    raise ValueError(
        f"the checkpoint {checkpoints.directory / str(step)} does not fit this model and optimizer (it was "
        f"written with a different config); pass a new --workdir or delete the old one. Orbax: {str(error)[:300]}"
    ) from error
  logging.info("resumed from %s at step %d", checkpoints.directory / str(step), step)
  return DataPosition.from_json(data["position"])


def _train_loop(config, task, model, optimizer, schedule, mesh, checkpoints, writer, run_eval, step, position):
  """Trains from `step` (the stream at `position`) to train.num_steps -> the final step."""
  train = config.train
  stream = TrainStream(task.splits["train"], train.batch_size, config.seed, position)
  tokens_per_step = train.batch_size * task.splits["train"].seq_len
  log = _TrainLog(task, tokens_per_step)
  progress = ProgressBar(train.num_steps, step, tokens_per_step)
  dropout_base = jax.random.key(config.seed + 1)
  logging.info("training %s on %s from step %d to %d", model.config.variant, task.name, step, train.num_steps)
  model.train()
  # cached_partial skips nnx.jit's per-call graph traversal (a large share of a small model's step);
  # it is rebuilt after each evaluation, which switches the model to eval mode and back.
  step_fn = nnx.cached_partial(train_step, model, optimizer)
  try:
    while step < train.num_steps:
      batch = shard_batch(next(stream), mesh)
      metrics = step_fn(batch, jax.random.fold_in(dropout_base, step), config.aux_loss_weight)
      step += 1
      log.add(step, metrics)
      done = step == train.num_steps
      log_now = done or step % train.log_every == 0
      # The final evaluation follows the loop.
      eval_now = not done and step % train.eval_every == 0
      save_now = done or step % train.checkpoint_every == 0
      if log_now or eval_now or save_now:
        summary = log.flush()
        if log_now:
          summary["learning_rate"] = float(schedule(step - 1))
          writer.write(step, "train", summary)
          progress.update(step, summary["loss"])
          progress.newline()
          logging.info(
              "step %d/%d: loss %.4f accuracy %.4f | %.1f steps/s %.0f tokens/s", step, train.num_steps,
              summary["loss"], summary["accuracy"], summary["steps_per_sec"], summary["tokens_per_sec"],
          )
        if save_now:
          checkpoints.save(step, model, optimizer, {"step": step, "position": stream.position.to_json()})
        if eval_now:
          logging.info("step %d: valid %s", step, _format(run_eval("valid", step)))
          model.train()
          step_fn = nnx.cached_partial(train_step, model, optimizer)
          log.restart_clock()
      else:
        progress.update(step)
  except NonFiniteLossError as error:
    progress.newline()
    checkpoints.wait()
    kept = checkpoints.latest_step()
    where = f"the last good one (step {kept}, in {checkpoints.directory}) is kept" if kept else "none was saved yet"
    raise NonFiniteLossError(
        f"training stopped: non-finite loss at {error}. No checkpoint was written after it; {where}. "
        "Lower train.learning_rate or train.grad_clip_norm, or use model.dtype=float32, and rerun to resume."
    ) from None
  return step


def _format(metrics: Mapping[str, float]) -> str:
  return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())
