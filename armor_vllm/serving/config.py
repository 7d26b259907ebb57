"""The ``armor`` quantization config for vLLM: parses and validates the checkpoint's
``quantization_config`` (``core.format.ArmorConfig``), checks the checkpoint directory's headers before
any weight is read, and hands each layer its method: ``ArmorLinearMethod`` (``serving.linear_method``)
for linears, ``ArmorMoEMethod`` (``serving.moe_method``) for fused experts, vLLM's unquantized methods
for what the checkpoint leaves dense.

Registered with ``@register_quantization_config("armor")`` when vLLM loads our general plugin
(``armor_vllm.serving.plugin:register``) in every process, so ``vllm serve DIR --quantization armor``
works. The execution kernel comes from ``$ARMOR_VLLM_KERNEL`` (``armor_vllm.envs``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from armor_vllm import envs
from armor_vllm.core.format import QUANT_METHOD, ArmorConfig, ArmorFormatError
from armor_vllm.kernels import KERNEL_MODES
from armor_vllm.serving.linear_method import ArmorLinearMethod

KERNEL_ENV = envs.KERNEL
logger = init_logger(__name__)


def selected_kernel() -> str:
    """The execution mode from ``$ARMOR_VLLM_KERNEL``, validated against the known names."""
    mode = (envs.get(KERNEL_ENV) or "auto").strip().lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"${KERNEL_ENV}={mode!r} is not one of {sorted(KERNEL_MODES)}")
    return mode


@register_quantization_config(QUANT_METHOD)
class ArmorQuantConfig(QuantizationConfig):
    """The validated ``quantization_config`` of an ARMOR checkpoint (format v1/v2)."""

    def __init__(self, armor: ArmorConfig):
        super().__init__()
        self.armor = armor
        self.kernel = selected_kernel()
        # served weight memory of the ARMOR linears against dense (logged once all are prepared)
        self.linear_methods = 0
        self.prepared = 0
        self.served_bytes = 0
        self.dense_bytes = 0

    def note_prepared(self, kernel) -> None:
        """Count one prepared ARMOR linear; after the last one, log the served weight bytes of all
        of them against the dense model's (a 2:4 model must not need more memory than dense)."""
        self.prepared += 1
        self.served_bytes += int(kernel.weight_bytes)
        self.dense_bytes += int(kernel.dense_bytes)
        if self.prepared == self.linear_methods and self.dense_bytes:
            logger.info(
                "ARMOR: %d linear layers serve %.1f MiB of weights, %.2fx the dense model's %.1f MiB (kernel %s)",
                self.prepared,
                self.served_bytes / 2**20,
                self.served_bytes / self.dense_bytes,
                self.dense_bytes / 2**20,
                self.kernel,
            )

    def __repr__(self) -> str:
        return f"ArmorQuantConfig(block_size={self.armor.block_size}, method={self.armor.method}, kernel={self.kernel})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # sparse tensor cores (Ampere); the CPU path has no such limit

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ArmorQuantConfig":
        return cls(ArmorConfig.from_dict(config, where="config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """vLLM hands over the model's location before reading any weight: check every shard's
        header and every tensor name against the format there, so a truncated file or a stray
        tensor fails naming the file and tensor (vLLM's own errors do not)."""
        if model_name and os.path.isdir(model_name):
            from armor_vllm.core.validate import validate_checkpoint_dir

            validate_checkpoint_dir(model_name)

    @property
    def has_wrappers(self) -> bool:
        return bool(getattr(self.armor, "wrappers", True))

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint names of the projections a vLLM layer fuses (``qkv_proj`` -> q/k/v_proj)."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            from armor_vllm.serving.moe_method import moe_method  # imported late: vLLM's MoE code is heavy

            return moe_method(self.armor, layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        names = self.shard_names(prefix)
        compressed = [self.armor.is_compressed(n) for n in names]
        if all(compressed):
            self.linear_methods += 1
            return ArmorLinearMethod(self)
        if not any(compressed):
            return UnquantizedLinearMethod()
        raise ArmorFormatError(
            f"{prefix}: vLLM fuses {names} into one layer, but only some of them are ARMOR-compressed "
            f"(targets {list(self.armor.targets)}, ignore {list(self.armor.ignore)})"
        )
