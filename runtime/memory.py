"""Resident memory of this process, as an edge user budgets it (torch-free; Linux /proc, else getrusage)."""
from __future__ import annotations


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float | None:
    """Resident memory now (VmRSS), MB; None where there is no /proc."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """The most this process has ever held resident (VmHWM, else ``ru_maxrss``), MB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        try:
            import resource
            import sys

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = kb / 1024 if sys.platform == "darwin" else kb  # bytes on macOS, KiB on Linux
        except (ImportError, OSError):
            return None
    return kb / 1024


def reset_peak() -> bool:
    """Start a new peak (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so the next
    ``peak_rss_mb`` is the peak of what follows. False where that is impossible: then the peak
    stays the process's all-time one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
