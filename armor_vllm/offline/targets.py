"""What the offline pass compresses, decided before any work: every linear-like projection of the
model (``nn.Linear``, transformers' ``Conv1D``, each expert's gate/up/down inside 3-D expert
parameters) is either a compression target or left dense with a recorded reason (output head,
MoE router, ``--ignore``); anything else linear-like, or an architecture not in ``ARCHITECTURES``,
is refused with an error naming it. Targets carry the checkpoint names they are written under
(the source checkpoint's own names, which vLLM's loaders read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from armor_vllm.core.format import matches_module
from armor_vllm.offline import experts as moe


class UnsupportedModel(ValueError):
    """The offline pass cannot compress this model without writing a checkpoint vLLM cannot load."""


def _qkv_parts(config) -> tuple[int, ...]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (config.num_attention_heads * head_dim, kv * head_dim, kv * head_dim)


def _halves(config) -> tuple[int, ...]:
    return (config.intermediate_size, config.intermediate_size)


def _thirds(config) -> tuple[int, ...]:
    return (config.hidden_size,) * 3


# Architectures (config.json ``model_type``) the offline pass and the plugin are tested with
# (tests/serving/test_architectures.py), each with the projections its checkpoints store fused that vLLM
# splits again: the name's last component -> the output partition sizes vLLM uses.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": {},
    "opt": {},
    "phi3": {"qkv_proj": _qkv_parts, "gate_up_proj": _halves},
    "gpt2": {"c_attn": _thirds},
    "qwen3_moe": {},
    "mixtral": {},
}
# Checkpoint projections that vLLM fuses into one layer: --ignore must take all of them or none.
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Target:
    """One ``(d_out, d_in)`` matrix of a decoder layer that is compressed as one problem."""

    name: str  # inside the layer, unique: "self_attn.q_proj", "mlp.experts.3.up" (expert 3's up projection)
    checkpoint: str  # full checkpoint prefix the compressed layer is written under
    replaces: tuple[str, ...]  # the checkpoint tensors it replaces (no longer written dense)
    kind: str  # "linear", "conv1d" or "expert"
    module: str  # the module inside the layer that holds the weight
    shape: tuple[int, int]  # (d_out, d_in)
    expert: int | None = None
    part: str | None = None  # "gate", "up" or "down" for an expert
    parts: tuple[int, ...] | None = None  # output partition of a checkpoint-fused matrix (vLLM splits it)
    has_bias: bool = False


@dataclass
class Dense:
    """A linear-like projection left dense, with why."""

    checkpoint: str
    reason: str


@dataclass
class TargetPlan:
    targets: list[list[Target]]  # per decoder layer
    dense: list[Dense]
    model_type: str
    block_size: int  # the wrapper block size, checked against every target (chosen when asked for "auto")

    def ignore(self) -> list[str]:
        """The ``sparsity_config.ignore`` list: every linear-like module left dense, by name."""
        return list(dict.fromkeys(d.checkpoint for d in self.dense))


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv1d"


def _strip(key: str, suffix: str, where: str) -> str:
    if not key.endswith("." + suffix):
        raise UnsupportedModel(f"{where}: read from the checkpoint tensor {key}, not a '.{suffix}' tensor")
    return key[: -len(suffix) - 1]


def _linear_target(keys, layer_prefix: str, name: str, module: nn.Module, fused: dict, config) -> Target:
    full = f"{layer_prefix}.{name}"
    key = keys.checkpoint_name(f"{full}.weight")
    if key is None:
        raise UnsupportedModel(
            f"{full}: its weight is built from several checkpoint tensors by transformers' conversion"
        )
    prefix = _strip(key, "weight", full)
    replaces = [key]
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias_key = keys.checkpoint_name(f"{full}.bias")
        if bias_key != f"{prefix}.bias":
            raise UnsupportedModel(f"{full}: its bias is read from {bias_key}, expected {prefix}.bias")
        replaces.append(bias_key)
    weight = module.weight
    shape = tuple(weight.shape) if isinstance(module, nn.Linear) else tuple(weight.shape[::-1])
    last = prefix.rpartition(".")[2]
    parts = tuple(fused[last](config)) if last in fused else None
    if parts is not None and sum(parts) != shape[0]:
        raise UnsupportedModel(f"{prefix}: a fused matrix of {shape[0]} rows, but vLLM splits it into {list(parts)}")
    return Target(
        name=name,
        checkpoint=prefix,
        replaces=tuple(replaces),
        kind=_kind(module),
        module=name,
        shape=shape,
        parts=parts,
        has_bias=bias is not None,
    )


def _expert_targets(keys, layer_prefix: str, name: str, module: nn.Module) -> list[Target]:
    full = f"{layer_prefix}.{name}"
    moe.check_layout(module, full)
    n = moe.num_experts(module)
    per_part: dict[str, list[str]] = {}
    for param, wanted in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
        source = keys.sources.get(f"{full}.{param}")
        if source is None:
            raise UnsupportedModel(f"{full}.{param}: the checkpoint has no tensors for it")
        ops = [type(op).__name__ for op in getattr(source.converter, "operations", [])]
        expect = ["MergeModulelist", "Concatenate"] if param == "gate_up_proj" else ["MergeModulelist"]
        if source.converter is None or ops != expect or len(source.by_pattern) != len(wanted):
            raise UnsupportedModel(
                f"{full}.{param}: the checkpoint does not store it as per-expert matrices merged by transformers "
                f"({source.keys[:2]}, conversion {ops or 'none'}); only per-expert checkpoint tensors are supported"
            )
        for part, pattern in zip(wanted, source.converter.source_patterns):
            found = source.by_pattern.get(pattern, [])
            numbers = [k.split(".")[-3] for k in found]
            if numbers != [str(e) for e in range(n)]:
                raise UnsupportedModel(
                    f"{full}.{param}: expected one checkpoint tensor per expert 0..{n - 1}, got {found[:3]}..."
                )
            per_part[part] = found
    rows = {
        "gate": module.gate_up_proj.shape[1] // 2,
        "up": module.gate_up_proj.shape[1] // 2,
        "down": module.down_proj.shape[1],
    }
    cols = {"gate": module.gate_up_proj.shape[2], "up": module.gate_up_proj.shape[2], "down": module.down_proj.shape[2]}
    targets = []
    for e in range(n):
        for part in moe.PARTS:
            key = per_part[part][e]
            targets.append(
                Target(
                    name=f"{name}.{e}.{part}",
                    checkpoint=_strip(key, "weight", full),
                    replaces=(key,),
                    kind="expert",
                    module=name,
                    shape=(rows[part], cols[part]),
                    expert=e,
                    part=part,
                )
            )
    return targets


def _is_router(name: str, module: nn.Module, siblings: dict[str, nn.Module]) -> bool:
    """A MoE block's router: the ``gate`` next to an experts module (it stays dense)."""
    return name.rpartition(".")[2] == "gate" and any(moe.is_experts_module(m) for m in siblings.values())


