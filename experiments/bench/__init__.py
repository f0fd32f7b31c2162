"""GPU benchmarks, one script per op; peers are measured in the same process."""
