"""experiments.compare: config overrides, the accuracy table, and a trained run re-evaluated at other lengths."""

import dataclasses
import json
import sys

import pytest

from experiments import compare, compare_plot
from experiments.cli import literal
from tests.helpers import run_script_main


def test_overrides_parse_and_reject_unknown_fields():
  config = compare.load_config("listops_small")
  path, value = compare.parse_assignment("train.num_steps=7", "set")
  compare.assign(config, path, literal(value))
  assert config.train.num_steps == 7
  with pytest.raises(ValueError, match="section.field=value"):
    compare.parse_assignment("num_steps=7", "set")
  with pytest.raises(ValueError, match="train.num_step"):
    compare.assign(config, ["train", "num_step"], 7)
  with pytest.raises(ValueError, match="--task='nope' is not valid"):
    compare.load_config("nope")


def test_table_has_mean_and_spread_over_seeds_and_the_published_numbers():
  runs = [
      compare.Run("full", 0, None, "ok", 10, 0.36),
      compare.Run("full", 1, None, "ok", 10, 0.38),
      compare.Run("performer", 0, None, "error: diverged"),
  ]
  table = compare.markdown("listops", runs, "", [])
  assert "| full | 2/2 | 37.00 ± 1.41 | 36.37 |" in table
  assert "| performer | 0/1 | failed | 18.01 |" in table
  assert "| S4 (Gu et al., 2022) |  |  | 59.60 |" in table
  assert "- performer seed 0: error: diverged" in table


def test_trained_model_is_evaluated_at_other_lengths(tmp_path):
  config = compare.load_config("induction_heads")
  for field, value in {"num_train": 64, "num_valid": 16, "num_test": 16, "train_seq_len": 16, "test_seq_len": 16}.items():
    config.task[field] = value
  config.model.num_layers = 1
  config.train.num_steps = 4
  config.train.eval_every = 4
  config.train.batch_size = 8
  config.cache_dir = str(tmp_path / "cache")
  run = compare.run_one(config, tmp_path / "run", "full", 0, None, [16, 32])
  assert run.status == "ok" and run.step == 4
  assert set(run.length_accuracy) == {16, 32}
  assert all(0.0 <= accuracy <= 1.0 for accuracy in run.length_accuracy.values())
  # The same length as the run's own test split gives the run's own test accuracy.
  assert run.length_accuracy[16] == pytest.approx(run.test_accuracy)


def test_workers_claim_each_run_once_and_the_merge_restores_the_planned_order(tmp_path):
  """--parallel_gpus workers take runs from a shared claim folder: each planned run goes to exactly one worker."""
  assert [compare.claim(tmp_path, k) for k in (0, 1, 0, 2, 1)] == [True, True, False, True, False]
  planned = [(None, f"v{k}", 0) for k in range(5)]
  runs = [compare.Run(f"v{k}", 0, None, "ok", 1, k / 10, {64: k / 10}) for k in range(5)]
  assert compare.in_planned_order([runs[3], runs[0], runs[4], runs[1], runs[2]], planned) == runs
  assert compare.unfinished(planned, [runs[1], runs[3]]) == [planned[0], planned[2], planned[4]]
  rows = [dataclasses.asdict(run) for run in runs]
  assert compare.runs_from_rows(json.loads(json.dumps(rows))) == runs


def test_workers_use_the_visible_gpus():
  assert compare.gpu_ids(2, None) == ["0", "1"]
  assert compare.gpu_ids(2, "2,3") == ["2", "3"]
  assert compare.gpu_ids(1, "3, 1") == ["3"]
  with pytest.raises(Exception, match="--parallel_gpus=3 is not valid with CUDA_VISIBLE_DEVICES='2,3'"):
    compare.gpu_ids(3, "2,3")


