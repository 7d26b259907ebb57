"""A fused Triton kernel applying block-diagonal wrappers in one pass.

``blockdiag_triton(x, wt, shards, bias)`` computes the same thing as ``blockdiag.blockdiag_bmm``: for every
input block ``j`` and shard ``s``, ``y_s[:, j] = x[:, j] @ wt[j][:, s*bs:(s+1)*bs] (+ bias)``. One
program handles one (token tile, block, shard) and writes straight into the final layout, so the
stacked multi-shard case needs no permute/copy afterwards (the bmm path needs one). Whether it is
faster than cuBLAS batched matmuls is decided by measurement (``kernels.plan``, or
``benchmarks/cuda_linear.py``), not assumed, and a plan that uses it is checked against the
reference maths before it serves.

One program holds a ``(BLOCK_T, bs)`` tile of ``x`` and a ``(bs, bs)`` block in registers/shared
memory; block sizes above ``MAX_BLOCK`` (128) would exceed shared memory at these tile sizes, so they
are refused (the batched-matmul path serves them).

Imports ``triton`` at module import: ``kernels.blockdiag`` imports this module lazily. Runs on CPU
under ``TRITON_INTERPRET=1`` (the tests use that; the interpreter's bf16 dot is wrong, so the CPU
tests use fp32 and fp16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _blockdiag_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    n_tokens,
    stride_xt,
    stride_wj,
    stride_wi,
    stride_ys,
    stride_yt,
    BS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    j = tl.program_id(1)  # diagonal block
    s = tl.program_id(2)  # shard (column group of the stacked weight)
    # int64 offsets: token x stride reaches 2**31 elements at T * d >= 2**31 (e.g. 131072 x 16384)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.arange(0, BS)
    j64 = j.to(tl.int64)
    s64 = s.to(tl.int64)
    row_ok = rows[:, None] < n_tokens
    x = tl.load(x_ptr + rows[:, None] * stride_xt + (j64 * BS + cols)[None, :], mask=row_ok, other=0.0)
    # weight block j, shard s: (bs_in, bs_out) at columns s*BS .. s*BS+BS-1 of wt[j]
    w = tl.load(w_ptr + j64 * stride_wj + cols[:, None] * stride_wi + (s64 * BS + cols)[None, :])
    # float32 accumulation; "ieee": float32 inputs are NOT rounded to TF32 (Triton's default on
    # tensor cores), so fp32 layers keep fp32 accuracy (fp16/bf16 inputs are unaffected)
    acc = tl.dot(x, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j64 * BS + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + s64 * stride_ys + rows[:, None] * stride_yt + (j64 * BS + cols)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


MIN_BLOCK, MAX_BLOCK = 16, 128


def supported(block_size: int) -> bool:
    """``tl.arange`` needs a power of two, ``tl.dot`` at least 16; above 128 the tiles outgrow
    shared memory."""
    return MIN_BLOCK <= block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0


def runs_on(device: torch.device) -> bool:
    """CUDA devices, or any device when Triton's CPU interpreter is switched on."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def token_tile(n_tokens: int) -> int:
    """Token rows per program: small tiles at decode, 64 for prefill."""
    return 16 if n_tokens <= 16 else 32 if n_tokens <= 32 else 64


def blockdiag_triton(
    x: torch.Tensor, wt: torch.Tensor, shards: int = 1, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (T, n*bs) contiguous rows; ``wt`` (n, bs, shards*bs) = the transposed blocks of every
    shard side by side. Returns (T, n*bs) for one shard, else (shards, T, n*bs)."""
    n, bs, width = wt.shape
    if width != shards * bs or x.shape[-1] != n * bs:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, wt {tuple(wt.shape)}, shards {shards}")
    if not supported(bs):
        raise ValueError(f"block size {bs} not supported by the Triton kernel ({MIN_BLOCK}..{MAX_BLOCK}, power of two)")
    if bias is not None and shards != 1:
        raise ValueError("bias is only supported for a single shard")
    if x.stride(-1) != 1 or wt.stride(-1) != 1:
        raise ValueError("x and wt need unit stride in their last dimension")
    n_tokens = x.shape[0]
    y = x.new_empty((shards, n_tokens, n * bs))
    tile = token_tile(n_tokens)
    grid = (triton.cdiv(n_tokens, tile), n, shards)
    _blockdiag_kernel[grid](
        x,
        wt,
        bias if bias is not None else x,  # unused pointer when HAS_BIAS is False
        y,
        n_tokens,
        x.stride(0),
        wt.stride(0),
        wt.stride(1),
        y.stride(0),
        y.stride(1),
        BS=bs,
        BLOCK_T=tile,
        HAS_BIAS=bias is not None,
        num_warps=4 if bs <= 64 else 8,
    )
    return y[0] if shards == 1 else y
