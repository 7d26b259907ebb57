"""Wanda (Sun et al. 2023) at 2:4: score ``|W_ij| * ||X_j||`` and keep the top 2 of every group of 4."""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import mask_from_scores
from armor_vllm.offline.methods.base import CompressionMethod, InputStats, LayerResult
from armor_vllm.offline.methods.magnitude import plain_24_layer


class Wanda(CompressionMethod):
    name = "wanda"

    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        act_norm = stats.sq.to(torch.float32).sqrt()
        return {
            name: LayerResult(plain_24_layer(w, mask_from_scores(w.abs() * act_norm), self.block_size))
            for name, w in weights.items()
        }
