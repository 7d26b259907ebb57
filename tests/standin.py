"""CPU stand-ins for the raw 2:4 ops of cuSPARSELt and CUTLASS, for tests only.

The CI machine has no GPU, yet the serving path that users run is the CUDA one: the factored kernel
with a sparse core backend, its padding, its wrappers, the custom op, vLLM's compiled mode, tensor
parallelism. ``install()`` puts CPU emulations in place of the device-level calls of
``kernels.backends`` (``CSLT_OPS`` / ``CUTLASS_OPS``) and declares them available on the CPU, so
that every line of the backends' glue code and of the kernel runs on CPU, checked against the same
contract as the real library:

- ``compress`` takes only a 2:4 core in fp16/bf16 whose shape meets the library's multiples, and
  really packs it (cuSPARSELt: one 1-D buffer of kept values + 2-bit positions IN THE CORE'S DTYPE,
  as ``torch._cslt_compress`` returns; CUTLASS: PyTorch's own CUTLASS value/metadata layout);
- every matmul refuses what the libraries refuse: a dense operand that is neither contiguous nor
  transposed-contiguous with leading dimension ``k`` (``(k, T)`` with strides ``(T, 1)`` or
  ``(1, k)``), of another dtype than the sparse operand, with a token count or ``k`` not a multiple
  of 8, or any operand (packed, dense, bias) whose address is not 16-byte aligned; a bias that is
  not a contiguous 1-D tensor of the output dtype and length;
- the cuSPARSELt matmul takes ``alg_id`` in ``range(ALG_COUNT)`` and ``split_k >= 1`` (recorded in
  ``KWARGS``), and returns the transposed result as a fresh row-major ``(T, rows)`` tensor with the
  bias fused; ``cslt_search`` stands in for ``torch._cslt_sparse_mm_search`` (same checks; a
  deterministic algorithm per token count);
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
ALIGNMENT = 16  # bytes
ALG_COUNT = 3  # algorithms the stand-in "library" offers (alg_id 0..2)
_DECODED: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
_SAVED: dict[str, tuple] = {}
CALLS: list[tuple[str, tuple[int, ...]]] = []  # (backend, dense operand shape) of every matmul
KWARGS: list[dict] = []  # the cuSPARSELt options of every cuSPARSELt matmul: {"tokens", "alg_id", "split_k"}


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


def _check_aligned(what: str, t: torch.Tensor) -> None:
    if t.data_ptr() % ALIGNMENT:
        raise RuntimeError(f"stand-in: {what} address is not {ALIGNMENT}-byte aligned")


def _check_dense(dense_t: torch.Tensor, dtype: torch.dtype, k_expected: int | None = None) -> None:
    if dense_t.dim() != 2:
        raise RuntimeError(f"stand-in: dense operand must be 2-D, got {tuple(dense_t.shape)}")
    k, n_tokens = dense_t.shape
    if dense_t.dtype != dtype:
        raise RuntimeError(f"stand-in: dense operand {dense_t.dtype}, sparse operand {dtype}")
    if n_tokens % TOKEN_MULTIPLE or k % TOKEN_MULTIPLE:
        raise RuntimeError(
            f"stand-in: dense operand {tuple(dense_t.shape)} must be padded to multiples of {TOKEN_MULTIPLE}"
        )
    if k_expected is not None and k != k_expected:
        raise RuntimeError(f"stand-in: dense operand has {k} rows, the sparse operand {k_expected} columns")
    if dense_t.stride() not in ((n_tokens, 1), (1, k)):
        raise RuntimeError(
            f"stand-in: dense operand {tuple(dense_t.shape)} has strides {dense_t.stride()}: it must be row-major "
            f"(strides ({n_tokens}, 1)) or column-major with leading dimension k (strides (1, {k}))"
        )
    _check_aligned("dense operand", dense_t)


def _check_bias(bias: torch.Tensor | None, rows: int, dtype: torch.dtype) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != rows or bias.dtype != dtype or bias.stride() != (1,):
        raise RuntimeError(
            f"stand-in: bias must be a contiguous ({rows},) tensor of {dtype}, got {tuple(bias.shape)} "
            f"{bias.dtype} strides {bias.stride()}"
        )
    _check_aligned("bias", bias)


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
    raw = torch.cat([header, values.contiguous().view(torch.uint8).reshape(-1), packed_pos.reshape(-1)])
    raw = torch.cat([raw, raw.new_zeros((-raw.numel()) % core.element_size())])
    return raw.view(core.dtype)  # like torch._cslt_compress: a 1-D tensor of the core's dtype


def cslt_decode(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype not in backends.HALF_DTYPES or packed.dim() != 1:
        raise RuntimeError(f"stand-in: not a cuSPARSELt-compressed tensor ({packed.dtype}, {tuple(packed.shape)})")
    packed = packed.view(torch.uint8)
    rows, cols, code, _ = (int(v) for v in packed[:16].view(torch.int32))
    dtype = backends.HALF_DTYPES[code]
    value_bytes = rows * cols // 2 * dtype.itemsize
    values = packed[16 : 16 + value_bytes].view(dtype).reshape(rows, cols // 2)
    pos_bytes = packed[16 + value_bytes : 16 + value_bytes + rows * cols // 2 // 4]
    positions = torch.stack([(pos_bytes >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(rows, cols // GROUP, KEEP)
    core = torch.zeros(rows, cols // GROUP, GROUP, dtype=dtype)
    core.scatter_(2, positions.long(), values.reshape(rows, cols // GROUP, KEEP))
    return core.reshape(rows, cols)


def _cslt_checked(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check_aligned("compressed operand", packed)
    core = _cached(packed, lambda: cslt_decode(packed))
    _check_dense(dense_t, core.dtype, core.shape[1])
    _check_bias(bias, core.shape[0], core.dtype)
    return core


def cslt_mm(
    packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, alg_id: int = 0, split_k: int = 1
) -> torch.Tensor:
    core = _cslt_checked(packed, dense_t, bias)
    if not (isinstance(alg_id, int) and 0 <= alg_id < ALG_COUNT) or not (isinstance(split_k, int) and split_k >= 1):
        raise RuntimeError(f"stand-in: invalid alg_id {alg_id!r} / split_k {split_k!r}")
    CALLS.append(("cusparselt", tuple(dense_t.shape)))
    KWARGS.append({"tokens": int(dense_t.shape[1]), "alg_id": alg_id, "split_k": split_k})
    with torch.profiler.record_function("standin::cslt_sparse_mm"):  # one node for launch counts
        out = torch.nn.functional.linear(dense_t.t(), core, bias)  # (T, rows)
        return out.contiguous()


def cslt_search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The stand-in of ``torch._cslt_sparse_mm_search``: the same checks, and a deterministic
    "fastest" algorithm per token count (0 up to 8 tokens, 1 up to 64, 2 above)."""
    _cslt_checked(packed, dense_t, bias)
    n_tokens = dense_t.shape[1]
    return 0 if n_tokens <= 8 else 1 if n_tokens <= 64 else 2


