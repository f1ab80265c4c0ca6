"""Keep freed memory in the process heap during training (glibc only), without environment variables.

A GEARS training step allocates and frees the same large activations (``genes x sets x hidden``
values, tens of MiB each) every step. glibc's ``malloc`` returns such blocks to the system when they
are freed (``munmap``, or trimming the top of the heap), and the next step faults every page back in:
at 5,000 genes about 45,000 minor page faults a step (``benchmarks/train_step_alloc.py``; issue 13
estimated a fifth of a step's CPU time). During training, :func:`keep_freed_memory` raises glibc's
thresholds with ``mallopt`` so that blocks up to 32 MiB (glibc's largest ``M_MMAP_THRESHOLD`` on
64-bit systems) come from the heap and freed memory stays there for the next step; afterwards it
sets moderate thresholds and hands the free memory back (``malloc_trim``).

Elsewhere (macOS, Windows, musl) it does nothing. ``mallopt`` settings are process-wide; glibc has
no call that reads them back, so the ones set on exit are those glibc's own dynamic threshold reaches
after large blocks have been freed (``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 64 MiB).
"""

from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager

from ._utils import logger

#: ``mallopt`` parameters of glibc's ``malloc.h``
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's upper bound of ``M_MMAP_THRESHOLD`` on 64-bit systems (``4 * 1024 * 1024 * sizeof(long)``)
MMAP_THRESHOLD_MAX = 32 * 2**20
#: during training: free memory at the top of the heap is kept up to this size
TRAINING_TRIM_THRESHOLD = 2**30
#: after training: what glibc's dynamic thresholds reach once a 32 MiB block has been freed
AFTER_MMAP_THRESHOLD = MMAP_THRESHOLD_MAX
AFTER_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD_MAX

_depth = 0


def _glibc():
    """The C library if it is glibc with ``mallopt`` and ``malloc_trim``, else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


@contextmanager
def keep_freed_memory(enabled: bool = True):
    """Within the block, freed blocks up to 32 MiB stay in the heap for reuse (glibc; elsewhere a no-op).

    On entry, free memory left by earlier work is handed back first (``malloc_trim(0)``), so that
    the heap then grows to the training working set only. Nested uses keep the outermost settings.
    Yields whether the thresholds were set.
    """
    global _depth
    libc = _glibc() if enabled and _depth == 0 else None
    if libc is None:
        yield False
        return
    _depth += 1
    try:
        libc.malloc_trim(0)
        ok = bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            and libc.mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
        )
        if not ok:
            logger.debug("mallopt refused the training thresholds; the allocator keeps its own.")
        yield ok
    finally:
        _depth -= 1
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
        libc.malloc_trim(0)
