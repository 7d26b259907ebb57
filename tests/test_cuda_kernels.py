"""CUDA kernel tests. On CPU: the pure-torch pieces (wrappers, shard stacking, padding, plans, mode
selection, light imports) with the sparse matmul swapped for a dense one through ``SPARSE_OPS``, and
the Triton kernel under ``TRITON_INTERPRET=1``. On CUDA: every backend against the reference maths."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from armor_vllm.factorization import apply_block_diag, factored_linear, mask_from_scores
from armor_vllm.kernels import CPU_KERNELS, CUDA_KERNELS, FoldedKernel, select_kernel
from armor_vllm.kernels import cuda as ck
from armor_vllm.kernels.base import ArmorShards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_shards(out_sizes, d_in, bs, wrappers_in="distinct", identity_out=False, seed=0, device="cpu"):
    """Random 2:4 cores, near-identity wrappers. ``wrappers_in``: distinct | equal | identity."""
    g = torch.Generator().manual_seed(seed)

    def blocks(d):
        return torch.eye(bs) + 0.2 * torch.randn(d // bs, bs, bs, generator=g)

    cores = []
    for rows in out_sizes:
        w = torch.randn(rows, d_in, generator=g)
        cores.append(w * mask_from_scores(w.abs()))
    shared = blocks(d_in)
    if wrappers_in == "distinct":
        ins = [blocks(d_in) for _ in out_sizes]
    elif wrappers_in == "equal":
        ins = [shared.clone() for _ in out_sizes]
    else:
        ins = [torch.eye(bs).expand(d_in // bs, bs, bs).clone() for _ in out_sizes]
    total = sum(out_sizes)
    out = torch.eye(bs).expand(total // bs, bs, bs).clone() if identity_out else blocks(total)
    mv = lambda t: t.to(device)  # noqa: E731
    return ArmorShards(wrapper_out=mv(out), cores=[mv(c) for c in cores], wrappers_in=[mv(w) for w in ins])


def reference(shards, x, bias=None):
    """Shard by shard with the shared maths, in float32."""
    bs, start, parts = shards.block_size, 0, []
    for core, b in zip(shards.cores, shards.wrappers_in):
        a = shards.wrapper_out[start // bs : (start + core.shape[0]) // bs]
        parts.append(factored_linear(x.float(), a.float(), core.float(), b.float()))
        start += core.shape[0]
    y = torch.cat(parts, dim=-1)
    return y if bias is None else y + bias.float()


def rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


class FakeDense:
    """The sparse matmul as a dense one, checking the padding contract and counting calls."""

    def __init__(self, token_multiple=8):
        self.calls = []
        self.ops = ck.SparseOps(self.compress, self.linear, token_multiple=token_multiple, row_multiple=16, col_multiple=16)

    @staticmethod
    def compress(core):
        return {"packed": core.clone()}

    def linear(self, stored, h, bias):
        assert h.shape[0] % self.ops.token_multiple == 0, h.shape
        assert h.is_contiguous()
        self.calls.append(tuple(h.shape))
        return F.linear(h, stored["packed"], bias)


@pytest.fixture
def fake(monkeypatch):
    f = FakeDense()
    monkeypatch.setitem(ck.SPARSE_OPS, "cusparselt", f.ops)
    return f


# ---------------------------------------------------------------------------------------------
# CPU: pieces


def test_import_pulls_no_serving_stack():
    code = textwrap.dedent(
        """
        import sys
        for m in ("vllm", "compressed_tensors", "transformers", "triton"):
            sys.modules[m] = None  # any import of them now fails
        import armor_vllm.kernels.cuda
        from armor_vllm.kernels import select_kernel
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("n_shards,bias", [(1, False), (1, True), (3, False)])
def test_blockdiag_bmm_matches_reference(n_shards, bias):
    torch.manual_seed(0)
    n, bs, tokens = 3, 8, 5
    blocks = [torch.randn(n, bs, bs) for _ in range(n_shards)]
    x = torch.randn(tokens, n * bs)
    b = torch.randn(n * bs) if bias else None
    wt = ck.stack_wrappers(blocks)
    assert wt.shape == (n, bs, n_shards * bs)
    got = ck.blockdiag_bmm(x, wt, n_shards, b)
    want = [apply_block_diag(x, blk) + (b if bias else 0) for blk in blocks]
    if n_shards == 1:
        torch.testing.assert_close(got, want[0])
    else:
        assert got.shape == (n_shards, tokens, n * bs)
        for s in range(n_shards):
            torch.testing.assert_close(got[s], want[s])


