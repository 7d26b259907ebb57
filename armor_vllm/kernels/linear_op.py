"""Every ARMOR linear as ONE opaque torch op with a fixed schema: ``torch.ops.armor_vllm.armor_linear``.

vLLM compiles the model with ``torch.compile(fullgraph=True)``, traces once with a symbolic token
count, drops the guards, replays CUDA graphs captured at 1, 2, 4, ... tokens, and (AOT compile, on
by default with torch >= 2.10) SAVES the compiled graph under a key made of ITS config and env, not
ours. So the traced graph must not depend on anything ARMOR decides at load: the kernel
(``ARMOR_VLLM_KERNEL``), a kept dense copy (``ARMOR_VLLM_DENSE_BELOW``), the measured plan, the
backend's number of stored tensors. Every ARMOR layer (folded ones too) therefore traces as the same
node::

    armor_linear(Tensor x, Tensor? bias, str layer, int out_features) -> Tensor

``layer`` names the layer's entry in ``LAYERS`` (a process-wide registry filled when the layer is
prepared, as vLLM's attention ops find their layer by name); ``out_features`` is the model's output
width (fixed by the architecture). The entry holds the prepared tensors and how to run them
(``LayerEntry.forward``): the factored path (``run_factored``: layout + plan), a folded dense weight,
vLLM's own dense GEMM of a folded layer, or any other backend that keeps its own packed tensors. A
graph compiled in one process with one choice thus runs unchanged in a process that made another.

Everything that depends on the token count lives inside the op and runs at call time: padding the
tokens to the core backend's multiple, the dense fallback for small counts, the wrapper
implementation and the cuSPARSELt algorithm per count. The compiler sees a single node with a fake
implementation that only gives the output shape; under CUDA graph capture the op body runs once per
captured size, so each size records its own branch. The op never returns (a view of) an input.

Registered with ``torch.library`` directly (``define`` + ``impl`` for CompositeExplicitAutograd +
``register_fake``), as vLLM's ``direct_register_custom_op`` does, without importing vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from armor_vllm.kernels.backends import get_backend
from armor_vllm.kernels.blockdiag import blockdiag, blockdiag_rows
from armor_vllm.kernels.plan import KernelPlan

LIBRARY = "armor_vllm"
OP_NAME = "armor_linear"
ALIGNMENT = 16  # bytes: what cuSPARSELt/CUTLASS need of every operand's address


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


@dataclass
class LayerEntry:
    """One prepared layer: ``forward(x, bias)`` computes it for ``x`` of shape ``(..., d_in)``.
    ``tensors``: what it keeps (memory accounting); ``layout``/``plan``: set for the factored path."""

    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    out_features: int
    tensors: tuple[torch.Tensor, ...] = field(default=())
    layout: LinearLayout | None = None
    plan: KernelPlan | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


# layer key -> entry; filled at load, read on every call
LAYERS: dict[str, LayerEntry] = {}


def register_layer(key: str, entry: LayerEntry) -> LayerEntry:
    LAYERS[key] = entry
    return entry


def factored_entry(tensors: list[torch.Tensor], layout: LinearLayout, plan: KernelPlan) -> LayerEntry:
    kept = list(tensors)
    return LayerEntry(
        forward=lambda x, bias: run_factored(x, kept, bias, layout, plan),
        out_features=layout.out_features,
        tensors=tuple(kept),
        layout=layout,
        plan=plan,
    )


def dense_entry(weight: torch.Tensor) -> LayerEntry:
    """A folded layer run as ``F.linear`` (the vLLM plugin registers vLLM's own dense GEMM instead)."""
    return LayerEntry(
        forward=lambda x, bias: F.linear(x, weight, bias), out_features=int(weight.shape[0]), tensors=(weight,)
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor whose address is 16-byte aligned (a copy only when needed)."""
    if not t.is_contiguous() or t.data_ptr() % ALIGNMENT:
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        out.copy_(t)
        return out
    return t


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
    if bias is not None and backend.sparse:
        # the sparse libraries take a contiguous, aligned bias of the output dtype
        bias = _aligned(bias.to(x2.dtype))
    pad = (-n_tokens) % backend.token_multiple
    impl = plan.wrapper_for(n_tokens)
    core_opts = plan.core_opts_for(n_tokens)

    i = 0
    if layout.in_shards and impl == "bmm":
        # B writes the padded, row-major rows itself: no separate pad, no copy back (one launch for a
        # shared B, two for distinct ones)
        h = blockdiag_rows(x2.contiguous(), weights[0], layout.in_shards, None, n_tokens + pad)
        i = 1
    else:
        x2 = F.pad(x2, (0, 0, 0, pad)) if pad else _aligned(x2)
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
        # a shard of a stacked result can be a strided view (d_in == block size): the libraries need
        # row-major rows of exactly d_in elements at an aligned address
        h_c = _aligned(h[c]) if layout.in_shards > 1 else h
        opts = core_opts[c] if c < len(core_opts) else None
        parts.append(backend.matmul(stored, h_c, bias if fuse_bias_in_core else None, opts))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if layout.has_wrapper_out:
        # A (+ bias) straight into row-major output rows: one launch
        y = blockdiag_rows(y, weights[i], 1, bias) if impl == "bmm" else blockdiag(y, weights[i], 1, bias, impl)
    elif bias is not None and not fuse_bias_in_core:
        y = y + bias
    if pad:
        y = y[:n_tokens]
    return y.reshape(*lead, layout.out_features)


def _armor_linear(x: torch.Tensor, bias: torch.Tensor | None, layer: str, out_features: int) -> torch.Tensor:
    try:
        entry = LAYERS[layer]
    except KeyError:
        raise RuntimeError(f"ARMOR layer {layer!r} was not prepared in this process") from None
    return entry.forward(x, bias)


def _armor_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, layer: str, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _register() -> None:
    if hasattr(torch.ops, LIBRARY) and hasattr(getattr(torch.ops, LIBRARY), OP_NAME):
        return  # already registered in this process (module reloaded)
    lib = torch.library.Library(LIBRARY, "FRAGMENT")
    schema = torch.library.infer_schema(_armor_linear, mutates_args=())
    lib.define(OP_NAME + schema)
    lib.impl(OP_NAME, _armor_linear, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{LIBRARY}::{OP_NAME}", _armor_linear_fake, lib=lib)
    _LIBS.append(lib)  # the op lives as long as its Library object


_LIBS: list = []
_register()
_OP = getattr(getattr(torch.ops, LIBRARY), OP_NAME)


def call_op(x: torch.Tensor, bias: torch.Tensor | None, layer: str, out_features: int) -> torch.Tensor:
    """Call the registered op (what every ARMOR layer's apply and the compiled graph run)."""
    return _OP(x, bias, layer, out_features)


__all__ = [
    "LAYERS",
    "LayerEntry",
    "LinearLayout",
    "call_op",
    "dense_entry",
    "factored_entry",
    "register_layer",
    "run_factored",
]
