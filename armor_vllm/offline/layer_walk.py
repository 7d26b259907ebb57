"""Walk a Hugging Face decoder one layer at a time: capture what the model's own forward passes each
decoder layer, run each layer on the calibration samples with hooks that collect the input
statistics of its compression targets, and produce the inputs of the next layer. Memory stays
bounded by one layer's activations.

Every layer is called with the arguments the model's forward gives *that* layer: models that mix
sliding-window and full attention (Gemma 2/3, ...) give each layer type its own mask and rotary
embeddings, so the arguments are captured per layer, not copied from the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from armor_vllm.offline import experts as moe
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.targets import Target


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


CALIB_BATCH = 8  # samples per forward call: larger matmuls, activations of 8 samples at a time
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")  # per call; never carried between layers


@dataclass
class LayerInputs:
    """What enters decoder layer ``index``: the hidden states, one ``(batch, seq, hidden)`` tensor per
    batch of samples, and for every layer and batch the other arguments (positional after the
    hidden states, keyword) the model's forward called that layer with."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)  # calls[layer][batch]
    index: int = 0

    def arguments(self, batch: int) -> tuple[tuple, dict]:
        return self.calls[self.index][batch]

    def next(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        return LayerInputs(hidden=hidden, calls=self.calls, index=self.index + 1)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, batch: int = CALIB_BATCH) -> LayerInputs:
    """Run the model's forward on every batch of samples with each decoder layer's ``forward``
    replaced by a recorder: it keeps the arguments the layer receives (and the first layer's hidden
    states), returns its input unchanged, and the last one stops the forward. The layers' weights
    are never touched (they may still be on the meta device)."""
    layers = decoder_layers(model)
    captured = LayerInputs(hidden=[], calls=[[] for _ in layers])

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            kept = {k: v for k, v in kwargs.items() if k not in _CACHE_ARGS}
            captured.calls[index].append((rest, kept))
            if index == 0:
                captured.hidden.append(hidden.detach())
            if index == len(layers) - 1:
                raise _StopForward
            return hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute shadows the class's forward
    try:
        for chunk in samples.split(batch):
            try:
                model(input_ids=chunk, use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
    if any(len(calls) != len(captured.hidden) for calls in captured.calls):
        raise ValueError(f"{type(model).__name__}: its forward does not call every decoder layer once per batch")
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _call(layer: nn.Module, inputs: LayerInputs, b: int) -> torch.Tensor:
    args, kwargs = inputs.arguments(b)
    return _layer_output(layer(inputs.hidden[b], *args, **kwargs))


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The outputs of ``layer`` for every sample: the inputs of the next layer."""
    return inputs.next([_call(layer, inputs, b) for b in range(len(inputs.hidden))])


@dataclass
class StatsGroup:
    """Targets of one layer that read the same input tensor (q/k/v, gate/up, one expert's gate/up)
    and the statistics of that input."""

    names: list[str]
    stats: InputStats


def _new_stats(d_in: int, full_hessian: bool, cross: bool = False) -> InputStats:
    square = lambda: torch.zeros(d_in, d_in, dtype=torch.float64)  # noqa: E731
    return InputStats(
        sq=torch.zeros(d_in, dtype=torch.float64),
        n_tokens=0,
        xtx=square() if full_hessian or cross else None,
        cross=square() if cross else None,
    )


def _accumulate(stats: InputStats, x: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    stats.sq += (flat * flat).sum(0)
    stats.n_tokens += flat.shape[0]
    if stats.xtx is not None:  # float32 product (2x faster; ~1e-7 relative), float64 running sum
        x32 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        stats.xtx += (x32.T @ x32).to(torch.float64)
        if stats.cross is not None:  # the same tokens on the dense model's path
            d32 = x_dense.reshape(-1, x_dense.shape[-1]).to(torch.float32)
            stats.cross += (d32.T @ x32).to(torch.float64)


@dataclass
class LayerStats:
    """What ``collect_layer_stats`` measured on one decoder layer."""

    groups: list[StatsGroup]  # in target order
    outputs: LayerInputs  # the layer's outputs: the next layer's inputs
    routing: dict  # per experts module: routed token counts and fallbacks (experts.resolve)
    dense_outputs: LayerInputs | None = None  # the outputs on the dense model's path, when it was given


@torch.no_grad()
def collect_layer_stats(
    layer: nn.Module,
    inputs: LayerInputs,
    targets: list[Target],
    full_hessian: bool,
    dense_inputs: LayerInputs | None = None,
) -> LayerStats:
    """Run ``layer`` on every sample with hooks that collect the input statistics of ``targets``.
    Linear-like targets fed the very same tensor share one ``InputStats``; each expert's gate/up
    see only the tokens routed to that expert, its down projection their intermediate activations.

    ``dense_inputs`` (the dense model's hidden states entering this layer; ``--output-target
    dense``): each batch is first run on the dense path, keeping every linear target's input, so
    that their statistics also hold ``cross = X_dense^T X`` (and ``xtx``). MoE experts get none:
    their tokens are routed differently on the two paths, so they keep the layer target."""
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.module, []).append(t)
    stats: dict[str, InputStats] = {}  # group key -> stats
    owner: dict[str, str] = {}  # target name -> group key
    # data_ptr of an input in the current forward -> (group key, the tensor). Holding the tensor
    # keeps its memory from being reused by a later, different input during the same forward.
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    block_stats: dict[str, InputStats] = {}  # experts module -> every token entering it
    dense_seen: dict[str, torch.Tensor] = {}  # module -> its input on the dense path, current batch
    on_dense_path = False
    cross = dense_inputs is not None

    def linear_hook(module_name: str):
        def hook(module, args):
            x = args[0]
            if on_dense_path:
                dense_seen[module_name] = x
                return
            key = x.data_ptr()
            names = [t.name for t in by_module[module_name]]
            if names[0] not in owner:
                group = seen.setdefault(key, (module_name, x))[0]
                for n in names:
                    owner[n] = group
            group = owner[names[0]]
            if group != module_name:  # another linear of the group already counted this input
                return
            if group not in stats:
                stats[group] = _new_stats(x.shape[-1], full_hessian, cross)
            _accumulate(stats[group], x, dense_seen.get(group))

        return hook

    def experts_hook(module_name: str):
        def hook(module, args, kwargs):
            if on_dense_path:
                return
            for e, part, x in moe.expert_inputs(module, args, kwargs):
                key = (module_name, e, part)
                if key not in stats:
                    stats[key] = _new_stats(x.shape[-1], full_hessian)
                _accumulate(stats[key], x)
            hidden = args[0] if args else kwargs["hidden_states"]
            if module_name not in block_stats:
                block_stats[module_name] = _new_stats(hidden.shape[-1], full_hessian)
            _accumulate(block_stats[module_name], hidden)

        return hook

    handles = []
    modules = dict(layer.named_modules())
    for module_name, ts in by_module.items():
        if ts[0].kind == "expert":
            handles.append(modules[module_name].register_forward_pre_hook(experts_hook(module_name), with_kwargs=True))
        else:
            handles.append(modules[module_name].register_forward_pre_hook(linear_hook(module_name)))
    outputs, dense_outputs = [], []
    try:
        for b in range(len(inputs.hidden)):
            if cross:
                on_dense_path = True
                dense_outputs.append(_call(layer, dense_inputs, b))
                on_dense_path = False
            seen.clear()
            outputs.append(_call(layer, inputs, b))
            dense_seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    chosen: dict = {}  # (experts module, expert, "in"|"mid") -> the statistics it is compressed with
    routing: dict = {}
    for module_name, ts in by_module.items():
        if ts[0].kind != "expert":
            continue
        if module_name not in block_stats:
            raise ValueError(f"{module_name}: the MoE experts were never called on the calibration samples")
        n = moe.num_experts(modules[module_name])
        own = {key[1:]: st for key, st in stats.items() if isinstance(key, tuple) and key[0] == module_name}
        resolved, tokens, fell_back = moe.resolve(n, own, block_stats[module_name])
        chosen.update({(module_name, e, part): st for (e, part), st in resolved.items()})
        routing[module_name] = {"tokens": tokens, "fell_back": fell_back}
    groups: dict = {}
    for t in targets:
        if t.kind == "expert":
            key = (t.module, t.expert, "mid" if t.part == "down" else "in")
            group_stats = chosen[key]
        else:
            key = owner.get(t.name)
            if key is None or key not in stats:
                raise ValueError(f"{t.checkpoint}: never called on the calibration samples")
            group_stats = stats[key]
        groups.setdefault(key, StatsGroup(names=[], stats=group_stats)).names.append(t.name)
    return LayerStats(
        list(groups.values()), inputs.next(outputs), routing, dense_inputs.next(dense_outputs) if cross else None
    )
