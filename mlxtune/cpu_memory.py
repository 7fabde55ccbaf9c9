"""Keep freed memory in the process while MLX computes on the CPU under glibc (Linux).

MLX's CPU allocator is plain `malloc`/`free`, with no buffer cache of its own. glibc gives freed memory back
to the kernel: buffers above its mmap threshold are unmapped at once, and the free top of the heap of every
thread's arena is trimmed past 128 KiB or so. The next step asks for the same buffers again, and every page
of them is faulted in and zeroed by the kernel. A SmolLM2-135M LoRA step on this 2-core machine faulted ~30k
pages (~120 MB) a step on MLX's one compute thread, ~4% of the step (docs/benchmarks.md, "Freed memory").

`keep_freed_memory` raises glibc's trim threshold and fixes its mmap threshold at the largest value glibc
takes (32 MiB on 64-bit), so a step's buffers come back from the arenas the next step. The process keeps
the memory of its peak until it exits, which it reached anyway; buffers over 32 MiB are still mapped and
unmapped each time. MLXTUNE_KEEP_FREED_MEMORY=0 turns this off. Nothing happens on macOS (Metal has its own
cache) or without glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more than half its 64 MiB arena heap
TOP_PAD = 64 << 20  # grow an arena by this much at a time: fewer, larger extensions

_kept = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; True when it is (or already was) set."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MLXTUNE_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 when it took the value
    _kept = (mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
             and mallopt(M_TOP_PAD, TOP_PAD) == 1)
    return _kept
