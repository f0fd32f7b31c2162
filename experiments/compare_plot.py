"""The picture beside a compare table: accuracy against the swept value, against the test length, or per variant.

- With a sweep (e.g. MQAR's task.train_seq_len or model.width): test accuracy against the swept value, a line per
  variant.
- With --eval_lengths (e.g. induction heads): test accuracy against the test length, a line per variant, the
  training length marked.
- Otherwise (ListOps): a bar per variant (per variant and value for a sweep of non-numbers), the published numbers
  as markers and reference rows as lines.

Accuracy is the mean over a variant's seeds that finished; a variant with no finished run is left out.
"""

import statistics
from typing import Any

# Twelve variants outrun a ten-colour cycle: distinct colours and markers keep every line apart.
_MARKERS = "osD^v<>ph*XP"


def _style(plt, index: int) -> dict[str, Any]:
  colors = plt.get_cmap("tab20").colors
  return dict(marker=_MARKERS[index % len(_MARKERS)], color=colors[(2 * index) % 20 + (2 * index) // 20 % 2])


def _mean_percent(values: list[float]) -> float:
  return 100 * statistics.fmean(values)


def sweep_series(runs, *, by_length: bool, sweep_field: str = "") -> dict[str, tuple[list, list[float]]]:
  """{line label: (x values, mean accuracy % at each)} over the sweep values (by_length=False, a line per variant)
  or the test lengths (a line per variant, or per variant and sweep value when sweep_field is set, so a line never
  averages runs of different configurations)."""
  points = {}
  for run in runs:
    if run.status != "ok":
      continue
    label = f"{run.variant} ({sweep_field}={run.sweep_value})" if by_length and sweep_field else run.variant
    items = run.length_accuracy.items() if by_length else [(run.sweep_value, run.test_accuracy)]
    for x, accuracy in items:
      if accuracy is not None:
        points.setdefault(label, {}).setdefault(x, []).append(accuracy)
  return {label: (sorted(at), [_mean_percent(at[x]) for x in sorted(at)]) for label, at in sorted(points.items())}


def bar_values(runs, sweep_field: str) -> dict[tuple, float]:
  """{(variant, sweep value): mean accuracy %}: a bar per variant, or per (variant, value) for a sweep whose values
  are not numbers (no x axis to put them on), so one bar never averages runs of different configurations."""
  accuracies = {}
  for run in runs:
    if run.status == "ok":
      accuracies.setdefault((run.variant, run.sweep_value if sweep_field else None), []).append(run.test_accuracy)
  return {key: _mean_percent(values) for key, values in accuracies.items()}


def plot(path: str, runs, *, sweep_field: str, eval_lengths: list[int], published: dict[str, float],
         reference_rows: dict[str, float], train_length: int | None = None) -> bool:
  """Writes the figure to `path` (PNG); False (nothing written) without matplotlib or without a finished run."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not importable; no plot")
    return False
  numeric_sweep = sweep_field and all(isinstance(run.sweep_value, (int, float)) for run in runs)
  if numeric_sweep or eval_lengths:
    series = sweep_series(runs, by_length=not numeric_sweep, sweep_field=sweep_field)
    if not series:
      return False
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for i, (variant, (xs, ys)) in enumerate(series.items()):
      ax.plot(xs, ys, label=variant, **_style(plt, i))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(sweep_field if numeric_sweep else "test length")
    if not numeric_sweep and train_length:
      ax.axvline(train_length, color="grey", linestyle=":", label=f"training length {train_length}")
  else:
    bars = bar_values(runs, sweep_field)
    if not bars:
      return False
    keys = sorted(bars, key=bars.get)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(keys) + 1.5))
    ax.barh([f"{variant} ({sweep_field}={value})" if sweep_field else variant for variant, value in keys],
            [bars[key] for key in keys], color="tab:blue", label="ours")
    marked = [(i, published[variant]) for i, (variant, _) in enumerate(keys) if variant in published]
    if marked:
      ax.scatter([p for _, p in marked], [i for i, _ in marked], color="black", marker="|", s=200, zorder=3,
                 label="published")
    for i, (name, accuracy) in enumerate(reference_rows.items()):
      ax.axvline(accuracy, color=_style(plt, i + 1)["color"], linestyle="--", label=name)
    ax.set_xlabel("test accuracy (%)")
  if numeric_sweep or eval_lengths:
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 101)
    # Outside the axes: eleven lines leave no empty corner inside.
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  else:
    ax.legend(fontsize=8, loc="lower right")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
