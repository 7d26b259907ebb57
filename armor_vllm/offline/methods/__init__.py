"""Compression methods, one file each, all writing the same checkpoint format."""

from __future__ import annotations

from armor_vllm.offline.methods.armor import Armor
from armor_vllm.offline.methods.base import CompressionMethod, InputStats, LayerResult
from armor_vllm.offline.methods.magnitude import Magnitude
from armor_vllm.offline.methods.nowag import NoWag
from armor_vllm.offline.methods.sparsegpt import SparseGPT
from armor_vllm.offline.methods.wanda import Wanda

METHODS: dict[str, type[CompressionMethod]] = {m.name: m for m in (Magnitude, Wanda, SparseGPT, NoWag, Armor)}


def get_method(name: str) -> type[CompressionMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--method {name!r} is not one of {sorted(METHODS)}") from None


__all__ = ["CompressionMethod", "InputStats", "LayerResult", "METHODS", "get_method"]
