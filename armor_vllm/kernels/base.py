"""What every ARMOR kernel receives (``ArmorShards``) and the two calls it implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from armor_vllm.factorization import block_diag_to_dense


@dataclass
class ArmorShards:
    """The validated weights of one vLLM linear, which may fuse several checkpoint layers (q/k/v or
    gate/up) along the output dimension. Shard ``i`` is ``A_i · S_i · B_i``; the output-side blocks
    of all shards are concatenated into ``wrapper_out`` since ``A`` is block-diagonal over outputs."""

    wrapper_out: torch.Tensor  # (sum d_out_i / bs, bs, bs), float32
    cores: list[torch.Tensor]  # per shard (d_out_i, d_in), dense with zeros where pruned
    wrappers_in: list[torch.Tensor]  # per shard (d_in / bs, bs, bs), float32

    @property
    def output_sizes(self) -> list[int]:
        return [int(c.shape[0]) for c in self.cores]

    @property
    def block_size(self) -> int:
        return int(self.wrapper_out.shape[-1])

    def shared_wrapper_in(self) -> torch.Tensor | None:
        """The input-side blocks when every shard has the same ones (one ``B`` for all), else None."""
        first = self.wrappers_in[0]
        return first if all(torch.equal(first, w) for w in self.wrappers_in[1:]) else None


def is_identity(blocks: torch.Tensor) -> bool:
    """True when block-diagonal blocks are exactly the identity (plain 2:4 checkpoints)."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return bool(torch.equal(blocks, eye.expand_as(blocks)))


def dense_blocks(blocks: torch.Tensor) -> torch.Tensor:
    return block_diag_to_dense(blocks)


class ArmorKernel(ABC):
    """One way to execute an ARMOR linear. ``prepare`` runs once at load; ``apply`` per forward."""

    name: str = ""

    @abstractmethod
    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Turn the loaded shards into the tensors ``apply`` needs (registered on the layer)."""

    @abstractmethod
    def apply(
        self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``y = A (S (B x)) + bias`` for ``x`` of shape ``(..., d_in)``."""
