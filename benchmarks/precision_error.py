"""Each optimizer's W-step error on GPUs and TPUs, emulated on this CPU::

  python -m benchmarks.precision_error --out benchmarks/results/precision_error.json

The emulator and the cases are the library test's (``tests/test_precision.py``:
each float32 dot's operands rounded as TF32 or bfloat16 passes would round
them for the precision it carries); this entry runs them for the table in
``benchmarks/RESULTS.md``, also with the products over ``m`` or ``n`` kept at
the hardware's default, which the library does not do.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import test_precision  # noqa: E402  (from tests/, put on the path above)

if __name__ == "__main__":
  test_precision.main()
