"""benchmarks/compile_time.py: the update's compile time against the number of layers."""

import pytest

from benchmarks import compile_time


def _compile_cpu_seconds(layers, layout):
  """CPU seconds to compile the step: unlike wall time, not stretched by other processes."""
  return compile_time.compile_seconds("adaprelora", layers, layout)["compile_cpu"]


@pytest.mark.slow  # compiles the update for up to 32 unscanned layers
def test_compile_time_flat_in_stacked_layers_at_most_linear_in_unscanned_layers():
  """Stacked: independent of L. Unscanned: at most linear with 50 % slack.

  Each role's pairs are solved in one vmap, so 224 unscanned pairs compiled in
  5.4 s CPU (79 s before grouping, when XLA's passes grew about as L²).
  ``python -m benchmarks.compile_time`` gives the figures at L = 4…32.
  """
  two, sixteen = _compile_cpu_seconds(2, "stacked"), _compile_cpu_seconds(16, "stacked")
  assert sixteen < 1.5 * two + 0.5, (two, sixteen)
  eight, thirty_two = _compile_cpu_seconds(8, "unscanned"), _compile_cpu_seconds(32, "unscanned")
  assert thirty_two < 1.5 * 4 * eight, (eight, thirty_two)
