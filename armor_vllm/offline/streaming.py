"""A causal LM whose weights stay on disk: the module tree is built on the meta device, the parts
outside the decoder layers (embeddings, final norm, rotary tables) are read at once, and each decoder
layer is read from the safetensors shards only while the offline pass works on it. Peak memory is
the small parts plus one layer, whatever the model's size.

Tensors are read through transformers' own checkpoint conversion (``armor_vllm.hf.keys``), so a
layer is built exactly as ``from_pretrained`` builds it (renamed modules, per-expert checkpoint
tensors merged into 3-D expert parameters). Buffers that no checkpoint holds (rotary frequencies,
Gemma's ``embed_scale``) are computed on the CPU by the model's own weight initialisation, as
``from_pretrained`` does for them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from armor_vllm.core.checkpoint import shard_files
from armor_vllm.hf.keys import CheckpointKeys, CheckpointLayoutError
from armor_vllm.offline.layer_walk import decoder_layers


class LayerStream:
    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype = dtype
        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config, "quantization_config", None):
            raise ValueError(f"{model_dir}/config.json already has a quantization_config: compress a dense model")
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        except ValueError as exc:  # transformers: no causal-LM class for this config
            raise ValueError(
                f"{model_dir}: transformers cannot build a causal LM from its config.json ({exc})"
            ) from None
        self.config = config
        self.layers = decoder_layers(self.model)
        self.layer_prefix = next(n for n, m in self.model.named_modules() if m is self.layers)
        self.where: dict[str, Path] = {}
        for f in shard_files(self.model_dir):
            with safe_open(str(f), framework="pt") as handle:
                self.where.update({k: f for k in handle.keys()})
        self.keys = CheckpointKeys(self.model, self.where)
        self._owners = {n: m for n, m in self.model.named_modules() if hasattr(m, "_init_weights")}
        self._load_outside_layers()

    # -- tensors ---------------------------------------------------------------------------------
    def _read(self, name: str) -> torch.Tensor:
        path = self.where.get(name)
        if path is None:
            raise CheckpointLayoutError(f"{self.model_dir}: the checkpoint has no tensor {name}")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).to(self.dtype)

    def _set(self, full_name: str, value: torch.Tensor) -> None:
        mod_name, _, attr = full_name.rpartition(".")
        module = self.model.get_submodule(mod_name)
        if attr in module._parameters:
            current = module._parameters[attr]
            if tuple(current.shape) != tuple(value.shape):
                raise CheckpointLayoutError(
                    f"{self.model_dir}: {full_name} is built with shape {tuple(value.shape)}, the model expects "
                    f"{tuple(current.shape)}"
                )
            module._parameters[attr] = nn.Parameter(value.to(current.dtype), requires_grad=False)
        else:
            module._buffers[attr] = value.to(module._buffers[attr].dtype)

    def _load_params(self, names: list[str]) -> None:
        for name, value in self.keys.load(names, self._read).items():
            self._set(name, value)

    def _stored(self, module_prefix: str, module: nn.Module) -> list[str]:
        """The checkpoint-backed parameters and persistent buffers of ``module`` (own, not children)."""
        names = [f"{module_prefix}{n}" for n in module._parameters if module._parameters[n] is not None]
        names += [
            f"{module_prefix}{n}"
            for n, b in module._buffers.items()
            if b is not None
            and n not in module._non_persistent_buffers_set
            and f"{module_prefix}{n}" in self.keys.sources
        ]
        return names

    def _load_outside_layers(self) -> None:
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        names = []
        for mod_name, module in self.model.named_modules():
            if mod_name == self.layer_prefix or mod_name.startswith(self.layer_prefix + "."):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            names += [n for n in self._stored(prefix, module) if not (n in tied and n not in self.keys.sources)]
        self._load_params(names)  # tied and absent (lm_head): never needed before the last layer
        for mod_name, module in self.model.named_modules():
            if not (mod_name == self.layer_prefix or mod_name.startswith(self.layer_prefix + ".")):
                self._compute_buffers(mod_name, module)

    def _compute_buffers(self, mod_name: str, module: nn.Module) -> None:
        """Buffers no checkpoint holds (rotary frequencies, ``embed_scale``): computed on the CPU by
        the model's own ``_init_weights`` (what ``from_pretrained`` does), or, for modules it does not
        cover, by building the module again from the config."""
        from transformers import initialization as hf_init

        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            return
        for n in meta:
            buf = module._buffers[n]
            fill = (
                float("nan")
                if buf.is_floating_point()
                else torch.iinfo(buf.dtype).min
                if buf.dtype != torch.bool
                else False
            )
            module._buffers[n] = torch.full(buf.shape, fill, dtype=buf.dtype, device="cpu")
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True  # loaded from the checkpoint: never re-initialised
        owner = max((p for p in self._owners if p == "" or mod_name == p or mod_name.startswith(p + ".")), key=len)
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            self._owners[owner]._init_weights(module)
        unset = [n for n in meta if not _was_set(module._buffers[n])]
        if unset and "config" in inspect.signature(type(module).__init__).parameters:
            with torch.device("cpu"):
                fresh = type(module)(config=self.config)
            for n in unset:
                module._buffers[n] = fresh._buffers[n].to(module._buffers[n].dtype)
            unset = []
        if unset:
            raise ValueError(
                f"{self.model_dir}: {mod_name or 'the model'} ({type(module).__name__}): cannot compute its buffers "
                f"{unset}: they are not in the checkpoint and transformers' initialisation does not set them"
            )

    # -- layers ----------------------------------------------------------------------------------
    def layer_param_names(self, index: int) -> list[str]:
        base = f"{self.layer_prefix}.{index}."
        names = []
        for mod_name, module in self.layers[index].named_modules():
            names += self._stored(base + (f"{mod_name}." if mod_name else ""), module)
        return names

    def load_layer(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from the shards; returns it."""
        layer = self.layers[index]
        self._load_params(self.layer_param_names(index))
        base = f"{self.layer_prefix}.{index}"
        for mod_name, module in layer.named_modules():
            self._compute_buffers(f"{base}.{mod_name}" if mod_name else base, module)
        return layer

    def release_layer(self, index: int) -> None:
        """Give the memory of decoder layer ``index`` back (its tensors return to the meta device)."""
        self.layers[index].to("meta")


def _was_set(buf: torch.Tensor) -> bool:
    if buf.is_floating_point():
        return not bool(torch.isnan(buf).any())
    if buf.dtype == torch.bool:
        return False  # cannot tell whether initialisation wrote it: rebuild from the config or refuse
    return not bool((buf == torch.iinfo(buf.dtype).min).any())
