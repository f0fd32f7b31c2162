"""experiments.scaling: the sweep stops at a variant's wall, and the script writes its results end to end."""

import importlib.util
import json
import subprocess
import sys

import pytest

from experiments import scaling
from tests.helpers import run_script_main


def test_parse_options_reads_literals_and_rejects_malformed():
  assert scaling.parse_options(["full.impl=cudnn", "performer.num_features=128", "linear.chunk_size=64"]) == {
      "full": {"impl": "cudnn"}, "performer": {"num_features": 128}, "linear": {"chunk_size": 64}}
  with pytest.raises(ValueError, match="variant.field=value"):
    scaling.parse_options(["impl=cudnn"])


def test_sweep_stops_after_the_first_length_that_does_not_fit():
  def fake_measure(seq_len):
    if seq_len >= 4096:
      return scaling.Row("full", seq_len, "oom")
    return scaling.Row("full", seq_len, "ok", step_ms=seq_len / 1000, tokens_per_s=1e6, memory_gib=0.5)

  rows = scaling.scan_variant("full", [1024, 2048, 4096, 8192, 16384], fake_measure, max_step_s=5.0)
  assert [r.status for r in rows] == ["ok", "ok", "oom", "skipped", "skipped"]
  table = scaling.markdown(rows, [1024, 2048, 4096, 8192, 16384], "tiny")
  assert "| full | 1.0 ms / 512 MiB | 2.0 ms / 512 MiB | oom | skipped | skipped |" in table
  rows = scaling.scan_variant("full", [1024, 2048, 3072], fake_measure, max_step_s=1.5e-3)
  assert [r.status for r in rows] == ["ok", "ok", "slow"]


def test_script_writes_json_markdown_and_plot_and_merges_an_earlier_run(tmp_path, monkeypatch):
  # One timed length (and one searched past it): every length is a compile of its own, and the sweep over several
  # lengths has its test above. float32: no bf16 casts in the step, whose compile is most of this test's time.
  common = ["--lengths=16", "--width=32", "--num_layers=1", "--num_heads=2", "--dtype=float32", "--iters=2"]
  # The runs that compile call main in this process with the same flags: no interpreter start and jax import each
  # (the command line end to end is the last run, a merge, which compiles nothing).
  script = lambda *args: run_script_main(scaling, monkeypatch, *common, *args)
  first = tmp_path / "first"
  # A compile-only search past the timed lengths, up to --longest_max.
  script("--variants=full", f"--out_dir={first}", "--longest_bisect=1", "--longest_max=32", "--memory_limit_gib=1")
  # A second run measures only linear and takes full's rows from the first (the split-over-GPUs workflow). Linear
  # compiles about as fast as full; mamba's scan takes twice as long, and every length here is a compile.
  script("--variants=linear", f"--merge_from={first / 'scaling.json'}", f"--out_dir={tmp_path}")
  results = json.loads((tmp_path / "scaling.json").read_text())
  assert results["environment"]["device"]
  rows = {(r["variant"], r["seq_len"]): r for r in results["rows"]}
  assert set(rows) == {("full", 16), ("full", 32), ("linear", 16)}
  assert rows[("full", 32)]["status"] == "fits" and rows[("full", 32)]["memory_gib"] > 0
  del rows[("full", 32)]
  assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
  first_rows = json.loads((first / "scaling.json").read_text())["rows"]
  assert [r for r in results["rows"] if r["variant"] == "full"] == first_rows
  table = (tmp_path / "scaling.md").read_text()
  assert "| linear |" in table and "| full |" in table and "| 32 (the longest tried) |" in table
  if importlib.util.find_spec("matplotlib"):
    assert (tmp_path / "scaling.png").stat().st_size > 0
  # A merge with --longest_bisect searches the merged variant that has no search yet (linear), not full again.
  searched = tmp_path / "searched"
  script("--variants=full,linear", f"--merge_from={tmp_path / 'scaling.json'}", f"--out_dir={searched}",
         "--longest_bisect=1", "--longest_max=32", "--memory_limit_gib=1")
  rows = json.loads((searched / "scaling.json").read_text())["rows"]
  assert [(r["variant"], r["seq_len"], r["status"]) for r in rows if r["status"] in scaling.SEARCHED] == [
      ("full", 32, "fits"), ("linear", 32, "fits")]
  # Two files that repeat the same earlier rows merge without duplicates: `python -m` end to end.
  merged = tmp_path / "merged"
  subprocess.run([sys.executable, "-m", "experiments.scaling", *common, "--variants=full,linear",
                  f"--merge_from={searched / 'scaling.json'},{tmp_path / 'scaling.json'}", f"--out_dir={merged}"],
                 check=True, capture_output=True, text=True, timeout=300)
  assert json.loads((merged / "scaling.json").read_text())["rows"] == rows
  assert "| linear |" in (merged / "scaling.md").read_text()


