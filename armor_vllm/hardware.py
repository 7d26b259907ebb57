"""What this machine's CPU can do, read at run time: some of our machines have AVX-512 with bf16 and
AMX, others only AVX2, and the fast path differs (vLLM's bf16 matmul, bf16 training steps)."""

from __future__ import annotations

from pathlib import Path

# oneDNN builds vLLM's bf16 CPU matmul only with AVX-512 (its "avx512_core" level)
AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# a CPU that multiplies bfloat16 natively (else torch emulates it, slower than float32)
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16)
