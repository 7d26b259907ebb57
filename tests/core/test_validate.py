"""armor_vllm.core.validate: checkpoint directories are checked from their headers, and every problem
is named by file and tensor (truncated shards, stray tensors, missing tensors, wrong dtypes/shapes,
index mismatches, layers the config does not target)."""

import json
import os
import shutil
import time

import pytest
import torch
from armor_checkpoints import edit_config, edit_tensors, write_armor_checkpoint

from armor_vllm.core.checkpoint import load_tensors
from armor_vllm.core.format import ArmorFormatError
from armor_vllm.core.validate import read_safetensors_header, validate_checkpoint_dir

UP = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("validate")
    return {k: write_armor_checkpoint(tiny_model_dir, root / k, k) for k in ("v2-wrappers", "v2-plain", "v1")}


def test_valid_checkpoints_pass_and_report_their_layout(ckpts, tiny_model_dir):
    for kind, ckpt in ckpts.items():
        layout = validate_checkpoint_dir(ckpt)
        assert len(layout.compressed) == 14, kind
        expect = {"compressed", "bitmask", "shape"} | ({"wrapper_out", "wrapper_in"} if kind != "v2-plain" else set())
        assert layout.compressed[UP] == expect
        assert layout.tensors[f"{UP}.bitmask"].dtype == "U8"
    dense = validate_checkpoint_dir(tiny_model_dir)  # an ordinary model: headers only
    assert dense.config is None and not dense.compressed


def test_truncated_shard_names_file_and_tensor(ckpts, tmp_path):
    bad = shutil.copytree(ckpts["v2-wrappers"], tmp_path / "trunc")
    shard = bad / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ArmorFormatError, match=r"model\.safetensors: tensor \S+ ends at data byte .* truncated"):
        validate_checkpoint_dir(bad)
    os.truncate(shard, 5)
    with pytest.raises(ArmorFormatError, match=r"model\.safetensors: 5 bytes, too short"):
        validate_checkpoint_dir(bad)


