"""The vLLM linear method driven the way vLLM drives it (create_weights, the weight loaders with
shard ids, process_weights_after_loading, apply), on CPU, without starting an engine."""

import pytest
import torch
from torch import nn

from armor_vllm.factorization import factored_linear, mask_from_scores
from armor_vllm.format import ArmorConfig, ArmorFormatError, ArmorLayer, encode_layer

from conftest import random_armor_layer

vq = pytest.importorskip("armor_vllm.vllm_quant")

BS = 16
PREFIX = "model.layers.0.self_attn"
SIZES = {"q_proj": 64, "k_proj": 32, "v_proj": 32}
D_IN = 64


def make_layer(rows, cols, seed):
    return random_armor_layer(rows, cols, BS, seed, spread=0.2)


def quant_config():
    cfg = vq.ArmorQuantConfig(ArmorConfig(block_size=BS, method="armor"))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    return cfg


def build(cfg, prefix=f"{PREFIX}.qkv_proj", sizes=tuple(SIZES.values()), d_in=D_IN):
    layer = nn.Module()
    layer.prefix = prefix
    method = cfg.get_quant_method(_Linear(), prefix)
    assert isinstance(method, vq.ArmorLinearMethod)
    method.create_weights(layer, d_in, list(sizes), d_in, sum(sizes), torch.float32)
    return layer, method


class _Linear(vq.LinearBase):
    """Only for isinstance checks in get_quant_method."""

    def __init__(self):
        nn.Module.__init__(self)


def load(layer, tensors, prefix_map):
    """Feed checkpoint tensors the way vLLM's loader does: per-projection names, shard ids."""
    for name, tensor in tensors.items():
        proj, _, tensor_name = name.rpartition(".")
        shard = prefix_map[proj.rpartition(".")[2]]
        param = getattr(layer, tensor_name)
        param.weight_loader(param, tensor, shard)


def checkpoint(seed=0):
    layers = {p: make_layer(r, D_IN, seed + i) for i, (p, r) in enumerate(SIZES.items())}
    tensors = {}
    for p, layer in layers.items():
        tensors.update(encode_layer(f"{PREFIX}.{p}", layer, torch.float32))
    return layers, tensors


@pytest.mark.parametrize("kernel", ["folded", "factored"])
def test_fused_qkv_matches_reference(kernel, monkeypatch):
    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    layers, tensors = checkpoint()
    layer, method = build(quant_config())
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    method.process_weights_after_loading(layer)
    x = torch.randn(5, D_IN)
    bias = torch.randn(sum(SIZES.values()))
    expect = torch.cat([factored_linear(x, l.wrapper_out, l.core, l.wrapper_in) for l in layers.values()], -1) + bias
    torch.testing.assert_close(method.apply(layer, x, bias), expect, rtol=1e-4, atol=1e-4)


def test_plain_24_checkpoint_skips_identity_wrappers(monkeypatch):
    monkeypatch.setenv(vq.KERNEL_ENV, "factored")
    gen = torch.Generator().manual_seed(3)
    core = torch.randn(32, D_IN, generator=gen) * mask_from_scores(torch.rand(32, D_IN, generator=gen))
    plain = ArmorLayer(torch.eye(BS).expand(2, BS, BS).clone(), core, torch.eye(BS).expand(4, BS, BS).clone())
    cfg = quant_config()
    layer, method = build(cfg, prefix=f"{PREFIX}.o_proj", sizes=(32,))
    tensors = encode_layer(f"{PREFIX}.o_proj", plain, torch.float32)
    load(layer, tensors, {"o_proj": None})
    method.process_weights_after_loading(layer)
    assert layer.armor_tensors == ["core"]  # no wrapper work at all
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(method.apply(layer, x), x @ core.T)


def test_missing_tensor_is_named(monkeypatch):
    _, tensors = checkpoint()
    del tensors[f"{PREFIX}.k_proj.wrapper_in"]
    layer, method = build(quant_config())
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    with pytest.raises(ArmorFormatError, match=rf"missing: {PREFIX}.k_proj.wrapper_in"):
        method.process_weights_after_loading(layer)


def test_wrong_shape_is_named():
    _, tensors = checkpoint()
    tensors[f"{PREFIX}.v_proj.compressed"] = tensors[f"{PREFIX}.v_proj.compressed"][:16]
    layer, method = build(quant_config())
    with pytest.raises(ArmorFormatError, match=rf"{PREFIX}.v_proj.compressed: shape \(16, 32\)"):
        load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})


def test_shape_tensor_must_agree():
    _, tensors = checkpoint()
    tensors[f"{PREFIX}.q_proj.shape"] = torch.tensor([64, 128])
    layer, method = build(quant_config())
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    with pytest.raises(ArmorFormatError, match=rf"{PREFIX}.q_proj.shape: says \[64, 128\]"):
        method.process_weights_after_loading(layer)


def test_mask_that_is_not_24_is_named():
    _, tensors = checkpoint()
    bits = tensors[f"{PREFIX}.k_proj.bitmask"].clone()
    bits[2, 1] = 0xFF
    tensors[f"{PREFIX}.k_proj.bitmask"] = bits
    layer, method = build(quant_config())
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    with pytest.raises(ArmorFormatError, match=rf"{PREFIX}.k_proj.bitmask: not a 2:4 mask \(row 2"):
        method.process_weights_after_loading(layer)


def test_block_size_that_does_not_divide_the_layer():
    cfg = vq.ArmorQuantConfig(ArmorConfig(block_size=24, method="armor"))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(ArmorFormatError, match=rf"{PREFIX}.q_proj: block size 24 does not divide its 64 output rows"):
        build(cfg)


def test_partly_compressed_fused_layer_is_refused():
    cfg = vq.ArmorQuantConfig(ArmorConfig(block_size=BS, method="armor", ignore=("k_proj",)))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(ArmorFormatError, match="only some of them"):
        cfg.get_quant_method(_Linear(), f"{PREFIX}.qkv_proj")


def test_unknown_kernel_name(monkeypatch):
    monkeypatch.setenv(vq.KERNEL_ENV, "turbo")
    with pytest.raises(ValueError, match="ARMOR_VLLM_KERNEL='turbo'"):
        quant_config()
