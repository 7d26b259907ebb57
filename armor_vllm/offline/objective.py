"""The NoWag/ARMOR proxy loss and the weight normalisation it is computed on, in one place.

For a weight ``W`` (``d_out x d_in``) and channel importances ``h`` (``InputStats.channel_importance``):

* normalisation: each column ``j`` of ``W`` is divided by ``c_j = ||W[:, j]|| + 1e-5``, then each row
  ``i`` of the result by ``r_i = ||row_i|| + 1e-5``, so ``W = diag(r) W_n diag(c)``;
* proxy loss of an approximation ``W_hat_n`` of ``W_n``: ``sum_ij h_j (W_hat_n - W_n)_ij^2``, divided by
  its value at ``W_hat_n = 0`` so that it reads as a relative error (0 = exact, 1 = all pruned).

Every method reports this number (``loss_start``/``loss_end``) so they can be compared, and ARMOR
optimises it. A factorization found on ``W_n`` is turned into one of ``W`` by ``fold_normalisation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORM_EPS = 1e-5


@dataclass
class Normalisation:
    """``W = diag(row_scale) W_n diag(col_scale)``."""

    row_scale: torch.Tensor  # r, (d_out,)
    col_scale: torch.Tensor  # c, (d_in,)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """``W_n = diag(1/r) W diag(1/c)`` for any matrix in the original space."""
        return w / self.col_scale / self.row_scale[:, None]

    def undo(self, w_n: torch.Tensor) -> torch.Tensor:
        """``diag(r) W_n diag(c)``."""
        return w_n * self.col_scale * self.row_scale[:, None]


def normalise(weight: torch.Tensor) -> tuple[torch.Tensor, Normalisation]:
    """Columns then rows to unit norm (plus ``1e-5``); returns ``W_n`` and the scales."""
    col_scale = weight.norm(dim=0) + NORM_EPS
    w_cols = weight / col_scale
    row_scale = w_cols.norm(dim=1) + NORM_EPS
    return w_cols / row_scale[:, None], Normalisation(row_scale, col_scale)


def fold_normalisation(
    a_blocks: torch.Tensor, b_blocks: torch.Tensor, norm: Normalisation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrappers of ``W`` from those of ``W_n``: ``A <- diag(r) A`` and ``B <- B diag(c)``, so that
    ``reconstruct(A', S, B') = diag(r) (A S B) diag(c)`` with the core unchanged."""
    n_out, bs, _ = a_blocks.shape
    n_in = b_blocks.shape[0]
    a_folded = a_blocks * norm.row_scale.reshape(n_out, bs, 1).to(a_blocks.dtype)
    b_folded = b_blocks * norm.col_scale.reshape(n_in, 1, bs).to(b_blocks.dtype)
    return a_folded, b_folded


def loss_scale(w_n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sum_ij h_j W_n[i, j]^2``: the loss of ``W_hat = 0``, the denominator of the relative loss."""
    return (w_n.square() * h).sum()


def proxy_loss(w_hat_n: torch.Tensor, w_n: torch.Tensor, h: torch.Tensor) -> float:
    """Relative proxy loss ``sum h_j (W_hat_n - W_n)^2 / sum h_j W_n^2``, both normalised (float64
    accumulation so that small differences between methods are not rounding noise)."""
    h64 = h.to(torch.float64)
    err = ((w_hat_n.to(torch.float64) - w_n.to(torch.float64)).square() * h64).sum()
    return float(err / loss_scale(w_n.to(torch.float64), h64))


def relative_proxy_loss(w_hat: torch.Tensor, weight: torch.Tensor, h: torch.Tensor) -> float:
    """The proxy loss of ``w_hat`` approximating ``weight``, both in the original (unnormalised)
    space: what a stored layer ``reconstruct(A, S, B)`` achieves."""
    w_n, norm = normalise(weight)
    return proxy_loss(norm.apply(w_hat), w_n, h)
