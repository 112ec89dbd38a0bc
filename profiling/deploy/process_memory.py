"""This process's resident memory, measured (Linux ``/proc/self/status``; psutil / getrusage elsewhere).

Kept apart from :mod:`.measure` so a measuring child that must not import torch (the GGUF one) can
use it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    rss = _proc_status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of the process's own address space. Not ``ru_maxrss``: Linux keeps that across
    ``execve``, so a child started from a big parent would report the parent's peak.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