def test_merge_refuses_rows_of_another_model(tmp_path):
  path = tmp_path / "scaling.json"
  path.write_text(json.dumps({"environment": {"device": "cpu", "model": "width 64"}, "rows": [
      {"variant": "full", "seq_len": 16, "status": "ok", "step_ms": 1.0, "tokens_per_s": 1.0, "memory_gib": 0.1}]}))
  rows, env = scaling.load_measured([str(path)], "width 64", [16, 32])
  assert [r.variant for r in rows] == ["full"] and env["device"] == "cpu"
  with pytest.raises(ValueError, match="merge_from.*width 64"):
    scaling.load_measured([str(path)], "width 32", [16, 32])


def test_remeasure_drops_a_variants_merged_rows_and_must_name_one_of_this_runs_variants(tmp_path):
  path = tmp_path / "scaling.json"
  row = lambda variant: {"variant": variant, "seq_len": 16, "status": "ok", "step_ms": 1.0, "tokens_per_s": 1.0,
                         "memory_gib": 0.1}
  path.write_text(json.dumps({"environment": {"device": "cpu", "model": "width 64"},
                              "rows": [row("full"), row("performer")]}))
  rows, _ = scaling.load_measured([str(path)], "width 64", [16], drop=scaling.checked_remeasure(
      ["performer"], ["full", "performer"]))
  assert [r.variant for r in rows] == ["full"]
  with pytest.raises(scaling.app.UsageError, match="--remeasure entry 'mamba' is not valid.*full, performer"):
    scaling.checked_remeasure(["mamba"], ["full", "performer"])


def test_longest_search_doubles_then_bisects_by_compiled_memory():
  ok = lambda t: scaling.Row("linear", t, "ok", step_ms=1.0, tokens_per_s=1.0, memory_gib=0.1)
  memory = lambda t: t / 1024 * 0.1  # GiB: 5 GiB fits up to 51.2K tokens
  found = scaling.search_longest("linear", [ok(1024), ok(4096)], memory, 5.0, max_len=1 << 20, bisect=3)
  assert [(r.seq_len, r.status) for r in found] == [
      (8192, "fits"), (16384, "fits"), (32768, "fits"), (65536, "too big"), (49152, "fits"), (57344, "too big"),
      (53248, "too big")]
  assert scaling._longest([ok(1024), ok(4096), *found], "linear") == "48K (52K does not)"
  # A timed length that ran out of memory bounds the search from above; a variant stopped for time is not searched.
  rows = [ok(1024), ok(4096), scaling.Row("linear", 65536, "oom")]
  assert [r.seq_len for r in scaling.search_longest("linear", rows, memory, 5.0, 1 << 20, bisect=1)] == [34816]
  slow = [ok(1024), scaling.Row("linear", 4096, "slow")]
  assert scaling.search_longest("linear", slow, memory, 5.0, 1 << 20, bisect=3) == []
  table = scaling.markdown([ok(1024), ok(4096), *found], [1024, 4096], "tiny")
  assert "| linear | 1.0 ms / 102 MiB | 1.0 ms / 102 MiB | 48K (52K does not) |" in table
