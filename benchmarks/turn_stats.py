"""Small measurements the per-family latency benchmarks share: percentiles, machine load, free
memory, per-stage busy time and first/last spans before a cut-off (the waterfall), and a bundle's
stage sizes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "n": len(values)}


def load_avg() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"time": time.strftime("%H:%M:%S"), "load1": one, "load5": five, "load15": fifteen}


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def busy_before(spans, until: float) -> dict[str, float]:
    """Busy seconds per stage of (name, start, end) spans, clipped at `until` (a turn's first audio)."""
    out: dict[str, float] = {}
    for name, a, b in spans:
        if a < until:
            out[name] = out.get(name, 0.0) + min(b, until) - a
    return out


def first_last(spans, until: float) -> dict[str, list[float]]:
    """Per stage, [first start, last end] of its spans before `until` (the waterfall)."""
    out: dict[str, list[float]] = {}
    for name, a, b in spans:
        if a < until:
            lo, hi = out.get(name, [a, min(b, until)])
            out[name] = [min(lo, a), max(hi, min(b, until))]
    return out


def bundle_sizes(path: Path) -> dict:
    """Each stage's precision and size (GB), the preset, and whether its accuracy report passed."""
    from omnilite.runtime.bundle import load_bundle

    b = load_bundle(path, verify=False)
    stages = {s.name: {"precision": s.precision,
                       "gb": sum((b.path / f).stat().st_size for f in [s.file, *s.extra_files]) / 2**30}
              for s in b.stages.values()}
    return {"path": str(path), "preset": (b.manifest.get("quantization") or {}).get("preset"), "stages": stages,
            "gb": sum(v["gb"] for v in stages.values()),
            "accuracy_ok": ((b.manifest.get("quantization") or {}).get("accuracy") or {}).get("ok")}
