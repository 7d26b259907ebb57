"""Tensor parallelism: every rank loads its slice of the ARMOR tensors (column-parallel layers their
output rows with the ``A`` blocks over them, row-parallel layers their input columns with the ``B``
blocks over them) and the ranks together compute what the whole layer computes.

The fast tests drive ``ArmorLinearMethod`` the way vLLM does on each rank (create_weights with the
per-rank partition, the weight loaders with full checkpoint tensors and shard ids, then vLLM's own
``ColumnParallelLinear.forward`` / ``RowParallelLinear.forward``, which decide who adds the bias),
and compare the concatenated (column) or summed (row, the all-reduce) outputs with the unsplit
reference. The slow test runs vLLM with ``tensor_parallel_size=2`` on CPU against ``TP=1``."""

import json
import math
import os

import pytest
import torch
from conftest import random_armor_layer
from torch import nn

from armor_vllm.core.factorization import factored_linear
from armor_vllm.core.format import ArmorConfig, ArmorFormatError, encode_layer

vq = pytest.importorskip("armor_vllm.serving.config")
lm = pytest.importorskip("armor_vllm.serving.linear_method")
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

BS = 16
PREFIX = "model.layers.0"
QKV = {"q_proj": ("q", 128), "k_proj": ("k", 64), "v_proj": ("v", 64)}  # shard id, full rows
GATE_UP = {"gate_proj": (0, 96), "up_proj": (1, 96)}
D_MODEL = 64


def make_layer(rows, cols, seed):
    """A random ARMOR layer whose wrappers are far from the identity (each block differs)."""
    return random_armor_layer(rows, cols, BS, seed, spread=0.3)


def quant_config(fused_in_checkpoint=False):
    cfg = vq.ArmorQuantConfig(ArmorConfig(block_size=BS, method="armor"))
    cfg.packed_modules_mapping = {"qkv_proj": list(QKV), "gate_up_proj": list(GATE_UP)}
    if fused_in_checkpoint:
        cfg.packed_modules_mapping = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}
    return cfg


def fake_layer(cls, prefix, tp_rank, tp_size, config=None, **attrs):
    """An instance of vLLM's layer class carrying the attributes its __init__ would set on this
    rank (no distributed state needed), with the ARMOR method's weights created on it."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.prefix, layer.tp_rank, layer.tp_size = prefix, tp_rank, tp_size
    for key, value in attrs.items():
        setattr(layer, key, value)
    method = (config or quant_config()).get_quant_method(layer, prefix)
    assert isinstance(method, lm.ArmorLinearMethod)
    layer.quant_method = method
    return layer, method


def load_all(layer, tensors, shard_ids):
    """Feed the *full* checkpoint tensors, as vLLM's loader does on every rank."""
    for name, tensor in tensors.items():
        proj, _, tensor_name = name.rpartition(".")
        param = getattr(layer, tensor_name)
        param.weight_loader(param, tensor, shard_ids[proj.rpartition(".")[2]])
    layer.quant_method.process_weights_after_loading(layer)
    mode = os.environ.get(vq.KERNEL_ENV)
    if mode in ("cusparselt", "cutlass"):  # the sparse path really serves (no silent fallback)
        assert layer.quant_method.kernel.layout.backend == mode


def checkpoint(specs, d_in, seed):
    """{proj: ArmorLayer}, and their checkpoint tensors named ``PREFIX.sub.proj.*``."""
    layers, tensors = {}, {}
    for i, (proj, (_, rows)) in enumerate(specs.items()):
        layers[proj] = make_layer(rows, d_in, seed + i)
        tensors.update(encode_layer(f"{PREFIX}.sub.{proj}", layers[proj], torch.float32))
    return layers, tensors


KERNELS = ["folded", "factored", "cusparselt"]  # cusparselt: the CUDA kernel class on the CPU stand-in


@pytest.fixture
def use_kernel(monkeypatch):
    """Select a kernel for the plugin; for a 2:4 backend install the CPU stand-in and run fp16.
    Returns (dtype, tolerance)."""
    import standin

    from armor_vllm.kernels import plan

    def use(kernel):
        monkeypatch.setenv(vq.KERNEL_ENV, kernel)
        if kernel in ("cusparselt", "cutlass"):
            standin.install()
            monkeypatch.setattr(plan, "PLAN_CACHE", {})
            return torch.float16, 2e-2
        return torch.float32, 1e-4

    yield use
    standin.uninstall()


