"""Reading and writing checkpoint directories: safetensors shards with their index, the config
with its ``quantization_config``, the tokenizer files. Only safetensors and JSON are ever read.
Reading a whole checkpoint back (validated, every layer decoded) is ``core.reader``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from armor_vllm.core.format import (
    TRANSFORMERS_GUARD,
    TRANSFORMERS_GUARD_KEY,
    ArmorConfig,
    ArmorFormatError,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files copied unchanged from the source model (tokenizer, chat template, generation settings).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ArmorFormatError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (from the index when there is one)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights (only safetensors are read)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in {index} but missing")
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a model directory, one at a time (never the whole model in memory)."""
    for f in shard_files(model_dir):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(model_dir))


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``max_bytes``
    and the index; shard names are fixed when ``close`` knows how many there are."""

    def __init__(self, out_dir: Path, max_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        n = len(self.written)
        names = []
        weight_map = {}
        for i, (path, keys) in enumerate(self.written):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            write_json(
                self.out_dir / SAFETENSORS_INDEX,
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        return names


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def armor_model_config(source_config: dict, quantization_config: ArmorConfig) -> dict:
    """The ``config.json`` of a checkpoint: the source model's, with the ARMOR
    ``quantization_config`` and the key that makes plain transformers refuse it
    (``format.TRANSFORMERS_GUARD``)."""
    config = dict(source_config)
    config["quantization_config"] = quantization_config.to_dict()
    config[TRANSFORMERS_GUARD_KEY] = TRANSFORMERS_GUARD
    return config


def read_armor_config(model_dir: Path) -> ArmorConfig | None:
    """The validated ARMOR config of a checkpoint, or None for an ordinary dense model."""
    config = read_json(Path(model_dir) / "config.json")
    qcfg = config.get("quantization_config")
    if qcfg is None:
        return None
    return ArmorConfig.from_dict(qcfg, where=f"{Path(model_dir) / 'config.json'}: quantization_config")
