"""The vLLM linear method driven the way vLLM drives it (create_weights, the weight loaders with
shard ids, process_weights_after_loading, apply), on CPU, without starting an engine."""

import pytest
import torch
from conftest import random_armor_layer
from torch import nn

from armor_vllm.core.factorization import factored_linear, mask_from_scores
from armor_vllm.core.format import ArmorConfig, ArmorFormatError, ArmorLayer, encode_layer

vq = pytest.importorskip("armor_vllm.serving.config")
from vllm.model_executor.layers.linear import LinearBase  # noqa: E402

lm = pytest.importorskip("armor_vllm.serving.linear_method")

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


def build(cfg, prefix=f"{PREFIX}.qkv_proj", sizes=tuple(SIZES.values()), d_in=D_IN, dtype=torch.float32):
    layer = nn.Module()
    layer.prefix = prefix
    method = cfg.get_quant_method(_Linear(), prefix)
    assert isinstance(method, lm.ArmorLinearMethod)
    method.create_weights(layer, d_in, list(sizes), d_in, sum(sizes), dtype)
    return layer, method


class _Linear(LinearBase):
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
    layout = method.kernel.layout
    assert (layout.in_shards, layout.n_cores, layout.has_wrapper_out) == (0, 1, False)  # no wrapper work at all
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


# -- the CUDA kernel class through the plugin, on the CPU stand-in ----------------------------------


@pytest.fixture
def stand_in(monkeypatch):
    import standin

    from armor_vllm.kernels import plan

    standin.install()
    monkeypatch.setattr(plan, "PLAN_CACHE", {})
    yield standin
    standin.uninstall()


