"""CUDA kernels for an ARMOR linear ``y = A (S (B x)) + bias`` (sm80+), importing only torch.

Core backends (the 2:4 ``S``):

- ``cusparselt``: each core compressed once with ``torch._cslt_compress``; ``torch._cslt_sparse_mm``
  per forward (bias fused when there is no ``A``).
- ``cutlass``: ``to_sparse_semi_structured`` with ``_FORCE_CUTLASS``; the packed values and metadata
  are kept as plain tensors and ``torch._sparse_semi_structured_mm`` is called per forward.
- ``dense``: ``A · S · B`` folded into one dense weight at load (cuBLAS), the last resort.
- ``auto``: see ``CudaArmorKernel``.

Wrappers ``B`` and ``A`` run as batched matmuls over ``(tokens, d/bs, bs)`` views, written straight
into their output layout (no copies for one shard), or as the fused Triton kernel of
``triton_blockdiag`` when measured faster. Shards (fused q/k/v, gate/up) that share ``B`` get it
applied once and their cores concatenated into ONE sparse matmul. Shards with distinct ``B`` get all
their ``B`` in one stacked batched matmul (one launch, ``N = shards*bs``) but one sparse matmul each:
their inputs differ, and stacking them would multiply the core's work by the number of shards. ``A``
is always one batched matmul over all output blocks, with the bias fused into it.

Every token count works: tokens are padded to the sparse kernels' multiple (8) and sliced back.

Test seams: ``SPARSE_OPS`` (compress/linear per backend) and ``CudaArmorKernel.timer`` can be
replaced, so the whole pipeline runs on CPU with the sparse matmul swapped for a dense one.
"""

from __future__ import annotations

import os
import statistics
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from armor_vllm.kernels.base import ArmorKernel, ArmorShards, is_identity
from armor_vllm.kernels.cpu import FoldedKernel

CORE_BACKENDS = ("cusparselt", "cutlass", "dense")
MODES = ("auto",) + CORE_BACKENDS
WRAPPER_IMPLS = ("bmm", "triton")

# Token counts at which ``auto`` measures (decode to prefill); decisions hold up to the point.
LADDER = (1, 16, 64, 256, 1024, 4096)
_BIG = 1 << 62


# ---------------------------------------------------------------------------------------------
# Sparse core ops: the seam the CPU tests replace.


@dataclass(frozen=True)
class SparseOps:
    """How one backend stores a 2:4 core and multiplies by it.

    ``compress(core)`` takes the dense ``(rows, d_in)`` core (zeros where pruned, target dtype and
    device) and returns the tensors to keep. ``linear(stored, h, bias)`` returns ``h @ core^T + bias``
    as ``(T, rows)`` for ``h`` ``(T, d_in)`` contiguous with ``T`` a multiple of ``token_multiple``."""

    compress: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    linear: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None], torch.Tensor]
    token_multiple: int = 8
    row_multiple: int = 16
    col_multiple: int = 16


def _cslt_compress(core: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"packed": torch._cslt_compress(core)}


def _cslt_linear(stored, h, bias):
    # core @ h^T, returned transposed: (T, rows) row-major, which is what A and the caller want.
    return torch._cslt_sparse_mm(stored["packed"], h.t(), bias=bias, transpose_result=True)


def _cutlass_compress(core: torch.Tensor) -> dict[str, torch.Tensor]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        sparse = to_sparse_semi_structured(core)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return {"packed": sparse.packed, "meta": sparse.meta}


def _cutlass_linear(stored, h, bias):
    y = torch._sparse_semi_structured_mm(stored["packed"], stored["meta"], h.t()).t()
    return y if bias is None else y + bias


SPARSE_OPS: dict[str, SparseOps] = {
    "cusparselt": SparseOps(_cslt_compress, _cslt_linear, token_multiple=8, row_multiple=16, col_multiple=16),
    "cutlass": SparseOps(_cutlass_compress, _cutlass_linear, token_multiple=8, row_multiple=32, col_multiple=64),
}


