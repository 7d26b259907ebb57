"""Which part of a format-v1/v2 checkpoint tensor one vLLM layer keeps: tensor-parallel slicing and
the splitting of checkpoint-fused projections. Pure functions of tensors and sizes (no vLLM import),
so the rules are tested on their own and the plugin's weight loader stays a thin caller.

Tensor parallelism (vLLM's convention):

- a column-parallel shard keeps ``rows`` output rows starting at ``row_start`` of the checkpoint
  tensor: rows of ``compressed``/``bitmask`` and the ``A`` blocks over them (``wrapper_out``);
- a row-parallel layer keeps ``cols`` input columns starting at ``col_start``: columns of the core
  (``compressed`` holds 2 values per 4 columns, ``bitmask`` 8 columns a byte) and the ``B`` blocks
  over them (``wrapper_in``). ``A`` is applied to each rank's partial sum before the all-reduce.
- ``shape`` always holds the checkpoint's full ``[d_out, d_in]`` and is checked, not sliced.

Checkpoint-fused projections (Phi-3 stores ``qkv_proj`` and ``gate_up_proj`` as one matrix; vLLM fuses
them too but loads the parts as shards): ``split_fused`` cuts the stored layer at vLLM's full output
sizes into one layer per part (``wrapper_out`` by blocks, ``wrapper_in`` shared), before any
tensor-parallel slicing. The block size must divide every part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from armor_vllm.core.format import BITMASK, COMPRESSED, SHAPE, WRAPPER_IN, WRAPPER_OUT, ArmorFormatError

# values per input column of each per-row tensor: compressed keeps 2 of 4, bitmask packs 8 a byte
COLUMNS_PER_ENTRY = {COMPRESSED: 2, BITMASK: 8}


@dataclass(frozen=True)
class RankSlice:
    """The part of one shard this rank keeps, in checkpoint coordinates."""

    row_start: int
    rows: int
    col_start: int
    cols: int
    block_size: int


def rank_slice(
    *,
    rows: int,
    cols: int,
    block_size: int,
    tp_rank: int,
    column_parallel: bool,
    row_parallel: bool,
    kv_replicas: int = 1,
) -> RankSlice:
    """Where this rank's ``rows`` x ``cols`` part of a shard starts. With fewer kv heads than ranks,
    ``kv_replicas`` consecutive ranks hold the same k/v rows (vLLM's ``num_kv_head_replicas``)."""
    row_start = (tp_rank // kv_replicas) * rows if column_parallel else 0
    col_start = tp_rank * cols if row_parallel else 0
    return RankSlice(row_start, rows, col_start, cols, block_size)


def _narrow(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``t.narrow`` that never fails: a too-short tensor comes back short, for the shape check."""
    start = min(start, t.shape[dim])
    return t.narrow(dim, start, min(length, t.shape[dim] - start))


def slice_for_rank(name: str, loaded: torch.Tensor, part: RankSlice, where: str) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name`` (``compressed``, ``bitmask``, ``wrapper_out``,
    ``wrapper_in``; ``shape`` comes back unchanged). Shapes are checked by the caller against what
    the layer expects; here only the tensor's rank is."""
    bs = part.block_size
    if name == SHAPE:
        return loaded
    if name in COLUMNS_PER_ENTRY:
        if loaded.dim() != 2:
            raise ArmorFormatError(f"{where}: expected a 2-D tensor, got shape {tuple(loaded.shape)}")
        per = COLUMNS_PER_ENTRY[name]
        out = _narrow(loaded, 0, part.row_start, part.rows)
        return _narrow(out, 1, part.col_start // per, -(-part.cols // per))
    if name in (WRAPPER_OUT, WRAPPER_IN):
        if loaded.dim() != 3 or tuple(loaded.shape[1:]) != (bs, bs):
            side = "d_out" if name == WRAPPER_OUT else "d_in"
            raise ArmorFormatError(f"{where}: shape {tuple(loaded.shape)}, expected ({side}/{bs}, {bs}, {bs})")
        if name == WRAPPER_OUT:
            return _narrow(loaded, 0, part.row_start // bs, part.rows // bs)
        return _narrow(loaded, 0, part.col_start // bs, part.cols // bs)
    raise ArmorFormatError(f"{where}: format v1/v2 has no tensor named {name!r} for a compressed layer")


def split_fused(
    name: str, loaded: torch.Tensor, full_sizes: list[int], block_size: int, where: str
) -> list[torch.Tensor]:
    """One checkpoint tensor of a fused projection, cut into its parts at ``full_sizes`` output rows."""
    total = sum(full_sizes)
    if name == SHAPE:
        if loaded.numel() != 2:
            raise ArmorFormatError(f"{where}: expected [d_out, d_in], got shape {tuple(loaded.shape)}")
        rows, cols = (int(v) for v in loaded.reshape(2).tolist())
        if rows != total:
            raise ArmorFormatError(
                f"{where}: says {rows} output rows; vLLM fuses parts of {full_sizes} = {total} rows here"
            )
        return [torch.tensor([r, cols], dtype=loaded.dtype) for r in full_sizes]
    if name == WRAPPER_IN:
        return [loaded] * len(full_sizes)
    unit = block_size if name == WRAPPER_OUT else 1
    bad = [s for s in full_sizes if s % unit]
    if bad:
        raise ArmorFormatError(f"{where}: block size {block_size} does not divide the fused parts {full_sizes}")
    if name not in (COMPRESSED, BITMASK, WRAPPER_OUT):
        raise ArmorFormatError(f"{where}: format v1/v2 has no tensor named {name!r} for a compressed layer")
    if loaded.shape[0] * unit != total:
        raise ArmorFormatError(
            f"{where}: {loaded.shape[0] * unit} output rows, but vLLM fuses parts of {full_sizes} = {total} rows here"
        )
    return list(torch.split(loaded, [s // unit for s in full_sizes], dim=0))


__all__ = ["RankSlice", "rank_slice", "slice_for_rank", "split_fused"]
