"""trim_host_heap gives the heap that freed load temporaries leave behind back to the OS."""

import ctypes.util
import os
import resource

import pytest
import torch

from armor_vllm.serving.host_memory import trim_host_heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or ctypes.util.find_library("c") is None, reason="Linux")
def test_trim_returns_freed_heap_pages():
    if not trim_host_heap():
        pytest.skip("not glibc: no malloc_trim")
    # Freeing a large mmapped block raises glibc's mmap threshold; blocks below it then come from the
    # heap and stay resident after they are freed, as a layer's load temporaries do.
    big = torch.ones(24 << 20, dtype=torch.uint8)
    del big
    # allocated in order, freed in order except the last (which pins the heap's top)
    parts = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(40)]
    keep = parts.pop()
    del parts
    before = _rss_bytes()
    assert trim_host_heap()
    after = _rss_bytes()
    del keep
    assert before - after > 100 << 20, (before, after)  # most of the 312 MiB freed in the heap's middle
