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


def release() -> float | None:
    """Hand memory the process no longer uses back to the system; returns resident MB after.

    Freed Python objects and PyTorch tensors go back to glibc's heap, which keeps them: after tap
    extraction (a backbone's activations, at every batch) an AV-Digits learner held about 300 MB
    it no longer used, into the next task. ``gc.collect`` frees cycles, ``malloc_trim(0)`` returns
    free heap pages (glibc only; elsewhere a no-op)."""
    import gc

    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
    return rss_mb()


# glibc serves allocations above its mmap threshold with their own mapping, returned to the system
# when freed; but it raises that threshold to the size of each such block freed (up to 32 MB), and
# from then on serves a learner's per-batch activations from its heap, which grows with each new
# batch shape and is not given back: clothing-cil's text encoder, six tasks in one process, peaks
# 834 -> 1,492 MB a task. A fixed 1 MB threshold: 691-762 MB, its tap extraction ~25% slower; set
# when a text encoder extracts taps (AV-Digits' images, already within budget, would extract 70%
# slower; 8 MB was not enough for text: 822-968 MB).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (see above); True when
    set, False off glibc or where ``MALLOC_MMAP_THRESHOLD_`` was set by the user (theirs wins)."""
    import os

    mallopt = _libc_function("mallopt")
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_LIBC_FUNCTIONS: dict = {}


def _libc_function(name: str):
    """glibc's ``malloc_trim(size_t)`` or ``mallopt(int, int)``, loaded once; None elsewhere (musl
    and macOS have neither)."""
    if name not in _LIBC_FUNCTIONS:
        fn = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = getattr(libc, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_size_t] if name == "malloc_trim" else [ctypes.c_int, ctypes.c_int]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _LIBC_FUNCTIONS[name] = fn
    return _LIBC_FUNCTIONS[name]
