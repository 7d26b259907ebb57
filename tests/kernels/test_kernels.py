"""The execution kernels on CPU: the factored kernel with every core backend (the sparse ones through
``kernels.standin``, CPU emulations of cuSPARSELt's and CUTLASS's raw ops with their real contract),
the custom op under a vLLM-like compile, plans and their measurement, and the review findings each
pinned by a test that fails on the old code:

1. sparse tensors registered as buffers with "." in their names (tests/serving/test_plugin_method.py);
2. ``out=`` into non-contiguous views under ``torch.compile(fullgraph=True)``;
3. token-count logic frozen at trace time (padding, dense fallback, wrapper choice);
4. CUTLASS offered on Hopper, and its column-major result;
5. fp32 sent to a sparse backend (1:2, not 2:4, in torch's layouts);
6. Triton failures aborting the load, oversized blocks, plans never checked;
7. one measurement per layer instead of per shape; ranks free to disagree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import standin
import torch
from kernel_helpers import make_shards, reference, rel_err, vllm_like_compile

from armor_vllm.kernels import KERNEL_MODES, FactoredKernel, FoldedKernel, linear_op, select_kernel
from armor_vllm.kernels import backends as kb
from armor_vllm.kernels import blockdiag as kbd
from armor_vllm.kernels import plan as kplan
from armor_vllm.kernels.factored import build_tensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stand_in():
    """cuSPARSELt and CUTLASS emulated on CPU for the duration of a test."""
    standin.install()
    standin.CALLS.clear()
    kplan.PLAN_CACHE.clear()
    yield standin
    standin.uninstall()
    kplan.PLAN_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# pieces


def test_import_pulls_no_serving_stack():
    code = textwrap.dedent(
        """
        import sys
        for m in ("vllm", "compressed_tensors", "transformers", "triton"):
            sys.modules[m] = None  # any import of them now fails
        import armor_vllm.kernels
        import standin
        from armor_vllm.kernels import select_kernel
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])},
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("n_shards,bias", [(1, False), (1, True), (3, False)])
def test_blockdiag_bmm_matches_reference(n_shards, bias):
    from armor_vllm.core.factorization import apply_block_diag

    torch.manual_seed(0)
    n, bs, tokens = 3, 8, 5
    blocks = [torch.randn(n, bs, bs) for _ in range(n_shards)]
    x = torch.randn(tokens, n * bs)
    b = torch.randn(n * bs) if bias else None
    wt = kbd.stack_wrappers(blocks)
    got = kbd.blockdiag_bmm(x, wt, n_shards, b)
    want = [apply_block_diag(x, blk) + (b if bias else 0) for blk in blocks]
    if n_shards == 1:
        torch.testing.assert_close(got, want[0])
        assert got.is_contiguous()
    else:
        assert got.shape == (n_shards, tokens, n * bs)
        for s in range(n_shards):
            torch.testing.assert_close(got[s], want[s])


@pytest.mark.parametrize("bias", [False, True])
def test_blockdiag_compiles_full_graph(bias):
    """Review item 2: ``torch.bmm(..., out=strided view)`` raises under fullgraph compile."""
    n, bs = 4, 8
    wt = kbd.stack_wrappers([torch.randn(n, bs, bs)])
    b = torch.randn(n * bs) if bias else None
    compiled = torch.compile(lambda x: kbd.blockdiag_bmm(x, wt, 1, b), fullgraph=True, backend="aot_eager")
    x = torch.randn(6, n * bs)
    torch.testing.assert_close(compiled(x), kbd.blockdiag_bmm(x, wt, 1, b))


def test_modes_and_selection():
    assert set(KERNEL_MODES) == {"auto", "folded", "factored", "cusparselt", "cutlass", "cpu24", "dense"}
    with pytest.raises(ValueError, match="unknown ARMOR kernel"):
        select_kernel("cuslt", "cpu")
    with pytest.raises(ValueError):
        FactoredKernel(backend="sparse")
    with pytest.raises(ValueError):
        FactoredKernel(wrapper="cuda")
    assert isinstance(select_kernel("factored", "cpu"), FactoredKernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on a CPU: cpu24 where the C++ kernel builds, else folded, silently
        from armor_vllm.kernels import cpu_sparse

        want = FactoredKernel if cpu_sparse.available() else FoldedKernel
        assert isinstance(select_kernel("auto", "cpu"), want)
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):
        assert isinstance(select_kernel("cusparselt", "cpu"), FoldedKernel)


