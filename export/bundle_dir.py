"""Writing bundle directories: atomic replacement and the parity verdict, shared by every family's
exporter and by the quantizer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omnilite.runtime.bundle import MANIFEST
from omnilite.runtime.errors import OmniliteError

log = logging.getLogger(__name__)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temp dir into place; an existing `dst` is replaced only once `src` is complete."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def record_parity(manifest: dict, bundle_dir: Path, report: dict, strict: bool) -> None:
    """Store the parity report in the manifest; with `strict`, refuse a stage beyond tolerance."""
    manifest["parity"] = report
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    failed = [k for k, v in report.items() if isinstance(v, dict) and not v.get("ok", True)]
    if failed and strict:
        raise OmniliteError(
            f"exported stage(s) {', '.join(failed)} differ from the PyTorch reference beyond tolerance "
            f"({json.dumps({k: report[k] for k in failed})}); no bundle was written (pass --no-strict to keep it)."
        )
    for k in failed:
        log.warning("parity: stage %s misses its threshold: %s", k, report[k])