def test_modes_and_selection():
    assert set(CUDA_KERNELS) == {"auto", "cusparselt", "cutlass", "dense"}
    with pytest.raises(ValueError, match="unknown ARMOR kernel"):
        select_kernel("cuslt", "cpu")
    with pytest.raises(ValueError):
        ck.CudaArmorKernel(backend="sparse")
    with pytest.raises(ValueError):
        ck.CudaArmorKernel(wrapper="cuda")
    assert isinstance(select_kernel("factored", "cpu"), CPU_KERNELS["factored"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on CPU is folded, silently
        assert isinstance(select_kernel("auto", "cpu"), FoldedKernel)
    with pytest.warns(UserWarning, match="needs CUDA"):
        assert isinstance(select_kernel("cusparselt", "cpu"), FoldedKernel)


def test_unavailable_backend_falls_back_to_dense():
    shards = make_shards([32], 64, 16)
    kernel = ck.CudaArmorKernel(backend="cusparselt")  # real cuSPARSELt cannot run on CPU tensors
    with pytest.warns(UserWarning):
        tensors = kernel.prepare(shards, torch.float32)
    assert set(tensors) == {"weight"}
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernel.apply(tensors, x, None), reference(shards, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception):
        ck.CudaArmorKernel(backend="cusparselt", strict=True).prepare(shards, torch.float32)


# ---------------------------------------------------------------------------------------------
# CPU: the whole pipeline with a dense stand-in for the sparse matmul


CASES = [
    # out sizes, wrappers_in, identity_out, expected tensor keys (besides cores), sparse mms per call
    ([64, 32, 32], "distinct", False, {"wrapper_in", "wrapper_out"}, 3),  # fused q/k/v
    ([64, 64], "equal", False, {"wrapper_in", "wrapper_out"}, 1),  # gate/up sharing B
    ([64, 32], "identity", False, {"wrapper_out"}, 1),
    ([64], "distinct", True, {"wrapper_in"}, 1),  # A = identity: bias fused in the sparse mm
    ([48], "identity", True, set(), 1),  # plain 2:4
]


@pytest.mark.parametrize("out_sizes,wrappers_in,identity_out,keys,mms", CASES)
@pytest.mark.parametrize("tokens", [1, 5, 8, 13])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pipeline_with_dense_stand_in(fake, out_sizes, wrappers_in, identity_out, keys, mms, tokens, with_bias):
    d_in, bs = 64, 16
    shards = make_shards(out_sizes, d_in, bs, wrappers_in, identity_out, seed=tokens)
    kernel = ck.CudaArmorKernel(backend="cusparselt", wrapper="bmm", dense_below=0)
    tensors = kernel.prepare(shards, torch.float32)
    wrapper_keys = {k for k in tensors if k.startswith("wrapper")}
    assert wrapper_keys == keys
    n_cores = len({k.split(".")[0] for k in tensors if k.startswith("core")})
    assert n_cores == mms
    if "wrapper_in" in tensors:
        n_stacked = tensors["wrapper_in"].shape[2] // bs
        assert n_stacked == (len(out_sizes) if wrappers_in == "distinct" else 1)

    x = torch.randn(2, tokens, d_in)  # leading dims are kept
    bias = torch.randn(sum(out_sizes)) if with_bias else None
    fake.calls.clear()
    y = kernel.apply(tensors, x, bias)
    assert y.shape == (2, tokens, sum(out_sizes))
    assert len(fake.calls) == mms
    padded = -(-2 * tokens // 8) * 8
    assert all(c[0] == padded for c in fake.calls)
    torch.testing.assert_close(y, reference(shards, x, bias), rtol=1e-4, atol=1e-4)


def test_pipeline_half_precision(fake):
    shards = make_shards([64, 32], 64, 32)
    kernel = ck.CudaArmorKernel(backend="cusparselt", wrapper="bmm")
    for dtype in (torch.float16, torch.bfloat16):
        tensors = kernel.prepare(shards, dtype)
        x = torch.randn(7, 64, dtype=dtype)
        bias = torch.randn(96, dtype=dtype)
        y = kernel.apply(tensors, x, bias)
        assert y.dtype == dtype
        assert rel_err(y, reference(shards, x, bias)) < 2e-2


def test_cutlass_layout_roundtrip(monkeypatch):
    """Our cutlass path with torch's pure-torch CUTLASS packing: the packed+meta pair must decode
    to the concatenated core, whatever the shard split."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    def compress(core):
        packed, meta = sparse_semi_structured_from_dense_cutlass(core)
        return {"packed": packed, "meta": meta}

    def linear(stored, h, bias):
        core = sparse_semi_structured_to_dense_cutlass(stored["packed"], stored["meta"])
        y = F.linear(h, core)
        return y if bias is None else y + bias

    real = ck.SPARSE_OPS["cutlass"]
    monkeypatch.setitem(ck.SPARSE_OPS, "cutlass", ck.SparseOps(compress, linear, 8, real.row_multiple, real.col_multiple))
    shards = make_shards([64, 32], 128, 32, wrappers_in="equal", seed=3)
    kernel = ck.CudaArmorKernel(backend="cutlass", wrapper="bmm", strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    assert {"core.packed", "core.meta"} <= set(tensors)
    x = torch.randn(3, 128, dtype=torch.float16)
    assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 2e-2
    with pytest.raises(ValueError, match="multiples of 32"):  # 48 rows: CUTLASS wants 32s
        kernel._build(make_shards([48], 128, 16), torch.float16, "cutlass")


def test_auto_plan_from_timings(fake, monkeypatch):
    """``auto`` with a fake clock: dense wins up to 16 tokens -> dense kept for T <= 16."""
    monkeypatch.setattr(ck, "backend_available", lambda b, d: b == "cusparselt")
    kernel = ck.CudaArmorKernel(backend="auto", wrapper="bmm")

    def timer(fn):
        timer.dense = False
        fn()  # must be runnable; sets timer.dense when it is the dense matmul
        return 1.0 if timer.dense else 2.0

    timer.dense = False
    real_linear = F.linear

    def spy_linear(x, w, b=None):  # marks the next timing as the dense one when called on the folded weight
        if w.shape == (96, 64) and w.dtype == torch.float32 and not fake_in_call[0]:
            timer.dense = tokens_ok(x)
        return real_linear(x, w, b)

    fake_in_call = [False]
    orig_fake_linear = fake.linear

    def fake_linear(stored, h, bias):
        fake_in_call[0] = True
        try:
            return orig_fake_linear(stored, h, bias)
        finally:
            fake_in_call[0] = False

    fake.ops = ck.SparseOps(fake.compress, fake_linear, 8, 16, 16)
    monkeypatch.setitem(ck.SPARSE_OPS, "cusparselt", fake.ops)
    tokens_ok = lambda x: x.shape[0] <= 16  # noqa: E731 - dense is "faster" up to 16 tokens
    monkeypatch.setattr(ck.F, "linear", spy_linear)
    kernel.timer = timer
    shards = make_shards([64, 32], 64, 16)
    tensors = kernel.prepare(shards, torch.float32)
    monkeypatch.setattr(ck.F, "linear", real_linear)

    plan = kernel.plan_for(tensors)
    assert plan.backend == "cusparselt" and plan.dense_below == 16
    assert "dense_weight" in tensors
    for n_tokens, sparse_calls in ((16, 0), (17, 2)):
        fake.calls.clear()
        x = torch.randn(n_tokens, 64)
        y = kernel.apply(tensors, x, None)
        assert len(fake.calls) == sparse_calls
        torch.testing.assert_close(y, reference(shards, x), rtol=1e-4, atol=1e-4)

    # dense faster everywhere: the layer becomes dense; same shape again: measured once, reused
    tokens_ok = lambda x: True  # noqa: E731
    monkeypatch.setattr(ck.F, "linear", spy_linear)
    kernel2 = ck.CudaArmorKernel(backend="auto", wrapper="bmm")
    kernel2.timer = timer
    assert set(kernel2.prepare(shards, torch.float32)) == {"weight"}
    kernel.timer = None  # a second prepare of a known shape must not time again
    tensors_again = kernel.prepare(make_shards([64, 32], 64, 16, seed=9), torch.float32)
    assert kernel.plan_for(tensors_again).dense_below == 16


def test_forced_dense_below(fake):
    shards = make_shards([32], 64, 16)
    kernel = ck.CudaArmorKernel(backend="cusparselt", dense_below=4)
    tensors = kernel.prepare(shards, torch.float32)
    assert "dense_weight" in tensors
    for n_tokens, calls in ((4, 0), (5, 1)):
        fake.calls.clear()
        x = torch.randn(n_tokens, 64)
        torch.testing.assert_close(kernel.apply(tensors, x, None), reference(shards, x), rtol=1e-4, atol=1e-4)
        assert len(fake.calls) == calls


def test_triton_kernel_in_interpreter():
    """The fused Triton kernel against ``apply_block_diag`` under ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from armor_vllm.factorization import apply_block_diag
        from armor_vllm.kernels.cuda import stack_wrappers
        from armor_vllm.kernels.triton_blockdiag import blockdiag_triton
        torch.manual_seed(0)
        n, bs = 2, 16
        for tokens, shards, bias in ((1, 1, True), (20, 2, False), (40, 1, False)):
            blocks = [torch.randn(n, bs, bs) for _ in range(shards)]
            x = torch.randn(tokens, n * bs).half()
            b = torch.randn(n * bs).half() if bias else None
            y = blockdiag_triton(x, stack_wrappers(blocks).half(), shards, b)
            y = y if shards > 1 else y[None]
            for s in range(shards):
                want = apply_block_diag(x.float(), blocks[s].half().float()) + (b.float() if bias else 0)
                err = (y[s].float() - want).abs().max().item()
                assert err < 5e-2, (tokens, shards, err)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# CUDA: the real kernels


@needs_cuda
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrappers_in", ["distinct", "equal", "identity"])
def test_cuda_backend_matches_reference(backend, dtype, wrappers_in):
    if not ck.backend_available(backend if backend != "auto" else "dense", torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    shards = make_shards([256, 128, 128], 256, 64, wrappers_in, device="cuda")
    kernel = ck.CudaArmorKernel(backend=backend, strict=backend != "auto")
    tensors = kernel.prepare(shards, dtype)
    bias = torch.randn(512, device="cuda", dtype=dtype)
    for tokens in (1, 7, 16, 129, 1000):
        x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
        for b in (None, bias):
            y = kernel.apply(tensors, x, b)
            assert y.shape == (tokens, 512) and y.dtype == dtype
            assert rel_err(y, reference(shards, x, b)) < 2e-2, (tokens, b is None)


@needs_cuda
@pytest.mark.parametrize("wrapper", ["bmm", "triton"])
@pytest.mark.parametrize("bs", [32, 128])
def test_cuda_wrappers(wrapper, bs):
    if wrapper == "triton" and not ck._triton_usable(bs):
        pytest.skip("triton unusable")
    shards = make_shards([512, 256], 512, bs, "distinct", device="cuda")
    kernel = ck.CudaArmorKernel(backend="cusparselt", wrapper=wrapper, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    for tokens in (1, 33, 2048):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 2e-2


@needs_cuda
def test_cuda_graph_capture():
    """vLLM captures decode in CUDA graphs: apply must not sync or allocate outside the pool."""
    shards = make_shards([256], 256, 64, device="cuda")
    kernel = ck.CudaArmorKernel(backend="cusparselt", strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    kernel.apply(tensors, x, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernel.apply(tensors, x, None)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(y, reference(shards, x)) < 2e-2


@needs_cuda
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_cuda_plain_24_fused_bias(backend):
    """Identity wrappers: bias goes into the sparse matmul itself (cuSPARSELt) or after it."""
    if not ck.backend_available(backend, torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    shards = make_shards([128, 64], 256, 32, "identity", identity_out=True, device="cuda")
    kernel = ck.CudaArmorKernel(backend=backend, strict=True)
    tensors = kernel.prepare(shards, torch.float16)
    assert not any(k.startswith("wrapper") for k in tensors)
    bias = torch.randn(192, device="cuda", dtype=torch.float16)
    for tokens in (1, 9, 64):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        assert rel_err(kernel.apply(tensors, x, bias), reference(shards, x, bias)) < 2e-2
