"""armor_vllm.compress, the Python API of the offline pass: from a directory or a loaded model, the
same checkpoint as the CLI (which wraps it), options validated by name."""

import json

import pytest
import torch

import armor_vllm
from armor_vllm.core.validate import validate_checkpoint_dir
from armor_vllm.offline.__main__ import main as offline_main


def shard_bytes(path):
    return (path / "model.safetensors").read_bytes()


def test_compress_from_a_directory_equals_the_cli(tiny_model_dir, tmp_path, capsys):
    summary = armor_vllm.compress(
        tiny_model_dir, tmp_path / "api", method="wanda", calib_samples=4, seq_len=32, calib_data=["pydoc"]
    )
    assert summary["method"] == "wanda" and summary["matrices"] == 14 and summary["wrapper_overhead"] == 0.0
    layout = validate_checkpoint_dir(tmp_path / "api")
    assert layout.config.method == "wanda" and layout.config.wrappers is False and layout.config.format_version == 2
    assert (
        offline_main(
            [
                "--model",
                str(tiny_model_dir),
                "--output",
                str(tmp_path / "cli"),
                "--method",
                "wanda",
                "--calib-samples",
                "4",
                "--seq-len",
                "32",
                "--calib-data",
                "pydoc",
            ]
        )
        == 0
    )
    assert "14 matrices compressed with wanda" in capsys.readouterr().out
    assert shard_bytes(tmp_path / "api") == shard_bytes(tmp_path / "cli")


def test_compress_a_loaded_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # bfloat16, as stored
    armor_vllm.compress(tiny_model_dir, tmp_path / "from-dir", method="magnitude")
    armor_vllm.compress(model, tmp_path / "from-model", method="magnitude")  # tokenizer from name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    armor_vllm.compress(model, tmp_path / "with-tokenizer", method="magnitude", tokenizer=tokenizer)
    for out in ("from-model", "with-tokenizer"):
        assert shard_bytes(tmp_path / out) == shard_bytes(tmp_path / "from-dir")
        assert (tmp_path / out / "tokenizer.json").is_file()


def test_recipe_and_options(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\nmethod: wanda\nblock_size: 16\n")
    summary = armor_vllm.compress(None, tmp_path / "out", method="magnitude", recipe=recipe)
    assert summary["method"] == "magnitude" and summary["block_size"] == 16  # explicit wins, recipe fills in
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["block_size"] == 16
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['blocksize'\]"):
        armor_vllm.compress(tiny_model_dir, tmp_path / "x", blocksize=16)
    with pytest.raises(FileExistsError, match="already exists"):
        armor_vllm.compress(tiny_model_dir, tmp_path / "out", method="magnitude")
    armor_vllm.compress(tiny_model_dir, tmp_path / "out", method="magnitude", overwrite=True)
    with pytest.raises(TypeError, match="model must be a directory or a transformers model"):
        armor_vllm.compress(torch.zeros(2), tmp_path / "y")
