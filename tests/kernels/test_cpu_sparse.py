"""The CPU 2:4 kernel (``armor_vllm.kernels.cpu_sparse``) against the reference maths: ``F.linear`` on
the dense core for the plain core, ``factored_linear`` for ARMOR layers. Every vector path the CPU
has is forced through ``ARMOR_VLLM_CPU_ISA``; the file skips when the extension cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    from armor_vllm.core.factorization import factored_linear, mask_from_scores
except ImportError:  # before the package regrouping
    from armor_vllm.factorization import factored_linear, mask_from_scores

from armor_vllm.kernels import cpu_sparse
from armor_vllm.kernels.blockdiag import stack_wrappers

if not cpu_sparse.available():
    pytest.skip("the CPU 2:4 extension cannot be built here (no compiler or headers)", allow_module_level=True)

BEST = cpu_sparse.isa()
_ORDER = ["scalar", "avx2", "avx512", "avx512bf16"]
ISAS = [
    pytest.param(
        name, marks=pytest.mark.skipif(_ORDER.index(name) > _ORDER.index(BEST), reason=f"this CPU has {BEST} at most")
    )
    for name in _ORDER
]
# (weight storage, x) dtypes every kernel takes: fp32 and bf16, mixed both ways
DTYPE_PAIRS = [(w, x) for w in (torch.float32, torch.bfloat16) for x in (torch.float32, torch.bfloat16)]
TOKENS = list(range(1, 18)) + [64, 130]  # 130: the decompress + dense GEMM path


def random_core(n: int, k: int, seed: int = 0, sparser: bool = False) -> torch.Tensor:
    """A random 2:4 core; ``sparser`` also zeroes some kept values (groups with 0 or 1 non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w = w * mask_from_scores(torch.rand(n, k, generator=gen))
    if sparser:
        w = w * (torch.rand(n, k, generator=gen) > 0.3)
    return w


def reference(x: torch.Tensor, core: torch.Tensor, dtype: torch.dtype, bias=None) -> torch.Tensor:
    """fp64 maths on the storage-rounded weights and the given x (an independent computation)."""
    w = core.to(dtype).double()
    return F.linear(x.double(), w, None if bias is None else bias.double())


def assert_close(y: torch.Tensor, ref: torch.Tensor, x_dtype: torch.dtype):
    assert y.dtype == x_dtype
    scale = ref.abs().max().item() + 1e-30
    if x_dtype == torch.float32:
        tol = 1e-5  # fp32 accumulation vs fp64
        err = (y.double() - ref).abs().max().item() / scale
    else:  # output rounded to bf16: at most ~1 bf16 rounding of the exact result
        tol = 1e-2
        err = ((y.double() - ref).abs() / (ref.abs() + 1e-3 * scale)).max().item()
    assert err < tol, f"relative error {err:.3g} >= {tol}"


@pytest.fixture
def isa_env(monkeypatch):
    def force(name):
        monkeypatch.setenv("ARMOR_VLLM_CPU_ISA", name)
        assert cpu_sparse.isa() == name

    return force


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 8), (16, 4), (50, 36), (129, 100), (64, 264)])
def test_pack_roundtrip(n, k, storage):
    core = random_core(n, k, seed=n + k, sparser=True)
    packed = cpu_sparse.pack(core, storage)
    assert packed.values.dtype == storage and packed.meta.dtype == torch.int32
    assert packed.values.numel() == -(-n // 16) * 16 * k // 2  # the kept half, N padded to 16
    torch.testing.assert_close(cpu_sparse.unpack(packed), core.to(storage), rtol=0, atol=0)


def test_pack_rejects_dense_groups():
    core = random_core(20, 16)
    core[7, 4:8] = 1.0
    with pytest.raises(RuntimeError, match="not 2:4"):
        cpu_sparse.pack(core)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage,x_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("n,k", [(37, 8), (50, 36), (129, 300)])
def test_matches_reference_every_token_count(isa, storage, x_dtype, n, k, isa_env):
    isa_env(isa)
    core = random_core(n, k, seed=3 * n + k, sparser=(n == 50))
    packed = cpu_sparse.pack(core, storage)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen)
    for tokens in TOKENS:
        x = torch.randn(tokens, k, generator=gen).to(x_dtype)
        for b in (None, bias.to(x_dtype)):  # a bias in the model's dtype, as vLLM holds it
            y = cpu_sparse.sparse24_linear(x, packed, b)
            assert y.shape == (tokens, n)
            assert_close(y, reference(x, core, storage, b), x_dtype)


