"""CPU kernels: ``folded`` (one dense matmul of the multiplied-out ``A · S · B``) and ``factored``
(block-diagonal wrappers as batched matmuls around the core)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from armor_vllm.factorization import apply_block_diag, reconstruct
from armor_vllm.kernels.base import ArmorKernel, ArmorShards, is_identity


class FoldedKernel(ArmorKernel):
    """Multiply out ``A_i · S_i · B_i`` per shard in float32 at load time; run one dense matmul."""

    name = "folded"

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        bs = shards.block_size
        rows, start = [], 0
        for core, b_blocks in zip(shards.cores, shards.wrappers_in):
            a_blocks = shards.wrapper_out[start // bs : (start + core.shape[0]) // bs]
            rows.append(reconstruct(a_blocks.float(), core.float(), b_blocks.float()))
            start += core.shape[0]
        return {"weight": torch.cat(rows).to(dtype).contiguous()}

    def apply(self, tensors, x, bias):
        return F.linear(x, tensors["weight"], bias)


class FactoredKernel(ArmorKernel):
    """``B`` per shard as one batched matmul over ``(tokens, d_in/bs, bs)`` views, the 2:4 core as a
    dense matmul, then ``A`` likewise. Identity wrappers are skipped, and shards that share their
    input-side wrapper apply it once."""

    name = "factored"

    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        shared = shards.shared_wrapper_in()
        if shared is not None:
            tensors["core"] = torch.cat(shards.cores).to(dtype).contiguous()
            if not is_identity(shared):
                tensors["wrapper_in"] = shared.to(dtype).contiguous()
        else:
            for i, (core, b_blocks) in enumerate(zip(shards.cores, shards.wrappers_in)):
                tensors[f"core_{i}"] = core.to(dtype).contiguous()
                tensors[f"wrapper_in_{i}"] = b_blocks.to(dtype).contiguous()
        if not is_identity(shards.wrapper_out):
            tensors["wrapper_out"] = shards.wrapper_out.to(dtype).contiguous()
        return tensors

    def apply(self, tensors, x, bias):
        if "core" in tensors:
            h = x if "wrapper_in" not in tensors else apply_block_diag(x, tensors["wrapper_in"])
            y = F.linear(h, tensors["core"])
        else:
            parts, i = [], 0
            while f"core_{i}" in tensors:
                h = apply_block_diag(x, tensors[f"wrapper_in_{i}"])
                parts.append(F.linear(h, tensors[f"core_{i}"]))
                i += 1
            y = torch.cat(parts, dim=-1)
        if "wrapper_out" in tensors:
            y = apply_block_diag(y, tensors["wrapper_out"])
        return y if bias is None else y + bias
