"""Process memory settings that keep a loaded pipeline's resident set near what it holds.

glibc's malloc serves a large block from the OS (mmap) and returns it on free, but only above a
threshold that it raises, after each such free, up to the block's size (at most 32 MiB). A
process that frees big buffers over and over (model loading, numpy temporaries, onnxruntime
activations without its arena) thus ends up serving them from its heaps, whose freed space stays
resident: measured on the LLaMA-Omni2 0.5B real-shape `small` bundle, ~200 MiB of free heap after
loading and more after every turn. A fixed threshold keeps large blocks on mmap, so a freed block
leaves the resident set at once. Values and results are the same; only where the bytes live moves.
Set OMNILITE_MALLOC_TUNING=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed instead of raised

_done: bool | None = None


def keep_large_blocks_off_heap() -> bool:
    """Fix glibc's mmap threshold (once per process; Linux/glibc only). True when it was set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("OMNILITE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: no mallopt; nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not _done:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; malloc keeps its dynamic threshold")
    return _done
