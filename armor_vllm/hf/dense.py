"""The dense reconstruction of a checkpoint as a transformers model, built by hand: an independent
reference for the quantizer (``hf.quantizer``), and the way to load what it does not (MoE experts)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from armor_vllm.core.checkpoint import shard_files
from armor_vllm.core.format import ArmorFormatError
from armor_vllm.core.reader import compressed_prefixes, dense_state_dict


def load_dense_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """A transformers model holding the dense reconstruction of an ARMOR checkpoint (or the
    dense model itself), built by hand from ``dense_state_dict``. The way in for users is
    ``AutoModelForCausalLM.from_pretrained`` after ``import armor_vllm`` (``hf_quantizer``); this
    stays as an independent reference, and for what that does not load (MoE experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in dense_state_dict(model_dir, dtype).items()}
    # Through transformers' checkpoint key conversion (per-expert tensors -> 3-D expert parameters,
    # renamed modules); reconstructed layers are (d_out, d_in) even where transformers has a Conv1D.
    from armor_vllm.hf.keys import load_checkpoint_state

    names = [k for f in shard_files(model_dir) for k in safe_open(str(f), framework="pt").keys()]
    try:
        load_checkpoint_state(model, state, linear_oriented=compressed_prefixes(names))
    except ValueError as exc:
        raise ArmorFormatError(f"{model_dir}: {exc}") from None
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
