"""Peak resident memory of one phase of a benchmark process (omnilite's own, not the baseline's)."""

from __future__ import annotations

import platform
import re
import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: VmHWM), so the next peak is the next phase's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM since the last reset (Linux), else the process's lifetime peak."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(rss if platform.system() == "Darwin" else rss * 1024)