def test_broken_headers_name_the_file(tmp_path):
    def shard(header: bytes, data: bytes = b"") -> str:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + data)
        return str(path)

    cases = [
        (shard(b"{not json"), "not valid JSON"),
        (
            shard(json.dumps({"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode(), b"\0"),
            "tensor t: dtype 'F4' is not one of",
        ),
        (
            shard(json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
            r"tensor t: data_offsets \[0, 4\] span 4 bytes, but F32 \[2\] needs 8",
        ),
        (
            shard(
                json.dumps(
                    {
                        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                        "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                    }
                ).encode(),
                b"\0" * 3,
            ),
            "tensor b .* overlaps",
        ),
        (
            shard(json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode(), b"\0" * 5),
            "3 bytes after the last tensor are not covered",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ArmorFormatError, match=message) as info:
            read_safetensors_header(path)
        assert path in str(info.value)
    path = tmp_path / "long.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArmorFormatError, match="claims 1000000 bytes but only 2 follow"):
        read_safetensors_header(path)


def test_stray_tensor_next_to_a_compressed_layer(ckpts, tmp_path):
    bad = edit_tensors(
        ckpts["v2-wrappers"],
        tmp_path / "stray",
        lambda t: t.update({f"{UP}.bogus": torch.zeros(3), f"{UP}.weight": torch.zeros(2, 2)}),
    )
    with pytest.raises(ArmorFormatError) as info:
        validate_checkpoint_dir(bad)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert f"model.safetensors: tensor {UP}.bogus: not a tensor format v2 (wrappers: true) allows" in message
    assert f"tensor {UP}.weight: not a tensor" in message


def test_stray_wrappers_in_a_plain_checkpoint_and_missing_wrappers(ckpts, tmp_path):
    plain, wrapped = ckpts["v2-plain"], ckpts["v2-wrappers"]
    extra = load_tensors(wrapped)[f"{UP}.wrapper_in"]
    bad = edit_tensors(plain, tmp_path / "stray-wrapper", lambda t: t.update({f"{UP}.wrapper_in": extra}))
    with pytest.raises(
        ArmorFormatError, match=rf"tensor {UP}.wrapper_in: stray wrapper: this checkpoint stores no wrappers"
    ):
        validate_checkpoint_dir(bad)
    bad = edit_tensors(wrapped, tmp_path / "missing", lambda t: t.pop(f"{UP}.wrapper_out"))
    with pytest.raises(ArmorFormatError, match=rf"compressed layer {UP} misses {UP}.wrapper_out"):
        validate_checkpoint_dir(bad)
    # a v1 checkpoint must carry wrappers too
    bad = edit_tensors(ckpts["v1"], tmp_path / "v1-missing", lambda t: t.pop(f"{UP}.wrapper_in"))
    with pytest.raises(ArmorFormatError, match=rf"misses {UP}.wrapper_in"):
        validate_checkpoint_dir(bad)


def test_dtypes_and_shapes_from_the_headers(ckpts, tmp_path):
    def change(t):
        t[f"{UP}.bitmask"] = t[f"{UP}.bitmask"].to(torch.int64)
        t["model.layers.1.mlp.down_proj.wrapper_out"] = t["model.layers.1.mlp.down_proj.wrapper_out"][:1]
        t["model.layers.1.self_attn.q_proj.compressed"] = t["model.layers.1.self_attn.q_proj.compressed"][:-1]

    bad = edit_tensors(ckpts["v2-wrappers"], tmp_path / "dtypes", change)
    with pytest.raises(ArmorFormatError) as info:
        validate_checkpoint_dir(bad)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert f"tensor {UP}.bitmask: dtype I64, expected U8" in message
    assert "tensor model.layers.1.mlp.down_proj.wrapper_out: F32 [1, 32, 32], expected F32 [2, 32, 32]" in message
    assert (
        "tensor model.layers.1.self_attn.q_proj.bitmask: shape [64, 8], expected [63, 8] to match "
        "model.layers.1.self_attn.q_proj.compressed [63, 32]"
    ) in message
    assert "q_proj.wrapper_out: block size 32 does not divide the layer's dimension 63" in message


def test_config_and_checkpoint_must_agree(ckpts, tmp_path):
    bad = edit_config(
        ckpts["v2-wrappers"],
        tmp_path / "ignored",
        lambda c: c["quantization_config"]["sparsity_config"].update(ignore=["lm_head", "re:.*mlp.*"]),
    )
    with pytest.raises(ArmorFormatError, match=rf"{UP}: stored compressed, but quantization_config does not target it"):
        validate_checkpoint_dir(bad)
    bad = edit_config(
        ckpts["v2-wrappers"], tmp_path / "v9", lambda c: c["quantization_config"].update(format_version=9)
    )
    with pytest.raises(ArmorFormatError, match="format_version: 9 is not supported"):
        validate_checkpoint_dir(bad)


def test_sharded_checkpoint_and_its_index(ckpts, tmp_path):
    from armor_vllm.core.checkpoint import ShardWriter

    src = ckpts["v2-wrappers"]
    out = tmp_path / "sharded"
    shutil.copytree(src, out)
    (out / "model.safetensors").unlink()
    writer = ShardWriter(out, max_bytes=1 << 20)
    for name, t in load_tensors(src).items():
        writer.add(name, t)
    shards = writer.close()
    assert len(shards) > 1
    assert len(validate_checkpoint_dir(out).compressed) == 14
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"][f"{UP}.compressed"] = (
        shards[-1] if index["weight_map"][f"{UP}.compressed"] != shards[-1] else shards[0]
    )
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ArmorFormatError,
        match=rf"index.json: lists tensor {UP}.compressed in model-0000\d-of-0000\d.safetensors, which does not hold it",  # noqa: E501
    ):
        validate_checkpoint_dir(out)


def test_headers_only_is_fast():
    """The embedded model (270 MiB) validates in well under a second: tensor data is never read."""
    from armor_vllm.models import default_model_dir

    start = time.perf_counter()
    layout = validate_checkpoint_dir(default_model_dir())
    assert time.perf_counter() - start < 1.0
    assert layout.config is None and len(layout.tensors) > 200
