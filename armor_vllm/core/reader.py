"""Reading a checkpoint directory back: validated from its headers first (``core.validate``),
then every compressed layer decoded by the one layer reader (``core.format.decode_layer``) and
multiplied out (``ArmorLayer.weight``: the one fold). Every consumer that wants the dense
reconstruction of a directory (tests, the transformers reference loader) comes through here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from armor_vllm.core.checkpoint import load_tensors
from armor_vllm.core.format import BIAS, COMPRESSED, LAYER_TENSORS, decode_layer
from armor_vllm.core.validate import validate_checkpoint_dir


def compressed_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    suffix = "." + COMPRESSED
    return sorted(n[: -len(suffix)] for n in tensors if n.endswith(suffix))


def dense_state_dict(model_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint with every ARMOR layer multiplied out to a dense ``weight`` (``A·S·B`` in
    float32, then cast to ``dtype``, by default the stored dtype), after validating the directory
    (``armor_vllm.core.validate``): a plain state dict, e.g. to compare against."""
    model_dir = Path(model_dir)
    cfg = validate_checkpoint_dir(model_dir).config
    tensors = load_tensors(model_dir)
    if cfg is None:
        return tensors
    out = {}
    prefixes = compressed_prefixes(tensors)
    for prefix in prefixes:
        layer = decode_layer(prefix, tensors, cfg.block_size, cfg.wrappers)
        out[f"{prefix}.weight"] = layer.weight().to(dtype or tensors[f"{prefix}.{COMPRESSED}"].dtype)
        if layer.bias is not None:
            out[f"{prefix}.bias"] = layer.bias
    owned = {f"{p}.{s}" for p in prefixes for s in (*LAYER_TENSORS, BIAS)}
    out.update({k: v for k, v in tensors.items() if k not in owned})
    return out
