"""The ``factored`` kernel: ``B``, the 2:4 core ``S`` and ``A`` kept apart, run through the custom op
``armor_vllm::factored_linear`` (``kernels.linear_op``).

The same class serves every device; only the core backend differs (``kernels.backends``):
``dense`` (the CPU ``factored`` kernel, a baseline on CUDA), ``cusparselt`` and ``cutlass`` (2:4
tensor cores, CUDA sm80+, fp16/bf16), or ``auto``, which measures.

``prepare`` (once per layer, at load):

1. folds ``A·S·B`` into a dense float32 weight: the reference every sparse layout is checked
   against, and the fallback;
2. picks the candidate backends that can run this dtype on this device (a named sparse backend that
   cannot falls back to the other 2:4 backend (``cutlass`` on sm90 -> ``cusparselt``), then to
   ``folded``, with a warning, or raises when ``strict``);
3. finds the plan of the layer's shape (``kernels.plan``), cached per distinct shape and agreed
   across tensor-parallel ranks (``agree``, once per layer): for a named backend, that backend; for
   ``auto``, measured (CUDA-graph replays for the counts vLLM captures) — the fastest backend at
   1024 tokens, or ``folded`` when the folded dense
   weight wins at every measured token count (then the layer costs exactly the dense weight's
   memory). Where dense wins only at small counts the layer still serves the 2:4 form: by default
   a layer NEVER keeps a folded dense copy beside its core (that copy would cost about 1.56x the
   dense weight's bytes: a 2:4 model bigger than the dense one, with less room for the KV cache).
   ``ARMOR_VLLM_DENSE_BELOW=N`` (N > 0) asks for the copy, served up to N tokens; ``=auto`` keeps it
   where measurements say dense wins; the cost is logged. With cuSPARSELt the plan also holds, per
   token range and core, the algorithm (``_cslt_sparse_mm_search``) and split-k (timed) to call with;
4. builds this layer's tensors for the plan's backend and runs the whole plan at several token
   counts (with a bias, and at the largest count the layer will see: ``max_tokens``) against the
   folded weight; a Triton part that fails or disagrees is replaced by the batched-matmul wrappers,
   a backend that fails or disagrees falls back (or raises when ``strict``);
5. registers the layer under its key for the op (``kernels.linear_op``): the factored tensors with
   layout and plan, or the folded weight.

Options: ``backend`` (``dense``, ``cusparselt``, ``cutlass``, ``auto``), ``wrapper`` (``bmm``,
``triton``, ``auto`` = measured on CUDA, else bmm; env ``ARMOR_VLLM_WRAPPER``), ``dense_below`` (env
``ARMOR_VLLM_DENSE_BELOW``: unset or 0 never keeps the dense copy; N > 0 keeps it for up to N tokens;
``"auto"`` keeps it where measured faster), ``key`` (the op's layer name; the vLLM plugin passes the
layer prefix), ``agree``, ``strict``, ``max_tokens``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from armor_vllm import envs
from armor_vllm.core.factorization import is_identity_blocks as is_identity
from armor_vllm.kernels.backends import CSLT_OPS, SPARSE_BACKENDS, get_backend, usable_sparse_backends
from armor_vllm.kernels.base import ArmorKernel, ArmorShards
from armor_vllm.kernels.blockdiag import IMPLS, blockdiag, stack_wrappers, triton_supported
from armor_vllm.kernels.folded import fold_shards
from armor_vllm.kernels.linear_op import LinearLayout, dense_entry, factored_entry, register_layer, run_factored
from armor_vllm.kernels.plan import (
    GRAPH_MAX,
    LADDER,
    UNBOUNDED,
    KernelPlan,
    cached_plan,
    dense_threshold,
    time_ms,
    wrapper_ranges,
)

MODES = ("auto", *SPARSE_BACKENDS, "cpu24", "dense")
WRAPPERS = (*IMPLS, "auto")
CHECK_TOKENS = (1, 5, 37)  # always verified; plus the edges of the plan's ranges and ``max_tokens``
MEASURE_AT = 1024  # tokens at which sparse backends are compared with each other
# cuSPARSELt search: token counts searched, each serving the range up to it (the last: every larger count)
SEARCH_AT = (8, 64, 512, 2048)
SPLIT_K = (1, 2, 4)  # split-k values timed per searched count (skinny decode products gain most)
_keys = itertools.count()


def dense_below_setting(value=None) -> int | str | None:
    """``dense_below`` as given, else from ``$ARMOR_VLLM_DENSE_BELOW``: None when unset (the default:
    no dense copy; ``auto`` may still serve a layer folded where dense wins at every measured count),
    0 (no dense copy, and ``auto`` serves the 2:4 form everywhere), N > 0 (keep a copy, serve up to N
    tokens with it) or ``"auto"`` (keep one where measured faster)."""
    if value is None:
        raw = envs.get(envs.DENSE_BELOW)
        if raw is None:
            return None
        if raw.strip().lower() == "auto":
            return "auto"
        value = envs.get_int(envs.DENSE_BELOW)
    if value == "auto":
        return value
    value = int(value)
    if value < 0:
        raise ValueError(f"ARMOR dense_below must be >= 0 or 'auto', got {value}")
    return value


class FactoredKernel(ArmorKernel):
    name = "factored"

    def __init__(
        self,
        backend: str = "dense",
        wrapper: str | None = None,
        dense_below: int | str | None = None,  # None: from the environment (see dense_below_setting)
        device: torch.device | str | None = None,
        strict: bool = False,
        key: str | None = None,
        agree: Callable[[KernelPlan], KernelPlan] | None = None,
        max_tokens: int | None = None,
        max_wrapper_share: float | None = None,
    ):
        """``max_wrapper_share``: serve a layer folded (silently) when its wrappers hold more than
        this share of the dense weight's numbers, or when the backend cannot take its dtype: what
        ``auto`` asks of ``cpu24``, where small layers with large wrappers lose to dense."""
        if backend not in MODES:
            raise ValueError(f"unknown ARMOR core backend {backend!r}; known: {', '.join(MODES)}")
        wrapper = wrapper or envs.get(envs.WRAPPER) or "auto"
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper implementation {wrapper!r}; known: {', '.join(WRAPPERS)}")
        self.backend = backend
        self.wrapper = wrapper
        self.dense_below = dense_below_setting(dense_below)
        self.device = torch.device(device) if device is not None else None
        self.strict = strict
        self.key = key or f"armor-linear-{next(_keys)}"
        self.agree = agree
        self.max_tokens = max_tokens
        self.max_wrapper_share = max_wrapper_share
        self.folded_why: str | None = None  # why a layer ``max_wrapper_share`` applies to was folded
        self.timer: Callable[[Callable[[], object], torch.device], float] = time_ms
        self.name = f"factored-{backend}"
        self.plan: KernelPlan | None = None
        self.layout: LinearLayout | None = None
        self.dense_would_win_below = 0  # measured (auto): where a dense copy would be faster

    # -- prepare ---------------------------------------------------------------------------

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> list[torch.Tensor]:
        device = self.device or shards.wrapper_out.device
        shards = shards.to(device)
        self.out_features = sum(shards.output_sizes)
        self.input_size = shards.input_size
        self.dense_bytes = self.out_features * shards.input_size * torch.empty((), dtype=dtype).element_size()
        with torch.inference_mode():
            folded = fold_shards(shards).to(dtype).contiguous()
            tensors = self._prepare(shards, dtype, device, folded)
        self.weight_bytes = _nbytes(tensors)
        return tensors

    def _candidates(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        if self.backend == "dense":
            return ["dense"]
        if self.backend == "cpu24":  # our CPU kernel: it runs where it builds, for fp32 and bf16
            backend = get_backend("cpu24")
            if backend.available(device) and backend.supports(dtype):
                return ["cpu24"]
            if self.max_wrapper_share is not None:  # chosen by auto: folded is the plain answer
                self.folded_why = f"cpu24 does not take {dtype}"
                return []
            if self.strict:
                raise RuntimeError(f"ARMOR {self.key}: cpu24 cannot run {dtype} on {device}")
            warnings.warn(f"ARMOR {self.key}: cpu24 cannot run {dtype} on {device}; using the folded dense weight")
            return []
        usable = usable_sparse_backends(device, dtype)
        if self.backend == "auto":
            return usable
        if self.backend in usable:
            return [self.backend]
        why = f"{self.backend} cannot run {dtype} on {device}"
        if self.strict:
            raise RuntimeError(f"ARMOR {self.key}: {why}")
        # the other 2:4 backend first (cutlass on sm90 -> cuSPARSELt), then the folded weight
        others = [b for b in SPARSE_BACKENDS if b != self.backend and b in usable]
        warnings.warn(f"ARMOR {self.key}: {why}; using {others[0] if others else 'the folded dense weight'}")
        return others[:1]

    def _plan_key(self, shards: ArmorShards, dtype, device, candidates) -> tuple:
        # Per-rank facts (identity slices) are part of the key: they decide the timing. Ranks stay
        # in step because ``cached_plan`` agrees once per layer, cache hit or not.
        shared = shards.shared_wrapper_in()
        in_kind = "distinct" if shared is None else ("identity" if is_identity(shared) else "shared")
        return (
            device.type,
            device.index,
            dtype,
            shards.block_size,
            tuple(shards.output_sizes),
            shards.input_size,
            in_kind,
            is_identity(shards.wrapper_out),
            tuple(candidates),
            self.backend,
            self.wrapper,
            self.dense_below,
        )

    def _prepare(self, shards, dtype, device, folded) -> list[torch.Tensor]:
        candidates = self._candidates(device, dtype)
        built: dict[str, tuple[LinearLayout, list[torch.Tensor]]] = {}

        def build(backend: str):
            if backend not in built:
                built[backend] = build_tensors(shards, dtype, backend)
            return built[backend]

        if not candidates:
            return self._serve_folded(folded)
        if self.max_wrapper_share is not None:
            share = wrapper_share(shards)
            if share > self.max_wrapper_share:
                self.folded_why = f"wrappers hold {share:.1%} of the dense numbers (> {self.max_wrapper_share:.0%})"
                return self._serve_folded(folded)
        key = self._plan_key(shards, dtype, device, candidates)
        if self.backend == "auto":
            plan = cached_plan(
                key, lambda: self._measure(candidates, build, folded, shards.block_size, device, dtype), self.agree
            )
        elif candidates[0] == "cusparselt":
            fixed = self._fixed_plan(candidates[0], shards.block_size, device)
            # searched per rank, not agreed: the algorithm only changes speed, and no collective is
            # needed where nothing else is measured
            plan = cached_plan(key, lambda: self._searched(fixed, build, device, dtype))
        else:
            plan = self._fixed_plan(candidates[0], shards.block_size, device)
        if plan.backend == "folded":
            return self._serve_folded(folded)
        try:
            layout, tensors = build(plan.backend)
        except Exception as err:  # noqa: BLE001 - a layout this backend cannot take
            return self._fail(f"{plan.backend} cannot store this layer ({type(err).__name__}: {err})", folded)
        if self.backend == "auto" and plan.dense_below == 0 and _nbytes(tensors) > _nbytes([folded]):
            # wrappers as large as the 2:4 savings (a block size near the layer's width): the folded
            # weight is smaller, and ``auto`` never serves more weight memory than dense unless asked
            return self._serve_folded(folded)
        if plan.dense_below > 0:
            layout = LinearLayout(**{**layout.__dict__, "has_dense": True})
            tensors = [*tensors, folded]
            _note_dense_copy(self.key, plan.dense_below, folded)
        plan = self._verified(layout, tensors, plan, folded, dtype)
        if plan is None:
            return self._fail(f"{layout.backend} disagrees with the folded weight", folded)
        self.layout, self.plan = layout, plan
        register_layer(self.key, factored_entry(tensors, layout, plan))
        return tensors

    def _fixed_plan(self, backend: str, block_size: int, device) -> KernelPlan:
        below = self.dense_below if isinstance(self.dense_below, int) else 0
        wrappers = self._fixed_wrappers(block_size, device)
        if backend == "cpu24" and self.wrapper in ("auto", "cpu"):
            # the extension's wrapper loop up to a few tokens, where a batched matmul costs its
            # dispatch and layout copies (BENCHMARKS.md, CPU kernel); bmm above
            from armor_vllm.kernels.cpu_sparse import CPU_WRAPPER_MAX_TOKENS

            wrappers = ((CPU_WRAPPER_MAX_TOKENS, "cpu"), (UNBOUNDED, "bmm"))
        return KernelPlan(backend=backend, dense_below=below, wrappers=wrappers)

    def _serve_folded(self, folded: torch.Tensor) -> list[torch.Tensor]:
        self.layout, self.plan = None, KernelPlan(backend="folded")
        register_layer(self.key, dense_entry(folded))
        return [folded]

    def _fail(self, message: str, folded: torch.Tensor) -> list[torch.Tensor]:
        if self.strict:
            raise RuntimeError(f"ARMOR {self.key}: {message}")
        warnings.warn(f"ARMOR {self.key}: {message}; serving the folded dense weight")
        return self._serve_folded(folded)

    def _fixed_wrappers(self, block_size: int, device) -> tuple[tuple[int, str], ...]:
        if self.wrapper == "triton":
            if triton_supported(block_size, device):
                return ((UNBOUNDED, "triton"),)
            warnings.warn(
                f"ARMOR {self.key}: the Triton wrapper kernel cannot run block size {block_size} on {device}; using bmm"
            )
        return ((UNBOUNDED, "bmm"),)

    def _time(self, fn, device, n_tokens: int | None = None) -> float:
        """``self.timer``; the default one replays a CUDA graph for counts vLLM captures."""
        if self.timer is time_ms:
            return time_ms(fn, device, graph=n_tokens is not None and n_tokens <= GRAPH_MAX)
        return self.timer(fn, device)

    # -- cuSPARSELt algorithm search ----------------------------------------------------------

    def _searched(self, plan: KernelPlan, build, device, dtype) -> KernelPlan:
        """``plan`` with, for each token range of ``SEARCH_AT`` and each core matmul, the
        cuSPARSELt ``(alg_id, split_k)`` to call with: the library's search for the algorithm, then
        the fastest of ``SPLIT_K`` with it. Without a search (or if it fails) the defaults stay."""
        if plan.backend != "cusparselt" or CSLT_OPS.search is None:
            return plan
        try:
            layout, tensors = build("cusparselt")
        except Exception:  # noqa: BLE001 - the build error is reported where the layer is built
            return plan
        first = 1 if layout.in_shards else 0
        packed = [tensors[first + c * layout.core_tensors] for c in range(layout.n_cores)]
        width = self.input_size
        gen = torch.Generator(device=device).manual_seed(0)
        ranges = []
        try:
            for n_tokens in SEARCH_AT:
                h = torch.randn(n_tokens, width, device=device, dtype=dtype, generator=gen)
                per_core = []
                for p in packed:
                    alg = int(CSLT_OPS.search(p, h.t(), None))
                    times = {
                        k: self._time(
                            lambda p=p, k=k: CSLT_OPS.mm(p, h.t(), None, alg_id=alg, split_k=k), device, n_tokens
                        )
                        for k in SPLIT_K
                    }
                    per_core.append((alg, min(times, key=times.get)))
                ranges.append((n_tokens, tuple(per_core)))
        except Exception as err:  # noqa: BLE001 - a missing or failing search: defaults serve
            warnings.warn(f"ARMOR {self.key}: cuSPARSELt algorithm search failed ({type(err).__name__}: {err})")
            return plan
        merged: list = []
        for upper, opts in ranges:
            if merged and merged[-1][1] == opts:
                merged[-1] = (upper, opts)
            else:
                merged.append((upper, opts))
        merged[-1] = (UNBOUNDED, merged[-1][1])
        return replace(plan, cores=tuple(merged))

    # -- verification ------------------------------------------------------------------------

    def _verified(self, layout, tensors, plan: KernelPlan, folded, dtype) -> KernelPlan | None:
        """``plan`` if running it matches the folded weight at every checked count; else the plan
        without Triton if that one does; else None."""
        tried = [plan] + ([plan.without("triton")] if plan.uses("triton") else [])
        for candidate in tried:
            problem = self._check(layout, tensors, candidate, folded, dtype)
            if problem is None:
                return candidate
            warnings.warn(f"ARMOR {self.key}: plan {candidate.to_json()} rejected: {problem}")
        return None

    def _check(self, layout, tensors, plan: KernelPlan, folded, dtype) -> str | None:
        """Run ``plan`` against the folded weight at the counts where it changes path, with and
        without a bias, up to the largest count the layer will see (``max_tokens``)."""
        counts = set(CHECK_TOKENS) | {plan.dense_below, plan.dense_below + 1}
        counts |= {u for u, _ in plan.wrappers[:-1]} | {u + 1 for u, _ in plan.wrappers[:-1]}
        counts |= {u for u, _ in plan.cores[:-1]} | {u + 1 for u, _ in plan.cores[:-1]}
        top = self.max_tokens or max(LADDER)
        counts = {c for c in counts if 0 < c <= top}
        if get_backend(layout.backend).sparse:
            counts.add(top)  # the 2:4 libraries at the largest product they will see (cheap on a GPU)
        tolerance = 1e-3 if dtype == torch.float32 else 3e-2
        gen = torch.Generator(device=folded.device).manual_seed(0)
        bias = torch.randn(folded.shape[0], device=folded.device, dtype=dtype, generator=gen)
        for i, n_tokens in enumerate(sorted(counts)):
            x = torch.randn(n_tokens, folded.shape[1], device=folded.device, dtype=dtype, generator=gen)
            b = bias if i % 2 else None  # every other count with a bias (the largest count with one)
            if n_tokens == max(counts):
                b = bias
            try:
                got = run_factored(x, tensors, b, layout, plan).float()
            except Exception as err:  # noqa: BLE001
                return f"{type(err).__name__} at {n_tokens} tokens{' with a bias' if b is not None else ''}: {err}"
            want = F.linear(x.float(), folded.float(), None if b is None else b.float())
            err = float((got - want).norm() / want.norm().clamp_min(1e-6))
            if not err <= tolerance:  # also catches NaN
                return f"relative error {err:.3g} at {n_tokens} tokens{' with a bias' if b is not None else ''}"
        return None

    # -- measurement (auto) -------------------------------------------------------------------

    def _measure(self, candidates, build, folded, block_size, device, dtype) -> KernelPlan:
        """The plan of this shape from timings (runs once per distinct shape)."""
        d_in = folded.shape[1]
        x_big = torch.randn(max(LADDER), d_in, device=device, dtype=dtype)
        timer = lambda fn, n_tokens=None: self._time(fn, device, n_tokens)  # noqa: E731
        working = []
        for backend in candidates:
            try:
                layout, tensors = build(backend)
                if self._check(layout, tensors, KernelPlan(backend=backend), folded, dtype) is None:
                    working.append(backend)
            except Exception as err:  # noqa: BLE001 - unusable here; the next candidate serves
                warnings.warn(f"ARMOR: {backend} unusable for {self.key} ({type(err).__name__}: {err})")
        if not working:
            return KernelPlan(backend="folded")

        wrappers = self._fixed_wrappers(block_size, device)
        layout, tensors = build(working[0])
        y_big = torch.randn(x_big.shape[0], folded.shape[0], device=device, dtype=dtype)
        wrapper_ops = []  # (stacked blocks, shards, an input of the right width)
        if layout.in_shards:
            wrapper_ops.append((tensors[0], layout.in_shards, x_big))
        if layout.has_wrapper_out:
            wrapper_ops.append((tensors[-1], 1, y_big))
        if self.wrapper == "auto" and wrapper_ops and device.type == "cuda" and triton_supported(block_size, device):
            wrappers = self._measure_wrappers(wrapper_ops, timer)

        def sparse_ms(backend: str, n_tokens: int) -> float:
            lay, ts = build(backend)
            plan = KernelPlan(backend=backend, wrappers=wrappers)
            xs = x_big[:n_tokens]
            return timer(lambda: run_factored(xs, ts, None, lay, plan), n_tokens)

        best = min(working, key=lambda b: sparse_ms(b, MEASURE_AT)) if len(working) > 1 else working[0]
        if isinstance(self.dense_below, int):  # set explicitly: the 2:4 form, with that copy or none
            plan = KernelPlan(backend=best, dense_below=self.dense_below, wrappers=wrappers)
            return self._searched(plan, build, device, dtype)
        dense = [timer(lambda n=n: F.linear(x_big[:n], folded), n) for n in LADDER]
        sparse = [sparse_ms(best, n) for n in LADDER]
        if all(d < s for d, s in zip(dense, sparse)):
            return KernelPlan(backend="folded")  # dense everywhere: the dense weight alone, dense's memory
        below = dense_threshold(dense, sparse)
        self.dense_would_win_below = below
        if self.dense_below != "auto":
            below = 0  # no dense copy unless asked: never more weight memory than dense
        return self._searched(KernelPlan(backend=best, dense_below=below, wrappers=wrappers), build, device, dtype)

    def _measure_wrappers(self, wrapper_ops, timer) -> tuple[tuple[int, str], ...]:
        """bmm or Triton at each ladder count (both wrappers' times summed); if Triton fails once it
        is dropped and bmm serves every count."""
        picks = []
        impls = [i for i in IMPLS if i != "cpu"]
        for n_tokens in LADDER:
            times = {}
            for impl in list(impls):
                try:
                    times[impl] = sum(
                        timer(
                            lambda wt=wt, s=s, inp=inp[:n_tokens], impl=impl: blockdiag(inp, wt, s, None, impl),
                            n_tokens,
                        )
                        for wt, s, inp in wrapper_ops
                    )
                except Exception as err:  # noqa: BLE001 - the bmm path serves
                    warnings.warn(f"ARMOR: the Triton wrapper kernel failed ({type(err).__name__}: {err}); using bmm")
                    impls.remove(impl)
            picks.append((n_tokens, min(times, key=times.get)))
        return wrapper_ranges(picks)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_NOTED: set[int] = set()


def _note_dense_copy(key: str, below: int, folded: torch.Tensor) -> None:
    """Say once per process what a kept dense copy costs (the vLLM plugin also logs the totals)."""
    if below in _NOTED:
        return
    _NOTED.add(below)
    mib = folded.numel() * folded.element_size() / 2**20
    warnings.warn(
        f"ARMOR: a folded dense copy is kept beside the 2:4 core for up to {below} tokens "
        f"(ARMOR_VLLM_DENSE_BELOW): +{mib:.1f} MiB for {key} alone, about 1.56x the dense model's "
        "weight memory in all; unset ARMOR_VLLM_DENSE_BELOW (or 0) to serve the 2:4 form only"
    )


def wrapper_share(shards: ArmorShards) -> float:
    """The numbers of a layer's non-identity wrappers (``B`` once when shared, ``A``) as a share of
    its dense weight's: what the factored form reads beyond the 2:4 core."""
    shared = shards.shared_wrapper_in()
    ins = [shared] if shared is not None else list(shards.wrappers_in)
    numbers = sum(w.numel() for w in [*ins, shards.wrapper_out] if not is_identity(w))
    return numbers / (sum(shards.output_sizes) * shards.input_size)


def build_tensors(shards: ArmorShards, dtype: torch.dtype, backend: str) -> tuple[LinearLayout, list[torch.Tensor]]:
    """This layer's tensors for ``backend``, in ``LinearLayout`` order: ``B`` stacked over shards
    unless every shard has the identity (one ``B`` when all shards share it; their cores are then
    concatenated into ONE matmul), each core compressed by the backend, ``A`` unless identity."""
    be = get_backend(backend)
    if not be.supports(dtype):
        raise ValueError(f"{backend} does not take {dtype}")
    shared = shards.shared_wrapper_in()
    tensors: list[torch.Tensor] = []
    if shared is not None:
        in_shards = 0 if is_identity(shared) else 1
        cores = [torch.cat(shards.cores)]
        if in_shards:
            tensors.append(stack_wrappers([shared]).to(dtype))
    else:
        in_shards = len(shards.cores)
        cores = list(shards.cores)
        tensors.append(stack_wrappers(shards.wrappers_in).to(dtype))
    core_tensors = 0
    for core in cores:
        be.check_shape(*core.shape)
        stored = be.compress(core.to(dtype).contiguous())
        core_tensors = len(stored)
        tensors.extend(stored)
    has_out = not is_identity(shards.wrapper_out)
    if has_out:
        tensors.append(stack_wrappers([shards.wrapper_out]).to(dtype))
    layout = LinearLayout(
        backend=backend,
        n_cores=len(cores),
        core_tensors=core_tensors,
        in_shards=in_shards,
        has_wrapper_out=has_out,
        has_dense=False,
        out_features=sum(shards.output_sizes),
    )
    return layout, tensors


__all__ = ["FactoredKernel", "MODES", "WRAPPERS", "build_tensors", "wrapper_share"]
