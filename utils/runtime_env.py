"""Import this module before torch: process settings that make CPU steps fast.

1. OpenMP threads wait passively. With the default (active) wait policy torch's CPU threads spin
   while they wait for each other; on cores shared with other processes a descheduled sibling
   makes every parallel region wait a whole time slice: measured on this project's 2-core machine
   with one other busy process, a CPU training step took 8.2 s with the default policy, 1.4 s with
   PASSIVE and 1.3 s with one thread.
2. glibc keeps freed memory in the process (``keep_freed_memory``). By default it gives large
   freed blocks back to the system (mmap'ed blocks above a dynamic threshold; the top of the heap
   above 128 KiB), and the next step faults every page in again: a training step allocates and
   frees the same activation buffers every time, and a distillation step, which holds the
   student's graph while the teacher and DFD allocate theirs, paid about half of its overhead
   beyond the two forwards in this system time (measured: ResNet-18 x0.5 DDPS step +9.4% over
   student step + teacher forward, +3% with the equivalent MALLOC_* environment variables). This
   is what PyTorch's caching allocator does for GPU memory; the price is that the process's
   resident memory stays at its peak.

What the user set in the environment wins: OMP_WAIT_POLICY, and any MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ (then glibc already applied them and nothing is changed);
DDPS_KEEP_FREED_MEMORY=0 turns step 2 off.
"""
import ctypes
import os
import sys
from typing import Dict, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap; the heap's
# top is trimmed only beyond 2 GiB free (mallopt takes an int) and grows 1 GiB at a time.
KEEP_FREED_MEMORY = {M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}
USER_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> Optional[Dict[int, int]]:
    """Apply KEEP_FREED_MEMORY with glibc's mallopt; returns what was set, or None when skipped
    (not Linux/glibc, switched off, or the user's MALLOC_* variables are in charge)."""
    if not sys.platform.startswith("linux") or os.environ.get("DDPS_KEEP_FREED_MEMORY", "1") == "0":
        return None
    if any(v in os.environ for v in USER_MALLOC_VARS):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = {}
    for param, value in KEEP_FREED_MEMORY.items():
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            applied[param] = value
    return applied


KEPT_FREED_MEMORY = keep_freed_memory()
