"""Magnitude pruning to 2:4: keep the 2 largest ``|W|`` of every group of 4. The simplest baseline."""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import identity_blocks, mask_from_scores
from armor_vllm.core.format import ArmorLayer
from armor_vllm.offline.methods.base import CompressionMethod, InputStats, LayerResult


def plain_24_layer(weight: torch.Tensor, mask: torch.Tensor, block_size: int) -> ArmorLayer:
    """A plain 2:4 layer (identity wrappers) keeping ``weight`` where ``mask`` is set."""
    d_out, d_in = weight.shape
    return ArmorLayer(
        wrapper_out=identity_blocks(d_out, block_size),
        core=weight * mask,
        wrapper_in=identity_blocks(d_in, block_size),
    )


class Magnitude(CompressionMethod):
    name = "magnitude"

    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        return {
            name: LayerResult(plain_24_layer(w, mask_from_scores(w.abs()), self.block_size))
            for name, w in weights.items()
        }
