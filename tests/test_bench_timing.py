"""experiments.bench.timing.median_ms: what one sample times, with and without back-to-back calls."""

import pytest

from experiments.bench import timing


class _Clock:
  """Stands in for time.perf_counter; the timed function advances it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.mark.parametrize("back_to_back", [1, 4])
def test_median_ms_divides_each_sample_by_its_calls_and_syncs_once_per_sample(monkeypatch, back_to_back):
  clock = _Clock()
  monkeypatch.setattr(timing.time, "perf_counter", clock)
  seen, synced = [], []

  def fn(value):
    seen.append(value)
    clock.now += 0.002  # 2 ms a call
    return value

  ms = timing.median_ms(fn, [(0,), (1,), (2,)], warmup=2, iters=5, back_to_back=back_to_back, sync=synced.append)
  assert ms == pytest.approx(2.0)
  # Warmup calls, then iters samples of back_to_back calls, rotating over the input sets; one sync per warmup call
  # and per sample, on the sample's last result.
  timed = seen[2:]
  assert len(timed) == 5 * back_to_back
  assert timed == [i % 3 for i in range(5 * back_to_back)]
  assert synced[2:] == [timed[(k + 1) * back_to_back - 1] for k in range(5)]
