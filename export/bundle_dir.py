"""Writing bundle directories: one writer per target (a lock), atomic replacement and the parity
verdict, shared by every family's exporter and by the quantizer."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omnilite.runtime.bundle import MANIFEST
from omnilite.runtime.errors import OmniliteError

log = logging.getLogger(__name__)


_held: set[Path] = set()  # targets this process has locked (export --preset locks OUT around a quantization that locks it too)


@contextmanager
def target_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` (next to OUT) while writing OUT, so a second writer of the same target gets one
    sentence instead of deleting the first one's temp dir. The lock is an flock, which the kernel
    drops when its holder dies, so a killed export never blocks the next; the file records the pid.
    A `.OUT.partial` found while holding the lock was left by a killed writer: it is removed, and
    the warning names it."""
    out = Path(out).absolute()
    if out in _held:
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OmniliteError(f"another export is writing {out}{f' (pid {holder})' if holder else ''}; "
                                "wait for it or choose another directory.") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file between our open and flock: take the new one
    try:
        previous = os.read(fd, 32).decode(errors="replace").strip()  # a writer that died holding it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = out.with_name(f".{out.name}.partial")
        if stale.exists():
            log.warning("removing %s, left by an interrupted export%s", stale, f" (pid {previous})" if previous else "")
            shutil.rmtree(stale, ignore_errors=True)
        _held.add(out)
        try:
            yield
        finally:
            _held.discard(out)
    finally:
        lock.unlink(missing_ok=True)  # before closing, so nobody can lock the old file after we release it
        os.close(fd)


@contextmanager
def building_dir(out: Path) -> Iterator[Path]:
    """Lock OUT and yield a fresh temp dir next to it, moved into place as OUT when the block
    completes and removed when it raises: a failed or interrupted build leaves nothing behind."""
    out = Path(out)
    with target_lock(out):
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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