def test_parallel_workers_run_every_planned_run_once(tmp_path, monkeypatch):
  """Two worker processes share three tiny runs; the merged table has each run once, in the planned order."""
  tiny = ["task.num_train=32", "task.num_valid=8", "task.num_test=8", "task.train_seq_len=16", "task.test_seq_len=16",
          "train.num_steps=2", "train.eval_every=2", "train.batch_size=4", "train.eval_batch_size=4",
          "model.num_layers=1"]
  out = tmp_path / "out"
  # The three runs differ only in their data (task.seed), so they compile the same programs: a worker's second run
  # takes its first's from jax's cache, where three variants compiled three times (mamba's for twice as long).
  args = ["--task=induction_heads", "--variants=full", "--sweep=task.seed=0,1,2", *(f"--set={item}" for item in tiny),
          "--parallel_gpus=1", "--runs_per_gpu=2", f"--workdir={tmp_path / 'runs'}", f"--out_dir={out}"]
  # The parent runs in this process; it starts the workers with its command line, as `python -m experiments.compare`.
  monkeypatch.setattr(sys, "argv", ["experiments.compare", *args])
  monkeypatch.setenv("EFFICIENT_ATTENTION_CACHE", str(tmp_path / "cache"))
  run_script_main(compare, monkeypatch, *args)
  rows = json.loads((out / "compare_induction_heads_seed.json").read_text())["rows"]
  assert [(row["sweep_value"], row["variant"], row["status"], row["step"]) for row in rows] == [
      (0, "full", "ok", 2), (1, "full", "ok", 2), (2, "full", "ok", 2)]
  worker_rows = [json.loads((out / f"worker_{i}" / "compare_induction_heads_seed.json").read_text())["rows"]
                 for i in range(2) if (out / f"worker_{i}" / "compare_induction_heads_seed.json").exists()]
  assert sorted(row["sweep_value"] for part in worker_rows for row in part) == [0, 1, 2]


def test_longer_test_lengths_get_smaller_eval_batches():
  """Eval batches at other lengths hold the tokens of one configured eval batch, at least one sequence."""
  config = compare.load_config("induction_heads")  # eval batch 32 at length 256
  assert compare.length_batch_size(config, 256) == 32
  assert compare.length_batch_size(config, 1024) == 8
  assert compare.length_batch_size(config, 16384) == 1
  assert compare.length_batch_size(config, 128) == 32  # shorter tests keep the configured batch


def _table_file(path, runs, **environment):
  env = {"device": "H200", "jax": "0.11.2", "date": "2026-11-28", "commit": "abc", "task": "listops", "overrides": [],
         "sweep": "", **environment}
  path.write_text(json.dumps({"environment": env, "rows": [dataclasses.asdict(run) for run in runs]}))
  return str(path)


def test_earlier_tables_merge_and_must_be_the_same_comparison(tmp_path):
  first = _table_file(tmp_path / "a.json", [compare.Run("full", 0, None, "ok", 10, 0.36)])
  second = _table_file(tmp_path / "b.json", [compare.Run("full", 0, None, "ok", 10, 0.99),
                                            compare.Run("mamba", 0, None, "ok", 10, 0.5)], commit="def")
  runs, env = compare.load_earlier([first, second], None)
  # A run in two files keeps its first row; the commits of both are listed.
  assert [(r.variant, r.test_accuracy) for r in runs] == [("full", 0.36), ("mamba", 0.5)]
  assert env["commit"] == "abc, def"
  other = _table_file(tmp_path / "c.json", [], overrides=["train.num_steps=5"])
  with pytest.raises(ValueError, match=r"c.json is not valid here: its overrides"):
    compare.load_earlier([first, other], None)
  elsewhere = _table_file(tmp_path / "d.json", [], device="cpu")
  with pytest.raises(ValueError, match=r"d.json is not valid here: its device"):
    compare.load_earlier([elsewhere], {"device": "H200", "commit": "x", "task": "listops", "overrides": [],
                                        "sweep": ""})


def test_sweep_table_has_rows_only_for_runs_that_exist_and_lists_what_was_not_run():
  runs = [compare.Run("full", 0, 64, "ok", 10, 0.9), compare.Run("mamba", 0, 128, "ok", 10, 0.7)]
  table = compare.markdown("mqar", runs, "task.train_seq_len", [], not_run=[(128, "full", 0)])
  assert "| full | 64 | 1/1 | 90.00 |" in table and "| mamba | 128 | 1/1 | 70.00 |" in table
  assert "| full | 128 |" not in table and "| mamba | 64 |" not in table
  assert "- full seed 0 task.train_seq_len=128: not run" in table


def test_a_length_that_failed_on_the_device_is_marked_apart_from_lengths_a_model_cannot_take():
  runs = [compare.Run("full", 0, None, "ok", 10, 0.5, {256: 0.5, 16384: None}, {16384: "RESOURCE_EXHAUSTED: oom"}),
          compare.Run("linformer", 0, None, "ok", 10, 0.4, {256: None, 16384: None})]
  table = compare.markdown("induction_heads", runs, "", [256, 16384])
  assert "| full | 1/1 | 50.00 | 50.00 | failed |" in table
  assert "| linformer | 1/1 | 40.00 | n/a | n/a |" in table
  assert "- full seed 0 at T=16384: error: RESOURCE_EXHAUSTED: oom" in table
  assert "- n/a: the model cannot take that length" in table
  rows = json.loads(json.dumps([dataclasses.asdict(run) for run in runs]))
  assert compare.runs_from_rows(rows) == runs


