"""The kernels on a real NVIDIA GPU (sm80+): every core backend and wrapper implementation against the
reference maths, the custom op under a vLLM-like compile and under CUDA-graph capture at decode
sizes. Skipped without CUDA; the same code paths run on CPU in tests/kernels/test_kernels.py through the
stand-in backends."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import make_shards, reference, rel_err, vllm_like_compile

from armor_vllm.kernels import FactoredKernel
from armor_vllm.kernels import backends as kb
from armor_vllm.kernels import plan as kplan
from armor_vllm.kernels.blockdiag import triton_supported

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_plans():
    kplan.PLAN_CACHE.clear()
    yield
    kplan.PLAN_CACHE.clear()


def usable(backend: str, dtype=torch.float16) -> bool:
    return backend in ("dense", "auto") or backend in kb.usable_sparse_backends(CUDA, dtype)


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrappers_in", ["distinct", "equal", "identity"])
def test_backend_matches_reference(backend, dtype, wrappers_in):
    if not usable(backend, dtype):
        pytest.skip(f"{backend} not available on this GPU")
    shards = make_shards([256, 128, 128], 256, 64, wrappers_in, device="cuda")
    kernel = FactoredKernel(backend=backend, strict=backend != "auto")
    tensors = kernel.prepare(shards, dtype)
    bias = torch.randn(512, device="cuda", dtype=dtype)
    for tokens in (1, 7, 16, 129, 1000):
        x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
        for b in (None, bias):
            y = kernel.apply(tensors, x, b)
            assert y.shape == (tokens, 512) and y.dtype == dtype and y.is_contiguous()
            assert rel_err(y, reference(shards, x, b)) < 2e-2, (tokens, b is None)


@pytest.mark.parametrize("wrapper", ["bmm", "triton"])
@pytest.mark.parametrize("bs", [32, 128])
def test_wrappers(wrapper, bs):
    if wrapper == "triton" and not triton_supported(bs, CUDA):
        pytest.skip("triton unusable")
    if not usable("cusparselt"):
        pytest.skip("cuSPARSELt not available")
    shards = make_shards([512, 256], 512, bs, "distinct", device="cuda")
    kernel = FactoredKernel(backend="cusparselt", wrapper=wrapper, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    assert kernel.plan.uses(wrapper)
    for tokens in (1, 33, 2048):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 2e-2


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_cuda_graphs_at_decode_sizes(backend):
    """vLLM captures the compiled model at 1, 2, 4, 8, ... tokens and replays: each size records its
    own padding / fallback branch inside the op."""
    if not usable(backend):
        pytest.skip(f"{backend} not available")
    shards = make_shards([256], 256, 64, device="cuda")
    kernel = FactoredKernel(backend=backend, strict=True, dense_below=2)
    tensors = kernel.prepare(shards, torch.float16)
    compiled = vllm_like_compile(lambda x: kernel.apply(tensors, x, None), backend="inductor")
    for tokens in (1, 2, 4, 8, 16):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x)  # warm up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = compiled(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, reference(shards, x)) < 2e-2, tokens


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_plain_24_fused_bias(backend):
    """Identity wrappers: no wrapper work; the bias goes into the sparse matmul (cuSPARSELt) or the
    transposing copy (CUTLASS)."""
    if not usable(backend):
        pytest.skip(f"{backend} not available")
    shards = make_shards([128, 64], 256, 32, "identity", identity_out=True, device="cuda")
    kernel = FactoredKernel(backend=backend, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    assert kernel.layout.in_shards == 0 and not kernel.layout.has_wrapper_out
    bias = torch.randn(192, device="cuda", dtype=torch.float16)
    for tokens in (1, 9, 64):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        y = kernel.apply(tensors, x, bias)
        assert y.is_contiguous() and rel_err(y, reference(shards, x, bias)) < 2e-2


def test_auto_plan_is_measured_once_per_shape():
    calls = []

    def counting_timer(fn, device):
        calls.append(1)
        return kplan.time_ms(fn, device)

    kernels = [FactoredKernel(backend="auto") for _ in range(2)]
    for k in kernels:
        k.timer = counting_timer
    for i, k in enumerate(kernels):
        k.prepare(make_shards([512], 512, 64, seed=i, device="cuda"), torch.float16)
        if i == 0:
            measured = len(calls)
    assert len(calls) == measured and kernels[0].plan == kernels[1].plan


def test_triton_fp32_is_not_tf32_and_offsets_are_64_bit():
    """Issue 19 item 9: fp32 ``tl.dot`` defaulted to TF32 (about 1e-3 relative error), and pointer
    offsets were int32 (wrong addresses once T * d >= 2**31)."""
    from armor_vllm.kernels import blockdiag as kbd
    from armor_vllm.kernels.triton_blockdiag import blockdiag_triton

    if not triton_supported(64, CUDA):
        pytest.skip("triton unusable")
    torch.manual_seed(0)
    wt = kbd.stack_wrappers([torch.randn(4, 64, 64, device="cuda")])
    x = torch.randn(100, 256, device="cuda")
    want = kbd.blockdiag_bmm(x.double(), wt.double())
    assert rel_err(blockdiag_triton(x, wt), want) < 1e-5
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB free for a 2**31-element activation")
    n_tokens = (1 << 31) // 256 + 64  # T * d just above 2**31 elements
    x = torch.empty(n_tokens, 256, device="cuda", dtype=torch.float16).normal_()
    wt16 = wt.half()
    y = blockdiag_triton(x, wt16)
    tail = slice(n_tokens - 64, n_tokens)
    assert rel_err(y[tail], kbd.blockdiag_bmm(x[tail].contiguous(), wt16)) < 1e-2
