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
every rank use rank 0's plan, so ranks never disagree on what they compute. ``agree`` is called
ONCE FOR EVERY LAYER, cache hit or not: the cache key holds per-rank facts (whether this rank's
slice of ``A``/``B`` is the identity), so one rank can hit its cache where another measures, and a
broadcast entered by only one of them would hang. Every rank prepares the same layers in the same
order, so the collective calls line up.
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
    # Per token range, the core backend's options for each core matmul of the layer (cuSPARSELt:
    # ``(alg_id, split_k)`` found by the search at load); empty: the library's defaults.
    cores: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()

    def wrapper_for(self, n_tokens: int) -> str:
        for upper, impl in self.wrappers:
            if n_tokens <= upper:
                return impl
        return self.wrappers[-1][1]

    def core_opts_for(self, n_tokens: int) -> tuple[tuple[int, int], ...]:
        for upper, opts in self.cores:
            if n_tokens <= upper:
                return opts
        return self.cores[-1][1] if self.cores else ()

    def uses(self, impl: str) -> bool:
        return any(i == impl for _, i in self.wrappers)

    def without(self, impl: str, fallback: str = "bmm") -> "KernelPlan":
        return replace(self, wrappers=tuple((u, fallback if i == impl else i) for u, i in self.wrappers))

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "dense_below": self.dense_below,
            "wrappers": [[min(u, UNBOUNDED), i] for u, i in self.wrappers],
            "cores": [[min(u, UNBOUNDED), [list(o) for o in opts]] for u, opts in self.cores],
        }

    @classmethod
    def from_json(cls, data: dict) -> "KernelPlan":
        return cls(
            backend=str(data["backend"]),
            dense_below=int(data["dense_below"]),
            wrappers=tuple((int(u), str(i)) for u, i in data["wrappers"]),
            cores=tuple((int(u), tuple((int(a), int(k)) for a, k in opts)) for u, opts in data.get("cores", ())),
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
    """The token count ``N`` (0 or a ladder point) up to which a kept dense copy should serve,
    looking at EVERY crossover, not only the first: the ``N`` whose "dense up to ``N``, sparse above"
    costs least over the measured counts, each count weighted by its time relative to the faster
    path there (decode sizes count as much as prefill). Ties go to the smaller ``N``."""
    points = list(zip(ladder, dense_ms, sparse_ms))
    best_n, best_cost = 0, None
    for n in [0, *ladder]:
        cost = sum((d if t <= n else s) / max(min(d, s), 1e-12) for t, d, s in points)
        if best_cost is None or cost < best_cost - 1e-9:
            best_n, best_cost = n, cost
    return best_n


# ---------------------------------------------------------------------------------------------
# timing

GRAPH_MAX = 512  # vLLM captures CUDA graphs for batches up to this many tokens (its default)


def time_ms(
    fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10, graph: bool = False, inner: int = 5
) -> float:
    """Median milliseconds of ``fn``: CUDA events on a CUDA device, ``perf_counter`` elsewhere. With
    ``graph`` (on CUDA) ``fn`` is captured ``inner`` times in a CUDA graph and the replays are timed,
    as vLLM replays decode batches (``benchmarks/cuda_linear.py`` times the same way): launch
    overhead, which dominates eager timings of small token counts, is then what it is in serving. A
    function that cannot be captured is timed eagerly."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        run, per = fn, 1
        if graph:
            try:
                torch.cuda.synchronize(device)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    for _ in range(inner):
                        fn()
                run, per = cuda_graph.replay, inner
            except Exception:  # noqa: BLE001 - not capturable: eager timing
                run, per = fn, 1
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / per)
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
    """The plan of ``key``: measured once per process and reused after; then agreed across ranks on
    EVERY call (one collective per layer on every rank, whatever each rank's cache holds)."""
    plan = PLAN_CACHE.get(key)
    if plan is None:
        plan = measure()
        PLAN_CACHE[key] = plan
    if agree is not None:
        plan = agree(plan)
    return plan


__all__ = [
    "GRAPH_MAX",
    "LADDER",
    "PLAN_CACHE",
    "KernelPlan",
    "UNBOUNDED",
    "cached_plan",
    "dense_threshold",
    "time_ms",
    "wrapper_ranges",
]
