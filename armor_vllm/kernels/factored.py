"""The ``factored`` kernel: ``B``, the 2:4 core ``S`` and ``A`` kept apart, run through the custom op
``armor_vllm::factored_linear`` (``kernels.linear_op``).

The same class serves every device; only the core backend differs (``kernels.backends``):
``dense`` (the CPU ``factored`` kernel, a baseline on CUDA), ``cusparselt`` and ``cutlass`` (2:4
tensor cores, CUDA sm80+, fp16/bf16), or ``auto``, which measures.

``prepare`` (once per layer, at load):

1. folds ``A·S·B`` into a dense float32 weight: the reference every sparse layout is checked
   against, and the fallback;
2. picks the candidate backends that can run this dtype on this device (a named sparse backend that
   cannot falls back ``cusparselt -> cutlass -> folded`` with a warning, or raises when ``strict``);
3. finds the plan of the layer's shape (``kernels.plan``): fixed for a named backend; for ``auto``
   measured once per distinct shape and reused by every layer of that shape — the fastest backend
   at 1024 tokens, the token count up to which the folded dense weight beats it (that weight is then
   kept next to the core: ``dense_below``; it costs its memory again, ``ARMOR_VLLM_DENSE_BELOW=0``
   refuses that), and bmm or Triton wrappers per token range; then agreed across tensor-parallel
   ranks (``agree``);
4. builds this layer's tensors for the plan's backend and runs the whole plan at several token
   counts against the folded weight; a Triton part that fails or disagrees is replaced by the
   batched-matmul wrappers, a backend that fails or disagrees falls back (or raises when ``strict``);
5. registers the layout and plan under the layer's key for the op.

Options: ``backend`` (``dense``, ``cusparselt``, ``cutlass``, ``auto``), ``wrapper`` (``bmm``,
``triton``, ``auto`` = measured on CUDA, else bmm; env ``ARMOR_VLLM_WRAPPER``), ``dense_below`` (env
``ARMOR_VLLM_DENSE_BELOW``: 0 never keeps the dense copy; a positive value forces that threshold),
``key`` (the op's layer name; the vLLM plugin passes the layer prefix), ``agree``, ``strict``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from armor_vllm import envs
from armor_vllm.core.factorization import is_identity_blocks as is_identity
from armor_vllm.kernels.backends import SPARSE_BACKENDS, get_backend, usable_sparse_backends
from armor_vllm.kernels.base import ArmorKernel, ArmorShards
from armor_vllm.kernels.blockdiag import IMPLS, blockdiag, stack_wrappers, triton_supported
from armor_vllm.kernels.folded import fold_shards
from armor_vllm.kernels.linear_op import LinearLayout, call_factored_op, register_layer, run_factored
from armor_vllm.kernels.plan import (
    LADDER,
    UNBOUNDED,
    KernelPlan,
    cached_plan,
    dense_threshold,
    time_ms,
    wrapper_ranges,
)

MODES = ("auto", *SPARSE_BACKENDS, "dense")
WRAPPERS = (*IMPLS, "auto")
CHECK_TOKENS = (1, 5, 37)  # always verified; plus the edges of the plan's ranges
MEASURE_AT = 1024  # tokens at which sparse backends are compared with each other
_keys = itertools.count()


class FactoredKernel(ArmorKernel):
    name = "factored"

    def __init__(
        self,
        backend: str = "dense",
        wrapper: str | None = None,
        dense_below: int | None = None,
        device: torch.device | str | None = None,
        strict: bool = False,
        key: str | None = None,
        agree: Callable[[KernelPlan], KernelPlan] | None = None,
    ):
        if backend not in MODES:
            raise ValueError(f"unknown ARMOR core backend {backend!r}; known: {', '.join(MODES)}")
        wrapper = wrapper or envs.get(envs.WRAPPER) or "auto"
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper implementation {wrapper!r}; known: {', '.join(WRAPPERS)}")
        self.backend = backend
        self.wrapper = wrapper
        self.dense_below = dense_below if dense_below is not None else envs.get_int(envs.DENSE_BELOW)
        self.device = torch.device(device) if device is not None else None
        self.strict = strict
        self.key = key or f"armor-linear-{next(_keys)}"
        self.agree = agree
        self.timer: Callable[[Callable[[], object], torch.device], float] = time_ms
        self.name = f"factored-{backend}"
        self.plan: KernelPlan | None = None
        self.layout: LinearLayout | None = None

    # -- prepare ---------------------------------------------------------------------------

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> list[torch.Tensor]:
        device = self.device or shards.wrapper_out.device
        shards = shards.to(device)
        with torch.inference_mode():
            folded = fold_shards(shards).to(dtype).contiguous()
            tensors = self._prepare(shards, dtype, device, folded)
        return tensors

    def _candidates(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        if self.backend == "dense":
            return ["dense"]
        usable = usable_sparse_backends(device, dtype)
        if self.backend == "auto":
            return usable
        if self.backend in usable:
            return [self.backend]
        why = f"{self.backend} cannot run {dtype} on {device}"
        if self.strict:
            raise RuntimeError(f"ARMOR {self.key}: {why}")
        later = [b for b in SPARSE_BACKENDS[SPARSE_BACKENDS.index(self.backend) + 1 :] if b in usable]
        warnings.warn(f"ARMOR {self.key}: {why}; using {later[0] if later else 'the folded dense weight'}")
        return later[:1]

    def _plan_key(self, shards: ArmorShards, dtype, device, candidates) -> tuple:
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
        if self.backend == "auto":
            plan = cached_plan(
                self._plan_key(shards, dtype, device, candidates),
                lambda: self._measure(candidates, build, folded, shards.block_size, device, dtype),
                self.agree,
            )
        else:
            plan = KernelPlan(
                backend=candidates[0],
                dense_below=self.dense_below or 0,
                wrappers=self._fixed_wrappers(shards.block_size, device),
            )
        if plan.backend == "folded":
            return self._serve_folded(folded)
        try:
            layout, tensors = build(plan.backend)
        except Exception as err:  # noqa: BLE001 - a layout this backend cannot take
            return self._fail(f"{plan.backend} cannot store this layer ({type(err).__name__}: {err})", folded)
        if plan.dense_below > 0:
            layout = LinearLayout(**{**layout.__dict__, "has_dense": True})
            tensors = [*tensors, folded]
        plan = self._verified(layout, tensors, plan, folded, dtype)
        if plan is None:
            return self._fail(f"{layout.backend} disagrees with the folded weight", folded)
        self.layout, self.plan = layout, plan
        register_layer(self.key, layout, plan)
        return tensors

    def _serve_folded(self, folded: torch.Tensor) -> list[torch.Tensor]:
        self.layout, self.plan = None, KernelPlan(backend="folded")
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
        counts = set(CHECK_TOKENS) | {plan.dense_below, plan.dense_below + 1}
        counts |= {u for u, _ in plan.wrappers[:-1]} | {u + 1 for u, _ in plan.wrappers[:-1]}
        tolerance = 1e-3 if dtype == torch.float32 else 3e-2
        gen = torch.Generator(device=folded.device).manual_seed(0)
        for n_tokens in sorted(c for c in counts if 0 < c <= max(LADDER)):
            x = torch.randn(n_tokens, folded.shape[1], device=folded.device, dtype=dtype, generator=gen)
            try:
                got = run_factored(x, tensors, None, layout, plan).float()
            except Exception as err:  # noqa: BLE001
                return f"{type(err).__name__} at {n_tokens} tokens: {err}"
            want = F.linear(x.float(), folded.float())
            err = float((got - want).norm() / want.norm().clamp_min(1e-6))
            if not err <= tolerance:  # also catches NaN
                return f"relative error {err:.3g} at {n_tokens} tokens"
        return None

    # -- measurement (auto) -------------------------------------------------------------------

    def _measure(self, candidates, build, folded, block_size, device, dtype) -> KernelPlan:
        """The plan of this shape from timings (runs once per distinct shape)."""
        d_in = folded.shape[1]
        x_big = torch.randn(max(LADDER), d_in, device=device, dtype=dtype)
        timer = lambda fn: self.timer(fn, device)  # noqa: E731
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
            return timer(lambda: run_factored(xs, ts, None, lay, plan))

        best = min(working, key=lambda b: sparse_ms(b, MEASURE_AT)) if len(working) > 1 else working[0]
        plan = KernelPlan(backend=best, wrappers=wrappers)
        if self.dense_below is not None:
            return KernelPlan(backend=best, dense_below=self.dense_below, wrappers=wrappers)
        dense = [timer(lambda n=n: F.linear(x_big[:n], folded)) for n in LADDER]
        sparse = [sparse_ms(best, n) for n in LADDER]
        below = dense_threshold(dense, sparse)
        if below >= LADDER[-1]:
            return KernelPlan(backend="folded")
        return KernelPlan(backend=best, dense_below=below, wrappers=plan.wrappers)

    def _measure_wrappers(self, wrapper_ops, timer) -> tuple[tuple[int, str], ...]:
        """bmm or Triton at each ladder count (both wrappers' times summed); if Triton fails once it
        is dropped and bmm serves every count."""
        picks = []
        impls = list(IMPLS)
        for n_tokens in LADDER:
            times = {}
            for impl in list(impls):
                try:
                    times[impl] = sum(
                        timer(lambda wt=wt, s=s, inp=inp[:n_tokens], impl=impl: blockdiag(inp, wt, s, None, impl))
                        for wt, s, inp in wrapper_ops
                    )
                except Exception as err:  # noqa: BLE001 - the bmm path serves
                    warnings.warn(f"ARMOR: the Triton wrapper kernel failed ({type(err).__name__}: {err}); using bmm")
                    impls.remove(impl)
            picks.append((n_tokens, min(times, key=times.get)))
        return wrapper_ranges(picks)

    # -- apply -------------------------------------------------------------------------------

    def apply(self, tensors, x, bias):
        if self.layout is None:
            return F.linear(x, tensors[0], bias)
        return call_factored_op(x, tensors, bias, self.key, self.layout.out_features)


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


__all__ = ["FactoredKernel", "MODES", "WRAPPERS", "build_tensors"]
