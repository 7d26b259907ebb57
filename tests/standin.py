"""CPU stand-ins for the raw 2:4 ops of cuSPARSELt and CUTLASS, for tests only.

The CI machine has no GPU, yet the serving path that users run is the CUDA one: the factored kernel
with a sparse core backend, its padding, its wrappers, the custom op, vLLM's compiled mode, tensor
parallelism. ``install()`` puts CPU emulations in place of the device-level calls of
``kernels.backends`` (``CSLT_OPS`` / ``CUTLASS_OPS``) and declares them available on the CPU, so
that every line of the backends' glue code and of the kernel runs on CPU, checked against the same
contract as the real library:

- ``compress`` takes only a 2:4 core in fp16/bf16 whose shape meets the library's multiples, and
  really packs it (cuSPARSELt: one buffer of kept values + 2-bit positions; CUTLASS: PyTorch's own
  CUTLASS value/metadata layout);
- the cuSPARSELt matmul refuses a dense operand whose token count is not a multiple of 8, and
  returns the transposed result as a fresh row-major ``(T, rows)`` tensor with the bias fused;
- the CUTLASS matmul returns ``(rows, T)`` as the real op does, leaving the caller to transpose.

Nothing outside the tests calls ``install``: it is reached through ``tests/standin_site``
(a ``sitecustomize`` that the vLLM tests put on ``PYTHONPATH``, so that vLLM's worker processes get
the stand-ins too) and through test fixtures. The packed forms are decoded once per stored tensor and
cached, to keep CPU tests fast.
"""

from __future__ import annotations

import weakref

import torch

from armor_vllm.core.factorization import GROUP, KEEP, first_24_violation, kept_mask
from armor_vllm.kernels import backends

TOKEN_MULTIPLE = 8
_DECODED: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
_SAVED: dict[str, tuple] = {}
CALLS: list[tuple[str, tuple[int, ...]]] = []  # (backend, dense operand shape) of every matmul


def _cached(packed: torch.Tensor, decode) -> torch.Tensor:
    entry = _DECODED.get(id(packed))
    if entry is not None and entry[0]() is packed:
        return entry[1]
    dense = decode()
    _DECODED[id(packed)] = (weakref.ref(packed), dense)
    return dense


def _check_core(core: torch.Tensor, rows_multiple: int, cols_multiple: int) -> None:
    if core.dtype not in backends.HALF_DTYPES:
        raise RuntimeError(f"stand-in: 2:4 compression needs fp16/bf16, got {core.dtype}")
    rows, cols = core.shape
    if rows % rows_multiple or cols % cols_multiple:
        raise RuntimeError(
            f"stand-in: core shape {tuple(core.shape)} is not a multiple of ({rows_multiple}, {cols_multiple})"
        )
    bad = first_24_violation(core)
    if bad is not None:
        raise RuntimeError(f"stand-in: core is not 2:4 (row {bad[0]}, columns {bad[1]}..{bad[1] + 3})")


def _check_dense(dense_t: torch.Tensor, dtype: torch.dtype) -> None:
    k, n_tokens = dense_t.shape
    if dense_t.dtype != dtype:
        raise RuntimeError(f"stand-in: dense operand {dense_t.dtype}, sparse operand {dtype}")
    if n_tokens % TOKEN_MULTIPLE or k % TOKEN_MULTIPLE:
        raise RuntimeError(
            f"stand-in: dense operand {tuple(dense_t.shape)} must be padded to multiples of {TOKEN_MULTIPLE}"
        )


# ---------------------------------------------------------------------------------------------
# cuSPARSELt: packed = [16-byte header | kept values as bytes | positions, 2 bits each, as bytes]


def cslt_compress(core: torch.Tensor) -> torch.Tensor:
    _check_core(core, 16, 16)
    rows, cols = core.shape
    mask = kept_mask(core)
    values = core[mask].reshape(rows, cols // 2)
    positions = mask.reshape(rows, cols // GROUP, GROUP).nonzero()[:, 2].to(torch.uint8)  # 2 per group
    packed_pos = positions.reshape(-1, 4)
    packed_pos = packed_pos[:, 0] | (packed_pos[:, 1] << 2) | (packed_pos[:, 2] << 4) | (packed_pos[:, 3] << 6)
    header = torch.tensor([rows, cols, backends.HALF_DTYPES.index(core.dtype), 0], dtype=torch.int32).view(torch.uint8)
    return torch.cat([header, values.contiguous().view(torch.uint8).reshape(-1), packed_pos.reshape(-1)])


def cslt_decode(packed: torch.Tensor) -> torch.Tensor:
    rows, cols, code, _ = (int(v) for v in packed[:16].view(torch.int32))
    dtype = backends.HALF_DTYPES[code]
    value_bytes = rows * cols // 2 * dtype.itemsize
    values = packed[16 : 16 + value_bytes].view(dtype).reshape(rows, cols // 2)
    pos_bytes = packed[16 + value_bytes :]
    positions = torch.stack([(pos_bytes >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(rows, cols // GROUP, KEEP)
    core = torch.zeros(rows, cols // GROUP, GROUP, dtype=dtype)
    core.scatter_(2, positions.long(), values.reshape(rows, cols // GROUP, KEEP))
    return core.reshape(rows, cols)


def cslt_mm(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    core = _cached(packed, lambda: cslt_decode(packed))
    _check_dense(dense_t, core.dtype)
    CALLS.append(("cusparselt", tuple(dense_t.shape)))
    out = torch.nn.functional.linear(dense_t.t(), core, bias)  # (T, rows)
    return out.contiguous()


# ---------------------------------------------------------------------------------------------
# CUTLASS: PyTorch's own (pure torch) conversion to the CUTLASS value/metadata layout


def cutlass_compress(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    _check_core(core, 32, 64)
    return sparse_semi_structured_from_dense_cutlass(core)


def cutlass_mm(packed: torch.Tensor, meta: torch.Tensor, dense_t: torch.Tensor) -> torch.Tensor:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    core = _cached(packed, lambda: sparse_semi_structured_to_dense_cutlass(packed, meta))
    _check_dense(dense_t, core.dtype)
    CALLS.append(("cutlass", tuple(dense_t.shape)))
    return core @ dense_t  # (rows, T), row-major: the transposed layout of what the caller wants


# ---------------------------------------------------------------------------------------------


def _cpu_or(real):
    return lambda device: torch.device(device).type == "cpu" or real(device)


def install() -> None:
    """Replace the raw sparse ops by the CPU emulations (idempotent)."""
    if _SAVED:
        return
    for name, ops, compress, mm in (
        ("cusparselt", backends.CSLT_OPS, cslt_compress, cslt_mm),
        ("cutlass", backends.CUTLASS_OPS, cutlass_compress, cutlass_mm),
    ):
        _SAVED[name] = (ops.compress, ops.mm, ops.device_ok)
        ops.compress, ops.mm, ops.device_ok = compress, mm, _cpu_or(ops.device_ok)


def uninstall() -> None:
    for name, ops in (("cusparselt", backends.CSLT_OPS), ("cutlass", backends.CUTLASS_OPS)):
        if name in _SAVED:
            ops.compress, ops.mm, ops.device_ok = _SAVED.pop(name)
    _DECODED.clear()


def installed() -> bool:
    return bool(_SAVED)