def test_cutlass_is_offered_only_on_sm8x(monkeypatch):
    """Review item 4: PyTorch's CUTLASS 2:4 kernel raises on sm90; never offer it there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for capability, expect in (
        ((8, 0), {"cusparselt", "cutlass"}),
        ((8, 9), {"cusparselt", "cutlass"}),
        ((9, 0), {"cusparselt"}),
        ((7, 5), set()),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert set(kb.usable_sparse_backends(cuda, torch.float16)) == expect, capability


def test_sparse_backends_take_only_half_precision(stand_in):
    """Review item 5: fp32 in torch's semi-structured layouts is 1:2, not 2:4."""
    assert kb.usable_sparse_backends(torch.device("cpu"), torch.float32) == []
    assert kb.usable_sparse_backends(torch.device("cpu"), torch.bfloat16) == ["cusparselt", "cutlass"]
    shards = make_shards([64], 64, 16)
    kernel = FactoredKernel(backend="cusparselt")
    with pytest.warns(UserWarning, match="cannot run torch.float32"):
        tensors = kernel.prepare(shards, torch.float32)
    assert kernel.layout is None and kernel.plan.backend == "folded"  # served dense, correctly
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernel.apply(tensors, x, None), reference(shards, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="cannot run torch.float32"):
        FactoredKernel(backend="cusparselt", strict=True).prepare(shards, torch.float32)
    with pytest.raises(ValueError, match="does not take torch.float32"):
        build_tensors(shards, torch.float32, "cusparselt")


def test_standin_enforces_the_contract(stand_in):
    from armor_vllm.core.factorization import mask_from_scores

    w = torch.randn(32, 64)
    core = (w * mask_from_scores(w.abs())).half()
    packed = standin.cslt_compress(core)
    assert packed.dtype == core.dtype and packed.dim() == 1 and packed.numel() < core.numel()  # really packed
    torch.testing.assert_close(standin.cslt_decode(packed), core)
    with pytest.raises(RuntimeError, match="not 2:4"):
        standin.cslt_compress(w.half())
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        standin.cslt_compress(core.float())
    with pytest.raises(RuntimeError, match="padded to multiples of 8"):
        standin.cslt_mm(packed, torch.randn(5, 64).half().t(), None)
    y = standin.cslt_mm(packed, torch.randn(8, 64).half().t(), None)
    assert y.shape == (8, 32) and y.is_contiguous()


# ---------------------------------------------------------------------------------------------
# the factored kernel with each backend


CASES = [
    # out sizes, wrappers_in, identity_out, expected (in_shards, n_cores, has_wrapper_out)
    ([64, 32, 32], "distinct", False, (3, 3, True)),  # fused q/k/v
    ([64, 64], "equal", False, (1, 1, True)),  # gate/up sharing B: one concatenated core
    ([64, 32], "identity", False, (0, 1, True)),
    ([64], "distinct", True, (1, 1, False)),  # A = identity: bias fused in the core matmul
    ([64], "identity", True, (0, 1, False)),  # plain 2:4
]


