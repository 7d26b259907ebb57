"""Small ARMOR checkpoints written directly (no offline pass) from the tiny random Llama of
conftest: every decoder projection becomes a magnitude-pruned 2:4 core with random wrappers
``I + spread·noise`` (or none), in format v2 or v1. Fast, and every part of the format is used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from armor_vllm.core.checkpoint import armor_model_config, copy_side_files, load_tensors, read_json, write_json
from armor_vllm.core.factorization import mask_from_scores
from armor_vllm.core.format import TRANSFORMERS_GUARD_KEY, ArmorConfig, ArmorLayer, encode_layer

KINDS = ("v2-wrappers", "v2-plain", "v1")


def write_armor_checkpoint(
    dense_dir: Path, out: Path, kind: str = "v2-wrappers", block_size: int = 32, seed: int = 0, spread: float = 0.05
) -> Path:
    """``kind``: ``v2-wrappers`` (format v2, wrappers: true), ``v2-plain`` (wrappers: false) or
    ``v1`` (format v1 as armor-vllm 0.1 wrote it: wrappers, no transformers guard)."""
    if kind not in KINDS:
        raise ValueError(kind)
    wrappers = kind != "v2-plain"
    gen = torch.Generator().manual_seed(seed)
    tensors = load_tensors(dense_dir)
    for name in sorted(tensors):
        if ".layers." not in name or not name.endswith("_proj.weight"):
            continue
        prefix, weight = name[: -len(".weight")], tensors.pop(name).float()
        rows, cols = weight.shape
        core = weight * mask_from_scores(weight.abs())
        a = b = None
        if wrappers:
            eye = lambda d: torch.eye(block_size).expand(d // block_size, block_size, block_size)  # noqa: E731
            a = eye(rows) + spread * torch.randn(rows // block_size, block_size, block_size, generator=gen)
            b = eye(cols) + spread * torch.randn(cols // block_size, block_size, block_size, generator=gen)
        tensors.update(encode_layer(prefix, ArmorLayer(a, core, b), torch.bfloat16, wrappers=wrappers))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qcfg = ArmorConfig(
        block_size=block_size,
        method="armor" if wrappers else "magnitude",
        format_version=1 if kind == "v1" else 2,
        wrappers=wrappers,
    )
    config = armor_model_config(read_json(dense_dir / "config.json"), qcfg)
    if kind == "v1":
        del config[TRANSFORMERS_GUARD_KEY]
    write_json(out / "config.json", config)
    copy_side_files(dense_dir, out)
    return out


def edit_tensors(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint ``src`` at ``dst`` whose tensors went through ``change(dict)``."""
    shutil.copytree(src, dst)
    tensors = load_tensors(src)
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def edit_config(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst
