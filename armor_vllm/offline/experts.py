"""Mixture-of-Experts weights as compression problems: transformers holds a MoE block's experts as
two 3-D parameters (``gate_up_proj``: ``(E, 2I, H)``, gate rows first; ``down_proj``: ``(E, H, I)``);
each expert's gate, up and down matrix is a problem of its own, calibrated with only the tokens
the router sent to that expert.

Rule for an expert that received fewer than ``MIN_EXPERT_TOKENS`` calibration tokens (too few for
its statistics to mean much): its gate and up projections use the statistics of every token that
entered its MoE block, and its down projection the statistics pooled over the intermediate
activations of all experts of the block. The report counts these experts per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from armor_vllm.offline.methods.base import InputStats

MIN_EXPERT_TOKENS = 32
PARTS = ("gate", "up", "down")


class UnsupportedExperts(ValueError):
    """A MoE expert layout the offline pass cannot compress; the message names the module."""


def is_experts_module(module: nn.Module) -> bool:
    params = module._parameters
    return all(isinstance(params.get(n), nn.Parameter) and params[n].dim() == 3 for n in ("gate_up_proj", "down_proj"))


def check_layout(module: nn.Module, where: str) -> None:
    """Only the layout Qwen3-MoE and Mixtral use: concatenated [gate; up], not transposed, no bias."""
    flags = {
        "has_gate": getattr(module, "has_gate", True),
        "is_concatenated": getattr(module, "is_concatenated", True),
        "is_transposed": getattr(module, "is_transposed", False),
        "has_bias": getattr(module, "has_bias", False),
    }
    if flags != {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False}:
        raise UnsupportedExperts(f"{where} ({type(module).__name__}): expert layout {flags} is not supported")
    e, two_i, h = module.gate_up_proj.shape
    if tuple(module.down_proj.shape) != (e, h, two_i // 2) or two_i % 2:
        raise UnsupportedExperts(
            f"{where}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj "
            f"{tuple(module.down_proj.shape)} are not (E, 2I, H) and (E, H, I)"
        )


def num_experts(module: nn.Module) -> int:
    return int(module.gate_up_proj.shape[0])


def expert_weight(module: nn.Module, expert: int, part: str) -> torch.Tensor:
    """The ``(d_out, d_in)`` matrix of one expert's ``part`` (a view into the 3-D parameter)."""
    if part == "down":
        return module.down_proj[expert]
    inter = module.gate_up_proj.shape[1] // 2
    rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
    return module.gate_up_proj[expert, rows]


@torch.no_grad()
def set_expert_weight(module: nn.Module, expert: int, part: str, weight: torch.Tensor) -> None:
    view = expert_weight(module, expert, part)
    view.copy_(weight.to(view.dtype))


@torch.no_grad()
def expert_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """For a call ``experts(hidden_states, top_k_index, top_k_weights)``: yield
    ``(expert, "in", x)`` with the tokens routed to each expert (the input of its gate and up
    projections) and ``(expert, "mid", act(x G^T) * (x U^T))`` (the input of its down projection)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    hidden, index = values["hidden_states"], values["top_k_index"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    for e in range(num_experts(module)):
        tokens = (index == e).any(-1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        x = hidden[tokens]
        gate = x @ expert_weight(module, e, "gate").T
        up = x @ expert_weight(module, e, "up").T
        yield e, "in", x
        yield e, "mid", module.act_fn(gate) * up


def _sum_stats(parts: list[InputStats]) -> InputStats:
    total = InputStats(sq=sum(p.sq for p in parts), n_tokens=sum(p.n_tokens for p in parts))
    if parts and parts[0].xtx is not None:
        total.xtx = sum(p.xtx for p in parts)
    return total


def resolve(n_experts: int, own: dict, block: InputStats) -> tuple[dict, list[int], list[int]]:
    """The statistics each expert is compressed with, following the module docstring's rule.
    ``own[(e, "in"|"mid")]`` holds what expert ``e`` saw. Returns ``{(e, part): stats}``, the
    routed token count of every expert and the experts that fell back."""
    tokens = [own[(e, "in")].n_tokens if (e, "in") in own else 0 for e in range(n_experts)]
    pooled_mid = _sum_stats([own[k] for k in sorted(own) if k[1] == "mid"])
    chosen, fell_back = {}, []
    for e in range(n_experts):
        if tokens[e] >= MIN_EXPERT_TOKENS:
            chosen[(e, "in")], chosen[(e, "mid")] = own[(e, "in")], own[(e, "mid")]
        else:
            fell_back.append(e)
            chosen[(e, "in")], chosen[(e, "mid")] = block, pooled_mid
    return chosen, tokens, fell_back
