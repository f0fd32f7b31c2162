# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Training results
#
# What this notebook shows: the learning curves (loss and accuracy against step, training and validation)
# of every training run found in the workdirs, one line per variant, and the final test accuracies next to
# the published Long Range Arena numbers (Tay et al. 2021; S4 from Gu et al. 2022).
#
# Where runs come from: `python -m experiments.train --variant=<name>` writes
# `workdir/<config>-<variant>-s<seed>/` with `metrics.jsonl`, `results.json` and `config.json`. This notebook
# reads every directory matching the glob in the `WORKDIRS` environment variable (default `workdir/*`,
# relative to the repository root).
#
# How long it takes: seconds; it only reads files.

# %%
import glob
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from experiments.metrics import METRICS_FILE, read_metrics
from experiments.trainer import CONFIG_FILE, RESULTS_FILE

# Relative globs are taken from the repository root, whether the notebook runs from there or from notebooks/.
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
WORKDIRS = os.environ.get("WORKDIRS", "workdir/*")

# %% [markdown]
# ## Runs found

# %%
def load_run(workdir: Path) -> dict:
  """{"name", "variant", "task", "records", "results"} of one training workdir (results None if unfinished)."""
  config = json.loads((workdir / CONFIG_FILE).read_text()) if (workdir / CONFIG_FILE).exists() else {}
  results_path = workdir / RESULTS_FILE
  return {
      "name": workdir.name,
      "variant": config.get("decoder", {}).get("variant", "?"),
      "task": config.get("config", {}).get("task", {}).get("name", "?"),
      "records": read_metrics(workdir),
      "results": json.loads(results_path.read_text()) if results_path.exists() else None,
  }


pattern = WORKDIRS if os.path.isabs(WORKDIRS) else str(ROOT / WORKDIRS)
runs = [load_run(Path(path)) for path in sorted(glob.glob(pattern)) if (Path(path) / METRICS_FILE).exists()]
if runs:
  print(f"{len(runs)} run(s) matching {pattern}:")
  for run in runs:
    status = f"finished at step {run['results']['step']}" if run["results"] else "unfinished"
    print(f"  {run['name']}: {run['task']} / {run['variant']}, {len(run['records'])} records, {status}")
else:
  print(
      f"No training runs found: no directory matching {pattern} has a {METRICS_FILE}.\n"
      "Train some, e.g. `python -m experiments.train --variant=performer`, or point the WORKDIRS "
      "environment variable at your workdirs (a glob). The published numbers below still print."
  )

# %% [markdown]
# ## Learning curves
#
# Solid lines are training metrics (averaged over each logging interval), dashed lines with markers are
# validation evaluations.

# %%
def curve(run: dict, split: str, metric: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], r[metric]) for r in run["records"] if r["split"] == split and metric in r]
  return [s for s, _ in points], [v for _, v in points]


if runs:
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for index, run in enumerate(runs):
      color = f"C{index % 10}"
      label = run["variant"] if len({r["variant"] for r in runs}) == len(runs) else f"{run['variant']} ({run['name']})"
      ax.plot(*curve(run, "train", metric), color=color, label=f"{label} train")
      ax.plot(*curve(run, "valid", metric), "o--", color=color, label=f"{label} valid")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
  axes[1].legend(fontsize="small", ncol=2)
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## Test accuracy next to the published Long Range Arena numbers
#
# The published column is ListOps test accuracy (%) of the same method in the LRA paper; it compares only
# with runs on the full ListOps task (`--config=experiments/configs/listops.py`). The small default task
# (`listops_small`) is much easier, so its accuracies are not comparable with the paper's.

# %%
PUBLISHED_LISTOPS = {
    "Transformer": 36.37,
    "Local Attention": 15.82,
    "Sparse Transformer": 17.07,
    "Longformer": 35.63,
    "Linformer": 35.70,
    "Reformer": 37.27,
    "Sinkhorn Transformer": 33.67,
    "Synthesizer": 36.99,
    "BigBird": 36.05,
    "Linear Transformer": 16.13,
    "Performer": 18.01,
    "S4": 59.60,
}
# The method of the paper that each variant implements (variants missing here have no LRA entry).
PUBLISHED_NAME = {
    "full": "Transformer",
    "flash": "Transformer",
    "local": "Local Attention",
    "longformer": "Longformer",
    "linformer": "Linformer",
    "bigbird": "BigBird",
    "linear": "Linear Transformer",
    "performer": "Performer",
}

finished = [run for run in runs if run["results"]]
if finished:
  print(
      f"{'run':40s} {'task':10s} {'variant':15s} {'step':>6s} {'test acc %':>10s} {'majority %':>10s} "
      f"{'LRA ListOps %':>13s}"
  )
  for run in finished:
    results = run["results"]
    majority = results.get("majority_baseline_accuracy")
    published = PUBLISHED_LISTOPS.get(PUBLISHED_NAME.get(run["variant"], "")) if run["task"] == "listops" else None
    print(
        f"{run['name']:40s} {run['task']:10s} {run['variant']:15s} {results['step']:6d} "
        f"{100 * results['test']['accuracy']:10.2f} {'' if majority is None else f'{100 * majority:.2f}':>10s} "
        f"{'-' if published is None else f'{published:.2f}':>13s}"
    )
else:
  print("No finished runs (no results.json) to compare.")

print("\nPublished ListOps test accuracy (%):")
for method, accuracy in PUBLISHED_LISTOPS.items():
  print(f"  {method:22s} {accuracy:6.2f}")
