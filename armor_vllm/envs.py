"""Every environment variable armor-vllm reads, in one place (as vLLM's ``vllm/envs.py``).

All names share the prefix ``ARMOR_VLLM_``. The older names ``ARMOR_WRAPPER`` and
``ARMOR_DENSE_BELOW`` are still read, with a deprecation warning. Imports nothing heavy: the
kernels and the vLLM plugin (in every vLLM process) read these.

================================  ============================================================
name                              meaning
================================  ============================================================
``ARMOR_VLLM_KERNEL``             execution kernel of the vLLM plugin (``auto``, ``folded``, ...)
``ARMOR_VLLM_KERNEL_REPORT``      file every vLLM worker appends one JSON line per layer to
``ARMOR_VLLM_WRAPPER``            wrapper implementation of the factored kernel (``bmm``, ``triton``, ``auto``)
``ARMOR_VLLM_DENSE_BELOW``        keep a folded dense copy beside the 2:4 core and serve up to this many
                                  tokens with it (costs the dense weight's memory again); unset or 0:
                                  never (the default); ``auto``: where measured faster
``ARMOR_VLLM_CPU_ISA``            force a lower path of the CPU 2:4 kernel (``avx512bf16``, ``avx512``,
                                  ``avx2``, ``scalar``; read by ``kernels/csrc/sparse24_cpu.cpp``)
``ARMOR_VLLM_CPU_SPARSE_MAX_TOKENS``  above this many tokens the CPU 2:4 kernel decompresses a tile
                                  into a dense GEMM (default 128)
================================  ============================================================
"""

from __future__ import annotations

import os
import warnings

KERNEL = "ARMOR_VLLM_KERNEL"
KERNEL_REPORT = "ARMOR_VLLM_KERNEL_REPORT"
WRAPPER = "ARMOR_VLLM_WRAPPER"
DENSE_BELOW = "ARMOR_VLLM_DENSE_BELOW"
DEPRECATED = {WRAPPER: "ARMOR_WRAPPER", DENSE_BELOW: "ARMOR_DENSE_BELOW"}  # new name -> old name


def get(name: str) -> str | None:
    """The value of ``name``, or of its deprecated older name (with a warning); None when unset or empty."""
    value = os.environ.get(name)
    if value in (None, "") and name in DEPRECATED:
        old = DEPRECATED[name]
        value = os.environ.get(old)
        if value not in (None, ""):
            warnings.warn(f"${old} is deprecated; use ${name}", DeprecationWarning, stacklevel=2)
    return None if value in (None, "") else value


def get_int(name: str) -> int | None:
    value = get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer") from None
