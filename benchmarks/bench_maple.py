"""MaPLe evaluation throughput (images/s): official-style vs promptcore vs the bare image encoder.

The MaPLe setting of bench_eval.py (same providers and options; see its docstring). Appends
JSON rows to benchmarks/results/maple.jsonl.

    python benchmarks/bench_maple.py                                   # CPU: batch 4, 50 classes, fp32
    python benchmarks/bench_maple.py --device cuda                     # GPU: fp16, batch 128, 1000 classes
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402


def case(**options) -> list:
    """bench_eval's case with ``method="maple"``."""
    return bench_eval.case(**{"method": "maple", **options})


if __name__ == "__main__":
    bench_eval.main(method_default="maple", results_file="maple.jsonl")
