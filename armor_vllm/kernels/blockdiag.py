"""Block-diagonal wrappers at serving time: ``A`` and ``B`` applied to a ``(T, n*bs)`` activation.

The maths is ``factorization.apply_block_diag`` (each ``bs``-slice of the input times its own block).
Here it is laid out for speed: the blocks of one or several shards (fused q/k/v, gate/up with
distinct ``B``) are stacked once at load into one operand ``(n, bs, shards*bs)`` (``stack_wrappers``)
so that a single batched matmul applies every shard's wrapper. ``impl="triton"`` runs the fused
Triton kernel of ``triton_blockdiag`` instead (same contract, no permute copy); ``impl="cpu"`` the C++
loop of ``cpu_sparse.blockdiag`` (CPU, few tokens: up to ``cpu_sparse.CPU_WRAPPER_MAX_TOKENS``).

Nothing writes through ``out=`` into strided views: ``torch.compile`` refuses non-contiguous
``out=`` tensors, and the result here is always a fresh contiguous tensor.
"""

from __future__ import annotations

import torch

from armor_vllm.kernels import cpu_sparse

IMPLS = ("bmm", "triton", "cpu")


def stack_wrappers(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks of several shards ``[(n, bs, bs)] * k`` as one ``(n, bs, k*bs)`` operand: block ``j``
    holds ``[D_1j^T | D_2j^T | ...]``, so ``x_j @ operand_j`` gives every shard's ``D_sj x_j``."""
    return torch.cat([b.transpose(1, 2) for b in blocks], dim=2).contiguous()


def blockdiag_bmm(x: torch.Tensor, wt: torch.Tensor, shards: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal wrappers as one batched matmul. ``x`` (T, n*bs) contiguous, ``wt`` from
    ``stack_wrappers``. One shard: (T, n*bs) (+ bias, fused through ``baddbmm``); several:
    (shards, T, n*bs). One copy brings the batched result back to row-major tokens."""
    n_tokens = x.shape[0]
    n, bs, width = wt.shape
    xb = x.view(n_tokens, n, bs).transpose(0, 1)  # (n, T, bs), strided: cuBLAS takes the strides
    if shards == 1:
        yb = torch.bmm(xb, wt) if bias is None else torch.baddbmm(bias.view(n, 1, bs), xb, wt)
        return yb.transpose(0, 1).reshape(n_tokens, n * bs)
    if bias is not None:
        raise ValueError("bias is only supported for a single shard")
    yb = torch.bmm(xb, wt)  # (n, T, shards*bs)
    return yb.view(n, n_tokens, shards, bs).permute(2, 1, 0, 3).reshape(shards, n_tokens, n * bs)


def blockdiag_rows(
    x: torch.Tensor, wt: torch.Tensor, shards: int = 1, bias: torch.Tensor | None = None, rows: int | None = None
) -> torch.Tensor:
    """``blockdiag_bmm`` with fewer launches, for the body of the custom op only: the batched matmul
    writes straight into the row-major result (``out=`` a strided view: cuBLAS takes the strides; never
    under ``torch.compile``, which refuses that, but the op's body is never traced), and the result
    has ``rows >= T`` rows, the rows past ``T`` left unset (token padding for the core backend
    without a separate pad: they only ever produce output rows that are sliced away, since every
    product here is row-wise). One shard: one launch; several: the matmul and one copy."""
    n_tokens = x.shape[0]
    n, bs, width = wt.shape
    rows = n_tokens if rows is None else rows
    xb = x.view(n_tokens, n, bs).transpose(0, 1)
    if shards == 1:
        y = x.new_empty((rows, n * bs))
        out = y[:n_tokens].view(n_tokens, n, bs).transpose(0, 1)
        if bias is None:
            torch.bmm(xb, wt, out=out)
        else:
            torch.baddbmm(bias.view(n, 1, bs), xb, wt, out=out)
        return y
    if bias is not None:
        raise ValueError("bias is only supported for a single shard")
    yb = torch.bmm(xb, wt)  # (n, T, shards*bs)
    y = x.new_empty((shards, rows, n * bs))
    y[:, :n_tokens].view(shards, n_tokens, n, bs).copy_(yb.view(n, n_tokens, shards, bs).permute(2, 1, 0, 3))
    return y


def triton_supported(block_size: int, device: torch.device) -> bool:
    """Whether the Triton kernel can run this block size here (an importable Triton, a power-of-two
    block size within the kernel's bounds, and a CUDA device unless Triton's CPU interpreter is on)."""
    try:
        from armor_vllm.kernels import triton_blockdiag
    except Exception:  # noqa: BLE001 - no triton, or a broken install: the bmm path serves
        return False
    return triton_blockdiag.supported(block_size) and triton_blockdiag.runs_on(device)


def blockdiag(x, wt, shards: int = 1, bias=None, impl: str = "bmm"):
    """``blockdiag_bmm``, the Triton kernel or the CPU extension's loop (same contract)."""
    if impl == "cpu":
        return cpu_sparse.blockdiag(x, wt, shards, bias)
    if impl == "triton":
        from armor_vllm.kernels.triton_blockdiag import blockdiag_triton

        return blockdiag_triton(x, wt, shards, bias)
    return blockdiag_bmm(x, wt, shards, bias)
