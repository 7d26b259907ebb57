"""Checkpoint format v2 (and v1): how one ARMOR linear layer and the model's
``quantization_config`` are stored, and the validation both the offline pass and the readers (vLLM
plugin, transformers quantizer) apply.

For a compressed linear ``P`` (for example ``model.layers.0.mlp.up_proj``):

=====================  ===========================  ==========================================
tensor                 shape, dtype                 meaning
=====================  ===========================  ==========================================
``P.compressed``       ``(d_out, d_in/2)``, model   the kept values of the 2:4 core ``S``, row by row
``P.bitmask``          ``(d_out, d_in/8)``, uint8   positions of the kept values (``pack_bitmasks``)
``P.shape``            ``(2,)``, int64              ``[d_out, d_in]``
``P.wrapper_out``      ``(d_out/bs, bs, bs)``, f32  the paper's ``A``: block-diagonal, on the output
``P.wrapper_in``       ``(d_in/bs, bs, bs)``, f32   the paper's ``B``: block-diagonal, on the input
``P.bias``             ``(d_out,)``, model          only when the layer has a bias
=====================  ===========================  ==========================================

The first three are exactly compressed-tensors' ``sparse-24-bitmask`` layout: its
``unpack_bitmasks`` restores the mask and the values fill it in row-major order.

Versions: v1 stores both wrappers for every compressed layer. v2 adds
``quantization_config.wrappers`` (absent = true): ``true`` is v1's layout; ``false`` means no layer
stores ``wrapper_out`` or ``wrapper_in`` (``A`` and ``B`` are the identity: plain 2:4 checkpoints
of magnitude, Wanda, SparseGPT, NoWag-P). A wrapper tensor in a ``wrappers: false`` checkpoint is
an error, as is any other tensor the format does not name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from armor_vllm.core.factorization import GROUP, KEEP, check_block_size, is_identity_blocks, kept_mask, reconstruct

QUANT_METHOD = "armor"
FORMAT_VERSION = 2  # what this version writes
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # what it reads
SPARSITY_FORMAT = "sparse-24-bitmask"
SPARSITY_STRUCTURE = "2:4"
METHODS = ("magnitude", "wanda", "sparsegpt", "nowag", "armor")

COMPRESSED = "compressed"
BITMASK = "bitmask"
SHAPE = "shape"
WRAPPER_OUT = "wrapper_out"
WRAPPER_IN = "wrapper_in"
BIAS = "bias"
CORE_TENSORS = (COMPRESSED, BITMASK, SHAPE)
WRAPPER_TENSORS = (WRAPPER_OUT, WRAPPER_IN)
LAYER_TENSORS = (*CORE_TENSORS, *WRAPPER_TENSORS)  # a layer with wrappers (v1, v2 wrappers=true)
WRAPPER_DTYPE = torch.float32

# config.json key and value that make plain transformers (without ``import armor_vllm``) refuse an
# ARMOR checkpoint loudly instead of loading random decoder weights: transformers loads the weights
# file this key names, which does not exist. armor_vllm's transformers quantizer drops the key
# before transformers resolves the weight files (armor_vllm.hf.quantizer).
TRANSFORMERS_GUARD_KEY = "transformers_weights"
TRANSFORMERS_GUARD = "ARMOR-checkpoint--import-armor_vllm-to-load-it-with-transformers.safetensors"


def layer_tensor_names(wrappers: bool) -> tuple[str, ...]:
    """The tensors every compressed layer stores (``BIAS`` may come in addition)."""
    return LAYER_TENSORS if wrappers else CORE_TENSORS


class ArmorFormatError(ValueError):
    """A checkpoint that does not follow the format; the message names the file, layer or tensor."""


# ---------------------------------------------------------------------------------------------
# One layer


def compress_core(core: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode a 2:4 core in the sparse-24-bitmask layout: ``compressed``, ``bitmask``, ``shape``."""
    # Imported here: compressed-tensors imports transformers' model code, and this module must stay
    # importable while transformers is loading (armor_vllm registers its quantizer then).
    from compressed_tensors.utils import pack_bitmasks

    mask = kept_mask(core)
    rows, cols = core.shape
    return {
        COMPRESSED: core[mask].reshape(rows, cols // 2).contiguous(),
        BITMASK: pack_bitmasks(mask.cpu()),
        SHAPE: torch.tensor([rows, cols], dtype=torch.int64),
    }


def decompress_core(
    compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, where: str = "layer"
) -> torch.Tensor:
    """The dense 2:4 core from its sparse-24-bitmask tensors, validated on the way."""
    from compressed_tensors.utils import unpack_bitmasks

    rows, cols = validate_shape_tensor(shape, where)
    expect = {COMPRESSED: (rows, cols // 2), BITMASK: (rows, (cols + 7) // 8)}
    for name, tensor in ((COMPRESSED, compressed), (BITMASK, bitmask)):
        if tuple(tensor.shape) != expect[name]:
            raise ArmorFormatError(
                f"{where}.{name}: shape {tuple(tensor.shape)}, expected {expect[name]} for a {rows}x{cols} layer"
            )
    if bitmask.dtype != torch.uint8:
        raise ArmorFormatError(f"{where}.{BITMASK}: dtype {bitmask.dtype}, expected torch.uint8")
    mask = unpack_bitmasks(bitmask.cpu(), [rows, cols]).to(compressed.device)
    per_group = mask.reshape(rows, cols // GROUP, GROUP).sum(-1)
    if not bool((per_group == KEEP).all()):
        bad = (per_group != KEEP).nonzero()[0]
        raise ArmorFormatError(
            f"{where}.{BITMASK}: not a 2:4 mask (row {int(bad[0])}, columns "
            f"{int(bad[1]) * GROUP}..{int(bad[1]) * GROUP + 3} keep {int(per_group[bad[0], bad[1]])} of 4)"
        )
    core = torch.zeros(rows, cols, dtype=compressed.dtype, device=compressed.device)
    core[mask] = compressed.reshape(-1)
    return core


def validate_shape_tensor(shape: torch.Tensor, where: str) -> tuple[int, int]:
    if shape.numel() != 2 or shape.dtype.is_floating_point:
        raise ArmorFormatError(f"{where}.{SHAPE}: expected 2 integers [d_out, d_in], got {shape.tolist()}")
    rows, cols = (int(v) for v in shape.tolist())
    if rows <= 0 or cols <= 0 or cols % GROUP:
        raise ArmorFormatError(f"{where}.{SHAPE}: {[rows, cols]} is not a valid 2:4 layer shape")
    return rows, cols


def validate_wrapper(blocks: torch.Tensor, dim: int, block_size: int, where: str, name: str) -> None:
    if dim % block_size:
        raise ArmorFormatError(f"{where}: block size {block_size} does not divide the dimension {dim} of {name}")
    expect = (dim // block_size, block_size, block_size)
    if tuple(blocks.shape) != expect:
        raise ArmorFormatError(f"{where}.{name}: shape {tuple(blocks.shape)}, expected {expect}")
    if not bool(torch.isfinite(blocks).all()):
        raise ArmorFormatError(f"{where}.{name}: holds non-finite values")


@dataclass
class ArmorLayer:
    """One factorized linear: ``y = A (S (B x)) + bias`` with blocks as in the module docstring;
    ``None`` wrappers are the identity (a layer of a ``wrappers: false`` checkpoint)."""

    wrapper_out: torch.Tensor | None  # A, (d_out/bs, bs, bs)
    core: torch.Tensor  # S, dense (d_out, d_in) holding zeros where pruned
    wrapper_in: torch.Tensor | None  # B, (d_in/bs, bs, bs)
    bias: torch.Tensor | None = None

    @property
    def block_size(self) -> int | None:
        return None if self.wrapper_out is None else int(self.wrapper_out.shape[-1])

    def weight(self) -> torch.Tensor:
        """The dense ``A·S·B`` in float32."""
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        return reconstruct(f32(self.wrapper_out), self.core.float(), f32(self.wrapper_in))


def encode_layer(prefix: str, layer: ArmorLayer, dtype: torch.dtype, wrappers: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one layer, keyed by their full names. ``wrappers=False`` (a
    ``wrappers: false`` checkpoint) stores none, and refuses a layer whose wrappers are not the
    identity rather than drop them."""
    tensors = compress_core(layer.core.to(dtype))
    if wrappers:
        if layer.wrapper_out is None or layer.wrapper_in is None:
            raise ArmorFormatError(
                f"{prefix}: a checkpoint with wrappers stores A and B for every layer; this one has none"
            )
        tensors[WRAPPER_OUT] = layer.wrapper_out.to(WRAPPER_DTYPE).contiguous()
        tensors[WRAPPER_IN] = layer.wrapper_in.to(WRAPPER_DTYPE).contiguous()
    else:
        for name, blocks in ((WRAPPER_OUT, layer.wrapper_out), (WRAPPER_IN, layer.wrapper_in)):
            if blocks is not None and not is_identity_blocks(blocks):
                raise ArmorFormatError(
                    f"{prefix}.{name}: not the identity, so it cannot be left out of a checkpoint without "
                    f"wrappers (wrappers: false)"
                )
    if layer.bias is not None:
        tensors[BIAS] = layer.bias.to(dtype).contiguous()
    return {f"{prefix}.{k}": v.cpu() for k, v in tensors.items()}


def decode_layer(prefix: str, tensors: dict[str, torch.Tensor], block_size: int, wrappers: bool = True) -> ArmorLayer:
    """Read one layer from ``tensors`` (full names), validating every tensor against the format:
    ``wrappers`` is the checkpoint's ``quantization_config.wrappers``."""
    missing = [name for name in layer_tensor_names(wrappers) if f"{prefix}.{name}" not in tensors]
    if missing:
        raise ArmorFormatError(f"{prefix}: missing tensor(s) {', '.join(f'{prefix}.{m}' for m in missing)}")
    if not wrappers:
        stray = [f"{prefix}.{name}" for name in WRAPPER_TENSORS if f"{prefix}.{name}" in tensors]
        if stray:
            raise ArmorFormatError(
                f"{', '.join(stray)}: stray tensor(s); the checkpoint says wrappers: false, so no layer stores wrappers"
            )
    get = lambda name: tensors[f"{prefix}.{name}"]  # noqa: E731
    core = decompress_core(get(COMPRESSED), get(BITMASK), get(SHAPE), where=prefix)
    rows, cols = core.shape
    a = b = None
    if wrappers:
        a, b = get(WRAPPER_OUT), get(WRAPPER_IN)
        validate_wrapper(a, rows, block_size, prefix, WRAPPER_OUT)
        validate_wrapper(b, cols, block_size, prefix, WRAPPER_IN)
    bias = tensors.get(f"{prefix}.{BIAS}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ArmorFormatError(f"{prefix}.{BIAS}: shape {tuple(bias.shape)}, expected ({rows},)")
    return ArmorLayer(a, core, b, bias)


# ---------------------------------------------------------------------------------------------
# quantization_config


@dataclass(frozen=True)
class ArmorConfig:
    """The validated ``quantization_config`` of an ARMOR checkpoint."""

    block_size: int
    method: str
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    global_sparsity: float = 0.0
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    wrappers: bool = True  # v2: false = no layer stores A or B (identity); v1 is always true

    def __post_init__(self):
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ArmorFormatError(
                f"format_version {self.format_version!r} is not one of {list(SUPPORTED_FORMAT_VERSIONS)}"
            )
        if self.format_version == 1 and not self.wrappers:
            raise ArmorFormatError("format v1 always stores wrappers; wrappers=False needs format_version 2")

    def to_dict(self) -> dict[str, Any]:
        version_keys = {"wrappers": self.wrappers} if self.format_version >= 2 else {}
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "block_size": self.block_size,
            **version_keys,
            "method": self.method,
            "wrapper_dtype": "float32",
            "sparsity_config": {
                "format": SPARSITY_FORMAT,
                "sparsity_structure": SPARSITY_STRUCTURE,
                "targets": list(self.targets),
                "ignore": list(self.ignore),
                "global_sparsity": self.global_sparsity,
            },
            **self.extra,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "quantization_config") -> "ArmorConfig":
        """Parse and validate; every value is checked against the ones we support, never used to
        pick code by name."""
        if not isinstance(config, dict):
            raise ArmorFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
        if config.get("quant_method") != QUANT_METHOD:
            raise ArmorFormatError(f"{where}.quant_method: {config.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = config.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ArmorFormatError(
                f"{where}.format_version: {version!r} is not supported (this armor-vllm reads "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade armor-vllm or re-export the checkpoint"
            )
        block_size = config.get("block_size")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ArmorFormatError(f"{where}.block_size: {block_size!r} is not a positive integer")
        if version == 1 and "wrappers" in config:
            raise ArmorFormatError(
                f"{where}.wrappers: not a format-v1 key (v1 always stores wrappers); use format_version 2"
            )
        wrappers = config.get("wrappers", True)
        if not isinstance(wrappers, bool):
            raise ArmorFormatError(f"{where}.wrappers: {wrappers!r}, expected true or false")
        method = config.get("method")
        if method not in METHODS:
            raise ArmorFormatError(f"{where}.method: {method!r} is not one of {list(METHODS)}")
        if config.get("wrapper_dtype", "float32") != "float32":
            raise ArmorFormatError(f"{where}.wrapper_dtype: {config.get('wrapper_dtype')!r}, expected 'float32'")
        sparsity = config.get("sparsity_config")
        if not isinstance(sparsity, dict):
            raise ArmorFormatError(f"{where}.sparsity_config: missing or not an object")
        if sparsity.get("format") != SPARSITY_FORMAT:
            raise ArmorFormatError(
                f"{where}.sparsity_config.format: {sparsity.get('format')!r}, expected {SPARSITY_FORMAT!r}"
            )
        if sparsity.get("sparsity_structure") != SPARSITY_STRUCTURE:
            raise ArmorFormatError(
                f"{where}.sparsity_config.sparsity_structure: {sparsity.get('sparsity_structure')!r}, "
                f"expected {SPARSITY_STRUCTURE!r}"
            )
        targets = sparsity.get("targets") or ["Linear"]
        ignore = sparsity.get("ignore") or []
        for key, values in (("targets", targets), ("ignore", ignore)):
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ArmorFormatError(f"{where}.sparsity_config.{key}: expected a list of strings")
            for v in values:
                if v.startswith("re:"):
                    try:
                        re.compile(v[3:])
                    except re.error as exc:
                        raise ArmorFormatError(f"{where}.sparsity_config.{key}: bad pattern {v!r}: {exc}") from None
        known = {
            "quant_method",
            "format_version",
            "block_size",
            "wrappers",
            "method",
            "wrapper_dtype",
            "sparsity_config",
        }
        extra = {k: v for k, v in config.items() if k not in known}
        return cls(
            block_size=block_size,
            method=method,
            targets=tuple(targets),
            ignore=tuple(ignore),
            global_sparsity=float(sparsity.get("global_sparsity") or 0.0),
            format_version=version,
            extra=extra,
            wrappers=wrappers,
        )

    @property
    def layer_tensors(self) -> tuple[str, ...]:
        """The tensors every compressed layer of this checkpoint stores (a bias may come in addition)."""
        return layer_tensor_names(self.wrappers)

    def is_compressed(self, module_name: str, class_name: str = "Linear") -> bool:
        """Whether the linear ``module_name`` is stored in the ARMOR layout (compressed-tensors'
        matching rules: a class name, an exact module name, or ``re:`` followed by a pattern)."""
        return matches_module(module_name, self.targets, class_name) and not matches_module(
            module_name, self.ignore, class_name
        )


def matches_module(name: str, patterns, class_name: str | None = None) -> bool:
    """compressed-tensors' matching rules: a class name, an exact module name or its last
    components, or ``re:`` followed by a regular expression (``re.match``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == class_name or pattern == name or name.endswith("." + pattern):
            return True
    return False


def check_layer_block_size(prefix: str, d_out: int, d_in: int, block_size: int) -> None:
    """Clear error when the block size does not divide a layer (offline and at load time)."""
    for dim, what in ((d_out, "output"), (d_in, "input")):
        try:
            check_block_size(dim, block_size, what=f"{what} dimension")
        except ValueError as exc:
            raise ArmorFormatError(f"{prefix}: {exc}") from None
