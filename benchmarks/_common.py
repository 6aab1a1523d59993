"""Helpers the benchmark scripts share: machine description, percentile summaries, JSON out.

Each ``benchmarks/bench_*.py`` runs standalone (``python benchmarks/bench_ring.py``): Python
puts the script's folder first on ``sys.path``, so ``import _common`` finds this file; the
scripts also add that folder themselves, for when they are imported from elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np


def cpu_model(fallback: str = "") -> str:
    """The CPU's model name from /proc/cpuinfo; else ``platform.processor()``, else
    ``fallback``, else ``platform.machine()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
    """The full machine description (CPU, logical CPUs, platform, Python, NumPy) + ``extra``."""
    return {
        "cpu": cpu_model("unknown"),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "numpy": np.__version__,
        **extra,
    }


def command_line() -> str:
    """How this run was started: the interpreter's name and the script's arguments."""
    return " ".join([os.path.basename(sys.executable), *sys.argv])


def median_p99(values: Iterable[float] | np.ndarray) -> dict[str, float]:
    """``{"median": ..., "p99": ...}`` of ``values``, in their own unit."""
    a = np.asarray(values)
    return {"median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def stats_us(samples_ns: list[int] | np.ndarray, median_key: str = "median_us") -> dict[str, Any]:
    """Median, p99 and mean in µs (one decimal) and the count, of times in ns."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {median_key: round(float(np.median(a)), 1),
            "p99_us": round(float(np.percentile(a, 99)), 1),
            "mean_us": round(float(a.mean()), 1), "n": int(a.size)}


def dumps(result: dict[str, Any]) -> str:
    """The JSON text a benchmark prints (indented by 2)."""
    return json.dumps(result, indent=2)


def print_json(result: dict[str, Any]) -> str:
    """Print ``result`` as JSON on stdout; returns the text."""
    text = dumps(result)
    print(text)
    return text
