"""The pieces of ``benchmarks/bench_engine.py``: workloads, the tools it times, memory
measurement, one measured job in a child process, and the report.

The plain loop shares the tests' reference chain (``tests/reference.py``), so that folder
is put on the import path here.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