def qkv_reference(layers, x, bias=None):
    y = torch.cat([factored_linear(x.float(), l.wrapper_out, l.core, l.wrapper_in) for l in layers.values()], -1)
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
def test_sparse_kernel_loads_and_serves_through_the_plugin(kernel, stand_in, monkeypatch):
    """Review item 1: the sparse tensors were registered as buffers named ``armor_core.packed``,
    which ``register_buffer`` refuses; no test drove the plugin with the CUDA kernel class."""
    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    sizes = {"q_proj": 64, "k_proj": 64, "v_proj": 64} if kernel == "cutlass" else SIZES
    d_in = 128
    layers = {p: random_armor_layer(r, d_in, BS, i, spread=0.2) for i, (p, r) in enumerate(sizes.items())}
    tensors = {}
    for p, lay in layers.items():
        tensors.update(encode_layer(f"{PREFIX}.{p}", lay, torch.float16))
    layer, method = build(quant_config(), sizes=tuple(sizes.values()), d_in=d_in, dtype=torch.float16)
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    method.process_weights_after_loading(layer)
    assert method.kernel.layout.backend == kernel
    assert all("." not in name for name, _ in layer.named_buffers())
    bias = torch.randn(sum(sizes.values())).half()
    for tokens in (1, 6, 19):
        x = torch.randn(tokens, d_in).half()
        got = method.apply(layer, x, bias)
        assert got.dtype == torch.float16 and got.is_contiguous()
        want = qkv_reference(layers, x, bias)
        assert float((got.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("kernel", ["folded", "factored", "cusparselt"])
def test_plugin_apply_under_a_vllm_like_compile(kernel, stand_in, monkeypatch):
    """vLLM's default mode: the method's apply traced once, guards dropped, then every size."""
    from kernel_helpers import vllm_like_compile

    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    dtype = torch.float16 if kernel == "cusparselt" else torch.float32
    layers, tensors = checkpoint()
    layer, method = build(quant_config(), dtype=dtype)
    load(
        layer,
        {k: v.to(dtype) if v.is_floating_point() and "wrapper" not in k else v for k, v in tensors.items()},
        {"q_proj": "q", "k_proj": "k", "v_proj": "v"},
    )
    method.process_weights_after_loading(layer)
    compiled = vllm_like_compile(lambda x: method.apply(layer, x, None))
    for tokens in (32, 1, 3, 12):
        x = torch.randn(tokens, D_IN).to(dtype)
        torch._dynamo.mark_dynamic(x, 0)
        want = qkv_reference(layers, x)
        assert float((compiled(x).float() - want).norm() / want.norm()) < 1e-2, tokens


@pytest.mark.parametrize("kernel", ["folded", "factored", "cusparselt"])
def test_checkpoint_fused_projection_is_split_at_vllm_sizes(kernel, stand_in, monkeypatch):
    """Phi-3 stores qkv_proj fused: one format layer under the fused name, no shard id at load."""
    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    dtype = torch.float16 if kernel == "cusparselt" else torch.float32
    fused = random_armor_layer(sum(SIZES.values()), D_IN, BS, seed=4, spread=0.2)
    cfg = quant_config()
    cfg.packed_modules_mapping = {"qkv_proj": ["qkv_proj"]}
    layer, method = build(cfg, dtype=dtype)
    tensors = encode_layer(f"{PREFIX}.qkv_proj", fused, dtype)
    for name, tensor in tensors.items():
        param = getattr(layer, name.rpartition(".")[2])
        param.weight_loader(param, tensor)  # vLLM passes no shard id for a checkpoint-fused tensor
    method.process_weights_after_loading(layer)
    x = torch.randn(5, D_IN).to(dtype)
    want = factored_linear(x.float(), fused.wrapper_out, fused.core, fused.wrapper_in)
    got = method.apply(layer, x)
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


def test_checkpoint_fused_projection_with_wrong_total_is_named():
    cfg = quant_config()
    cfg.packed_modules_mapping = {"qkv_proj": ["qkv_proj"]}
    layer, method = build(cfg)
    fused = random_armor_layer(sum(SIZES.values()) + BS, D_IN, BS, seed=4)
    tensors = encode_layer(f"{PREFIX}.qkv_proj", fused, torch.float32)
    param = layer.compressed
    with pytest.raises(
        ArmorFormatError,
        match=rf"{PREFIX}.qkv_proj.compressed: 144 output rows, but vLLM fuses "
        r"parts of \[64, 32, 32\] = 128 rows",
    ):
        param.weight_loader(param, tensors[f"{PREFIX}.qkv_proj.compressed"])


@pytest.mark.parametrize("kernel", ["folded", "factored"])
def test_plain_checkpoint_without_wrappers(kernel, monkeypatch):
    """Format v2 ``wrappers: false``: no wrapper parameters, identity A and B; the block size (here
    one that divides nothing) plays no part."""
    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    cfg = vq.ArmorQuantConfig(ArmorConfig(block_size=24, method="wanda", format_version=2, wrappers=False))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    layer, method = build(cfg)
    assert not hasattr(layer, "wrapper_out") and not hasattr(layer, "wrapper_in")
    gen = torch.Generator().manual_seed(1)
    cores, tensors = {}, {}
    for proj, rows in SIZES.items():
        w = torch.randn(rows, D_IN, generator=gen)
        cores[proj] = w * mask_from_scores(w.abs())
        tensors.update(
            encode_layer(f"{PREFIX}.{proj}", ArmorLayer(None, cores[proj], None), torch.float32, wrappers=False)
        )
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    method.process_weights_after_loading(layer)
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(method.apply(layer, x), x @ torch.cat(list(cores.values())).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["folded", "cusparselt"])
def test_served_weight_bytes_are_reported_against_dense(kernel, stand_in, monkeypatch, tmp_path):
    """Issue 19 item 3: every layer's report line and the plugin's totals give the weight bytes it
    serves against the dense weight's; the 2:4 path serves fewer, ``folded`` exactly as many."""
    import json

    report = tmp_path / "kernels.jsonl"
    monkeypatch.setenv(vq.KERNEL_ENV, kernel)
    monkeypatch.setenv("ARMOR_VLLM_KERNEL_REPORT", str(report))
    d_in = 256
    layers = {p: random_armor_layer(r * 2, d_in, BS, i, spread=0.2) for i, (p, r) in enumerate(SIZES.items())}
    tensors = {}
    for p, lay in layers.items():
        tensors.update(encode_layer(f"{PREFIX}.{p}", lay, torch.float16))
    cfg = quant_config()
    sizes = tuple(2 * r for r in SIZES.values())
    layer, method = build(cfg, sizes=sizes, d_in=d_in, dtype=torch.float16)
    assert cfg.linear_methods == 1
    load(layer, tensors, {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
    method.process_weights_after_loading(layer)
    (entry,) = [json.loads(line) for line in report.read_text().splitlines()]
    assert entry["dense_bytes"] == sum(sizes) * d_in * 2
    if kernel == "folded":
        assert entry["weight_bytes"] == entry["dense_bytes"]
    else:
        assert entry["plan"]["backend"] == "cusparselt" and entry["weight_bytes"] < entry["dense_bytes"]
    assert (cfg.prepared, cfg.served_bytes, cfg.dense_bytes) == (1, entry["weight_bytes"], entry["dense_bytes"])
    x = torch.randn(3, d_in).half()
    want = qkv_reference(layers, x)
    assert float((method.apply(layer, x).float() - want).norm() / want.norm()) < 1e-2