def test_merge_only_writes_the_merged_table_and_names_the_runs_without_results(tmp_path, monkeypatch):
  part = _table_file(tmp_path / "part.json", [compare.Run("full", 0, None, "ok", 10, 0.36)])
  out = tmp_path / "out"
  # main in this process, with the flags as the command line gives them (a merge compiles nothing: a new process
  # would spend its time starting).
  script = lambda *args: run_script_main(compare, monkeypatch, "--task=listops", "--variants=full,mamba", *args)
  script(f"--merge_from={part}", "--merge_only", f"--out_dir={out}")
  table = (out / "compare_listops.md").read_text()
  assert "| full | 1/1 | 36.00 | 36.37 |" in table
  assert "- mamba seed 0: not run" in table
  assert json.loads((out / "compare_listops.json").read_text())["environment"]["commit"] == "abc"
  # --retry_failed: a failed run is planned again (here: listed as not run) instead of counting as done.
  failed = _table_file(tmp_path / "failed.json", [compare.Run("full", 0, None, "ok", 10, 0.36),
                                                  compare.Run("mamba", 0, None, "error: diverged")])
  for retry, expected in ((False, "- mamba seed 0: error: diverged"), (True, "- mamba seed 0: not run")):
    script(f"--merge_from={failed}", "--merge_only", f"--retry_failed={retry}", f"--out_dir={out}")
    assert expected in (out / "compare_listops.md").read_text()


def test_plots_for_a_sweep_for_test_lengths_and_per_variant(tmp_path):
  pytest.importorskip("matplotlib")
  sweep = [compare.Run("full", seed, value, "ok", 10, accuracy)
           for seed, value, accuracy in ((0, 64, 0.5), (1, 64, 0.7), (0, 128, 0.9))]
  sweep += [compare.Run("mamba", 0, 64, "error: diverged"), compare.Run("mamba", 0, 128, "ok", 10, 0.25)]
  # The mean over finished seeds at each swept value; a failed run adds no point.
  assert compare_plot.sweep_series(sweep, by_length=False) == {"full": ([64, 128], [60.0, 90.0]),
                                                               "mamba": ([128], [25.0])}
  lengths = [compare.Run("mamba", 0, None, "ok", 10, 1.0, {256: 1.0, 1024: 0.5}),
             compare.Run("linformer", 0, None, "ok", 10, 0.1, {256: None, 1024: 0.1})]
  assert compare_plot.sweep_series(lengths, by_length=True) == {"linformer": ([1024], [10.0]),
                                                                "mamba": ([256, 1024], [100.0, 50.0])}
  swept_lengths = [compare.Run("full", 0, "rope", "ok", 10, 1.0, {256: 1.0}),
                   compare.Run("full", 0, "learned", "ok", 10, 0.2, {256: 0.2})]
  assert compare_plot.sweep_series(swept_lengths, by_length=True, sweep_field="model.position") == {
      "full (model.position=learned)": ([256], [20.0]), "full (model.position=rope)": ([256], [100.0])}
  per_variant = [compare.Run("full", 0, None, "ok", 10, 0.36), compare.Run("mamba", 0, None, "ok", 10, 0.37)]
  named_sweep = [compare.Run("full", 0, "rope", "ok", 10, 0.9), compare.Run("full", 0, "learned", "ok", 10, 0.1)]
  # A sweep of names gets a bar per value, not one bar averaging them.
  assert compare_plot.bar_values(named_sweep, "model.position") == {("full", "rope"): 90.0, ("full", "learned"): 10.0}
  assert compare_plot.bar_values(per_variant, "") == {("full", None): 36.0, ("mamba", None): 37.0}
  cases = {"sweep": (sweep, "task.train_seq_len", []), "lengths": (lengths, "", [256, 1024]),
           "variants": (per_variant, "", []), "named_sweep": (named_sweep, "model.position", [])}
  for name, (runs, sweep_field, eval_lengths) in cases.items():
    path = tmp_path / f"{name}.png"
    assert compare_plot.plot(str(path), runs, sweep_field=sweep_field, eval_lengths=eval_lengths,
                             published={"full": 36.37}, reference_rows={"S4": 59.6}, train_length=256)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not compare_plot.plot(str(tmp_path / "none.png"), [compare.Run("full", 0, None, "error: oom")],
                               sweep_field="", eval_lengths=[], published={}, reference_rows={})
  assert not (tmp_path / "none.png").exists()