def close(got, want, tol):
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, float(want.abs().max())))


def column_forward(layer, x):
    layer.gather_output, layer.skip_bias_add, layer.return_bias = False, False, False
    return ColumnParallelLinear.forward(layer, x)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tp_size,kv_heads", [(2, 2), (4, 2), (2, 1)])
def test_qkv_column_parallel(kernel, tp_size, kv_heads, use_kernel):
    """Fused q/k/v split over the ranks; with fewer kv heads than ranks (kv_heads 1 at TP=2, 2 at
    TP=4) groups of ranks share the same k/v rows, like vLLM's QKVParallelLinear."""
    dtype, tol = use_kernel(kernel)
    head = 32
    specs = dict(QKV)
    specs["k_proj"] = ("k", kv_heads * head)
    specs["v_proj"] = ("v", kv_heads * head)
    layers, tensors = checkpoint(specs, D_MODEL, seed=10 * tp_size + kv_heads)
    replicas = max(1, tp_size // kv_heads)
    x = torch.randn(5, D_MODEL).to(dtype)
    full = {p: factored_linear(x.float(), l.wrapper_out, l.core, l.wrapper_in) for p, l in layers.items()}
    for rank in range(tp_size):
        q_rows = specs["q_proj"][1] // tp_size
        kv_rows = max(head, kv_heads * head // tp_size)
        sizes = [q_rows, kv_rows, kv_rows]
        layer, method = fake_layer(
            QKVParallelLinear, f"{PREFIX}.sub.qkv_proj", rank, tp_size, num_kv_head_replicas=replicas
        )
        method.create_weights(layer, D_MODEL, sizes, D_MODEL, sum(sizes), dtype)
        layer.bias = None
        load_all(layer, tensors, {p: sid for p, (sid, _) in specs.items()})
        kv_rank = rank // replicas
        expect = torch.cat(
            [
                full["q_proj"][:, rank * q_rows : (rank + 1) * q_rows],
                full["k_proj"][:, kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
                full["v_proj"][:, kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
            ],
            -1,
        )
        close(column_forward(layer, x), expect, tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gate_up_column_parallel_concatenates_to_full(kernel, use_kernel):
    dtype, tol = use_kernel(kernel)
    tp = 2
    layers, tensors = checkpoint(GATE_UP, D_MODEL, seed=3)
    x = torch.randn(4, D_MODEL).to(dtype)
    outs = []
    for rank in range(tp):
        sizes = [rows // tp for _, rows in GATE_UP.values()]
        layer, method = fake_layer(MergedColumnParallelLinear, f"{PREFIX}.sub.gate_up_proj", rank, tp)
        method.create_weights(layer, D_MODEL, sizes, D_MODEL, sum(sizes), dtype)
        layer.bias = None
        load_all(layer, tensors, {p: sid for p, (sid, _) in GATE_UP.items()})
        outs.append(column_forward(layer, x).split(sizes, -1))
    for i, (proj, l) in enumerate(layers.items()):
        got = torch.cat([o[i] for o in outs], -1)  # each projection gathered over the ranks
        close(got, factored_linear(x.float(), l.wrapper_out, l.core, l.wrapper_in), tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_checkpoint_fused_gate_up_is_split_then_sliced_per_rank(kernel, use_kernel):
    """Phi-3 stores gate_up_proj as one matrix: the plugin cuts it into gate and up at vLLM's full
    sizes, then each rank keeps its rows of each part (and the A blocks over them)."""
    dtype, tol = use_kernel(kernel)
    tp, half = 2, 96
    fused = make_layer(2 * half, D_MODEL, seed=11)
    tensors = encode_layer(f"{PREFIX}.sub.gate_up_proj", fused, torch.float32)
    x = torch.randn(4, D_MODEL).to(dtype)
    full = factored_linear(x.float(), fused.wrapper_out, fused.core, fused.wrapper_in)
    gate, up = full[:, :half], full[:, half:]
    for rank in range(tp):
        sizes = [half // tp, half // tp]
        layer, method = fake_layer(
            MergedColumnParallelLinear,
            f"{PREFIX}.sub.gate_up_proj",
            rank,
            tp,
            config=quant_config(fused_in_checkpoint=True),
        )
        method.create_weights(layer, D_MODEL, sizes, D_MODEL, sum(sizes), dtype)
        layer.bias = None
        load_all(layer, tensors, {"gate_up_proj": None})
        rows = slice(rank * sizes[0], (rank + 1) * sizes[0])
        close(column_forward(layer, x), torch.cat([gate[:, rows], up[:, rows]], -1), tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_partial_sums_reduce_to_full(kernel, tp, use_kernel):
    """o_proj/down_proj: each rank gets its input columns and B blocks, applies A to its partial
    sum; vLLM's RowParallelLinear.forward passes the bias to rank 0 only, so the all-reduce (here a
    sum) adds it exactly once."""
    dtype, tol = use_kernel(kernel)
    d_in, d_out = 128, 64
    ref = make_layer(d_out, d_in, seed=7)
    tensors = encode_layer(f"{PREFIX}.sub.o_proj", ref, torch.float32)
    bias = torch.randn(d_out).to(dtype)
    x = torch.randn(6, d_in).to(dtype)
    part = d_in // tp
    total = torch.zeros(6, d_out)
    for rank in range(tp):
        layer, method = fake_layer(RowParallelLinear, f"{PREFIX}.sub.o_proj", rank, tp, input_size_per_partition=part)
        method.create_weights(layer, part, [d_out], d_in, d_out, dtype)
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        layer.input_is_parallel, layer.skip_bias_add, layer.return_bias = True, False, False
        layer.reduce_results = False  # we do the all-reduce ourselves
        load_all(layer, tensors, {"o_proj": None})
        total += RowParallelLinear.forward(layer, x[:, rank * part : (rank + 1) * part]).float()
    expect = factored_linear(x.float(), ref.wrapper_out, ref.core, ref.wrapper_in) + bias.float()
    close(total, expect, tol)


def test_replicated_linear_is_not_split(monkeypatch):
    """A ReplicatedLinear carries the world's tp_rank/tp_size but keeps the whole weight."""
    monkeypatch.setenv(vq.KERNEL_ENV, "factored")
    ref = make_layer(64, D_MODEL, seed=5)
    tensors = encode_layer(f"{PREFIX}.sub.proj", ref, torch.float32)
    x = torch.randn(3, D_MODEL)
    for rank in range(2):
        layer, method = fake_layer(ReplicatedLinear, f"{PREFIX}.sub.proj", rank, 2)
        method.create_weights(layer, D_MODEL, [64], D_MODEL, 64, torch.float32)
        load_all(layer, tensors, {"proj": None})
        torch.testing.assert_close(
            method.apply(layer, x), factored_linear(x, ref.wrapper_out, ref.core, ref.wrapper_in), rtol=1e-4, atol=1e-4
        )


def test_block_size_must_divide_each_ranks_output_rows():
    # q_proj 96 rows at TP=4: 24 per rank, not a multiple of the block size 16
    layer, method = fake_layer(QKVParallelLinear, f"{PREFIX}.sub.qkv_proj", 0, 4, num_kv_head_replicas=1)
    with pytest.raises(
        ArmorFormatError,
        match=rf"{PREFIX}.sub.q_proj: block size 16 does not divide its "
        r"24 output rows on this rank \(tensor parallel size 4\)",
    ):
        method.create_weights(layer, D_MODEL, [24, 16, 16], D_MODEL, 56, torch.float32)


def test_block_size_must_divide_each_ranks_input_columns():
    # down_proj 96 inputs at TP=4: 24 per rank
    layer, method = fake_layer(RowParallelLinear, f"{PREFIX}.sub.down_proj", 0, 4, input_size_per_partition=24)
    with pytest.raises(
        ArmorFormatError,
        match=rf"{PREFIX}.sub.down_proj: block size 16 .* must divide its "
        r"24 input columns on this rank \(tensor parallel size 4\)",
    ):
        method.create_weights(layer, 24, [64], 96, 64, torch.float32)


# -- vLLM, TP=2 vs TP=1 -------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]
# vLLM's CPU backend binds each worker's OpenMP threads to a NUMA node ("auto"); this machine has
# one, so give each of the two ranks one core by hand.
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp_runs(tp_checkpoint, tmp_path_factory):
    """Greedy tokens and prompt logprobs of the TP test checkpoint: transformers on the dense
    reconstruction, vLLM at TP=1 (folded) and vLLM at TP=2 with each CPU kernel (cpu24: every layer
    served by it where the extension builds, else folded with a warning). (TP=1 with the
    factored kernel equals TP=1 folded: both match transformers in test_vllm_integration.)"""
    from conftest import run_vllm_jobs
    from transformers import AutoTokenizer

    from armor_vllm.hf.dense import load_dense_hf_model

    tok = AutoTokenizer.from_pretrained(tp_checkpoint)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    model = load_dense_hf_model(tp_checkpoint, dtype=torch.float32)
    hf = {"greedy_ids": [], "prompt_logprobs": []}
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
            hf["greedy_ids"].append(out[0, len(ids) :].tolist())
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            hf["prompt_logprobs"].append([None, *lp.tolist()])
    configs = {
        "tp1": (1, "folded", True),
        "tp2-folded": (2, "folded", True),
        "tp2-factored": (2, "factored", True),
        "tp2-cpu24": (2, "cpu24", True),  # our C++ 2:4 kernel, each rank its own slice of the core
        "tp1-folded-compiled": (1, "folded", False),
        "tp1-factored-compiled": (1, "factored", False),
    }
    jobs = [
        {
            "model": tp_checkpoint,
            "env": {"ARMOR_VLLM_KERNEL": kernel, **(TP2_ENV if tp == 2 else {})},
            "request": {
                "prompt_ids": prompt_ids,
                "max_tokens": 8,
                "dtype": "float32",
                "enforce_eager": eager,
                "llm_kwargs": {"tensor_parallel_size": tp},
            },
        }
        for tp, kernel, eager in configs.values()
    ]
    report = tmp_path_factory.mktemp("tp-report") / "cpu24.jsonl"  # which kernel served each layer, per rank
    jobs[list(configs).index("tp2-cpu24")]["env"]["ARMOR_VLLM_KERNEL_REPORT"] = str(report)
    runs = {"hf": hf}
    for name, result in zip(configs, run_vllm_jobs(jobs)):
        assert "error" not in result, (name, result.get("error"), result.get("log_tail"))
        runs[name] = result
    runs["tp2-cpu24"]["kernels"] = (
        [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    )
    return runs


def max_logprob_diff(a, b):
    diffs = []
    for got, expect in zip(a["prompt_logprobs"], b["prompt_logprobs"], strict=True):
        assert len(got) == len(expect) and got[0] is None and expect[0] is None
        diffs += [abs(g - e) for g, e in zip(got[1:], expect[1:])]
    return max(diffs)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["folded", "factored", "cpu24"])
def test_vllm_tp2_matches_tp1(tp_runs, kernel):
    tp1, tp2 = tp_runs["tp1"], tp_runs[f"tp2-{kernel}"]
    if kernel == "cpu24":
        from armor_vllm.kernels import cpu_sparse

        if not cpu_sparse.available():
            pytest.skip("the CPU 2:4 extension cannot be built here")
        backends = {k["plan"]["backend"] for k in tp2["kernels"]}
        assert tp2["kernels"] and backends == {"cpu24"}, backends  # every layer of both ranks
    assert tp2["greedy_ids"] == tp1["greedy_ids"]
    diff = max_logprob_diff(tp2, tp1)
    print(f"max |logprob TP2 ({kernel}) - TP1| = {diff:.2e}")
    assert diff <= 2e-3, diff
    # and both are what the checkpoint means (the dense reconstruction in transformers)
    assert tp2["greedy_ids"] == tp_runs["hf"]["greedy_ids"]
    assert math.isclose(max_logprob_diff(tp2, tp_runs["hf"]), 0, abs_tol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["folded", "factored"])
def test_vllm_compiled_mode_matches_transformers(tp_runs, kernel):
    """vLLM's default mode (torch.compile, no --enforce-eager) with each CPU kernel computes what the
    checkpoint means."""
    run = tp_runs[f"tp1-{kernel}-compiled"]
    assert run["greedy_ids"] == tp_runs["hf"]["greedy_ids"]
    diff = max_logprob_diff(run, tp_runs["hf"])
    print(f"max |logprob compiled ({kernel}) - transformers| = {diff:.2e}")
    assert diff <= 2e-3, diff