def backend_available(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on ``device`` at all (a run may still fail: ``auto`` checks)."""
    if backend == "dense":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if backend == "cusparselt":
        return bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())
    return backend == "cutlass"


# ---------------------------------------------------------------------------------------------
# Block-diagonal wrappers


def stack_wrappers(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks of several shards ``[(n, bs, bs)] * k`` as one ``(n, bs, k*bs)`` operand: block ``j``
    holds ``[D_1j^T | D_2j^T | ...]``, so one batched matmul applies every shard's wrapper."""
    return torch.cat([b.transpose(1, 2) for b in blocks], dim=2).contiguous()


def blockdiag_bmm(
    x: torch.Tensor, wt: torch.Tensor, shards: int = 1, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Block-diagonal wrappers as one batched matmul. ``x`` (T, n*bs) contiguous, ``wt`` from
    ``stack_wrappers``. One shard: (T, n*bs), written in place through a strided view (cuBLAS takes
    the strides, no copy), bias fused via ``baddbmm``. Several: (shards, T, n*bs), one permute copy."""
    n_tokens = x.shape[0]
    n, bs, width = wt.shape
    xb = x.view(n_tokens, n, bs).transpose(0, 1)  # (n, T, bs), strided
    if shards == 1:
        y = x.new_empty((n_tokens, n * bs))
        yb = y.view(n_tokens, n, bs).transpose(0, 1)
        if bias is None:
            torch.bmm(xb, wt, out=yb)
        else:
            torch.baddbmm(bias.view(n, 1, bs), xb, wt, out=yb)
        return y
    if bias is not None:
        raise ValueError("bias is only supported for a single shard")
    yb = torch.bmm(xb, wt)  # (n, T, shards*bs)
    return yb.view(n, n_tokens, shards, bs).permute(2, 1, 0, 3).reshape(shards, n_tokens, n * bs)


def _triton_usable(block_size: int) -> bool:
    try:
        from armor_vllm.kernels import triton_blockdiag
    except Exception:  # no triton, or a broken install
        return False
    return triton_blockdiag.supported(block_size)


def blockdiag(x, wt, shards=1, bias=None, impl="bmm"):
    """Dispatch to ``blockdiag_bmm`` or the Triton kernel (same contract)."""
    if impl == "triton":
        from armor_vllm.kernels.triton_blockdiag import blockdiag_triton

        return blockdiag_triton(x, wt, shards, bias)
    return blockdiag_bmm(x, wt, shards, bias)


# ---------------------------------------------------------------------------------------------
# The kernel


@dataclass(frozen=True)
class Plan:
    """Per-shape decisions. They only choose between equivalent computations: a missing or wrong
    plan costs speed, never correctness (``apply`` checks which tensors exist)."""

    backend: str = "cusparselt"
    dense_below: int = 0  # token counts <= this use the folded dense weight, when it was kept
    wrappers: tuple[tuple[int, str], ...] = ((_BIG, "bmm"),)  # (max tokens, impl), ascending

    def wrapper_for(self, n_tokens: int) -> str:
        for upper, impl in self.wrappers:
            if n_tokens <= upper:
                return impl
        return self.wrappers[-1][1]


def cuda_time(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` by CUDA events (one event pair per repetition)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _signature(tensors: dict[str, torch.Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in tensors.items()))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


class CudaArmorKernel(ArmorKernel):
    """ARMOR on CUDA: wrappers as batched matmuls (or Triton), the core as a 2:4 sparse matmul.

    ``backend``: ``cusparselt``, ``cutlass``, ``dense`` or ``auto``. An explicit sparse backend that
    fails to prepare falls back along ``cusparselt -> cutlass -> dense`` with a warning, unless
    ``strict``. ``auto`` on a layer shape it has not seen (results are cached per shape, so a model
    measures each distinct shape once):

    1. with ``wrapper="auto"``, times batched-matmul vs Triton wrappers at each ``LADDER`` token count;
    2. prepares every available sparse backend, checks it against the folded dense weight on random
       input (a backend that errors or disagrees is dropped), and times it at 1024 tokens;
    3. times the fastest sparse path against dense cuBLAS on the folded weight at each ``LADDER``
       count: ``dense_below`` is the largest count up to which dense wins at every point. If dense
       wins everywhere, the layer becomes ``dense``; if it wins somewhere at small counts (decode),
       the folded weight is KEPT next to the sparse one and used for ``T <= dense_below`` tokens.
       That costs the dense weight's memory again; ``dense_below=0`` (or env
       ``ARMOR_DENSE_BELOW=0``) turns it off, a positive value forces that threshold unmeasured.

    ``wrapper``: ``bmm``, ``triton`` or ``auto`` (env ``ARMOR_WRAPPER``); ``auto`` measures (step 1)
    only under ``backend="auto"`` on CUDA with a Triton that supports the block size, else ``bmm``.
    """

    name = "cuda"

    def __init__(
        self,
        backend: str = "auto",
        wrapper: str | None = None,
        dense_below: int | None = None,
        device: torch.device | str | None = None,
        strict: bool = False,
    ):
        if backend not in MODES:
            raise ValueError(f"unknown ARMOR CUDA backend {backend!r}; known: {', '.join(MODES)}")
        wrapper = wrapper or os.environ.get("ARMOR_WRAPPER") or "auto"
        if wrapper not in WRAPPER_IMPLS + ("auto",):
            raise ValueError(f"unknown wrapper implementation {wrapper!r}; known: bmm, triton, auto")
        self.backend = backend
        self.wrapper = wrapper
        self.dense_below = dense_below if dense_below is not None else _env_int("ARMOR_DENSE_BELOW")
        self.device = torch.device(device) if device is not None else None
        self.strict = strict
        self.name = f"cuda-{backend}"
        self.timer: Callable[[Callable[[], object]], float] = cuda_time
        self._measured: dict[tuple, Plan] = {}  # shape key -> decisions of auto
        self._plans: dict[tuple, Plan] = {}  # signature of prepared tensors -> plan

    # -- prepare ---------------------------------------------------------------------------

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        device = self.device or shards.wrapper_out.device
        shards = ArmorShards(
            wrapper_out=shards.wrapper_out.to(device),
            cores=[c.to(device) for c in shards.cores],
            wrappers_in=[w.to(device) for w in shards.wrappers_in],
        )
        with torch.inference_mode():
            tensors, plan = self._prepare(shards, dtype, device)
        self._plans[_signature(tensors)] = plan
        return tensors

    def _candidates(self, device: torch.device) -> list[str]:
        if self.backend == "auto":
            return [b for b in ("cusparselt", "cutlass") if backend_available(b, device)]
        if self.backend == "dense":
            return []
        order = CORE_BACKENDS[CORE_BACKENDS.index(self.backend) :]
        chosen = [b for b in order if b != "dense" and (b == self.backend or backend_available(b, device))]
        if not self.strict:
            return chosen
        return chosen[:1]

    def _prepare(self, shards, dtype, device):
        folded = FoldedKernel().prepare(shards, dtype)["weight"]
        key = self._shape_key(shards, dtype)
        candidates = self._candidates(device)
        if not candidates:
            if self.backend not in ("dense", "auto"):
                self._fail(f"backend {self.backend} not available on {device}")
            return {"weight": folded}, Plan(backend="dense")

        cached = self._measured.get(key) if self.backend == "auto" else None
        if cached is not None:
            candidates = [cached.backend] if cached.backend != "dense" else []
            if not candidates:
                return {"weight": folded}, cached

        wrappers = self._fixed_wrappers(shards.block_size, device)
        built: dict[str, dict[str, torch.Tensor]] = {}
        for backend in candidates:
            try:
                tensors = self._build(shards, dtype, backend)
                self._check(tensors, folded, Plan(backend=backend, wrappers=wrappers), shards, dtype)
            except Exception as err:  # noqa: BLE001 - any failure means "does not work here"
                if self.strict:
                    raise
                warnings.warn(f"ARMOR {backend} kernel unusable ({type(err).__name__}: {err}); trying the next")
                continue
            built[backend] = tensors
            if self.backend != "auto":
                break
        if not built:
            if self.backend != "auto":
                self._fail(f"no sparse backend worked for backend={self.backend}")
            return {"weight": folded}, Plan(backend="dense")

        if cached is not None:
            plan = cached
        elif self.backend == "auto":
            plan = self._measure(built, folded, shards, dtype, device)
            self._measured[key] = plan
        else:
            plan = Plan(backend=next(iter(built)), wrappers=wrappers)
            if self.dense_below:
                plan = replace(plan, dense_below=self.dense_below)
        if plan.backend == "dense":
            return {"weight": folded}, plan
        tensors = built[plan.backend]
        if plan.dense_below > 0:
            tensors["dense_weight"] = folded
        return tensors, plan

    def _fail(self, message: str) -> None:
        if self.strict:
            raise RuntimeError(message)
        warnings.warn(f"ARMOR: {message}; using the folded dense weight")

    @staticmethod
    def _shape_key(shards: ArmorShards, dtype) -> tuple:
        shared = shards.shared_wrapper_in()
        return (
            dtype,
            shards.block_size,
            tuple(shards.output_sizes),
            int(shards.cores[0].shape[1]),
            shared is None,
            shared is not None and is_identity(shared),
            is_identity(shards.wrapper_out),
        )

    def _fixed_wrappers(self, block_size: int, device) -> tuple[tuple[int, str], ...]:
        if self.wrapper == "triton" and _triton_usable(block_size):
            return ((_BIG, "triton"),)
        return ((_BIG, "bmm"),)

    def _build(self, shards: ArmorShards, dtype, backend: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one sparse backend: ``core`` (or ``core_i`` per shard) as
        ``core.<name>`` entries of that backend, ``wrapper_in`` (n, bs, k*bs) unless identity, and
        ``wrapper_out`` (n_out, bs, bs) transposed, unless identity."""
        ops = SPARSE_OPS[backend]
        d_in = int(shards.cores[0].shape[1])
        if d_in % ops.col_multiple:
            raise ValueError(f"{backend} needs the input dimension to be a multiple of {ops.col_multiple}")
        tensors: dict[str, torch.Tensor] = {}
        shared = shards.shared_wrapper_in()
        if shared is not None:
            groups = [("core", torch.cat(shards.cores))]
            if not is_identity(shared):
                tensors["wrapper_in"] = stack_wrappers([shared]).to(dtype)
        else:
            groups = [(f"core_{i}", c) for i, c in enumerate(shards.cores)]
            tensors["wrapper_in"] = stack_wrappers(shards.wrappers_in).to(dtype)
        for name, core in groups:
            if core.shape[0] % ops.row_multiple:
                raise ValueError(f"{backend} needs output rows in multiples of {ops.row_multiple}")
            for part, t in ops.compress(core.to(dtype).contiguous()).items():
                tensors[f"{name}.{part}"] = t
        if not is_identity(shards.wrapper_out):
            tensors["wrapper_out"] = stack_wrappers([shards.wrapper_out]).to(dtype)
        return tensors

    def _check(self, tensors, folded, plan, shards, dtype) -> None:
        """Run the sparse path once on random input and compare with the folded dense weight."""
        d_in = int(shards.cores[0].shape[1])
        x = torch.randn(5, d_in, device=folded.device, dtype=dtype)
        got = self._sparse_apply(tensors, x, None, plan).float()
        want = F.linear(x, folded).float()
        err = (got - want).norm() / want.norm().clamp_min(1e-6)
        if not torch.isfinite(err) or err > 5e-2:
            raise RuntimeError(f"result differs from the folded weight (relative error {float(err):.3g})")

    def _measure(self, built, folded, shards, dtype, device) -> Plan:
        d_in = int(shards.cores[0].shape[1])
        x_big = torch.randn(max(LADDER), d_in, device=device, dtype=dtype)

        wrappers = self._fixed_wrappers(shards.block_size, device)
        any_tensors = next(iter(built.values()))
        wrapper_keys = [k for k in ("wrapper_in", "wrapper_out") if k in any_tensors]
        if self.wrapper == "auto" and wrapper_keys and device.type == "cuda" and _triton_usable(shards.block_size):
            inputs = {"wrapper_in": x_big}
            if "wrapper_out" in wrapper_keys:
                inputs["wrapper_out"] = torch.randn(max(LADDER), folded.shape[0], device=device, dtype=dtype)
            picks = []
            for n_tokens in LADDER:
                ms = {
                    impl: sum(self.timer(lambda k=k, impl=impl: self._wrap(inputs[k][:n_tokens], any_tensors[k], impl))
                              for k in wrapper_keys)
                    for impl in WRAPPER_IMPLS
                }
                picks.append((n_tokens, min(ms, key=ms.get)))
            wrappers = tuple(picks[:-1]) + ((_BIG, picks[-1][1]),)

        def sparse_ms(backend, n_tokens):
            plan = Plan(backend=backend, wrappers=wrappers)
            xs = x_big[:n_tokens]
            return self.timer(lambda: self._sparse_apply(built[backend], xs, None, plan))

        backend = min(built, key=lambda b: sparse_ms(b, 1024)) if len(built) > 1 else next(iter(built))
        plan = Plan(backend=backend, wrappers=wrappers)
        if self.dense_below is not None:
            return replace(plan, dense_below=self.dense_below)
        dense_below = 0
        for n_tokens in LADDER:
            xs = x_big[:n_tokens]
            if self.timer(lambda: F.linear(xs, folded)) < sparse_ms(backend, n_tokens):
                dense_below = n_tokens
            else:
                break
        if dense_below == LADDER[-1]:
            return Plan(backend="dense")
        return replace(plan, dense_below=dense_below)

    @staticmethod
    def _wrap(x, wt, impl):
        return blockdiag(x, wt, wt.shape[2] // wt.shape[1], None, impl)

    # -- apply -----------------------------------------------------------------------------

    def plan_for(self, tensors: dict[str, torch.Tensor]) -> Plan:
        if "weight" in tensors:
            return Plan(backend="dense")
        plan = self._plans.get(_signature(tensors))
        if plan is not None:
            return plan
        backend = "cutlass" if any(k.endswith(".meta") for k in tensors) else "cusparselt"
        return Plan(backend=backend, dense_below=self.dense_below or 0)

    def apply(self, tensors, x, bias):
        if "weight" in tensors:
            return F.linear(x, tensors["weight"], bias)
        plan = self.plan_for(tensors)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if "dense_weight" in tensors and x2.shape[0] <= plan.dense_below:
            return F.linear(x, tensors["dense_weight"], bias)
        y = self._sparse_apply(tensors, x2, bias, plan)
        return y.reshape(*lead, y.shape[-1])

    def _sparse_apply(self, tensors, x2, bias, plan: Plan) -> torch.Tensor:
        """The factored path on a 2-D input: pad tokens, ``B``, core(s), ``A`` + bias, slice."""
        ops = SPARSE_OPS[plan.backend]
        n_tokens = x2.shape[0]
        pad = (-n_tokens) % ops.token_multiple
        x2 = F.pad(x2, (0, 0, 0, pad)) if pad else x2.contiguous()
        impl = plan.wrapper_for(n_tokens)

        has_out = "wrapper_out" in tensors
        if "core.packed" in tensors:  # one core for all shards
            h = blockdiag(x2, tensors["wrapper_in"], 1, None, impl) if "wrapper_in" in tensors else x2
            y = ops.linear(_part(tensors, "core"), h, None if has_out else bias)
            bias_done = not has_out
        else:
            wt = tensors["wrapper_in"]
            n_shards = wt.shape[2] // wt.shape[1]
            h = blockdiag(x2, wt, n_shards, None, impl)
            y = torch.cat([ops.linear(_part(tensors, f"core_{i}"), h[i], None) for i in range(n_shards)], dim=1)
            bias_done = False
        if has_out:
            y = blockdiag(y.contiguous(), tensors["wrapper_out"], 1, bias, impl)
            bias_done = True
        if bias is not None and not bias_done:
            y = y + bias
        return y[:n_tokens] if pad else y


def _part(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


__all__ = [
    "CORE_BACKENDS",
    "CudaArmorKernel",
    "LADDER",
    "MODES",
    "Plan",
    "SPARSE_OPS",
    "SparseOps",
    "backend_available",
    "blockdiag",
    "blockdiag_bmm",
    "cuda_time",
    "stack_wrappers",
]
