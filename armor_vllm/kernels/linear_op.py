"""The factored ARMOR linear as ONE opaque torch op: ``torch.ops.armor_vllm.factored_linear``.

vLLM compiles the model with ``torch.compile(fullgraph=True)``, traces once with a symbolic token
count, drops the guards and replays CUDA graphs captured at 1, 2, 4, ... tokens. Python branches on
the token count inside a traced function are therefore frozen at trace time. Everything that depends
on the token count lives here, inside the op, and runs at call time: padding the tokens to the core
backend's multiple, the dense fallback for small counts, the wrapper implementation per count. The
compiler sees a single node with a fake implementation that only gives the output shape; under CUDA
graph capture the op body runs once per captured size, so each size records its own branch.

Schema: ``factored_linear(Tensor x, Tensor[] weights, Tensor? bias, str layer, int out_features)``.
``weights`` are the layer's prepared tensors in a fixed order (``LinearLayout.tensor_order``);
``layer`` names the entry of ``LAYERS`` (layout + plan) registered at load time — a string, like
vLLM's attention ops take the layer name, so a compiled graph stays valid across processes that load
the same model. The op never returns (a view of) an input.

Registered with ``torch.library`` directly (``define`` + ``impl`` for CompositeExplicitAutograd +
``register_fake``), as vLLM's ``direct_register_custom_op`` does, without importing vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from armor_vllm.kernels.backends import get_backend
from armor_vllm.kernels.blockdiag import blockdiag
from armor_vllm.kernels.plan import KernelPlan

LIBRARY = "armor_vllm"
OP_NAME = "factored_linear"


@dataclass(frozen=True)
class LinearLayout:
    """Which prepared tensor is what, fixed at load. Order: ``wrapper_in`` (stacked ``B`` of
    ``in_shards`` shards) if any, then the cores (``core_tensors`` tensors each, ``n_cores`` of them),
    then ``wrapper_out`` (``A``, transposed blocks) if any, then the folded ``dense_weight`` if kept."""

    backend: str
    n_cores: int
    core_tensors: int
    in_shards: int  # 0: no wrapper_in; 1: one B for every shard; k: one per shard (k == n_cores)
    has_wrapper_out: bool
    has_dense: bool
    out_features: int

    def tensor_order(self) -> list[str]:
        names = ["wrapper_in"] if self.in_shards else []
        names += [f"core{c}_{p}" for c in range(self.n_cores) for p in range(self.core_tensors)]
        names += ["wrapper_out"] if self.has_wrapper_out else []
        names += ["dense_weight"] if self.has_dense else []
        return names


# layer key -> (layout, plan); filled at load, read on every call
LAYERS: dict[str, tuple[LinearLayout, KernelPlan]] = {}


def register_layer(key: str, layout: LinearLayout, plan: KernelPlan) -> None:
    LAYERS[key] = (layout, plan)


def run_factored(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, layout: LinearLayout, plan: KernelPlan
) -> torch.Tensor:
    """``y = A (S (B x)) + bias`` for ``x`` (..., d_in), by ``layout`` and ``plan`` (the op's body)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n_tokens = x2.shape[0]
    if layout.has_dense and n_tokens <= plan.dense_below:
        return F.linear(x2, weights[-1], bias).reshape(*lead, layout.out_features)
    backend = get_backend(layout.backend)
    pad = (-n_tokens) % backend.token_multiple
    x2 = F.pad(x2, (0, 0, 0, pad)) if pad else x2.contiguous()
    impl = plan.wrapper_for(n_tokens)

    i = 0
    if layout.in_shards:
        h = blockdiag(x2, weights[0], layout.in_shards, None, impl)
        i = 1
    else:
        h = x2
    # The bias rides in the last matmul: the single core when there is no A, else A.
    fuse_bias_in_core = bias is not None and not layout.has_wrapper_out and layout.n_cores == 1
    parts = []
    for c in range(layout.n_cores):
        stored = weights[i : i + layout.core_tensors]
        i += layout.core_tensors
        h_c = h[c] if layout.in_shards > 1 else h
        parts.append(backend.matmul(stored, h_c, bias if fuse_bias_in_core else None))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if layout.has_wrapper_out:
        y = blockdiag(y, weights[i], 1, bias, impl)
    elif bias is not None and not fuse_bias_in_core:
        y = y + bias
    if pad:
        y = y[:n_tokens]
    return y.reshape(*lead, layout.out_features)


def _factored_linear(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, layer: str, out_features: int
) -> torch.Tensor:
    try:
        layout, plan = LAYERS[layer]
    except KeyError:
        raise RuntimeError(f"ARMOR layer {layer!r} was not prepared in this process") from None
    return run_factored(x, weights, bias, layout, plan)


def _factored_linear_fake(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, layer: str, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _register() -> None:
    if hasattr(torch.ops, LIBRARY) and hasattr(getattr(torch.ops, LIBRARY), OP_NAME):
        return  # already registered in this process (module reloaded)
    lib = torch.library.Library(LIBRARY, "FRAGMENT")
    schema = torch.library.infer_schema(_factored_linear, mutates_args=())
    lib.define(OP_NAME + schema)
    lib.impl(OP_NAME, _factored_linear, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{LIBRARY}::{OP_NAME}", _factored_linear_fake, lib=lib)
    _LIBS.append(lib)  # the op lives as long as its Library object


_LIBS: list = []
_register()
_OP = getattr(getattr(torch.ops, LIBRARY), OP_NAME)


def call_factored_op(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, layer: str, out_features: int
) -> torch.Tensor:
    """Call the registered op (what ``FactoredKernel.apply`` and the compiled graph run)."""
    return _OP(x, weights, bias, layer, out_features)


__all__ = ["LAYERS", "LinearLayout", "call_factored_op", "register_layer", "run_factored"]
