"""A causal LM whose weights stay on disk: the module tree is built on the meta device, the parts
outside the decoder layers (embeddings, final norm, rotary tables) are read at once, and each decoder
layer is read from the safetensors shards only while the offline pass works on it. Peak memory is
the small parts plus one layer, whatever the model's size.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from armor_vllm.checkpoint import shard_files
from armor_vllm.offline.layer_walk import decoder_layers


class LayerStream:
    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype = dtype
        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config, "quantization_config", None):
            raise ValueError(f"{model_dir}/config.json already has a quantization_config: compress a dense model")
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.config = config
        self.layers = decoder_layers(self.model)
        self.layer_prefix = next(n for n, m in self.model.named_modules() if m is self.layers)
        self.where: dict[str, Path] = {}
        for f in shard_files(self.model_dir):
            with safe_open(str(f), framework="pt") as handle:
                self.where.update({k: f for k in handle.keys()})
        self._load_outside_layers()

    # -- tensors ---------------------------------------------------------------------------------
    def _read(self, name: str) -> torch.Tensor:
        path = self.where.get(name)
        if path is None:
            raise KeyError(f"{self.model_dir}: the checkpoint has no tensor {name}")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).to(self.dtype)

    def _assign(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            module._parameters[name] = nn.Parameter(self._read(f"{prefix}{name}"), requires_grad=False)
        for name in list(module._buffers):
            if name not in module._non_persistent_buffers_set and f"{prefix}{name}" in self.where:
                module._buffers[name] = self._read(f"{prefix}{name}")

    def _load_outside_layers(self) -> None:
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for mod_name, module in self.model.named_modules():
            if mod_name == self.layer_prefix or mod_name.startswith(self.layer_prefix + "."):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            for name, _ in list(module.named_parameters(recurse=False)):
                full = f"{prefix}{name}"
                if full not in self.where and tied and full.endswith("lm_head.weight"):
                    continue  # tied to the embeddings; never needed before the first layer
                module._parameters[name] = nn.Parameter(self._read(full), requires_grad=False)
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta and f"{prefix}{name}" in self.where:
                    module._buffers[name] = self._read(f"{prefix}{name}")
            self._rebuild_computed_buffers(mod_name, module)

    def _rebuild_computed_buffers(self, mod_name: str, module: nn.Module) -> None:
        """Buffers computed in ``__init__`` (rotary frequencies) are not in the checkpoint: build the
        module again on the CPU from the config and take them from there."""
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            return
        params = inspect.signature(type(module).__init__).parameters
        if "config" not in params:
            raise ValueError(f"{mod_name}: cannot compute its buffers {meta} outside the meta device")
        with torch.device("cpu"):
            fresh = type(module)(config=self.config)
        for n in meta:
            module._buffers[n] = fresh._buffers[n]

    # -- layers ----------------------------------------------------------------------------------
    def load_layer(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from the shards; returns it."""
        layer = self.layers[index]
        base = f"{self.layer_prefix}.{index}."
        for mod_name, module in layer.named_modules():
            self._assign(module, base + (f"{mod_name}." if mod_name else ""))
        return layer

    def release_layer(self, index: int) -> None:
        """Give the memory of decoder layer ``index`` back (its tensors return to the meta device)."""
        self.layers[index].to("meta")
