"""Check a checkpoint directory before any reader (vLLM plugin, transformers quantizer) touches
tensor data, so that a broken file fails with the file and tensor at fault named.

Reads only the safetensors headers (the 8-byte little-endian header length, then the JSON header)
and ``config.json``; no tensor data, so it costs milliseconds even for large models. It checks:

* every shard: the header fits in the file and parses; every tensor has a known dtype, a shape, and
  ``data_offsets`` whose length matches ``dtype x shape``; the tensors cover the data section
  exactly (a truncated file, a gap or an overlap is named with the tensor it hits);
* the index (``model.safetensors.index.json``), when there is one: every listed file exists and
  holds the tensors the index places there; no tensor is stored twice;
* for an ARMOR checkpoint (``quant_method: "armor"``), every tensor name against the format: a
  compressed layer stores exactly the tensors its format version allows (``compressed``,
  ``bitmask``, ``shape``, the wrappers unless ``wrappers: false``, an optional ``bias``) with the
  dtypes and mutually consistent shapes of docs/FORMAT.md, and only layers the config targets are
  stored compressed. Tensors of dense modules keep their ordinary names and are not judged here.

``validate_checkpoint_dir`` raises ``ArmorFormatError`` listing every problem found (the first
``MAX_REPORTED``), or returns the directory's layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from armor_vllm.core.checkpoint import SAFETENSORS_INDEX, read_json, shard_files
from armor_vllm.core.format import (
    BIAS,
    BITMASK,
    COMPRESSED,
    LAYER_TENSORS,
    QUANT_METHOD,
    SHAPE,
    WRAPPER_IN,
    WRAPPER_OUT,
    WRAPPER_TENSORS,
    ArmorConfig,
    ArmorFormatError,
)

# Bytes per element of the safetensors dtypes this reader knows (sub-byte dtypes are refused).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_REPORTED = 10
ARMOR_SUFFIXES = frozenset((*LAYER_TENSORS,))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard's header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class CheckpointLayout:
    """What a valid checkpoint directory holds (from headers only)."""

    path: Path
    config: ArmorConfig | None  # None: not an ARMOR checkpoint
    files: list[Path]
    tensors: dict[str, TensorInfo]
    compressed: dict[str, set[str]] = field(default_factory=dict)  # layer prefix -> stored suffixes


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one shard from its header, checked against the file's size; errors name the
    file and the tensor at fault."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ArmorFormatError(f"{path}: {size} bytes, too short for a safetensors header (truncated file?)")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ArmorFormatError(
                f"{path}: the header claims {n} bytes but only {size - 8} follow its length (truncated file?)"
            )
        if n > MAX_HEADER_BYTES:
            raise ArmorFormatError(f"{path}: a {n}-byte header is over safetensors' {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArmorFormatError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ArmorFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ArmorFormatError(f"{path}: __metadata__ must map strings to strings")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(entry, dict):
            raise ArmorFormatError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ArmorFormatError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ArmorFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ArmorFormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expect = math.prod(shape) * DTYPE_BYTES[dtype]
        if begin < 0 or end - begin != expect:
            raise ArmorFormatError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} {shape} needs {expect}"
            )
        tensors[name] = TensorInfo(path, dtype, tuple(shape))
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves bytes {position}..{begin} uncovered"
            raise ArmorFormatError(f"{path}: tensor {name} (data_offsets [{begin}, {end}]) {what}")
        if end > data_bytes:
            raise ArmorFormatError(
                f"{path}: tensor {name} ends at data byte {end}, but the file holds only {data_bytes} bytes of "
                f"tensor data (the file is truncated: {size} bytes, {8 + n + end} needed)"
            )
        position = end
    if position != data_bytes:
        raise ArmorFormatError(
            f"{path}: {data_bytes - position} bytes after the last tensor are not covered by the header"
        )
    return tensors


def _armor_config(model_dir: Path) -> ArmorConfig | None:
    config_path = model_dir / "config.json"
    config = read_json(config_path)
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        return None
    return ArmorConfig.from_dict(qcfg, where=f"{config_path}: quantization_config")


def _check_layer(prefix: str, stored: dict[str, TensorInfo], cfg: ArmorConfig) -> list[str]:
    """Problems of one compressed layer (names, dtypes, shapes from the headers)."""
    problems = []
    required = set(cfg.layer_tensors)
    allowed = required | {BIAS}
    version = f"format v{cfg.format_version}" + (
        "" if cfg.format_version == 1 else f" (wrappers: {str(cfg.wrappers).lower()})"
    )
    for suffix, info in sorted(stored.items()):
        if suffix in allowed:
            continue
        why = (
            "stray wrapper: this checkpoint stores no wrappers (wrappers: false)"
            if suffix in WRAPPER_TENSORS
            else f"not a tensor {version} allows for a compressed layer ({', '.join(sorted(allowed))})"
        )
        problems.append(f"{info.file}: tensor {prefix}.{suffix}: {why}")
    missing = sorted(required - set(stored))
    if missing:
        files = sorted({str(i.file) for i in stored.values()})
        problems.append(
            f"{', '.join(files)}: compressed layer {prefix} misses {', '.join(f'{prefix}.{m}' for m in missing)}"
        )
    if not cfg.is_compressed(prefix):
        problems.append(
            f"{prefix}: stored compressed, but quantization_config does not target it (targets "
            f"{list(cfg.targets)}, ignore {list(cfg.ignore)})"
        )
    if problems:
        return problems

    def bad(suffix: str, message: str) -> None:
        problems.append(f"{stored[suffix].file}: tensor {prefix}.{suffix}: {message}")

    comp, bits, shp = stored[COMPRESSED], stored[BITMASK], stored[SHAPE]
    if comp.dtype not in FLOAT_DTYPES:
        bad(COMPRESSED, f"dtype {comp.dtype}, expected one of {list(FLOAT_DTYPES)}")
    if bits.dtype != "U8":
        bad(BITMASK, f"dtype {bits.dtype}, expected U8")
    if shp.dtype not in ("I64", "I32") or shp.shape != (2,):
        bad(SHAPE, f"{shp.dtype} {list(shp.shape)}, expected I64 [2] ([d_out, d_in])")
    if len(comp.shape) != 2:
        bad(COMPRESSED, f"shape {list(comp.shape)}, expected [d_out, d_in/2]")
        return problems
    rows, cols = comp.shape[0], comp.shape[1] * 2
    if cols % 4:
        bad(COMPRESSED, f"shape {list(comp.shape)}: d_in = {cols} is not a multiple of 4 (2:4 groups)")
    if bits.shape != (rows, (cols + 7) // 8):
        bad(
            BITMASK,
            f"shape {list(bits.shape)}, expected {[rows, (cols + 7) // 8]} to match {prefix}.{COMPRESSED} {list(comp.shape)}",  # noqa: E501
        )
    bias = stored.get(BIAS)
    if bias is not None and (bias.shape != (rows,) or bias.dtype not in FLOAT_DTYPES):
        bad(BIAS, f"{bias.dtype} {list(bias.shape)}, expected a float [{rows}]")
    if cfg.wrappers:
        bs = cfg.block_size
        for suffix, dim in ((WRAPPER_OUT, rows), (WRAPPER_IN, cols)):
            info = stored[suffix]
            expect = (dim // bs, bs, bs)
            if dim % bs:
                bad(suffix, f"block size {bs} does not divide the layer's dimension {dim}")
            elif info.dtype != "F32" or info.shape != expect:
                bad(suffix, f"{info.dtype} {list(info.shape)}, expected F32 {list(expect)}")
    return problems


def validate_checkpoint_dir(path: str | Path) -> CheckpointLayout:
    """Validate a checkpoint directory from its headers (see the module docstring); raises
    ``ArmorFormatError`` naming every file and tensor at fault."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory")
    cfg = _armor_config(model_dir)
    files = shard_files(model_dir)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in tensors:
                problems.append(f"{f}: tensor {name} is also stored in {tensors[name].file}")
            tensors[name] = info
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ArmorFormatError(f"{index}: no weight_map object")
        for name, file_name in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file.name != file_name:
                problems.append(f"{index}: lists tensor {name} in {file_name}, which does not hold it")
    layout = CheckpointLayout(model_dir, cfg, files, tensors)
    if cfg is not None:
        by_module: dict[str, dict[str, TensorInfo]] = {}
        for name, info in tensors.items():
            module, _, suffix = name.rpartition(".")
            by_module.setdefault(module, {})[suffix] = info
        for module, stored in sorted(by_module.items()):
            if ARMOR_SUFFIXES.intersection(stored):
                layout.compressed[module] = set(stored)
                problems.extend(_check_layer(module, stored, cfg))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ArmorFormatError(
            f"{model_dir}: not a valid checkpoint ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:MAX_REPORTED])
            + more
        )
    return layout
