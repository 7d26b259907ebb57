"""Checkpoint format v2 (and v1): round trips, the sparse-24-bitmask layout, layers without
wrappers, and config validation."""

import numpy as np
import pytest
import torch
from compressed_tensors.utils import unpack_bitmasks
from conftest import random_armor_layer

from armor_vllm.core.factorization import reconstruct
from armor_vllm.core.format import (
    ArmorConfig,
    ArmorFormatError,
    ArmorLayer,
    compress_core,
    decode_layer,
    decompress_core,
    encode_layer,
)


def make_layer(rows=64, cols=96, bs=32, seed=0, bias=True):
    return random_armor_layer(rows, cols, bs, seed, spread=0.1, bias=bias)


def test_layer_round_trip_is_exact():
    layer = make_layer()
    tensors = encode_layer("model.layers.0.mlp.up_proj", layer, torch.float32)
    assert set(tensors) == {
        f"model.layers.0.mlp.up_proj.{s}"
        for s in ("compressed", "bitmask", "shape", "wrapper_out", "wrapper_in", "bias")
    }
    back = decode_layer("model.layers.0.mlp.up_proj", tensors, block_size=32)
    assert torch.equal(back.core, layer.core)
    assert torch.equal(back.wrapper_out, layer.wrapper_out) and torch.equal(back.wrapper_in, layer.wrapper_in)
    assert torch.equal(back.bias, layer.bias)
    torch.testing.assert_close(
        reconstruct(back.wrapper_out, back.core, back.wrapper_in),
        reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in),
    )


def test_bitmask_layout_matches_compressed_tensors():
    layer = make_layer(rows=8, cols=32, bs=8)
    enc = compress_core(layer.core)
    mask = layer.core != 0
    # Independent packing: numpy little-endian bits per row, as compressed-tensors' pack_bitmasks.
    expect = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert enc["bitmask"].dtype == torch.uint8
    assert np.array_equal(enc["bitmask"].numpy(), expect)
    assert enc["shape"].tolist() == [8, 32]
    # compressed-tensors' own unpacking restores the mask, and values fill it row-major.
    unpacked = unpack_bitmasks(enc["bitmask"], [8, 32])
    assert torch.equal(unpacked, mask)
    dense = torch.zeros(8, 32)
    dense[unpacked] = enc["compressed"].reshape(-1)
    assert torch.equal(dense, layer.core)
    assert enc["compressed"].shape == (8, 16)


def test_groups_with_fewer_than_two_nonzeros_still_store_two_values():
    core = torch.zeros(2, 8)
    core[0, 1] = 5.0
    enc = compress_core(core)
    assert enc["compressed"].shape == (2, 4)
    assert torch.equal(decompress_core(enc["compressed"], enc["bitmask"], enc["shape"]), core)


def test_decode_errors_name_the_tensor():
    prefix = "model.layers.3.self_attn.q_proj"
    good = encode_layer(prefix, make_layer(bias=False), torch.float32)

    missing = {k: v for k, v in good.items() if not k.endswith("wrapper_in")}
    with pytest.raises(ArmorFormatError, match=rf"{prefix}.wrapper_in"):
        decode_layer(prefix, missing, 32)

    wrong = dict(good, **{f"{prefix}.compressed": good[f"{prefix}.compressed"][:, :-1]})
    with pytest.raises(ArmorFormatError, match=rf"{prefix}.compressed: shape"):
        decode_layer(prefix, wrong, 32)

    bits = good[f"{prefix}.bitmask"].clone()
    bits[0, 0] = 0b00000111  # three kept in the first group of four
    with pytest.raises(ArmorFormatError, match=rf"{prefix}.bitmask: not a 2:4 mask \(row 0, columns 0..3"):
        decode_layer(prefix, dict(good, **{f"{prefix}.bitmask": bits}), 32)

    with pytest.raises(ArmorFormatError, match="block size 48 does not divide"):
        decode_layer(prefix, good, 48)


def config_dict(**over):
    d = ArmorConfig(block_size=32, method="armor").to_dict()
    d.update(over)
    return d


