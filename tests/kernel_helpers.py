"""Shared helpers of the kernel tests: random shards, the reference maths, and a compile that
behaves like vLLM's (full graph, token dimension dynamic, every guard dropped)."""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import factored_linear, mask_from_scores
from armor_vllm.kernels.base import ArmorShards


def make_shards(out_sizes, d_in, bs, wrappers_in="distinct", identity_out=False, seed=0, device="cpu"):
    """Random 2:4 cores, near-identity wrappers. ``wrappers_in``: distinct | equal | identity."""
    g = torch.Generator().manual_seed(seed)

    def blocks(d):
        return torch.eye(bs) + 0.2 * torch.randn(d // bs, bs, bs, generator=g)

    cores = []
    for rows in out_sizes:
        w = torch.randn(rows, d_in, generator=g)
        cores.append(w * mask_from_scores(w.abs()))
    shared = blocks(d_in)
    if wrappers_in == "distinct":
        ins = [blocks(d_in) for _ in out_sizes]
    elif wrappers_in == "equal":
        ins = [shared.clone() for _ in out_sizes]
    else:
        ins = [torch.eye(bs).expand(d_in // bs, bs, bs).clone() for _ in out_sizes]
    total = sum(out_sizes)
    out = torch.eye(bs).expand(total // bs, bs, bs).clone() if identity_out else blocks(total)
    mv = lambda t: t.to(device)  # noqa: E731
    return ArmorShards(wrapper_out=mv(out), cores=[mv(c) for c in cores], wrappers_in=[mv(w) for w in ins])


def reference(shards, x, bias=None):
    """Shard by shard with the shared maths, in float32."""
    bs, start, parts = shards.block_size, 0, []
    for core, b in zip(shards.cores, shards.wrappers_in):
        a = shards.wrapper_out[start // bs : (start + core.shape[0]) // bs]
        parts.append(factored_linear(x.float(), a.float(), core.float(), b.float()))
        start += core.shape[0]
    y = torch.cat(parts, dim=-1)
    return y if bias is None else y + bias.float()


def rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def vllm_like_compile(fn, backend="aot_eager"):
    """``torch.compile`` as vLLM applies it: ``fullgraph=True``, ``dynamic=False`` with the token
    dimension marked dynamic by the caller (``torch._dynamo.mark_dynamic(x, 0)``), and ALL guards
    dropped (vLLM traces once and never re-checks), so a Python branch on the token count would be
    frozen at its first value. Dynamo's cache is reset first: with no guards, a cached graph of the
    same code object would otherwise be reused for a different closure."""
    torch._dynamo.reset()
    return torch.compile(
        fn,
        fullgraph=True,
        dynamic=False,
        backend=backend,
        options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
    )
