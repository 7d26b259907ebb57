"""ARMOR checkpoints in transformers: ``AutoModelForCausalLM.from_pretrained(armor_dir)`` works once
``armor_vllm`` is imported (no ``trust_remote_code``).

transformers (5.x) lets out-of-tree methods register a quantization config and a quantizer for a
``quant_method``; ``register()`` does that for ``"armor"`` when this module is imported
(``armor_vllm/__init__`` imports it as soon as transformers' model loading code is). Loading then:

1. drops the ``transformers_weights`` guard from the config (``format.TRANSFORMERS_GUARD``: without
   this package, transformers fails on that missing file instead of loading random weights);
2. validates the directory from its headers (``armor_vllm.core.validate``) and replaces every
   ``nn.Linear`` stored compressed by an ``ArmorLinear`` holding the checkpoint's tensors under their
   checkpoint names, so transformers' own loader fills them and ``save_pretrained`` writes them back
   unchanged;
3. after loading, decodes and validates every layer (transformers does not compare shapes for
   quantized models) and keeps its dense 2:4 core for the forward pass ``y = A (S (B x)) + bias``.

``ArmorHfConfig(dequantize=True)`` passed as ``quantization_config`` (or ``model.dequantize()``
after loading) folds every layer into a plain ``nn.Linear`` holding ``A·S·B``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from armor_vllm.core.factorization import factored_linear
from armor_vllm.core.format import (
    BIAS,
    BITMASK,
    COMPRESSED,
    QUANT_METHOD,
    SHAPE,
    TRANSFORMERS_GUARD,
    TRANSFORMERS_GUARD_KEY,
    WRAPPER_DTYPE,
    WRAPPER_IN,
    WRAPPER_OUT,
    ArmorConfig,
    ArmorFormatError,
    decode_layer,
)


class ArmorHfConfig(QuantizationConfigMixin):
    """transformers' view of an ARMOR ``quantization_config``: the validated checkpoint config
    (``armor``), written back unchanged by ``to_dict``, plus the loading option ``dequantize``."""

    def __init__(self, dequantize: bool = False, **checkpoint_config: Any):
        self.quant_method = QUANT_METHOD
        self.dequantize = bool(dequantize)
        checkpoint_config.pop("quant_method", None)
        self.armor = (
            ArmorConfig.from_dict(
                {"quant_method": QUANT_METHOD, **checkpoint_config}, where="config.json: quantization_config"
            )
            if checkpoint_config
            else None
        )

    def to_dict(self) -> dict[str, Any]:
        if self.armor is None:  # a loading option only (passed to from_pretrained)
            return {"quant_method": QUANT_METHOD, "dequantize": self.dequantize}
        return self.armor.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"dequantize": self.dequantize}


class ArmorLinear(nn.Module):
    """A linear stored in the ARMOR layout (docs/FORMAT.md), under the checkpoint's tensor names:
    ``compressed``, ``wrapper_out``, ``wrapper_in`` (and ``bias``) as parameters, ``bitmask`` and
    ``shape`` as buffers. The dense 2:4 core is decoded once (``finalize``) into the non-persistent
    buffer ``core``; the wrappers stay float32 and are applied as batched ``bs x bs`` blocks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        block_size: int,
        wrappers: bool,
        dtype: torch.dtype,
        device=None,
        name: str = "linear",
        conv1d: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.armor_name = in_features, out_features, name
        self.conv1d = conv1d  # replaces a transformers Conv1D (GPT-2): same map, weight stored transposed
        empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.compressed = frozen(empty(out_features, in_features // 2))
        self.register_buffer(BITMASK, empty(out_features, (in_features + 7) // 8, dt=torch.uint8))
        self.register_buffer(SHAPE, empty(2, dt=torch.int64))
        if wrappers:
            self.wrapper_out = frozen(empty(out_features // block_size, block_size, block_size, dt=WRAPPER_DTYPE))
            self.wrapper_in = frozen(empty(in_features // block_size, block_size, block_size, dt=WRAPPER_DTYPE))
        else:
            self.wrapper_out = self.wrapper_in = None
        self.bias = frozen(empty(out_features)) if bias else None
        self.block_size = block_size
        self.register_buffer("core", None, persistent=False)
        # A new state dict invalidates the decoded core.
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "core", None))

    def extra_repr(self) -> str:
        wrappers = f"block_size={self.block_size}" if self.wrapper_out is not None else "no wrappers"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {wrappers}"  # noqa: E501

    def layer(self):
        """The validated ``format.ArmorLayer`` of the stored tensors."""
        names = {
            COMPRESSED: self.compressed,
            BITMASK: self.bitmask,
            SHAPE: self.shape,
            WRAPPER_OUT: self.wrapper_out,
            WRAPPER_IN: self.wrapper_in,
            BIAS: self.bias,
        }
        tensors = {f"{self.armor_name}.{k}": v.detach() for k, v in names.items() if v is not None}
        layer = decode_layer(self.armor_name, tensors, self.block_size, wrappers=self.wrapper_out is not None)
        if tuple(layer.core.shape) != (self.out_features, self.in_features):
            raise ArmorFormatError(
                f"{self.armor_name}: the checkpoint stores a {tuple(layer.core.shape)} layer where the model "
                f"has a ({self.out_features}, {self.in_features}) linear"
            )
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``A·S·B`` as a plain linear (or Conv1D) would hold it, computed on each access
        (for code that inspects ``.weight``; model initialisation code writes into it harmlessly)."""
        weight = self.layer().weight().to(self.compressed.dtype)
        return weight.t() if self.conv1d else weight

    def finalize(self) -> None:
        """Decode and validate the stored tensors; keep the dense 2:4 core for ``forward``."""
        self.core = self.layer().core

    def folded(self) -> nn.Module:
        """A plain ``nn.Linear`` (or the ``Conv1D`` it replaced) holding ``A·S·B`` (computed in
        float32, stored in the core's dtype)."""
        layer = self.layer()
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(self.compressed.device, self.compressed.dtype)
        else:
            dense = nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                dtype=self.compressed.dtype,
                device=self.compressed.device,
            )
        with torch.no_grad():
            dense.weight.copy_(layer.weight().t() if self.conv1d else layer.weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.core is None:
            self.finalize()
        return factored_linear(x, self.wrapper_out, self.core, self.wrapper_in, self.bias)


def _checkpoint_name(model: nn.Module, name: str, compressed: dict) -> str | None:
    """The checkpoint prefix of the model's module ``name`` (a base model loaded from a causal-LM
    checkpoint has its names without the ``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, f"{prefix}.{name}" if prefix else None):
        if candidate in compressed:
            return candidate
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _guarded_save(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a loaded ARMOR model: transformers' own, then the guard key put back
    into ``config.json`` (transformers drops ``transformers_weights`` on every save)."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    path = Path(save_directory) / "config.json"
    config = json.loads(path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == QUANT_METHOD:
        config[TRANSFORMERS_GUARD_KEY] = TRANSFORMERS_GUARD
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


class ArmorHfQuantizer(HfQuantizer):
    """Loads pre-compressed ARMOR checkpoints (compressing on the fly is ``armor_vllm.compress``)."""

    requires_calibration = True
    quantization_config: ArmorHfConfig

    def update_tp_plan(self, config):
        # The first hook transformers gives a quantizer on the model config, before it resolves the
        # weight files: drop the guard that makes plain transformers refuse the checkpoint.
        if getattr(config, TRANSFORMERS_GUARD_KEY, None) == TRANSFORMERS_GUARD:
            delattr(config, TRANSFORMERS_GUARD_KEY)
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from armor_vllm.core.validate import validate_checkpoint_dir

        if not checkpoint_files:
            raise ArmorFormatError("ARMOR models load from a checkpoint directory (safetensors), not a state dict")
        model_dir = Path(checkpoint_files[0]).parent
        layout = validate_checkpoint_dir(model_dir)
        cfg = layout.config
        if cfg is None:
            raise ArmorFormatError(f"{model_dir}/config.json: no ARMOR quantization_config")
        from transformers.pytorch_utils import Conv1D

        found = set()
        for name, module in list(model.named_modules()):
            if not isinstance(module, (nn.Linear, Conv1D)):
                continue
            conv1d = isinstance(module, Conv1D)
            d_in, d_out = module.weight.shape if conv1d else (module.in_features, module.out_features)
            ckpt = _checkpoint_name(model, name, layout.compressed)
            if ckpt is None:
                if cfg.is_compressed(name) and f"{name}.weight" in layout.tensors:
                    raise ArmorFormatError(
                        f"{model_dir}: {name} is stored dense, but quantization_config targets it "
                        f"(targets {list(cfg.targets)}, ignore {list(cfg.ignore)})"
                    )
                continue
            found.add(ckpt)
            _replace(
                model,
                name,
                ArmorLinear(
                    d_in,
                    d_out,
                    module.bias is not None,
                    cfg.block_size,
                    cfg.wrappers,
                    dtype=module.weight.dtype,
                    device=module.weight.device,
                    name=ckpt,
                    conv1d=conv1d,
                ),
            )
        unmatched = sorted(set(layout.compressed) - found)
        if unmatched:
            raise ArmorFormatError(
                f"{model_dir}: compressed layer(s) {unmatched[:5]} have no linear module of that name in "
                f"{type(model).__name__}: transformers loads ARMOR layers where the model has an nn.Linear or "
                f"Conv1D (MoE experts, held as 3-D parameters, are not; vLLM serves them, and "
                f"armor_vllm.hf.dense.load_dense_hf_model gives their dense reconstruction)"
            )

    def _process_model_after_weight_loading(self, model, **kwargs):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ArmorLinear)]
        for name, module in layers:
            if self.quantization_config.dequantize:
                _replace(model, name, module.folded())
            else:
                module.finalize()
        if not self.quantization_config.dequantize:
            model.save_pretrained = types.MethodType(_guarded_save, model)
        return model

    def _dequantize(self, model, dtype=None):
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ArmorLinear)]:
            dense = module.folded()
            _replace(model, name, dense if dtype is None else dense.to(dtype))
        model.__dict__.pop("save_pretrained", None)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register ``quant_method: "armor"`` with transformers (idempotent)."""
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(QUANT_METHOD)(ArmorHfConfig)
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(QUANT_METHOD)(ArmorHfQuantizer)
    # So that from_pretrained(..., quantization_config=ArmorHfConfig(dequantize=True)) passes the
    # loading option on (transformers merges loading attributes only for the types listed here).
    if ArmorHfConfig not in hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES, ArmorHfConfig)


register()  # importing this module is what registers (armor_vllm/__init__ arranges the import)


def is_armor_checkpoint(model_dir: str | Path) -> bool:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    qcfg = json.loads(config.read_text()).get("quantization_config")
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, dequantize: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(model_dir)`` for an ARMOR or a dense directory, in
    ``dtype``, evaluation mode; ``dequantize=True`` folds ARMOR layers into dense ``nn.Linear``."""
    from transformers import AutoModelForCausalLM

    register()
    if dequantize and is_armor_checkpoint(model_dir):
        kwargs["quantization_config"] = ArmorHfConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).eval()