def test_config_round_trip_and_matching():
    cfg = ArmorConfig.from_dict(config_dict())
    assert cfg.block_size == 32 and cfg.method == "armor"
    assert cfg.to_dict()["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert cfg.is_compressed("model.layers.0.mlp.up_proj")
    assert not cfg.is_compressed("lm_head")
    cfg2 = ArmorConfig.from_dict(
        config_dict(
            sparsity_config={
                "format": "sparse-24-bitmask",
                "sparsity_structure": "2:4",
                "targets": ["re:.*mlp.*"],
                "ignore": ["re:.*layers\\.1\\..*"],
            }
        )
    )
    assert cfg2.is_compressed("model.layers.0.mlp.up_proj")
    assert not cfg2.is_compressed("model.layers.0.self_attn.q_proj")
    assert not cfg2.is_compressed("model.layers.1.mlp.up_proj")


def test_config_is_compatible_with_compressed_tensors_sparsity_config():
    from compressed_tensors.config import SparsityCompressionConfig

    sc = config_dict()["sparsity_config"]
    parsed = SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert parsed.sparsity_structure == "2:4"


@pytest.mark.parametrize(
    "over, message",
    [
        ({"format_version": 3}, "format_version: 3 is not supported"),
        ({"wrappers": "no"}, "wrappers: 'no', expected true or false"),
        ({"format_version": 1, "wrappers": True}, "wrappers: not a format-v1 key"),
        ({"quant_method": "compressed-tensors"}, "quant_method"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": "32"}, "block_size"),
        ({"method": "os.system"}, "method"),
        ({"sparsity_config": {"format": "dense", "sparsity_structure": "2:4"}}, "sparsity_config.format"),
        (
            {"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "unstructured"}},
            "sparsity_structure",
        ),
        (
            {"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "ignore": ["re:("]}},
            "bad pattern",
        ),
    ],
)
def test_config_rejects_bad_values(over, message):
    with pytest.raises(ArmorFormatError, match=message):
        ArmorConfig.from_dict(config_dict(**over))


def test_config_versions_and_wrappers():
    v2 = ArmorConfig(block_size=32, method="wanda", wrappers=False).to_dict()
    assert v2["format_version"] == 2 and v2["wrappers"] is False
    assert ArmorConfig.from_dict(v2) == ArmorConfig(block_size=32, method="wanda", wrappers=False)
    assert ArmorConfig.from_dict(v2).to_dict() == v2
    absent = dict(config_dict(), format_version=2)
    del absent["wrappers"]
    assert ArmorConfig.from_dict(absent).wrappers is True  # absent = true
    v1 = ArmorConfig(block_size=32, method="armor", format_version=1).to_dict()
    assert "wrappers" not in v1 and ArmorConfig.from_dict(v1).wrappers is True
    assert ArmorConfig.from_dict(v1).to_dict() == v1
    assert ArmorConfig.from_dict(v2).layer_tensors == ("compressed", "bitmask", "shape")
    with pytest.raises(ArmorFormatError, match="format v1 always stores wrappers"):
        ArmorConfig(block_size=32, method="wanda", format_version=1, wrappers=False)


def test_layer_without_wrappers():
    prefix = "model.layers.0.mlp.down_proj"
    layer = make_layer(rows=64, cols=96, bias=True)
    plain = ArmorLayer(
        torch.eye(32).expand(2, 32, 32).clone(), layer.core, torch.eye(32).expand(3, 32, 32).clone(), layer.bias
    )
    with_wrappers = encode_layer(prefix, plain, torch.float32)
    without = encode_layer(prefix, plain, torch.float32, wrappers=False)
    assert set(with_wrappers) - set(without) == {f"{prefix}.wrapper_out", f"{prefix}.wrapper_in"}
    back = decode_layer(prefix, without, 32, wrappers=False)
    assert back.wrapper_out is None and back.wrapper_in is None and back.block_size is None
    assert torch.equal(back.weight(), decode_layer(prefix, with_wrappers, 32).weight())
    assert torch.equal(back.weight(), layer.core)
    # wrappers that do work cannot be dropped, and stray wrappers are refused
    with pytest.raises(ArmorFormatError, match=rf"{prefix}.wrapper_out: not the identity"):
        encode_layer(prefix, layer, torch.float32, wrappers=False)
    with pytest.raises(ArmorFormatError, match=rf"{prefix}.wrapper_out, {prefix}.wrapper_in: stray tensor"):
        decode_layer(prefix, with_wrappers, 32, wrappers=False)
    with pytest.raises(ArmorFormatError, match=rf"missing tensor\(s\) {prefix}.wrapper_out"):
        decode_layer(prefix, without, 32, wrappers=True)
    with pytest.raises(ArmorFormatError, match="has none"):
        encode_layer(prefix, ArmorLayer(None, layer.core, None), torch.float32)
