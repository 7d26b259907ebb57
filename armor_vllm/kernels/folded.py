"""The ``folded`` kernel: ``A · S · B`` multiplied out once at load into one dense weight, run as an
ordinary dense matmul. The dense model's speed and memory; the CPU default (measured faster than the
factored path on CPUs, which have no 2:4 units) and the fallback everywhere a sparse path loses."""

from __future__ import annotations

import itertools

import torch

from armor_vllm.core.factorization import reconstruct
from armor_vllm.kernels.base import ArmorKernel, ArmorShards
from armor_vllm.kernels.linear_op import dense_entry, register_layer

_keys = itertools.count()


def fold_shards(shards: ArmorShards) -> torch.Tensor:
    """The dense ``(sum d_out_i, d_in)`` weight of every shard's ``A_i · S_i · B_i``, in float32."""
    bs = shards.block_size
    rows, start = [], 0
    for core, b_blocks in zip(shards.cores, shards.wrappers_in):
        a_blocks = shards.wrapper_out[start // bs : (start + core.shape[0]) // bs]
        rows.append(reconstruct(a_blocks.float(), core.float(), b_blocks.float()))
        start += core.shape[0]
    return torch.cat(rows)


class FoldedKernel(ArmorKernel):
    name = "folded"

    def __init__(self, key: str | None = None):
        self.key = key or f"armor-folded-{next(_keys)}"

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> list[torch.Tensor]:
        weight = fold_shards(shards).to(dtype).contiguous()
        self.out_features = int(weight.shape[0])
        self.weight_bytes = self.dense_bytes = weight.numel() * weight.element_size()
        register_layer(self.key, dense_entry(weight))
        return [weight]
