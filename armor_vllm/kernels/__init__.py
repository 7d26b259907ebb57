"""Execution kernels for an ARMOR linear: how ``y = A (S (B x)) + bias`` is computed on a device.

The vLLM plugin loads and validates the checkpoint tensors into ``ArmorShards`` and hands them to one
kernel's ``prepare`` once, after loading; ``apply`` then runs on every forward. The pieces:

- ``folded``: ``A · S · B`` multiplied out at load into one dense weight (``kernels.folded``);
- ``factored``: ``B``, core, ``A`` kept apart and run as one custom op (``kernels.factored``,
  ``kernels.linear_op``), with a core backend from ``kernels.backends`` (dense, cuSPARSELt,
  CUTLASS), wrappers from ``kernels.blockdiag`` / ``kernels.triton_blockdiag``, and per-shape plans
  from ``kernels.plan``.

``select_kernel(mode, device)`` maps the user's ``ARMOR_VLLM_KERNEL`` to one:

=================  =========================================================================
mode               kernel
=================  =========================================================================
``auto``           factored with measured backend/plan where a 2:4 backend can run (CUDA
                   sm80+); on a CPU where the C++ kernel builds, ``cpu24`` for layers whose
                   wrappers are small (plain 2:4 always), folded for the others; folded elsewhere
``folded``         folded (``dense`` is an older name for it)
``factored``       factored with the core as a dense matmul (any device)
``cusparselt``,    factored with that 2:4 backend; where it cannot run, the next one
``cutlass``        (cusparselt -> cutlass -> folded) with a warning
=================  =========================================================================

Imports only torch (and triton lazily), never vLLM.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from armor_vllm.kernels.backends import SPARSE_BACKENDS, any_sparse_backend, get_backend
from armor_vllm.kernels.base import ArmorKernel, ArmorShards
from armor_vllm.kernels.factored import FactoredKernel
from armor_vllm.kernels.folded import FoldedKernel
from armor_vllm.kernels.plan import KernelPlan

KERNEL_MODES = ("auto", "folded", "factored", *SPARSE_BACKENDS, "cpu24", "dense")
# auto on a CPU: cpu24 for a layer whose wrappers hold at most this share of the dense numbers.
# Measured (benchmarks/cpu_linear.py, 2 threads, Zen 4): Llama-3-8B shapes at bs 64 (wrappers 3-6%)
# run 2.2-3.2x dense at 1 token and 1.2-1.8x at 4; SmolLM2's 576-wide layers (13-44%) 0.5-1.1x.
CPU24_MAX_WRAPPER_SHARE = 0.08


def select_kernel(
    mode: str,
    device: torch.device | str,
    key: str | None = None,
    agree: Callable[[KernelPlan], KernelPlan] | None = None,
    max_tokens: int | None = None,
) -> ArmorKernel:
    """The kernel for ``mode`` on ``device`` (``key``: the op's layer name; ``agree``: how
    tensor-parallel ranks settle on one measured plan; ``max_tokens``: the largest token count a
    forward will carry, checked at load). Unknown names raise."""
    device = torch.device(device)
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown ARMOR kernel {mode!r}; known: {', '.join(KERNEL_MODES)}")
    if mode in ("folded", "dense"):
        return FoldedKernel(key=key)
    if mode == "factored":
        return FactoredKernel(backend="dense", device=device, key=key, max_tokens=max_tokens)
    if mode == "cpu24":
        if not get_backend("cpu24").available(device):
            warnings.warn(
                f"ARMOR kernel 'cpu24' needs a CPU where the C++ 2:4 kernel builds; running 'folded' on {device}"
            )
            return FoldedKernel(key=key)
        return FactoredKernel(backend="cpu24", device=device, key=key, max_tokens=max_tokens)
    sparse_here = any_sparse_backend(device)  # the GPU 2:4 libraries (or their CPU stand-ins in tests)
    if mode == "auto" and not sparse_here and device.type == "cpu" and get_backend("cpu24").available(device):
        # the compressed form where it reads fewer bytes than dense by enough to win (BENCHMARKS.md,
        # CPU kernel): every plain 2:4 layer, ARMOR layers whose wrappers are small; others folded
        return FactoredKernel(
            backend="cpu24", device=device, key=key, max_tokens=max_tokens, max_wrapper_share=CPU24_MAX_WRAPPER_SHARE
        )
    if not sparse_here:
        if mode != "auto":
            warnings.warn(f"ARMOR kernel {mode!r} needs a CUDA GPU with 2:4 support; running 'folded' on {device}")
        return FoldedKernel(key=key)
    return FactoredKernel(backend=mode, device=device, key=key, agree=agree, max_tokens=max_tokens)


__all__ = ["ArmorKernel", "ArmorShards", "FactoredKernel", "FoldedKernel", "KERNEL_MODES", "select_kernel"]