def test_kernel_can_fail():
    """The comparison sees a wrong weight: one changed kept value changes the output."""
    core = random_core(32, 16)
    packed = cpu_sparse.pack(core)
    other = core.clone()
    r, c = other.nonzero()[5].tolist()
    other[r, c] += 0.5
    x = torch.randn(3, 16)
    with pytest.raises(AssertionError):
        assert_close(cpu_sparse.sparse24_linear(x, packed), reference(x, other, torch.float32), torch.float32)


@pytest.mark.parametrize("isa", ISAS)
def test_large_k_and_many_tiles(isa, isa_env):
    """K spanning several cache chunks (> 256 groups) and many tiles split across threads."""
    isa_env(isa)
    core = random_core(200, 1100, seed=7)
    for storage in (torch.float32, torch.bfloat16):
        packed = cpu_sparse.pack(core, storage)
        for tokens in (1, 9, 17):
            x = torch.randn(tokens, 1100)
            assert_close(cpu_sparse.sparse24_linear(x, packed), reference(x, core, storage), torch.float32)


def test_3d_and_non_contiguous_inputs():
    core = random_core(40, 24, seed=5)
    packed = cpu_sparse.pack(core)
    x = torch.randn(2, 3, 48)[..., ::2]  # (2, 3, 24), strided
    assert not x.is_contiguous()
    y = cpu_sparse.sparse24_linear(x, packed)
    assert y.shape == (2, 3, 40)
    assert_close(y, reference(x, core, torch.float32), torch.float32)
    xt = torch.randn(24, 5).t()  # (5, 24) transposed
    assert_close(cpu_sparse.sparse24_linear(xt, packed), reference(xt, core, torch.float32), torch.float32)