def _router(keys, layer_prefix: str, name: str) -> Dense:
    full = f"{layer_prefix}.{name}"
    key = keys.checkpoint_name(f"{full}.weight")
    if key is None:
        raise UnsupportedModel(f"{full}: the MoE router's weight is not one checkpoint tensor")
    return Dense(_strip(key, "weight", full), "MoE router")


def check_architecture(model_dir, config=None) -> str:
    """The model type of ``model_dir`` if the offline pass supports it, else a clear error."""
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = getattr(config, "architectures", None) or []
        raise UnsupportedModel(
            f"{model_dir}: model type {model_type!r} ({', '.join(names) or 'no architectures listed'}) is not "
            f"supported by the offline pass; supported: {sorted(ARCHITECTURES)}"
        )
    return model_type


# Block sizes "auto" tries, best first: larger blocks correct more of the pruning error (measured on the
# embedded model: 64 closes 56-70% of SparseGPT's gap to dense against 37-57% at 32; BENCHMARKS.md,
# section 1) at the cost of more wrapper bytes and work.
AUTO_BLOCK_SIZES = (64, 32, 16)


def choose_block_size(per_layer: list[list[Target]], candidates: tuple[int, ...] = AUTO_BLOCK_SIZES) -> int:
    """The first of ``candidates`` that divides both dimensions of every target (and every part of a
    fused matrix, which vLLM splits); a clear error naming the first dimension none of them divides."""
    dims: dict[int, str] = {}
    for targets in per_layer:
        for t in targets:
            for d, what in (
                (t.shape[0], "rows"),
                (t.shape[1], "columns"),
                *((r, "rows of a part") for r in t.parts or ()),
            ):
                dims.setdefault(d, f"{t.checkpoint} ({d} {what})")
    for bs in candidates:
        if all(d % bs == 0 for d in dims):
            return bs
    stuck = next(where for d, where in dims.items() if all(d % bs for bs in candidates))
    raise UnsupportedModel(
        f"--block-size auto: none of {list(candidates)} divides {stuck}; pass --block-size N "
        f"with N a multiple of 4 dividing every compressed layer, or --ignore that layer"
    )


