"""Give freed host memory back to the operating system after the weights are prepared.

Why: while a layer is loaded the plugin holds the checkpoint's tensors and makes temporaries (the
decoded shards, a layout for the CPU kernel); once prepared they are freed, but glibc's allocator
keeps freed blocks below its (self-raising) mmap threshold inside the process heap. A served 2:4
model then holds its compressed weights AND the heap the load left behind: measured with
``benchmarks/cpu_serving.py`` the cpu24 server's resident memory was within 1% of the dense one's
although its linear weights are 215 MiB against 405 MiB. ``malloc_trim(0)`` returns the free heap
pages; it is what a user expects a 2:4 model to cost in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return libc


def trim_host_heap() -> bool:
    """Return the freed pages of the C heap to the OS (glibc's ``malloc_trim(0)``). True when the
    call exists here (it may have found nothing to release), False on other C libraries."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