def test_empty_batch():
    packed = cpu_sparse.pack(random_core(20, 8))
    assert cpu_sparse.sparse24_linear(torch.randn(0, 8), packed).shape == (0, 20)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_armor_linear_matches_factored_linear(storage, bias):
    n, k, bs = 96, 128, 32
    gen = torch.Generator().manual_seed(11)
    core = random_core(n, k, seed=11)
    a = torch.eye(bs) + 0.2 * torch.randn(n // bs, bs, bs, generator=gen)
    b = torch.eye(bs) + 0.2 * torch.randn(k // bs, bs, bs, generator=gen)
    bvec = torch.randn(n, generator=gen) if bias else None
    packed = cpu_sparse.pack(core, storage)
    for tokens in (1, 4, 17):
        x = torch.randn(tokens, k, generator=gen)
        ref = factored_linear(
            x.double(), a.double(), core.to(storage).double(), b.double(), None if bvec is None else bvec.double()
        )
        wt_b, wt_a = stack_wrappers([b]), stack_wrappers([a])
        assert_close(cpu_sparse.armor_linear(x, packed, wt_b, wt_a, bvec), ref, torch.float32)
        # one wrapper only
        ref_b = factored_linear(x.double(), None, core.to(storage).double(), b.double(), None)
        assert_close(cpu_sparse.armor_linear(x, packed, wrapper_in=wt_b), ref_b, torch.float32)


# -- the block-diagonal wrappers (op armor_vllm::cpu_blockdiag) ---------------------------------------


def blockdiag_reference(x, blocks, bias=None):
    """fp64: each shard's ``D_s x`` for block-diagonal ``D_s`` given as ``(n, bs, bs)`` blocks."""
    outs = []
    for d in blocks:
        n, bs, _ = d.shape
        y = torch.einsum("tnj,nij->tni", x.double().view(x.shape[0], n, bs), d.double()).reshape(x.shape[0], n * bs)
        outs.append(y if bias is None else y + bias.double())
    return outs[0] if len(outs) == 1 else torch.stack(outs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("w_dtype,x_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shards,bias", [(1, False), (1, True), (2, False), (3, False)])
def test_blockdiag_matches_reference(isa_env, isa, x_dtype, w_dtype, shards, bias):
    isa_env(isa)
    gen = torch.Generator().manual_seed(shards)
    n, bs = 3, 12  # bs not a multiple of the vector width: the tails run too
    blocks = [torch.eye(bs) + 0.3 * torch.randn(n, bs, bs, generator=gen) for _ in range(shards)]
    wt = stack_wrappers(blocks).to(w_dtype)
    bvec = torch.randn(n * bs, generator=gen) if bias else None
    stored = [d.to(w_dtype) for d in blocks]  # the reference takes the same rounded blocks
    for tokens in TOKENS[:17] + [64]:
        x = torch.randn(tokens, n * bs, generator=gen).to(x_dtype)
        y = cpu_sparse.blockdiag(x, wt, shards, bvec)
        assert y.shape == ((tokens, n * bs) if shards == 1 else (shards, tokens, n * bs))
        assert_close(y, blockdiag_reference(x, stored, bvec), x_dtype)


def test_blockdiag_errors_and_empty():
    wt = stack_wrappers([torch.eye(4).expand(2, 4, 4)])
    assert cpu_sparse.blockdiag(torch.randn(0, 8), wt).shape == (0, 8)
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_sparse.blockdiag(torch.randn(2, 6), wt)
    with pytest.raises(RuntimeError, match="shards"):
        cpu_sparse.blockdiag(torch.randn(2, 8), wt, 2)
    with pytest.raises(RuntimeError, match="bias is only supported"):
        cpu_sparse.blockdiag(torch.randn(2, 8), torch.cat([wt, wt], 2), 2, torch.randn(8))


def test_blockdiag_under_torch_compile():
    gen = torch.Generator().manual_seed(3)
    blocks = [torch.randn(4, 8, 8, generator=gen) for _ in range(2)]
    wt = stack_wrappers(blocks)
    compiled = torch.compile(lambda x: cpu_sparse.blockdiag(x * 2.0, wt, 2) + 1.0, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 32, generator=gen)
    assert_close(compiled(x), blockdiag_reference(x * 2.0, blocks) + 1.0, torch.float32)
    torch.library.opcheck(torch.ops.armor_vllm.cpu_blockdiag.default, (torch.randn(3, 32), wt, 2, None))


def test_custom_op_under_torch_compile():
    core = random_core(48, 32, seed=2)
    packed = cpu_sparse.pack(core)
    bias = torch.randn(48)
    assert hasattr(torch.ops.armor_vllm, "cpu_sparse24_mm")

    def f(x):
        return torch.relu(cpu_sparse.sparse24_linear(x * 2.0, packed, bias))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for tokens in (1, 5):
        x = torch.randn(2, tokens, 32)
        ref = torch.relu(reference(x * 2.0, core, torch.float32, bias))
        assert_close(compiled(x), ref, torch.float32)
    torch.library.opcheck(
        torch.ops.armor_vllm.cpu_sparse24_mm.default, (torch.randn(3, 32), packed.values, packed.meta, 48, 32, bias)
    )


# -- the kernel as the plugin's `cpu24` core backend (ARMOR_VLLM_KERNEL=cpu24) ----------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "out_sizes,wrappers_in,identity_out",
    [
        ([96, 32, 32], "distinct", False),  # fused q/k/v, each shard its own B and A
        ([64, 64], "equal", False),  # gate/up sharing B: one stacked core
        ([48], "identity", True),  # a plain 2:4 layer (no wrappers)
    ],
)
def test_the_cpu24_backend_serves_through_the_op(dtype, tol, out_sizes, wrappers_in, identity_out):
    """Every token count 1..17 (and 64), with and without bias, fused shards with distinct wrappers,
    through the one custom op, eager and under a vLLM-like compile; no dense copy kept."""
    from kernel_helpers import make_shards, reference, rel_err, vllm_like_compile

    from armor_vllm.kernels import select_kernel
    from armor_vllm.kernels.linear_op import LAYERS

    shards = make_shards(out_sizes, 64, 16, wrappers_in=wrappers_in, identity_out=identity_out, seed=3)
    kernel = select_kernel("cpu24", "cpu", key=f"cpu24-{dtype}-{wrappers_in}")
    tensors = kernel.prepare(shards, dtype)
    assert kernel.plan.backend == "cpu24" and kernel.layout.backend == "cpu24"
    # the extension's wrapper loop at decode sizes, a batched matmul above (both run below)
    assert kernel.plan.wrapper_for(1) == "cpu" and kernel.plan.wrapper_for(cpu_sparse.CPU_WRAPPER_MAX_TOKENS) == "cpu"
    assert kernel.plan.wrapper_for(cpu_sparse.CPU_WRAPPER_MAX_TOKENS + 1) == "bmm"
    entry = LAYERS[kernel.key]
    names = kernel.layout.tensor_order()
    core_bytes = sum(t.numel() * t.element_size() for n, t in zip(names, entry.tensors) if n.startswith("core"))
    dense_bytes = sum(c.numel() for c in shards.cores) * dtype.itemsize
    assert core_bytes < 0.7 * dense_bytes, (core_bytes, dense_bytes)  # the compressed form, no dense copy
    assert "dense_weight" not in names
    rounded = make_shards(out_sizes, 64, 16, wrappers_in=wrappers_in, identity_out=identity_out, seed=3)
    rounded.cores = [c.to(dtype).float() for c in rounded.cores]
    bias = torch.randn(sum(out_sizes))
    compiled = vllm_like_compile(lambda x, b: kernel.apply(tensors, x, b))
    for n_tokens in [*range(1, 18), 64]:
        x = torch.randn(n_tokens, 64).to(dtype)
        for b in (None, bias.to(dtype)):
            want = reference(rounded, x.float(), None if b is None else b.float())
            assert rel_err(kernel.apply(tensors, x, b), want) < tol, (n_tokens, b is None)
        if n_tokens in (1, 9, 64):
            xd = torch.randn(n_tokens, 64).to(dtype)
            torch._dynamo.mark_dynamic(xd, 0)
            assert rel_err(compiled(xd, None), reference(rounded, xd.float())) < tol


def test_cpu24_where_it_cannot_run_falls_back_to_folded(monkeypatch):
    from armor_vllm.kernels import FoldedKernel, select_kernel
    from armor_vllm.kernels import cpu_sparse as cs

    monkeypatch.setattr(cs, "available", lambda: False)
    with pytest.warns(UserWarning, match="cpu24"):
        assert isinstance(select_kernel("cpu24", "cpu"), FoldedKernel)


def test_auto_on_a_cpu_serves_cpu24_where_the_wrappers_are_small():
    """auto's CPU rule: plain 2:4 layers and ARMOR layers with small wrappers run cpu24; a layer whose
    wrappers hold more than CPU24_MAX_WRAPPER_SHARE of the dense numbers (measured slower than dense)
    and a dtype cpu24 does not take are served folded, silently."""
    import warnings

    from kernel_helpers import make_shards, reference, rel_err

    from armor_vllm.kernels import CPU24_MAX_WRAPPER_SHARE, select_kernel
    from armor_vllm.kernels.factored import wrapper_share

    plain = make_shards([64, 64], 256, 16, wrappers_in="identity", identity_out=True, seed=1)
    small = make_shards([256], 256, 8, wrappers_in="equal", identity_out=False, seed=2)  # 2*256*8 / 256^2
    large = make_shards([64], 64, 32, wrappers_in="equal", identity_out=False, seed=3)  # 2*64*32 / 64^2
    assert wrapper_share(plain) == 0.0
    assert wrapper_share(small) == pytest.approx(2 * 8 / 256) and wrapper_share(small) <= CPU24_MAX_WRAPPER_SHARE
    assert wrapper_share(large) == pytest.approx(1.0) and wrapper_share(large) > CPU24_MAX_WRAPPER_SHARE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shards, backend in ((plain, "cpu24"), (small, "cpu24"), (large, "folded")):
            kernel = select_kernel("auto", "cpu", key=f"auto-{backend}-{wrapper_share(shards)}")
            tensors = kernel.prepare(shards, torch.float32)
            assert kernel.plan.backend == backend
            assert (kernel.folded_why is None) == (backend == "cpu24")
            x = torch.randn(3, shards.input_size)
            assert rel_err(kernel.apply(tensors, x, None), reference(shards, x)) < 1e-5
        kernel = select_kernel("auto", "cpu", key="auto-fp16")
        kernel.prepare(plain, torch.float16)
        assert kernel.plan.backend == "folded" and "float16" in kernel.folded_why
