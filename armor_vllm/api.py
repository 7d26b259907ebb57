"""The Python API of the offline pass: ``armor_vllm.compress``, what ``python -m armor_vllm.offline``
runs (the CLI is a thin wrapper over it), in the spirit of llm-compressor's ``oneshot``::

    import armor_vllm

    summary = armor_vllm.compress("path/to/hf-model", "out/model-armor", preset="quick")
    summary = armor_vllm.compress(model, "out/model-wanda", method="wanda", tokenizer=tokenizer)

Options are the CLI's, with underscores (``block_size``, ``calib_samples``, ``seq_len``,
``calib_data``, ``order``, ``seed``, ``ignore``, ``preset``, ``iterations``, ``lr`` ...; the full
list is ``RECIPE_KEYS`` plus ``RUN_KEYS``); explicit options win over the recipe's, as on the
command line. ``dense_budget`` with ``sensitivity`` (a report of ``python -m armor_vllm.sensitivity``)
adds the most sensitive matrices to ``ignore`` (``armor_vllm.offline.dense_budget``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Options that go to the compression method (OfflineOptions.method_options).
METHOD_OPTION_KEYS = (
    "preset",
    "iterations",
    "lr",
    "objective",
    "init",
    "damp",
    "device",
    "distill",
    "distill_steps",
    "distill_max_seconds",
    "distill_lr",
    "distill_target",
    "output_target",
    "output_target_mix",
    "e2e",
    "e2e_steps",
    "e2e_seconds",
    "e2e_lr",
    "e2e_schedule",
    "e2e_topk",
    "e2e_batch",
    "e2e_hidden",
    "e2e_precision",
    "e2e_data",
)
# Options a recipe file (and compress) may set: the run's own, and the method's (METHOD_OPTION_KEYS).
RECIPE_KEYS = {
    "model",
    "method",
    "block_size",
    "calib_samples",
    "seq_len",
    "calib_data",
    "order",
    "seed",
    "ignore",
    "dense_budget",
    "sensitivity",
    *METHOD_OPTION_KEYS,
}
# How and where the run happens rather than what it computes (never in a recipe).
RUN_KEYS = ("overwrite", "workers", "ray_address")


def load_recipe(path: str | Path) -> dict:
    """A recipe is a YAML (safe subset) or JSON mapping of option names to values."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--recipe {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--recipe {p}: expected a mapping of option names to values")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"--recipe {p}: unknown option(s) {unknown}; known: {sorted(RECIPE_KEYS)}")
    return data


def offline_options(
    model: str | Path | None,
    output: str | Path,
    method: str | None = None,
    recipe: str | Path | None = None,
    **options: Any,
):
    """The ``OfflineOptions`` of a run: the recipe's values, overridden by ``model``, ``method``
    and ``options`` that are not None; unknown option names are an error."""
    from armor_vllm.offline.pipeline import OfflineOptions

    unknown = sorted(set(options) - RECIPE_KEYS - set(RUN_KEYS) - {"model", "method"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(RECIPE_KEYS | set(RUN_KEYS))}")
    values = load_recipe(recipe) if recipe else {}
    for key, value in {**options, "model": model, "method": method}.items():
        if value is not None:
            values[key] = str(value) if key == "model" else value
    run = {k: values.pop(k) for k in RUN_KEYS if k in values}
    budget, report = values.pop("dense_budget", None), values.pop("sensitivity", None)
    if budget is not None or report is not None:  # leave the most sensitive matrices dense (offline.dense_budget)
        from armor_vllm.models import resolve_model
        from armor_vllm.offline import dense_budget

        run["dense_budget"] = dense_budget.resolve(budget, report, resolve_model(values.get("model")))
        values["ignore"] = list(dict.fromkeys([*(values.get("ignore") or []), *run["dense_budget"]["matrices"]]))
    method_options = {k: values.pop(k) for k in METHOD_OPTION_KEYS if values.get(k) is not None}
    values = {k: v for k, v in values.items() if v is not None}
    return OfflineOptions(
        output=str(output),
        method_options=method_options,
        **run,
        **{"model": values.pop("model", None) or "default", **values},
    )


def _save_loaded_model(model, tokenizer, directory: Path) -> None:
    """Write a loaded transformers model (and its tokenizer) as a safetensors directory the
    offline pass can stream."""
    from armor_vllm.core.checkpoint import copy_side_files

    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ValueError(f"compress: the model is already quantized ({type(model).__name__}); pass a dense model")
    model.save_pretrained(directory)
    if tokenizer is None:
        source = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if not (source / "tokenizer_config.json").is_file():
            raise ValueError(
                "compress: pass tokenizer= (a tokenizer or its directory) with a loaded model; its "
                f"name_or_path {str(source)!r} is not a local directory with a tokenizer"
            )
        copy_side_files(source, directory)
    elif isinstance(tokenizer, (str, Path)):
        copy_side_files(Path(tokenizer), directory)
    else:
        tokenizer.save_pretrained(directory)


def compress(
    model=None,
    output: str | Path | None = None,
    method: str | None = None,
    recipe: str | Path | None = None,
    *,
    tokenizer=None,
    **options: Any,
) -> dict:
    """Compress ``model`` into an ARMOR (or plain 2:4) checkpoint at ``output`` and return the
    run's summary (also in ``output/armor_report.json``).

    ``model``: a local Hugging Face directory (safetensors), a loaded dense transformers model
    (written to a temporary directory first, with ``tokenizer`` or the tokenizer files of its
    ``name_or_path``), or None for the recipe's model or else the embedded default model.
    ``method``: ``armor`` (default, or the recipe's), ``nowag``, ``sparsegpt``, ``wanda``,
    ``magnitude``. ``recipe``: a YAML/JSON file of options. ``options``: as on the command line.
    """
    from armor_vllm.offline.pipeline import run_offline

    if output is None:
        raise ValueError("compress: output (the directory to write) is required")
    if model is None or isinstance(model, (str, Path)):
        return run_offline(offline_options(model, output, method, recipe, **options))
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)) and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"compress: tokenizer must be a tokenizer or a directory, got {type(tokenizer).__name__}")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"compress: model must be a directory or a transformers model, got {type(model).__name__}")
    tmp = Path(tempfile.mkdtemp(prefix="armor-compress-"))
    try:
        _save_loaded_model(model, tokenizer, tmp)
        return run_offline(offline_options(tmp, output, method, recipe, **options))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
