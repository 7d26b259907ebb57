"""NoWag-P (Liu et al. 2025) at 2:4: normalise ``W`` (columns, then rows), score ``W_n[i, j]^2 * h_j``
and keep the top 2 of every group of 4. It is ARMOR's starting point and the baseline its proxy loss
must beat; identity wrappers, the kept values are the original weights."""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import mask_from_scores
from armor_vllm.offline.methods.base import CompressionMethod, InputStats, LayerResult
from armor_vllm.offline.methods.magnitude import plain_24_layer
from armor_vllm.offline.objective import normalise, proxy_loss


def nowag_mask(w_n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The NoWag-P 2:4 mask of a normalised weight ``w_n`` under channel importances ``h``."""
    return mask_from_scores(w_n.square() * h)


class NoWag(CompressionMethod):
    name = "nowag"

    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        h = stats.channel_importance()
        results = {}
        for name, weight in weights.items():
            w_n, _ = normalise(weight)
            mask = nowag_mask(w_n, h)
            loss = proxy_loss(w_n * mask, w_n, h)
            # Pruning commutes with the diagonal scalings: diag(r) (W_n * M) diag(c) = W * M.
            results[name] = LayerResult(
                plain_24_layer(weight, mask, self.block_size), {"loss_start": loss, "loss_end": loss}
            )
        return results
