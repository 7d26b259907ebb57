"""SparseGPT (Frantar & Alistarh 2023) at 2:4: prune column by column and compensate each pruned
weight with the Optimal Brain Surgeon update of the not yet processed columns, using the Cholesky
factor of the damped inverse Hessian ``H = (2/N) X^T X``.

The 2:4 mask of each group of 4 columns is chosen when the group is reached, from
``w^2 / [H^-1]_jj^2`` (the OBS saliency on the already updated weights). Updates inside a block of
``block_columns`` columns are applied eagerly, those to later columns lazily once per block (same
result, far fewer memory passes). Identity wrappers.
"""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import GROUP, mask_from_scores
from armor_vllm.offline.methods.base import (
    CompressionMethod,
    InputStats,
    LayerResult,
    resolve_device,
)
from armor_vllm.offline.methods.magnitude import plain_24_layer
from armor_vllm.offline.objective import relative_proxy_loss

DAMP_METHODS = ("armor", "sparsegpt")  # the methods whose own objective is damped (``damped_hessian``)


def check_damp(damp, method: str, output_target: str = "layer") -> float:
    """``--damp``: a number >= 0, for a method (or an output-aware target) that damps ``X^T X``."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0 or damp == float("inf"):
        raise ValueError(f"--damp must be a finite number >= 0, got {damp!r}")
    if method not in DAMP_METHODS and output_target != "dense":
        raise ValueError(
            f"--damp damps X^T X for --method {' or '.join(DAMP_METHODS)} (or --output-target dense); "
            f"--method {method} does not use it"
        )
    return float(damp)


def damped_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's damping of ``H`` (float64): dead input channels (zero diagonal) get a unit
    diagonal, then ``damp * mean(diag H)`` is added to the diagonal. Returns it and the dead mask.
    The quadratic ``tr(E H_damped E^T)`` is the objective SparseGPT's updates are exact for."""
    hessian = hessian.to(torch.float64).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    diag = torch.diagonal(hessian)
    diag += damp * diag.mean()
    return hessian, dead


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (float64), and the mask of
    dead input channels (zero diagonal), whose Hessian rows are replaced by the identity."""
    hessian, dead = damped_hessian(hessian, damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True), dead


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block_columns: int = 128,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-prune ``weight`` with OBS compensation; returns ``(pruned weight, keep mask)``.

    ``keep_mask`` fixes the mask instead of choosing it (used by the tests to compare the update with
    a direct least-squares solve). Works in float64; returns float32."""
    d_out, d_in = weight.shape
    if block_columns % GROUP:
        raise ValueError(f"block_columns {block_columns} must be a multiple of {GROUP}")
    hinv_chol, dead = inverse_hessian_cholesky(hessian, damp)
    w = weight.to(torch.float64).clone()
    w[:, dead] = 0.0
    keep = torch.zeros(d_out, d_in, dtype=torch.bool, device=weight.device) if keep_mask is None else keep_mask.clone()
    for start in range(0, d_in, block_columns):
        stop = min(start + block_columns, d_in)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv_chol[start:stop, start:stop]
        for i in range(stop - start):
            if keep_mask is None and i % GROUP == 0:
                saliency = w_block[:, i : i + GROUP].square() / torch.diagonal(hinv_block)[i : i + GROUP].square()
                keep[:, start + i : start + i + GROUP] = mask_from_scores(saliency)
            column = w_block[:, i]
            kept = column * keep[:, start + i]
            err = (column - kept) / hinv_block[i, i]
            w_block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            w_block[:, i] = kept
            err_block[:, i] = err
        w[:, start:stop] = w_block
        w[:, stop:] -= err_block @ hinv_chol[start:stop, stop:]
    return (w * keep).to(torch.float32), keep


class SparseGPT(CompressionMethod):
    """Options: ``damp`` (fraction of the mean Hessian diagonal added to it, default 0.01) and
    ``block_columns`` (lazy-update block, default 128)."""

    name = "sparsegpt"
    needs_full_hessian = True

    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        device = resolve_device(self.options.get("device"))
        weights = {n: w.to(device) for n, w in weights.items()}
        stats = stats.to(device)
        hessian = stats.hessian()
        h = stats.channel_importance()
        damp = float(self.options.get("damp", 0.01))
        block_columns = int(self.options.get("block_columns", 128))
        results = {}
        for name, weight in weights.items():
            pruned, keep = sparsegpt_prune(weight, hessian, damp=damp, block_columns=block_columns)
            diff = (pruned - weight).to(torch.float64)

            def relative(hess):
                return float(torch.einsum("ij,jk,ik->", diff, hess, diff)) / max(
                    float(torch.einsum("ij,jk,ik->", weight.double(), hess, weight.double())), 1e-30
                )

            results[name] = LayerResult(
                plain_24_layer(pruned.cpu(), keep.cpu(), self.block_size),
                {
                    "loss_end": relative_proxy_loss(pruned, weight, h),
                    "hessian_loss": relative(hessian),
                    # on the damped H its updates are exact for (ARMOR's full objective reports this one)
                    "hessian_loss_damped": relative(damped_hessian(hessian, damp)[0]),
                },
            )
        return results
