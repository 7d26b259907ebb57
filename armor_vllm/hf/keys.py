"""How the tensors of a checkpoint become the parameters of a transformers model, through
transformers' own checkpoint conversion (``conversion_mapping``: renamed modules, per-expert
tensors merged into 3-D expert parameters, ...). Whatever layout transformers loads, we load.

``CheckpointKeys`` maps every model parameter to the checkpoint tensors it is built from (and the
transformers ``WeightConverter`` that builds it), so one decoder layer can be read on its own, and
the compressed checkpoint can be written under the checkpoint's own names (what vLLM reads).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn


class CheckpointLayoutError(ValueError):
    """A checkpoint whose tensors do not map onto the transformers model; the message names them."""


@dataclass
class Source:
    """The checkpoint tensors one model parameter is built from."""

    keys: list[str]  # checkpoint tensor names, in transformers' loading order (natural sort)
    converter: object | None = None  # a transformers WeightConverter template, or None (plain rename)
    by_pattern: dict[str, list[str]] = field(default_factory=dict)  # converter source pattern -> its keys


def _natural(key: str):
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(key)


class CheckpointKeys:
    """The mapping checkpoint tensor names -> parameters of ``model`` (a transformers
    ``PreTrainedModel``, usually on the meta device)."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_source_pattern = {p: c for c in converters for p in c.source_patterns}
        expected = model.state_dict(keep_vars=True)  # meta tensors: no memory
        prefix = getattr(model, "base_model_prefix", None) or None
        self.sources: dict[str, Source] = {}
        self.unexpected: list[str] = []
        for key in sorted(checkpoint_keys, key=_natural):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = key, None
            if renamed not in expected:
                self.unexpected.append(key)
                continue
            source = self.sources.get(renamed)
            if source is None:
                converter = by_source_pattern[pattern] if pattern is not None else None
                source = self.sources[renamed] = Source(keys=[], converter=converter)
            source.keys.append(key)
            if pattern is not None:
                source.by_pattern.setdefault(pattern, []).append(key)
        for name, source in self.sources.items():
            if source.converter is None and len(source.keys) != 1:
                raise CheckpointLayoutError(f"{name}: several checkpoint tensors {source.keys[:4]} map onto it")

    def checkpoint_name(self, param: str) -> str | None:
        """The checkpoint tensor a parameter is read from unchanged (renamed at most), else None."""
        source = self.sources.get(param)
        return source.keys[0] if source is not None and source.converter is None else None

    def load(self, params: Iterable[str], read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values of ``params`` (model names), built from the checkpoint tensors ``read`` returns
        exactly as transformers' loading builds them. A parameter with no source is an error."""
        out: dict[str, torch.Tensor] = {}
        for param in params:
            if param in out:
                continue
            source = self.sources.get(param)
            if source is None:
                raise CheckpointLayoutError(f"the checkpoint has no tensor for the model parameter {param}")
            if source.converter is None:
                out[param] = read(source.keys[0])
                continue
            converter = copy.deepcopy(source.converter)
            for pattern, keys in source.by_pattern.items():
                for key in keys:
                    converter.add_tensor(param, key, pattern, lambda key=key: read(key))
            built = converter.convert(param, model=self.model, config=getattr(self.model, "config", None))
            for name, value in built.items():
                out[name] = value[0] if isinstance(value, list) else value
            if param not in out:
                raise CheckpointLayoutError(
                    f"{param}: transformers' conversion of {source.keys[:2]}... gave {sorted(built)[:4]}, not this parameter"  # noqa: E501
                )
        return out


def load_checkpoint_state(
    model: nn.Module, state: dict[str, torch.Tensor], linear_oriented: Iterable[str] = ()
) -> None:
    """Load a checkpoint-named state dict into ``model`` through transformers' key conversion.
    ``linear_oriented``: checkpoint prefixes whose ``weight`` is stored ``(d_out, d_in)`` although
    the model holds a transformers ``Conv1D`` there (``(d_in, d_out)``): our dense reconstruction."""
    from transformers.pytorch_utils import Conv1D

    flip = {f"{p}.weight" for p in linear_oriented}
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    keys = CheckpointKeys(model, state)
    if keys.unexpected:
        raise CheckpointLayoutError(f"checkpoint tensors the model has no place for: {keys.unexpected[:5]}")

    def read(key: str) -> torch.Tensor:
        tensor = state[key]
        return tensor.t().contiguous() if key in flip and keys_to_param.get(key) in conv1d else tensor

    keys_to_param = {k: p for p, s in keys.sources.items() for k in s.keys}
    values = keys.load(list(keys.sources), read)
    missing, unexpected = model.load_state_dict(values, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointLayoutError(f"missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
