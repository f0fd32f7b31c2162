"""The notebooks: committed .ipynb files match their jupytext sources and carry no outputs, and both run
end to end at small sizes, drawing their figures (results.py from a real, tiny training run)."""

import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from experiments.configs import listops_small
from experiments.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["compare_variants", "results"]
KERNEL = "efficient-attention-test"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
  """A kernel spec running this interpreter, so the test needs no `ipykernel install` and cannot pick up
  a user-level `python3` spec that points at another environment."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
  return root


def execute(name: str, kernel_path: Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
  """Runs notebooks/<name>.py from the repository root with the small settings -> the executed notebook."""
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
  monkeypatch.setenv("NOTEBOOK_SMALL", "1")
  # The inline backend (headless, Agg-rendered) turns each plt.show() into a PNG output the test can count.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
  client = NotebookClient(notebook, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(REPO)}})
  return client.execute()


def images(notebook: nbformat.NotebookNode) -> int:
  return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def text(notebook: nbformat.NotebookNode) -> str:
  return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_source_without_outputs(name):
  committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  source = jupytext.read(NOTEBOOKS / f"{name}.py")
  assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in source.cells], (
      f"notebooks/{name}.ipynb is stale: regenerate it with `jupytext --to ipynb notebooks/{name}.py`"
  )
  code = [cell for cell in committed.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code), (
      f"notebooks/{name}.ipynb carries outputs: clear them (`jupytext --to ipynb notebooks/{name}.py`)"
  )


def test_compare_variants_runs_and_draws(kernel_path, monkeypatch):
  notebook = execute("compare_variants", kernel_path, monkeypatch)
  # Patterns, Linformer's projection, Performer's error, time and memory against length.
  assert images(notebook) == 4
  printed = text(notebook)
  for variant in ("full", "linear", "performer", "mamba"):
    assert f"\n{variant} " in printed


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> Path:
  """One real training run of the linear variant, a few steps of a tiny ListOps (about 15 s on CPU)."""
  root = tmp_path_factory.mktemp("workdirs")
  config = listops_small.get_config()
  config.cache_dir = str(root / "task_cache")
  config.model.variant = "linear"
  config.task.update(num_train=64, num_valid=16, num_test=16, max_depth=2, max_args=3, max_length=16)
  config.model.update(width=16, num_layers=1, num_heads=2)
  config.train.update(batch_size=8, num_steps=4, log_every=1, eval_every=2, checkpoint_every=4, warmup_steps=1)
  train_and_evaluate(config, root / "runs" / "listops-linear")
  return root / "runs"


def test_results_plots_runs_and_table(kernel_path, workdirs, monkeypatch):
  notebook = execute("results", kernel_path, monkeypatch, WORKDIRS=str(workdirs / "*"))
  assert images(notebook) == 1
  printed = text(notebook)
  assert "1 run(s) matching" in printed and "No training runs found" not in printed
  row = next(line for line in printed.splitlines() if line.startswith("listops-linear "))
  # Task, variant, final step, and the published Linear Transformer ListOps accuracy next to it.
  assert row.split()[1:4] == ["listops", "linear", "4"] and row.split()[-1] == "16.13"


def test_results_says_when_no_runs(kernel_path, tmp_path, monkeypatch):
  notebook = execute("results", kernel_path, monkeypatch, WORKDIRS=str(tmp_path / "*"))
  assert images(notebook) == 0
  printed = text(notebook)
  assert "No training runs found" in printed and "S4" in printed
