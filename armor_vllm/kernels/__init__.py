"""Execution kernels for an ARMOR linear: how ``y = A (S (B x)) + bias`` is computed on a device.

The vLLM plugin loads and validates the checkpoint tensors into ``ArmorShards`` and hands them to
one kernel's ``prepare`` once, after loading; ``apply`` then runs on every forward. Kernels:

- ``folded`` (CPU default): multiply ``A · S · B`` out at load time into one dense weight; the speed
  of the dense model, the memory of the dense model.
- ``factored``: keep ``A``, ``S`` and ``B`` apart and apply the wrappers as batched small matmuls
  around the 2:4 core (a dense matmul on CPU, which has no 2:4 hardware).
- CUDA (``kernels.cuda``, imports only torch): ``auto``, ``cusparselt``, ``cutlass``, ``dense``.

``select_kernel(mode, device)`` picks one by name.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

from armor_vllm.kernels.base import ArmorKernel, ArmorShards
from armor_vllm.kernels.cpu import FactoredKernel, FoldedKernel
from armor_vllm.kernels.cuda import MODES as _CUDA_MODES
from armor_vllm.kernels.cuda import CudaArmorKernel

CPU_KERNELS: dict[str, type[ArmorKernel]] = {"folded": FoldedKernel, "factored": FactoredKernel}
CUDA_KERNELS: dict[str, Callable[[], ArmorKernel]] = {
    mode: functools.partial(CudaArmorKernel, backend=mode) for mode in _CUDA_MODES
}


def select_kernel(mode: str, device: torch.device | str) -> ArmorKernel:
    """The kernel for ``mode`` on ``device``. Unknown names raise. CPU modes run anywhere (pure
    torch); a CUDA mode on a non-CUDA device falls back to ``folded`` (with a warning, except for
    ``auto``, whose CPU meaning is ``folded``)."""
    device = torch.device(device)
    if mode in CPU_KERNELS:
        return CPU_KERNELS[mode]()
    if mode not in CUDA_KERNELS:
        known = ", ".join([*CPU_KERNELS, *CUDA_KERNELS])
        raise ValueError(f"unknown ARMOR kernel {mode!r}; known: {known}")
    if device.type != "cuda":
        if mode != "auto":
            warnings.warn(f"ARMOR kernel {mode!r} needs CUDA, running 'folded' on {device}")
        return FoldedKernel()
    return CudaArmorKernel(backend=mode, device=device)


__all__ = [
    "ArmorKernel",
    "ArmorShards",
    "CPU_KERNELS",
    "CUDA_KERNELS",
    "CudaArmorKernel",
    "FactoredKernel",
    "FoldedKernel",
    "select_kernel",
]