def plan(stream, ignore: list[str], block_size: int | str) -> TargetPlan:
    """Every compression target of every decoder layer and every linear-like projection left dense;
    refuses what cannot be handled, before any work. ``block_size="auto"`` picks the largest of
    ``AUTO_BLOCK_SIZES`` that fits every target."""
    from armor_vllm.core.format import check_layer_block_size

    config = stream.config
    model_type = check_architecture(stream.model_dir, config)
    fused = ARCHITECTURES[model_type]
    keys = stream.keys
    layers_prefix = stream.layer_prefix
    per_layer: list[list[Target]] = []
    dense: list[Dense] = []
    used_patterns: set[str] = set()

    def ignored(*names: str) -> bool:
        hit = [p for p in ignore if any(matches_module(n, [p]) for n in names)]
        used_patterns.update(hit)
        return bool(hit)

    for index, layer in enumerate(stream.layers):
        layer_prefix = f"{layers_prefix}.{index}"
        modules = dict(layer.named_modules())
        targets: list[Target] = []
        for name, module in modules.items():
            parent = name.rpartition(".")[0]
            siblings = {n: m for n, m in modules.items() if n.rpartition(".")[0] == parent and n != name}
            if moe.is_experts_module(module):
                found = _expert_targets(keys, layer_prefix, name, module)
                container = found[0].checkpoint.rsplit(".", 2)[0]
                flags = [ignored(t.checkpoint, f"{layer_prefix}.{t.name}", f"{layer_prefix}.{name}") for t in found]
                if any(flags) and not all(flags):
                    raise UnsupportedModel(
                        f"--ignore leaves some experts of {container} dense: vLLM runs all experts of a MoE block as one "  # noqa: E501
                        f"layer; ignore all of them ({container}) or none"
                    )
                if all(flags):
                    dense.append(Dense(container, "--ignore"))
                else:
                    targets += found
                continue
            if _is_linear(module):
                if _is_router(name, module, siblings):
                    dense.append(_router(keys, layer_prefix, name))
                    continue
                target = _linear_target(keys, layer_prefix, name, module, fused, config)
                if ignored(target.checkpoint, f"{layer_prefix}.{name}"):
                    dense.append(Dense(target.checkpoint, "--ignore"))
                else:
                    targets.append(target)
                continue
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
            if own and _is_router(name, module, siblings) and [n for n, _ in own] == ["weight"]:
                dense.append(_router(keys, layer_prefix, name))
            elif own:
                raise UnsupportedModel(
                    f"{layer_prefix}.{name} ({type(module).__name__}) holds the {own[0][1].dim()}-D weight "
                    f"{own[0][0]} {tuple(own[0][1].shape)}, which the offline pass can neither compress nor record as dense"  # noqa: E501
                )
        _check_vllm_fused_groups(layer_prefix, targets, dense)
        per_layer.append(targets)

    if block_size == "auto":
        block_size = choose_block_size(per_layer)
    for targets in per_layer:
        for t in targets:
            check_layer_block_size(t.checkpoint, t.shape[0], t.shape[1], block_size)
            for k, rows in enumerate(t.parts or ()):
                if rows % block_size:
                    raise UnsupportedModel(
                        f"{t.checkpoint}: block size {block_size} does not divide part {k} ({rows} rows) of this fused "
                        f"matrix; vLLM splits it into {list(t.parts)}"
                    )

    for name, module in stream.model.named_modules():
        if name == layers_prefix or name.startswith(layers_prefix + "."):
            continue
        if _is_linear(module) or (
            not isinstance(module, nn.Embedding) and any(p.dim() >= 2 for p in module.parameters(recurse=False))
        ):
            dense.append(Dense(name, "output head" if name.endswith("lm_head") else "outside the decoder layers"))
    unused = [p for p in ignore if p not in used_patterns]
    if unused:
        raise UnsupportedModel(f"--ignore {unused}: matches no compressible projection of {stream.model_dir}")
    return TargetPlan(targets=per_layer, dense=dense, model_type=model_type, block_size=block_size)


def _check_vllm_fused_groups(layer_prefix: str, targets: list[Target], dense: list[Dense]) -> None:
    """--ignore must not split what vLLM runs as one layer (q/k/v, gate/up)."""
    compressed = {t.checkpoint for t in targets}
    left = {d.checkpoint for d in dense}
    for group in VLLM_FUSED:
        by_parent: dict[str, dict[str, bool]] = {}
        for name in compressed | left:
            head, _, last = name.rpartition(".")
            if last in group and name.startswith(layer_prefix + "."):
                by_parent.setdefault(head, {})[last] = name in compressed
        for head, states in by_parent.items():
            if len(set(states.values())) > 1:
                raise UnsupportedModel(
                    f"--ignore leaves {sorted(k for k, v in states.items() if not v)} of {head} dense but not "
                    f"{sorted(k for k, v in states.items() if v)}: vLLM fuses {list(group)} into one layer; ignore all or none"  # noqa: E501
                )


# -- weights of a loaded layer ------------------------------------------------------------------


def _module(layer: nn.Module, target: Target) -> nn.Module:
    return layer.get_submodule(target.module) if target.module else layer


def get_weight(layer: nn.Module, target: Target) -> torch.Tensor:
    """The target's ``(d_out, d_in)`` weight as float32 (a copy)."""
    module = _module(layer, target)
    if target.kind == "expert":
        w = moe.expert_weight(module, target.expert, target.part)
    elif target.kind == "conv1d":
        w = module.weight.T
    else:
        w = module.weight
    return w.detach().float().clone(memory_format=torch.contiguous_format)


def get_bias(layer: nn.Module, target: Target) -> torch.Tensor | None:
    if not target.has_bias:
        return None
    return _module(layer, target).bias.detach()


@torch.no_grad()
def set_weight(layer: nn.Module, target: Target, weight: torch.Tensor) -> None:
    module = _module(layer, target)
    if target.kind == "expert":
        moe.set_expert_weight(module, target.expert, target.part, weight)
    elif target.kind == "conv1d":
        module.weight.copy_(weight.T.to(module.weight.dtype))
    else:
        module.weight.copy_(weight.to(module.weight.dtype))
