"""Walk a Hugging Face decoder one layer at a time: capture what enters the first layer, run each
layer on the calibration samples with hooks that collect the input statistics of its linears, and
produce the inputs of the next layer. Memory stays bounded by one layer's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from armor_vllm.offline.methods.base import InputStats


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers`` for Llama-like models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for model.layers)")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one decoder layer, by their name inside the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


CALIB_BATCH = 8  # samples per forward call: larger matmuls, activations of 8 samples at a time


@dataclass
class LayerInputs:
    """The hidden states entering a decoder layer, one ``(batch, seq, hidden)`` tensor per batch of
    samples, plus the keyword arguments (rotary embeddings, mask, positions) every layer is called
    with (they broadcast over the batch: all samples have the same length)."""

    hidden: list[torch.Tensor]
    kwargs: dict = field(default_factory=dict)


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, samples: torch.Tensor, batch: int = CALIB_BATCH) -> LayerInputs:
    """Run the model's embedding part on every batch of samples and stop at the first decoder layer."""
    layers = decoder_layers(model)
    captured = LayerInputs(hidden=[])

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        if not captured.kwargs:
            captured.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for chunk in samples.split(batch):
            try:
                model(input_ids=chunk, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    # Caches are per call; never carry one from the first sample into later layers.
    captured.kwargs.pop("past_key_values", None)
    captured.kwargs.pop("past_key_value", None)
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The outputs of ``layer`` for every sample: the inputs of the next layer."""
    return LayerInputs(
        hidden=[_layer_output(layer(h, **inputs.kwargs)) for h in inputs.hidden], kwargs=inputs.kwargs
    )


@dataclass
class StatsGroup:
    """Linears of one layer that read the same input tensor (q/k/v, or gate/up) and their stats."""

    names: list[str]
    stats: InputStats


@torch.no_grad()
def collect_layer_stats(
    layer: nn.Module, inputs: LayerInputs, full_hessian: bool
) -> tuple[list[StatsGroup], LayerInputs]:
    """Run ``layer`` on every sample with hooks on its linears. Linears fed the very same tensor
    share one ``InputStats``. Returns the groups (in module order) and the layer's outputs."""
    linears = layer_linears(layer)
    groups: dict[int, StatsGroup] = {}  # keyed by the first linear's position in the layer
    owner: dict[str, int] = {}  # linear name -> group key, fixed on the first sample
    # data_ptr of an input in the current forward -> (group key, the tensor). Holding the tensor
    # keeps its memory from being reused by a later, different input during the same forward.
    seen: dict[int, tuple[int, torch.Tensor]] = {}

    def make_hook(name: str, position: int):
        def hook(module, args):
            x = args[0]
            key = x.data_ptr()
            if name not in owner:
                owner[name] = seen.setdefault(key, (position, x))[0]
            group_key = owner[name]
            if group_key != position:  # another linear of the group already counted this input
                return
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            group = groups.get(group_key)
            if group is None:
                d_in = flat.shape[1]
                stats = InputStats(
                    sq=torch.zeros(d_in, dtype=torch.float64),
                    n_tokens=0,
                    xtx=torch.zeros(d_in, d_in, dtype=torch.float64) if full_hessian else None,
                )
                group = groups[group_key] = StatsGroup(names=[], stats=stats)
            group.stats.sq += (flat * flat).sum(0)
            group.stats.n_tokens += flat.shape[0]
            if group.stats.xtx is not None:
                group.stats.xtx += flat.T @ flat

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(name, i)) for i, (name, m) in enumerate(linears.items())
    ]
    outputs = []
    try:
        for h in inputs.hidden:
            seen.clear()
            outputs.append(_layer_output(layer(h, **inputs.kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    for name, key in owner.items():
        groups[key].names.append(name)
    ordered = [groups[k] for k in sorted(groups)]
    return ordered, LayerInputs(hidden=outputs, kwargs=inputs.kwargs)
