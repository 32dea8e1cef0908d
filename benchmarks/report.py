"""Benchmark results as the project keeps them: JSON plus a short markdown table, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from omnilite.runtime.audio import atomic_write_bytes

NOTES_MARK = "<!-- notes -->"  # what follows it in a result's markdown is a hand-written reading of that run


def write_markdown_keeping_notes(path: Path, text: str) -> None:
    """Write a result's markdown `text`, keeping the notes after NOTES_MARK of the file it replaces
    (re-rendering a finished run with --from-json must not lose its reading)."""
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARK, 1)[1].strip() if NOTES_MARK in old else ""
    if notes:
        text = text.rstrip() + "\n\n" + NOTES_MARK + "\n" + notes + "\n"
    atomic_write_bytes(path, text.encode())


def write_report(stem: str | Path, report: dict, markdown: str) -> None:
    """`stem`.json and `stem`.md; the markdown is also printed for the person who ran the benchmark."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stem.with_name(stem.name + ".json"), (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(stem.with_name(stem.name + ".md"), markdown.encode())
    print(markdown)
