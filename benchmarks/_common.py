"""Helpers shared by the benchmark scripts: CPU time, peak memory, the machine, the JSON record.

The scripts run as ``python benchmarks/<name>.py`` from the repository root, so ``benchmarks/`` is on
``sys.path`` and ``from _common import ...`` works; ``reference_gears/run_reference.py`` puts
``benchmarks/`` there itself. Standard library only at import time: ``compare_accuracy.py`` (as the
reference worker) and ``run_reference.py`` also run in the reference GEARS's venv, without pertpy_gnn.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (wall time inflates when cores are shared)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB: ``VmHWM`` (peak since :func:`reset_peak`), ``VmRSS``."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each package's (``"source tree"`` for one not installed, e.g. on PYTHONPATH)."""
    out = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "source tree"
    return out


def machine(load_start: tuple[float, ...] | None = None, **extra) -> dict:
    """Cores and memory of this machine, then (given ``load_start = os.getloadavg()`` at the start) the
    load averages at the start and now, the platform and processor, then ``extra``."""
    import psutil

    out = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if load_start is not None:
        out |= {
            "load_average_at_start": [round(v, 2) for v in load_start],
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        }
    return out | extra


def torch_machine(device: str, **extra) -> dict:
    """:func:`machine` with torch's version, its thread count and ``device``, then ``extra``."""
    import torch

    return machine(torch=torch.__version__, torch_threads=torch.get_num_threads(), device=device, **extra)


def write_record(record: dict, out: Path) -> None:
    """Write ``record`` as indented JSON to ``out`` (making its folder) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
