"""Output-aware targets (``--output-target dense``): what each matrix is compressed to reproduce.

In sequential order a matrix ``W`` sees inputs ``X_s`` that already carry the error of everything
compressed before it. The default (``layer``) compresses it to match the dense matrix on those inputs,
``||Ŵ X_s - W X_s||²``. ``dense`` matches the dense *model* instead, ``||Ŵ X_s - W X_d||²``, with ``X_d``
the dense model's own inputs to that matrix: each matrix then also corrects the error that reaches it.

With ``H = X_sᵀ X_s`` and ``C = X_dᵀ X_s`` (both scaled by ``2/N``) that loss is, up to a constant,
``tr((Ŵ - W̃) H (Ŵ - W̃)ᵀ)`` for ``W̃ = W C H⁻¹``. So every method that minimises the output error
against a weight (SparseGPT, ARMOR's full objective) runs unchanged on ``W̃``.

Matching the dense model alone asks each matrix to undo, linearly, every error upstream of it, and
on the embedded model that overfits the calibration set badly (BENCHMARKS.md, section 1: at
``mix = 1`` the target moves 49% of the weight's norm on average and perplexity rises 10x; at 0.25,
6%, and perplexity falls 8-10% on every text). So the loss mixes both terms, with ``mix``
the share of the dense-model term (GPTAQ-style asymmetric calibration), and ``H`` is damped as
SparseGPT damps it (``λ = damp · mean diag H``), the damping pulling towards ``W``:

    min  mix ||Ŵ X_s - W X_d||² + (1 - mix) ||Ŵ X_s - W X_s||² + λ ||Ŵ - W||²
    W̃ = W (mix C + (1 - mix) H + λI) (H + λI)⁻¹

which is ``W`` exactly when ``mix = 0`` or ``X_d = X_s``.
"""

from __future__ import annotations

import torch

from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.methods.sparsegpt import damped_hessian

OUTPUT_TARGETS = ("layer", "dense")
DEFAULT_MIX = 0.25


def check_mix(mix) -> float:
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 < mix <= 1:
        raise ValueError(f"--output-target-mix must be a number in (0, 1], got {mix!r}")
    return float(mix)


def dense_output_target(
    weight: torch.Tensor, stats: InputStats, damp: float = 0.01, mix: float = DEFAULT_MIX
) -> torch.Tensor:
    """``W̃ = W (mix C + (1 - mix) H + λI)(H + λI)⁻¹`` (module docstring) in ``weight``'s dtype;
    needs ``stats.cross`` and ``stats.xtx``."""
    if stats.cross is None or stats.xtx is None:
        raise ValueError("--output-target dense needs the cross statistics X_dense^T X of the dense model's inputs")
    scale = 2.0 / max(stats.n_tokens, 1)
    hessian = scale * stats.xtx.to(torch.float64)
    damped, _ = damped_hessian(hessian, damp)
    lam = torch.diagonal(damped) - torch.diagonal(hessian)  # λ, and 1 + λ on dead channels
    cross = scale * stats.cross.to(device=damped.device, dtype=torch.float64)
    cross = check_mix(mix) * cross + (1 - mix) * hessian + torch.diag(lam)
    w = weight.to(device=damped.device, dtype=torch.float64)
    # W̃ᵀ = (H + λI)⁻¹ (C + λI)ᵀ Wᵀ, by Cholesky of the (symmetric, positive definite) damped H
    chol = torch.linalg.cholesky(damped)
    target = torch.cholesky_solve(cross.T @ w.T, chol).T
    return target.to(device=weight.device, dtype=weight.dtype)


def relative_shift(target: torch.Tensor, weight: torch.Tensor) -> float:
    """``||W̃ - W|| / ||W||``: how far the output-aware target moved from the dense weight."""
    return float((target.double() - weight.double()).norm() / weight.double().norm().clamp_min(1e-30))
