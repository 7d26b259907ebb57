"""Core backends: how the 2:4 core ``S`` of an ARMOR linear is stored and multiplied.

A backend turns the dense ``(rows, d_in)`` core (zeros where pruned, already in the layer dtype) into
the tensors it keeps (``compress``) and computes ``h @ S^T (+ bias)`` as a row-major ``(T, rows)``
tensor (``matmul``). Its contract, which ``kernels.linear_op`` honours on every call:

- ``h`` is ``(T, d_in)``, contiguous, in the layer dtype, with ``T`` a multiple of ``token_multiple``
  (the caller pads decode batches and slices the result back);
- ``rows`` and ``d_in`` are multiples of ``row_multiple`` / ``col_multiple`` (checked at load);
- only the dtypes in ``dtypes`` are accepted (torch's semi-structured float32 layouts are 1:2 pairs,
  not 2:4, so no sparse backend takes float32);
- the result is a fresh, contiguous, row-major tensor.

Backends:

- ``dense``: the core kept as an ordinary dense matrix (``F.linear``). The CPU ``factored`` kernel,
  and a baseline on CUDA. Any device, any dtype.
- ``cusparselt``: ``torch._cslt_compress`` once at load, ``torch._cslt_sparse_mm`` per call with the
  transposed result (row-major ``(T, rows)``), the bias fused, and the ``alg_id``/``split_k`` the
  plan found at load for this core and token range (``FactoredKernel``: ``_cslt_sparse_mm_search``
  for the algorithm, timings for split-k). CUDA sm80+, fp16/bf16.
- ``cutlass``: PyTorch's CUTLASS semi-structured kernel (``torch._sparse_semi_structured_mm``). Only
  compute capability 8.x: PyTorch raises on sm90 (Hopper). It returns ``(rows, T)``; we transpose and
  copy to row-major (vLLM's next op expects contiguous rows), adding the bias on the way.

The raw torch ops are looked up through ``RawSparseOps`` objects so that ``kernels.standin`` can put
CPU emulations of them in place (tests only) and the very glue code below runs on CPU in CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class RawSparseOps:
    """The device-level calls of one sparse backend; ``device_ok(device)`` says where they run."""

    compress: Callable[..., object]
    mm: Callable[..., torch.Tensor]
    device_ok: Callable[[torch.device], bool]
    search: Callable[..., int] | None = None  # the library's algorithm search (cuSPARSELt), if any


@dataclass
class CoreBackend:
    name: str
    compress: Callable[[torch.Tensor], list[torch.Tensor]]
    # (stored, h, bias, opts): ``opts`` are the plan's options of this core at this token count
    # (cuSPARSELt: ``(alg_id, split_k)``), or None for the library's defaults
    matmul: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor | None, tuple | None], torch.Tensor]
    available: Callable[[torch.device], bool]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating dtype
    token_multiple: int = 1
    row_multiple: int = 1
    col_multiple: int = 1
    sparse: bool = True
    notes: dict = field(default_factory=dict)

    def supports(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    def check_shape(self, rows: int, cols: int) -> None:
        """Raise ``ValueError`` naming the rule when a core of this shape cannot be stored here."""
        if rows % self.row_multiple:
            raise ValueError(f"{self.name} needs output rows in multiples of {self.row_multiple}, got {rows}")
        if cols % self.col_multiple:
            raise ValueError(
                f"{self.name} needs the input dimension to be a multiple of {self.col_multiple}, got {cols}"
            )


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


# ---------------------------------------------------------------------------------------------
# dense


def _dense_matmul(stored: list[torch.Tensor], h: torch.Tensor, bias: torch.Tensor | None, opts=None) -> torch.Tensor:
    return F.linear(h, stored[0], bias)


DENSE = CoreBackend(
    name="dense",
    compress=lambda core: [core.contiguous()],
    matmul=_dense_matmul,
    available=lambda device: True,
    sparse=False,
)


# ---------------------------------------------------------------------------------------------
# cuSPARSELt


def _cslt_device_ok(device: torch.device) -> bool:
    capability = _cuda_capability(device)
    if capability is None or capability < (8, 0):
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available())


def _cslt_search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> int:
    # torch 2.13: ``_cslt_sparse_mm_search`` returns the fastest ``alg_id`` (deprecated upstream:
    # pytorch#137427; absent in a later torch, the caller then keeps alg 0)
    return int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=True))


CSLT_OPS = RawSparseOps(
    compress=lambda core: torch._cslt_compress(core),
    mm=lambda packed, dense_t, bias, alg_id=0, split_k=1: torch._cslt_sparse_mm(
        packed, dense_t, bias=bias, transpose_result=True, alg_id=alg_id, split_k=split_k
    ),
    device_ok=_cslt_device_ok,
    search=_cslt_search,
)


def _cslt_compress(core: torch.Tensor) -> list[torch.Tensor]:
    return [CSLT_OPS.compress(core)]


def _cslt_matmul(stored: list[torch.Tensor], h: torch.Tensor, bias: torch.Tensor | None, opts=None) -> torch.Tensor:
    # S @ h^T with a transposed result: (T, rows), row-major, bias (rows,) fused per output row;
    # with the algorithm and split-k the plan found for this core at this token count.
    if opts:
        return CSLT_OPS.mm(stored[0], h.t(), bias, alg_id=int(opts[0]), split_k=int(opts[1]))
    return CSLT_OPS.mm(stored[0], h.t(), bias)


CUSPARSELT = CoreBackend(
    name="cusparselt",
    compress=_cslt_compress,
    matmul=_cslt_matmul,
    available=lambda device: CSLT_OPS.device_ok(device),
    dtypes=HALF_DTYPES,
    token_multiple=8,
    row_multiple=16,
    col_multiple=16,
)


# ---------------------------------------------------------------------------------------------
# CUTLASS (PyTorch's semi-structured kernel, sm8x only)


def _cutlass_device_ok(device: torch.device) -> bool:
    capability = _cuda_capability(device)
    # PyTorch builds this kernel for compute capability 8.x only; on sm90 it raises at run time.
    return capability is not None and capability[0] == 8


def _torch_cutlass_compress(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        sparse = to_sparse_semi_structured(core)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return sparse.packed, sparse.meta


CUTLASS_OPS = RawSparseOps(
    compress=_torch_cutlass_compress,
    mm=lambda packed, meta, dense_t: torch._sparse_semi_structured_mm(packed, meta, dense_t),
    device_ok=_cutlass_device_ok,
)


def _cutlass_compress(core: torch.Tensor) -> list[torch.Tensor]:
    packed, meta = CUTLASS_OPS.compress(core)
    return [packed, meta]


def _cutlass_matmul(stored: list[torch.Tensor], h: torch.Tensor, bias: torch.Tensor | None, opts=None) -> torch.Tensor:
    y_t = CUTLASS_OPS.mm(stored[0], stored[1], h.t())  # (rows, T)
    if bias is not None:
        y_t = y_t + bias[:, None]
    return y_t.t().contiguous()  # the kernel's result is column-major for (T, rows): make it row-major


CUTLASS = CoreBackend(
    name="cutlass",
    compress=_cutlass_compress,
    matmul=_cutlass_matmul,
    available=lambda device: CUTLASS_OPS.device_ok(device),
    dtypes=HALF_DTYPES,
    token_multiple=8,
    row_multiple=32,
    col_multiple=64,
)


# ---------------------------------------------------------------------------------------------
# cpu24: our CPU kernel that reads the compressed form (kernels.cpu_sparse; AVX-512 / AVX2 / scalar)


def _cpu24_ok(device: torch.device) -> bool:
    if torch.device(device).type != "cpu":
        return False
    from armor_vllm.kernels import cpu_sparse

    return cpu_sparse.available()


def _cpu24_compress(core: torch.Tensor) -> list[torch.Tensor]:
    from armor_vllm.kernels import cpu_sparse

    packed = cpu_sparse.pack(core, core.dtype)
    return [packed.values, packed.meta, torch.tensor([packed.n, packed.k], dtype=torch.int64)]


def _cpu24_matmul(stored: list[torch.Tensor], h: torch.Tensor, bias: torch.Tensor | None, opts=None) -> torch.Tensor:
    from armor_vllm.kernels import cpu_sparse

    n, k = (int(v) for v in stored[2].tolist())
    return cpu_sparse.sparse24_linear(h, cpu_sparse.PackedCore(stored[0], stored[1], n, k), bias)


CPU24 = CoreBackend(
    name="cpu24",
    compress=_cpu24_compress,
    matmul=_cpu24_matmul,
    available=_cpu24_ok,
    dtypes=(torch.float32, torch.bfloat16),
    col_multiple=4,
    sparse=False,  # no library contract on the bias (alignment, dtype) to meet
)


BACKENDS: dict[str, CoreBackend] = {b.name: b for b in (CUSPARSELT, CUTLASS, DENSE, CPU24)}
SPARSE_BACKENDS = ("cusparselt", "cutlass")  # the GPU 2:4 libraries, in preference order


def get_backend(name: str) -> CoreBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown ARMOR core backend {name!r}; known: {', '.join(BACKENDS)}") from None


def usable_sparse_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The sparse backends that can run ``dtype`` on ``device``, in preference order."""
    device = torch.device(device)
    return [n for n in SPARSE_BACKENDS if BACKENDS[n].available(device) and BACKENDS[n].supports(dtype)]


def any_sparse_backend(device: torch.device) -> bool:
    device = torch.device(device)
    return any(BACKENDS[n].available(device) for n in SPARSE_BACKENDS)


__all__ = [
    "BACKENDS",
    "CSLT_OPS",
    "CUSPARSELT",
    "CUTLASS",
    "CUTLASS_OPS",
    "CPU24",
    "CoreBackend",
    "DENSE",
    "HALF_DTYPES",
    "RawSparseOps",
    "SPARSE_BACKENDS",
    "any_sparse_backend",
    "get_backend",
    "usable_sparse_backends",
]
