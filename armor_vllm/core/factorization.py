"""The maths of the ARMOR factorization ``W_hat = A · S · B``, in one place.

``S`` is a 2:4 sparse core (at most 2 non-zeros in every 4 consecutive inputs of a row), ``A``
(output side, ``d_out x d_out``) and ``B`` (input side, ``d_in x d_in``) are block-diagonal and
stored as their diagonal blocks, shaped ``(d / bs, bs, bs)``. A linear layer computes
``y = A (S (B x)) + bias``.

Both the offline pass (reconstruction, losses) and the vLLM plugin (folding and applying) use these
functions, so the two halves cannot disagree about what a checkpoint means.
"""

from __future__ import annotations

import torch

GROUP = 4  # 2:4 sparsity: groups of 4 consecutive inputs ...
KEEP = 2  # ... of which 2 are kept


def identity_blocks(dim: int, block_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Blocks ``(dim / bs, bs, bs)`` of an identity block-diagonal matrix."""
    check_block_size(dim, block_size, what="dimension")
    eye = torch.eye(block_size, dtype=dtype, device=device)
    return eye.expand(dim // block_size, block_size, block_size).clone()


def is_identity_blocks(blocks: torch.Tensor) -> bool:
    """Whether ``blocks`` ``(n, bs, bs)`` are exactly identity blocks."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return blocks.dim() == 3 and blocks.shape[-1] == blocks.shape[-2] and bool((blocks == eye).all())


def check_block_size(dim: int, block_size: int, what: str = "dimension") -> None:
    if block_size <= 0 or dim % block_size:
        raise ValueError(f"block size {block_size} does not divide the {what} {dim}")


def block_diag_to_dense(blocks: torch.Tensor) -> torch.Tensor:
    """The full ``(d, d)`` matrix of block-diagonal blocks ``(d / bs, bs, bs)``."""
    return torch.block_diag(*blocks.unbind(0))


def apply_block_diag(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ D^T`` for the block-diagonal ``D`` given by ``blocks``: each ``bs``-slice of the last
    dimension of ``x`` is multiplied by its own block. One batched matmul, no dense ``D``."""
    n, bs, _ = blocks.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, n, bs).transpose(0, 1)  # (n, tokens, bs)
    yb = torch.bmm(xb, blocks.transpose(1, 2))  # (n, tokens, bs)
    return yb.transpose(0, 1).reshape(*lead, n * bs)


def left_block_diag(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``D @ m`` for block-diagonal ``D`` (blocks act on groups of rows of ``m``)."""
    n, bs, _ = blocks.shape
    return torch.bmm(blocks, m.reshape(n, bs, -1)).reshape(m.shape)


def right_block_diag(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``m @ D`` for block-diagonal ``D`` (blocks act on groups of columns of ``m``)."""
    return apply_block_diag(m, blocks.transpose(1, 2))


def stacked_row_slices(matrices: list[torch.Tensor]) -> list[slice]:
    """The row range of each matrix when ``matrices`` are stacked along their outputs (``torch.cat``)."""
    slices, start = [], 0
    for m in matrices:
        slices.append(slice(start, start + m.shape[0]))
        start += m.shape[0]
    return slices


def reconstruct(a_blocks: torch.Tensor | None, core: torch.Tensor, b_blocks: torch.Tensor | None) -> torch.Tensor:
    """The dense weight ``A · S · B`` (``d_out x d_in``), computed block by block; a wrapper given
    as ``None`` is the identity (a plain 2:4 layer stored without wrappers). The one fold: every
    side that multiplies a layer out (``ArmorLayer.weight``, the folded kernel) calls this."""
    weight = core if b_blocks is None else right_block_diag(core, b_blocks)
    return weight if a_blocks is None else left_block_diag(a_blocks, weight)


def factored_linear(
    x: torch.Tensor,
    a_blocks: torch.Tensor | None,
    core: torch.Tensor,
    b_blocks: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = A (S (B x)) + bias`` without forming ``A · S · B``: the reference semantics of a layer
    (``None`` wrappers are the identity). Each factor runs in its own dtype (wrappers as stored,
    float32; the core in the model dtype) and the result comes back in ``x``'s dtype."""
    h = x if b_blocks is None else apply_block_diag(x.to(b_blocks.dtype), b_blocks)
    h = torch.nn.functional.linear(h.to(core.dtype), core)
    y = h if a_blocks is None else apply_block_diag(h.to(a_blocks.dtype), a_blocks)
    y = y.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# 2:4 masks


def mask_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Boolean 2:4 mask keeping the 2 highest scores of every group of 4 consecutive columns."""
    rows, cols = scores.shape
    if cols % GROUP:
        raise ValueError(f"2:4 sparsity needs the input dimension to be a multiple of 4, got {cols}")
    grouped = scores.reshape(rows, cols // GROUP, GROUP)
    top = grouped.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols)


def group_nonzeros(core: torch.Tensor) -> torch.Tensor:
    """Count of non-zeros in every group of 4 consecutive columns, shaped ``(rows, cols / 4)``."""
    rows, cols = core.shape
    return (core != 0).reshape(rows, cols // GROUP, GROUP).sum(-1)


def is_24_sparse(core: torch.Tensor) -> bool:
    """True when no group of 4 consecutive inputs holds more than 2 non-zeros."""
    return core.shape[-1] % GROUP == 0 and bool((group_nonzeros(core) <= KEEP).all())


def first_24_violation(core: torch.Tensor) -> tuple[int, int] | None:
    """``(row, first column of the group)`` of the first group with more than 2 non-zeros."""
    bad = (group_nonzeros(core) > KEEP).nonzero()
    if bad.numel() == 0:
        return None
    return int(bad[0, 0]), int(bad[0, 1]) * GROUP


def kept_mask(core: torch.Tensor) -> torch.Tensor:
    """A 2:4 mask with exactly 2 entries per group that covers every non-zero of ``core``.

    Groups with fewer than 2 non-zeros get zero-valued positions added (lowest index first), so the
    result always has the fixed ``d_out x d_in/2`` shape of the stored values."""
    if not is_24_sparse(core):
        where = first_24_violation(core)
        raise ValueError(f"core is not 2:4 sparse (row {where[0]}, columns {where[1]}..{where[1] + 3})")
    nz = (core != 0).to(torch.float32)
    # Prefer non-zeros, then earlier positions, so the choice is deterministic.
    position = torch.arange(core.shape[1], device=core.device, dtype=torch.float32) % GROUP
    return mask_from_scores(nz * 8 - position)
