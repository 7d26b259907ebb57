"""Per-shape execution plans of the factored kernel, measured once and shared.

A ``KernelPlan`` holds the choices that depend on the token count at call time: up to which count the
folded dense weight serves instead of the sparse path (decode sizes, where 2:4 tends to lose), and
which wrapper implementation serves each range of counts. They only choose between equivalent
computations: a plan costs speed, never correctness, and every plan is checked against the reference
maths before a layer serves with it (``FactoredKernel``).

Measurements are keyed by what decides the timing (device, dtype, block size, output sizes, input
size, which wrappers exist, candidate backends): a model with 30 identical decoder layers measures
each distinct linear shape once, in the first layer, and every other layer reuses the result
(``PLAN_CACHE``, process-wide). Under tensor parallelism each rank measures in its own process; an
``agree`` hook (the vLLM plugin passes a broadcast from rank 0 of the tensor-parallel group) makes
every rank use rank 0's plan, so ranks never disagree on what they compute. Every rank builds its
plans for the same layers in the same order, so the collective calls line up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

# Token counts at which ``auto`` measures (decode to prefill); a decision holds up to its point.
LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
UNBOUNDED = 1 << 62


@dataclass(frozen=True)
class KernelPlan:
    """Choices of one layer shape. ``backend``: the core backend, or ``"folded"`` for a layer that is
    served by its folded dense weight at every size."""

    backend: str
    dense_below: int = 0  # token counts <= this use the folded dense weight (when it is kept)
    wrappers: tuple[tuple[int, str], ...] = ((UNBOUNDED, "bmm"),)  # (max tokens, impl), ascending

    def wrapper_for(self, n_tokens: int) -> str:
        for upper, impl in self.wrappers:
            if n_tokens <= upper:
                return impl
        return self.wrappers[-1][1]

    def uses(self, impl: str) -> bool:
        return any(i == impl for _, i in self.wrappers)

    def without(self, impl: str, fallback: str = "bmm") -> "KernelPlan":
        return replace(self, wrappers=tuple((u, fallback if i == impl else i) for u, i in self.wrappers))

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "dense_below": self.dense_below,
            "wrappers": [[min(u, UNBOUNDED), i] for u, i in self.wrappers],
        }

    @classmethod
    def from_json(cls, data: dict) -> "KernelPlan":
        return cls(
            backend=str(data["backend"]),
            dense_below=int(data["dense_below"]),
            wrappers=tuple((int(u), str(i)) for u, i in data["wrappers"]),
        )


def wrapper_ranges(picks: list[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    """``[(tokens, impl), ...]`` measured at ascending counts -> ranges, merging equal neighbours and
    letting the last choice hold for every larger count."""
    merged: list[tuple[int, str]] = []
    for tokens, impl in picks:
        if merged and merged[-1][1] == impl:
            merged[-1] = (tokens, impl)
        else:
            merged.append((tokens, impl))
    merged[-1] = (UNBOUNDED, merged[-1][1])
    return tuple(merged)


def dense_threshold(dense_ms: list[float], sparse_ms: list[float], ladder=LADDER) -> int:
    """The largest count up to which dense wins at every measured point (0: sparse wins at 1)."""
    below = 0
    for tokens, d, s in zip(ladder, dense_ms, sparse_ms):
        if d < s:
            below = tokens
        else:
            break
    return below


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn``: CUDA events on a CUDA device, ``perf_counter`` elsewhere."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# the shared cache


PLAN_CACHE: dict[tuple, KernelPlan] = {}


def cached_plan(
    key: tuple, measure: Callable[[], KernelPlan], agree: Callable[[KernelPlan], KernelPlan] | None = None
) -> KernelPlan:
    """The plan of ``key``: measured once per process (then agreed across ranks), reused after."""
    plan = PLAN_CACHE.get(key)
    if plan is None:
        plan = measure()
        if agree is not None:
            plan = agree(plan)
        PLAN_CACHE[key] = plan
    return plan


__all__ = [
    "LADDER",
    "PLAN_CACHE",
    "KernelPlan",
    "UNBOUNDED",
    "cached_plan",
    "dense_threshold",
    "time_ms",
    "wrapper_ranges",
]
