"""What every ARMOR kernel receives (``ArmorShards``) and the two calls it implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from armor_vllm.core.factorization import identity_blocks


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
    def input_size(self) -> int:
        return int(self.cores[0].shape[1])

    @property
    def block_size(self) -> int:
        return int(self.wrapper_out.shape[-1])

    def shared_wrapper_in(self) -> torch.Tensor | None:
        """The input-side blocks when every shard has the same ones (one ``B`` for all), else None."""
        first = self.wrappers_in[0]
        return first if all(torch.equal(first, w) for w in self.wrappers_in[1:]) else None

    @classmethod
    def from_layers(cls, layers: list, block_size: int) -> "ArmorShards":
        """The shards of decoded layers (``core.format.ArmorLayer``, stacked along the outputs in
        order); a layer without wrappers (``None``) gets identity blocks of ``block_size``."""

        def blocks(b, dim, device):
            return identity_blocks(dim, block_size, device=device) if b is None else b

        cores = [layer.core for layer in layers]
        device = cores[0].device
        return cls(
            wrapper_out=torch.cat([blocks(layer.wrapper_out, layer.core.shape[0], device) for layer in layers]),
            cores=cores,
            wrappers_in=[blocks(layer.wrapper_in, layer.core.shape[1], device) for layer in layers],
        )

    def to(self, device: torch.device) -> "ArmorShards":
        return ArmorShards(
            wrapper_out=self.wrapper_out.to(device),
            cores=[c.to(device) for c in self.cores],
            wrappers_in=[w.to(device) for w in self.wrappers_in],
        )


class ArmorKernel(ABC):
    """One way to execute an ARMOR linear. One instance serves one layer: ``prepare`` runs once
    after loading, registers the layer under ``key`` for the op ``armor_vllm::armor_linear``
    (``kernels.linear_op``) and returns the tensors it keeps (the caller may hold them on the
    layer); ``apply`` runs on every forward, always as that one op, whatever was prepared (a
    compiled graph is the same for every kernel, plan and setting)."""

    name: str = ""
    key: str = ""
    # None: ``prepare`` returned one folded dense weight, to run as an ordinary dense linear.
    layout: object | None = None
    out_features: int = 0
    weight_bytes: int = 0  # bytes of the tensors kept to serve the layer
    dense_bytes: int = 0  # bytes of the dense weight of the same shape and dtype

    @abstractmethod
    def prepare(self, shards: ArmorShards, dtype: torch.dtype) -> list[torch.Tensor]:
        """Turn the loaded shards into the tensors the layer keeps, and register the layer."""

    def apply(self, tensors: list[torch.Tensor] | None, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``y = A (S (B x)) + bias`` for ``x`` of shape ``(..., d_in)``, through the op (``tensors``
        is ignored: the op finds the layer's tensors by its key)."""
        from armor_vllm.kernels.linear_op import call_op

        return call_op(x, bias, self.key, self.out_features)
