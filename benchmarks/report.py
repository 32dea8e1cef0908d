"""Benchmark results as the project keeps them: JSON plus a short markdown table, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from omnilite.runtime.audio import atomic_write_bytes


def write_report(stem: str | Path, report: dict, markdown: str) -> None:
    """`stem`.json and `stem`.md; the markdown is also printed for the person who ran the benchmark."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stem.with_name(stem.name + ".json"), (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(stem.with_name(stem.name + ".md"), markdown.encode())
    print(markdown)