# ---------------------------------------------------------------------------------------------
# CUTLASS: PyTorch's own (pure torch) conversion to the CUTLASS value/metadata layout


def cutlass_compress(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    _check_core(core, 32, 64)
    return sparse_semi_structured_from_dense_cutlass(core)


def cutlass_mm(packed: torch.Tensor, meta: torch.Tensor, dense_t: torch.Tensor) -> torch.Tensor:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    _check_aligned("packed values", packed)
    _check_aligned("metadata", meta)
    core = _cached(packed, lambda: sparse_semi_structured_to_dense_cutlass(packed, meta))
    _check_dense(dense_t, core.dtype, core.shape[1])
    CALLS.append(("cutlass", tuple(dense_t.shape)))
    with torch.profiler.record_function("standin::sparse_semi_structured_mm"):
        return core @ dense_t  # (rows, T), row-major: the transposed layout of what the caller wants


# ---------------------------------------------------------------------------------------------


def _cpu_or(real):
    return lambda device: torch.device(device).type == "cpu" or real(device)


def install() -> None:
    """Replace the raw sparse ops by the CPU emulations (idempotent)."""
    if _SAVED:
        return
    for name, ops, compress, mm, search in (
        ("cusparselt", backends.CSLT_OPS, cslt_compress, cslt_mm, cslt_search),
        ("cutlass", backends.CUTLASS_OPS, cutlass_compress, cutlass_mm, None),
    ):
        _SAVED[name] = (ops.compress, ops.mm, ops.device_ok, ops.search)
        ops.compress, ops.mm, ops.device_ok, ops.search = compress, mm, _cpu_or(ops.device_ok), search


def uninstall() -> None:
    for name, ops in (("cusparselt", backends.CSLT_OPS), ("cutlass", backends.CUTLASS_OPS)):
        if name in _SAVED:
            ops.compress, ops.mm, ops.device_ok, ops.search = _SAVED.pop(name)
    _DECODED.clear()


def installed() -> bool:
    return bool(_SAVED)