@pytest.mark.parametrize("backend", ["dense", "cusparselt", "cutlass"])
@pytest.mark.parametrize("out_sizes,wrappers_in,identity_out,expect", CASES)
def test_factored_kernel_matches_reference(stand_in, backend, out_sizes, wrappers_in, identity_out, expect):
    d_in, bs = 128, 32
    dtype = torch.float32 if backend == "dense" else torch.float16
    shards = make_shards(out_sizes, d_in, bs, wrappers_in, identity_out, seed=len(out_sizes))
    kernel = FactoredKernel(backend=backend, wrapper="bmm", dense_below=0, strict=True)
    tensors = kernel.prepare(shards, dtype)
    layout = kernel.layout
    assert (layout.in_shards, layout.n_cores, layout.has_wrapper_out) == expect
    assert len(tensors) == len(layout.tensor_order())
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    for tokens in (1, 5, 8, 13):
        for with_bias in (False, True):
            x = torch.randn(2, tokens, d_in, dtype=dtype)  # leading dims are kept
            bias = torch.randn(sum(out_sizes), dtype=dtype) if with_bias else None
            standin.CALLS.clear()
            y = kernel.apply(tensors, x, bias)
            assert y.shape == (2, tokens, sum(out_sizes)) and y.dtype == dtype and y.is_contiguous()
            assert rel_err(y, reference(shards, x, bias)) < tol, (tokens, with_bias)
            if backend != "dense":
                assert len(standin.CALLS) == expect[1]
                padded = -(-2 * tokens // 8) * 8
                assert all(shape[1] == padded for _, shape in standin.CALLS), standin.CALLS


def test_cutlass_result_is_row_major(stand_in):
    """Review item 4: the CUTLASS kernel's ``(rows, T)`` result transposed is column-major; with
    ``A`` the identity it used to reach vLLM like that."""
    shards = make_shards([64], 128, 32, "identity", identity_out=True)
    kernel = FactoredKernel(backend="cutlass", wrapper="bmm", dense_below=0, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    for tokens in (3, 16):
        y = kernel.apply(tensors, torch.randn(tokens, 128, dtype=torch.float16), torch.randn(64, dtype=torch.float16))
        assert y.is_contiguous() and y.stride() == (64, 1)


def test_dense_fallback_below_threshold(stand_in):
    shards = make_shards([64], 64, 16)
    kernel = FactoredKernel(backend="cusparselt", dense_below=4, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    assert kernel.layout.has_dense and len(tensors) == len(kernel.layout.tensor_order())
    for n_tokens, calls in ((1, 0), (4, 0), (5, 1), (40, 1)):
        standin.CALLS.clear()
        x = torch.randn(n_tokens, 64, dtype=torch.float16)
        assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 3e-3
        assert len(standin.CALLS) == calls, n_tokens


# ---------------------------------------------------------------------------------------------
# one opaque op under a vLLM-like compile


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass", "dense"])
def test_token_logic_runs_at_call_time_under_compile(stand_in, backend):
    """Review item 3: vLLM traces once (here at 64 tokens), drops every guard, then runs 1, 2, 3, ...
    tokens. Padding and the dense fallback must follow the real count, not the traced one."""
    dtype = torch.float32 if backend == "dense" else torch.float16
    shards = make_shards([64, 32], 128, 32)
    kernel = FactoredKernel(backend=backend, dense_below=2 if backend != "dense" else 0, wrapper="bmm", strict=True)
    tensors = kernel.prepare(shards, dtype)
    bias = torch.randn(96, dtype=dtype)
    compiled = vllm_like_compile(lambda x: kernel.apply(tensors, x, bias))
    for tokens in (64, 1, 2, 3, 9, 17):
        x = torch.randn(tokens, 128, dtype=dtype)
        torch._dynamo.mark_dynamic(x, 0)
        standin.CALLS.clear()
        y = compiled(x)
        assert y.shape == (tokens, 96)
        assert rel_err(y, reference(shards, x, bias)) < 3e-3, tokens
        if backend != "dense":
            expect_sparse = tokens > 2
            assert bool(standin.CALLS) == expect_sparse, (tokens, standin.CALLS)
            assert all(shape[1] % 8 == 0 and shape[1] >= tokens for _, shape in standin.CALLS)


def test_op_is_one_node_with_a_shape_only_fake(stand_in):
    shards = make_shards([64], 64, 16)
    kernel = FactoredKernel(backend="cusparselt", strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x, *ts: kernel.apply(list(ts), x, None), tracing_mode="symbolic")(
        torch.randn(24, 64, dtype=torch.float16), *tensors
    )
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.armor_vllm.armor_linear.default in calls
    assert not any("bmm" in str(t) or "pad" in str(t) for t in calls), calls
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = linear_op.call_op(mode.from_tensor(torch.empty(3, 7, 64, dtype=torch.float16)), None, kernel.key, 64)
    assert fake.shape == (3, 7, 64)


def test_op_refuses_an_unprepared_layer():
    with pytest.raises(RuntimeError, match="was not prepared"):
        linear_op.call_op(torch.randn(2, 8), None, "no-such-layer", 8)


# ---------------------------------------------------------------------------------------------
# plans: measured once per shape, agreed across ranks, checked before serving


class FakeClock:
    """Timings by rule instead of by clock: ``dense_wins_up_to`` tokens the dense matmul is faster."""

    def __init__(self, dense_wins_up_to=16):
        self.dense_wins_up_to = dense_wins_up_to
        self.calls = 0

    def __call__(self, fn, device):
        self.calls += 1
        standin.CALLS.clear()
        out = fn()
        n_tokens = out.shape[-2] if out.dim() > 1 else 1
        sparse = bool(standin.CALLS)
        if sparse:
            return 2.0 if n_tokens <= self.dense_wins_up_to else 1.0
        return 1.5


def test_auto_measures_once_per_shape_and_keeps_dense_for_decode(stand_in):
    """Review item 7: 30 identical layers measured once; and the measured threshold is used."""
    clock = FakeClock(dense_wins_up_to=16)
    kernels = [FactoredKernel(backend="auto", wrapper="bmm", dense_below="auto") for _ in range(3)]
    for k in kernels:
        k.timer = clock
    shards = [make_shards([64, 32], 64, 16, seed=s) for s in range(3)]
    tensors = kernels[0].prepare(shards[0], torch.float16)
    measured = clock.calls
    assert measured > 0
    assert kernels[0].plan.backend in ("cusparselt", "cutlass") and kernels[0].plan.dense_below == 16
    for k, s in zip(kernels[1:], shards[1:]):
        k.prepare(s, torch.float16)
        assert k.plan == kernels[0].plan
    assert clock.calls == measured  # no timing after the first layer of this shape
    for n_tokens, sparse in ((16, False), (17, True)):
        standin.CALLS.clear()
        x = torch.randn(n_tokens, 64, dtype=torch.float16)
        assert rel_err(kernels[0].apply(tensors, x, None), reference(shards[0], x)) < 3e-3
        assert bool(standin.CALLS) == sparse
    # dense faster at every size: the layer is served folded
    kplan.PLAN_CACHE.clear()
    k = FactoredKernel(backend="auto", wrapper="bmm")
    k.timer = FakeClock(dense_wins_up_to=1 << 20)
    k.prepare(shards[0], torch.float16)
    assert k.plan.backend == "folded" and k.layout is None


def test_tensor_parallel_ranks_take_rank_0s_plan(stand_in):
    """Review item 7: each rank measures in its own process; ``agree`` gives every rank rank 0's plan."""
    broadcast = {}

    def agree_as(rank):
        def agree(plan):
            if rank == 0:
                broadcast["plan"] = plan
            return broadcast["plan"]

        return agree

    shards = make_shards([64], 64, 16)
    plans = []
    for rank, wins_up_to in ((0, 4), (1, 64)):  # the two ranks' clocks disagree
        kplan.PLAN_CACHE.clear()  # separate processes
        k = FactoredKernel(backend="auto", wrapper="bmm", dense_below="auto", agree=agree_as(rank))
        k.timer = FakeClock(wins_up_to)
        k.prepare(shards, torch.float16)
        plans.append(k.plan)
    assert plans[0] == plans[1] and plans[0].dense_below == 4


def test_wrapper_ranges_and_plan_json():
    picks = [(1, "triton"), (2, "triton"), (4, "bmm"), (8, "bmm"), (16, "triton")]
    assert kplan.wrapper_ranges(picks) == ((2, "triton"), (8, "bmm"), (kplan.UNBOUNDED, "triton"))
    plan = kplan.KernelPlan("cusparselt", 8, kplan.wrapper_ranges(picks))
    assert kplan.KernelPlan.from_json(plan.to_json()) == plan
    assert plan.wrapper_for(1) == "triton" and plan.wrapper_for(5) == "bmm" and plan.wrapper_for(10**6) == "triton"
    assert plan.without("triton").wrappers == ((2, "bmm"), (8, "bmm"), (kplan.UNBOUNDED, "bmm"))
    assert kplan.dense_threshold([1, 1, 3], [2, 2, 2], ladder=(1, 2, 4)) == 2
    assert kplan.dense_threshold([3, 1, 1], [2, 2, 2], ladder=(1, 2, 4)) == 4  # every crossover (issue 19)
    assert kplan.dense_threshold([3, 3, 1], [2, 2, 2], ladder=(1, 2, 4)) == 0


def test_triton_failures_never_abort_loading(stand_in, monkeypatch):
    """Review item 6: a Triton kernel that raises or computes wrong numbers is dropped for bmm."""
    from armor_vllm.kernels import triton_blockdiag

    shards = make_shards([64], 64, 16)
    monkeypatch.setattr(kbd, "triton_supported", lambda bs, device: True)
    monkeypatch.setattr("armor_vllm.kernels.factored.triton_supported", lambda bs, device: True)

    def broken(x, wt, shards=1, bias=None):
        raise RuntimeError("out of shared memory")

    def wrong(x, wt, shards=1, bias=None):
        return kbd.blockdiag_bmm(x, wt, shards, bias) * 1.5

    for fake in (broken, wrong):
        monkeypatch.setattr(triton_blockdiag, "blockdiag_triton", fake)
        kernel = FactoredKernel(backend="cusparselt", wrapper="triton")
        with pytest.warns(UserWarning, match="rejected"):
            tensors = kernel.prepare(shards, torch.float16)
        assert kernel.plan.backend == "cusparselt" and not kernel.plan.uses("triton")
        x = torch.randn(5, 64, dtype=torch.float16)
        assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 3e-3


def test_triton_block_size_is_capped():
    from armor_vllm.kernels import triton_blockdiag

    assert [bs for bs in (8, 16, 32, 64, 128, 256, 48) if triton_blockdiag.supported(bs)] == [16, 32, 64, 128]


def test_a_backend_that_disagrees_is_not_served(stand_in, monkeypatch):
    shards = make_shards([64], 64, 16)
    real = kb.CSLT_OPS.mm
    monkeypatch.setattr(kb.CSLT_OPS, "mm", lambda p, d, b, **kw: real(p, d, b, **kw) * 0)
    kernel = FactoredKernel(backend="cusparselt")
    with pytest.warns(UserWarning, match="disagrees"):
        tensors = kernel.prepare(shards, torch.float16)
    assert kernel.layout is None
    with pytest.raises(RuntimeError, match="disagrees"):
        FactoredKernel(backend="cusparselt", strict=True).prepare(shards, torch.float16)
    x = torch.randn(3, 64, dtype=torch.float16)
    assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 3e-3


def test_cuda_benchmark_runs_end_to_end(tmp_path):
    """Review item 8: benchmarks/cuda_linear.py must run as typed on a GPU machine; ``--smoke`` runs
    the very same code on CPU through the stand-ins (the plain 2:4 baseline at 1 token included)."""
    import json

    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/cuda_linear.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    for row in result["linears"] + result["blocks"]:
        assert {"dense", "2:4", "2:4-raw", "armor-bmm", "armor-auto"} <= set(row["ms"]), row
    assert {r["tokens"] for r in result["linears"]} == {1, 9}


# ---------------------------------------------------------------------------------------------
# second review (issue 19), each finding pinned by a test that fails on the old code


def _graph_of(kernel, tensors, d_in, dtype):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: kernel.apply(tensors, x, None), tracing_mode="symbolic")(torch.randn(24, d_in, dtype=dtype))
    return gm.code


def test_traced_graph_is_the_same_for_every_kernel_and_plan(stand_in):
    """Issue 19 item 1: vLLM saves the compiled graph keyed on its own config only; what is traced
    must not depend on the kernel, the plan or a kept dense copy (one op, x + bias + layer name)."""
    shards = make_shards([64, 32], 64, 16)
    graphs = {}
    for name, kernel in {
        "folded": FoldedKernel(key="model.layers.0.qkv_proj"),
        "cusparselt": FactoredKernel(backend="cusparselt", dense_below=0, key="model.layers.0.qkv_proj"),
        "cusparselt-dense4": FactoredKernel(backend="cusparselt", dense_below=4, key="model.layers.0.qkv_proj"),
        "cutlass": FactoredKernel(backend="cutlass", key="model.layers.0.qkv_proj"),
    }.items():
        tensors = kernel.prepare(shards, torch.float16)
        graphs[name] = _graph_of(kernel, tensors, 64, torch.float16)
        x = torch.randn(5, 64, dtype=torch.float16)
        assert rel_err(kernel.apply(None, x, None), reference(shards, x)) < 3e-3, name
    assert len(set(graphs.values())) == 1, graphs
    assert "armor_linear" in graphs["folded"]


def test_tensor_parallel_ranks_broadcast_for_every_layer(stand_in):
    """Issue 19 item 2: the plan-cache key holds per-rank facts (is this rank's slice of B the
    identity?), so rank 0 hit its cache for layer 1 and skipped the broadcast rank 1 entered: a hang.
    Both ranks must enter the same sequence of collectives."""
    entered = {0: [], 1: []}

    def agree_as(rank, layer):
        def agree(plan):
            entered[rank].append(layer)
            return plan

        return agree

    ranks = {
        0: [make_shards([64], 64, 16, "equal", seed=0), make_shards([64], 64, 16, "equal", seed=1)],
        1: [make_shards([64], 64, 16, "identity", seed=0), make_shards([64], 64, 16, "equal", seed=1)],
    }
    for rank, layers in ranks.items():
        kplan.PLAN_CACHE.clear()  # separate processes
        for i, shards in enumerate(layers):
            k = FactoredKernel(backend="auto", wrapper="bmm", agree=agree_as(rank, i))
            k.timer = FakeClock(0)
            k.prepare(shards, torch.float16)
    assert entered[0] == entered[1] == [0, 1]


def test_auto_never_keeps_more_weight_memory_than_dense(stand_in, monkeypatch):
    """Issue 19 item 3: where dense wins at decode sizes, ``auto`` kept a folded dense copy beside
    the core (about 1.56x dense). By default it must not; ``ARMOR_VLLM_DENSE_BELOW`` asks for it."""
    monkeypatch.delenv("ARMOR_VLLM_DENSE_BELOW", raising=False)
    monkeypatch.delenv("ARMOR_DENSE_BELOW", raising=False)
    shards = make_shards([128, 64], 256, 16)
    k = FactoredKernel(backend="auto", wrapper="bmm")
    k.timer = FakeClock(dense_wins_up_to=16)
    tensors = k.prepare(shards, torch.float16)
    assert k.plan.backend == "cusparselt" and k.plan.dense_below == 0 and not k.layout.has_dense
    assert k.dense_would_win_below == 16  # measured, reported, not acted on
    assert k.weight_bytes == sum(t.numel() * t.element_size() for t in tensors) < k.dense_bytes
    x = torch.randn(2, 256, dtype=torch.float16)
    standin.CALLS.clear()
    assert rel_err(k.apply(tensors, x, None), reference(shards, x)) < 3e-3 and standin.CALLS  # 2:4 at decode
    # wrappers as big as the savings (block size near the width): the folded weight is smaller
    kplan.PLAN_CACHE.clear()
    k = FactoredKernel(backend="auto", wrapper="bmm")
    k.timer = FakeClock(dense_wins_up_to=16)
    k.prepare(make_shards([64, 32], 64, 16), torch.float16)
    assert k.layout is None and k.weight_bytes == k.dense_bytes
    # asked for: the copy is kept, and costs more than dense
    for setting in ("16", "auto"):
        kplan.PLAN_CACHE.clear()
        monkeypatch.setenv("ARMOR_VLLM_DENSE_BELOW", setting)
        k = FactoredKernel(backend="auto", wrapper="bmm")
        k.timer = FakeClock(dense_wins_up_to=16)
        k.prepare(shards, torch.float16)
        assert k.layout.has_dense and k.plan.dense_below == 16 and k.weight_bytes > k.dense_bytes, setting
    # dense faster everywhere: the folded weight alone, exactly dense's bytes
    monkeypatch.delenv("ARMOR_VLLM_DENSE_BELOW")
    kplan.PLAN_CACHE.clear()
    k = FactoredKernel(backend="auto", wrapper="bmm")
    k.timer = FakeClock(dense_wins_up_to=1 << 20)
    k.prepare(shards, torch.float16)
    assert k.layout is None and k.weight_bytes == k.dense_bytes


def test_cusparselt_algorithm_search_is_planned_and_passed(stand_in):
    """Issue 19 item 5: every call used alg_id 0, split_k 1. The search at load (per shape and
    token range) goes into the plan and every call passes it."""
    shards = make_shards([64, 32], 64, 16)

    def split_k_clock(fn, device):  # split-k 4 wins up to 8 tokens, 1 above
        fn()
        last = standin.KWARGS[-1]
        return 1.0 / last["split_k"] if last["tokens"] <= 8 else float(last["split_k"])

    k = FactoredKernel(backend="cusparselt", wrapper="bmm", strict=True)
    k.timer = split_k_clock
    tensors = k.prepare(shards, torch.float16)
    assert k.layout.n_cores == 2  # distinct B: one matmul per core, each with its own options
    assert k.plan.cores == ((8, ((0, 4),) * 2), (64, ((1, 1),) * 2), (kplan.UNBOUNDED, ((2, 1),) * 2))
    assert kplan.KernelPlan.from_json(k.plan.to_json()) == k.plan
    for n_tokens, expect in ((3, (0, 4)), (8, (0, 4)), (40, (1, 1)), (100, (2, 1))):
        standin.KWARGS.clear()
        x = torch.randn(n_tokens, 64, dtype=torch.float16)
        assert rel_err(k.apply(tensors, x, None), reference(shards, x)) < 3e-3
        assert [(c["alg_id"], c["split_k"]) for c in standin.KWARGS] == [expect] * 2, n_tokens


def test_standin_enforces_strides_alignment_and_bias(stand_in):
    """Issue 19 item 6: the real libraries take a dense operand that is row-major or column-major
    with leading dimension k, 16-byte aligned addresses, a contiguous bias of the output dtype."""
    from armor_vllm.core.factorization import mask_from_scores

    w = torch.randn(32, 64)
    packed = standin.cslt_compress((w * mask_from_scores(w.abs())).half())
    h = torch.randn(8, 64).half()
    standin.cslt_mm(packed, h.t(), None)  # transposed-contiguous, ld = k
    standin.cslt_mm(packed, h.t().contiguous(), None)  # row-major
    wide = torch.randn(8, 128).half()
    with pytest.raises(RuntimeError, match="strides"):
        standin.cslt_mm(packed, wide[:, :64].t(), None)  # ld 128 != k
    flat = torch.randn(8 * 64 + 1).half()
    with pytest.raises(RuntimeError, match="aligned"):
        standin.cslt_mm(packed, flat[1:].view(8, 64).t(), None)
    with pytest.raises(RuntimeError, match="bias"):
        standin.cslt_mm(packed, h.t(), torch.randn(64).half()[::2])
    with pytest.raises(RuntimeError, match="bias"):
        standin.cslt_mm(packed, h.t(), torch.randn(32))  # fp32 bias, fp16 output
    with pytest.raises(RuntimeError, match="alg_id"):
        standin.cslt_mm(packed, h.t(), None, alg_id=standin.ALG_COUNT)


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_factored_kernel_meets_the_strict_contract(stand_in, backend):
    """Issue 19 item 6: ``h[c]`` of a distinct-``B`` fused layer with ``d_in == bs`` is a strided view,
    an input can start at an unaligned address, a bias can be strided: all must reach the library
    as it needs them."""
    d_in = 16 if backend == "cusparselt" else 64
    sizes = [32, 16, 16] if backend == "cusparselt" else [128, 64, 64]
    shards = make_shards(sizes, d_in, d_in, "distinct")
    k = FactoredKernel(backend=backend, wrapper="bmm", strict=True)
    tensors = k.prepare(shards, torch.float16)
    assert k.layout.in_shards == 3
    flat = torch.randn(16 * d_in + 1).half()
    x = flat[1:].view(16, d_in)  # 2 bytes past an aligned address
    bias = torch.randn(2 * sum(sizes)).half()[::2]
    assert rel_err(k.apply(tensors, x, bias), reference(shards, x, bias)) < 3e-3
    plain = make_shards([64], 64, 16, "identity", identity_out=True)
    k = FactoredKernel(backend="cusparselt", wrapper="bmm", strict=True)
    tensors = k.prepare(plain, torch.float16)
    x = torch.randn(9, 64).half()
    assert rel_err(k.apply(tensors, x, bias[:64]), reference(plain, x, bias[:64])) < 3e-3


def test_load_check_uses_a_bias_and_the_largest_token_count(stand_in, monkeypatch):
    """Issue 19 item 9: a backend wrong only with a fused bias, or only at large token counts, was
    served: the load-time check ran without a bias and up to 37 tokens."""
    shards = make_shards([64], 64, 16, "identity", identity_out=True)  # bias fused in the core matmul
    real = kb.CSLT_OPS.mm
    monkeypatch.setattr(kb.CSLT_OPS, "mm", lambda p, d, b, **kw: real(p, d, None, **kw))  # drops the bias
    with pytest.raises(RuntimeError, match="disagrees"):
        FactoredKernel(backend="cusparselt", strict=True).prepare(shards, torch.float16)
    monkeypatch.setattr(kb.CSLT_OPS, "mm", lambda p, d, b, **kw: real(p, d, b, **kw) * (1 + (d.shape[1] > 4096)))
    FactoredKernel(backend="cusparselt", strict=True, max_tokens=4096).prepare(shards, torch.float16)
    with pytest.raises(RuntimeError, match="disagrees"):
        FactoredKernel(backend="cusparselt", strict=True, max_tokens=6000).prepare(shards, torch.float16)


def test_cutlass_on_hopper_falls_back_to_cusparselt(monkeypatch):
    """Issue 19 item 9: ``ARMOR_VLLM_KERNEL=cutlass`` on sm90 fell back to folded, not cuSPARSELt."""
    monkeypatch.setattr("armor_vllm.kernels.factored.usable_sparse_backends", lambda device, dtype: ["cusparselt"])
    with pytest.warns(UserWarning, match="using cusparselt"):
        assert FactoredKernel(backend="cutlass")._candidates(torch.device("cpu"), torch.float16) == ["cusparselt"]


_NO_LAUNCH = {  # views and allocations: no kernel of their own (a reshape that copies shows its copy)
    "aten::view",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::select",
    "aten::slice",
    "aten::as_strided",
    "aten::expand",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::narrow",
    "aten::_unsafe_view",
    "aten::alias",
    "aten::detach",
    "aten::empty",
    "aten::new_empty",
    "aten::empty_like",
    "aten::contiguous",
    "aten::reshape",
    "aten::to",
}


def _launches(fn) -> list[str]:
    """The kernel-launching ops the op ``armor_linear`` runs (the stand-in's matmul counts as one)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    (op,) = [e for e in prof.events() if e.name == "armor_vllm::armor_linear"]

    def walk(event):
        out = []
        for child in event.cpu_children:
            out += walk(child) if child.name in _NO_LAUNCH else [child.name]
        return out

    return walk(op)


def test_decode_launches_per_layer(stand_in):
    """Issue 19 item 7: a q/k/v layer with distinct ``B`` ran 9 kernels at decode (pad, bmm,
    permute copy, 3 sparse matmuls, cat, baddbmm, transpose copy). ``B`` now writes the padded
    rows itself and ``A`` writes the output rows directly: 7; a shared ``B``: 3 (was 6)."""
    for sizes, wrappers_in, expect in (
        (
            [64, 32, 32],
            "distinct",
            ["aten::bmm", "aten::copy_"] + ["standin::cslt_sparse_mm"] * 3 + ["aten::cat", "aten::baddbmm"],
        ),
        ([64, 64], "equal", ["aten::bmm", "standin::cslt_sparse_mm", "aten::baddbmm"]),
    ):
        shards = make_shards(sizes, 64, 16, wrappers_in)
        k = FactoredKernel(backend="cusparselt", wrapper="bmm", strict=True)
        tensors = k.prepare(shards, torch.float16)
        bias = torch.randn(sum(sizes)).half()
        for n_tokens in (1, 3, 8):
            x = torch.randn(n_tokens, 64).half()
            assert _launches(lambda: k.apply(tensors, x, bias)) == expect, (sizes, n_tokens)
            assert rel_err(k.apply(tensors, x, bias), reference(shards, x, bias)) < 3e-3


def test_gpu_only_tests_carry_the_cuda_marker():
    """Issue 19 item 8: the declared ``cuda`` marker selects the GPU-only tests (``-m cuda``)."""
    import test_cuda_kernels

    marks = test_cuda_kernels.pytestmark
    assert any(m.name == "cuda" for m in (marks if isinstance(marks, list) else [marks]))


class CrossoverClock:
    """Dense faster at 1 token, slower at 2, faster again from 4 to 16 tokens, slower above."""

    def __call__(self, fn, device):
        standin.CALLS.clear()
        out = fn()
        n_tokens = out.shape[-2] if out.dim() > 1 else 1
        if not standin.CALLS:
            return 1.0
        return 0.5 if n_tokens == 2 or n_tokens > 16 else 2.0


def test_plan_looks_at_every_crossover_and_times_graphs(stand_in, monkeypatch):
    """Issue 19 item 4: the threshold stopped at the first count where dense lost (here 1 token, as
    if dense only paid at decode size 1) and timings were eager, where launch overhead dominates
    small counts. Every crossover is weighed, and counts vLLM captures are timed as graph replays."""
    shards = make_shards([64], 64, 16)
    k = FactoredKernel(backend="auto", wrapper="bmm", dense_below="auto")
    k.timer = CrossoverClock()
    k.prepare(shards, torch.float16)
    assert k.plan.dense_below == 16
    graphs = {}

    def recording_time_ms(fn, device, graph=False, **kw):
        out = fn()
        graphs[out.shape[0] if out.dim() > 1 else 1] = graph
        return 1.0

    monkeypatch.setattr("armor_vllm.kernels.factored.time_ms", recording_time_ms)
    kplan.PLAN_CACHE.clear()
    FactoredKernel(backend="auto", wrapper="bmm").prepare(shards, torch.float16)
    assert graphs and all(graph == (n <= kplan.GRAPH_MAX) for n, graph in graphs.items()), graphs
    assert graphs[1] and not graphs[max(kplan.LADDER)]


def test_dense_below_setting(monkeypatch):
    """Issue 19 item 3: unset means no dense copy; N > 0 or ``auto`` ask for one."""
    from armor_vllm.kernels.factored import dense_below_setting

    monkeypatch.delenv("ARMOR_VLLM_DENSE_BELOW", raising=False)
    monkeypatch.delenv("ARMOR_DENSE_BELOW", raising=False)
    assert dense_below_setting() is None  # no copy; auto may still serve a layer folded
    for raw, expect in (("0", 0), ("8", 8), ("auto", "auto"), (" AUTO ", "auto")):
        monkeypatch.setenv("ARMOR_VLLM_DENSE_BELOW", raw)
        assert dense_below_setting() == expect
    assert dense_below_setting(3) == 3
    with pytest.raises(ValueError, match=">= 0"):
        dense_below_setting(-1)
