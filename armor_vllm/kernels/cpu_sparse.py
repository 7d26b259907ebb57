"""A CPU kernel for the 2:4 core that reads the compressed form directly (issue 18).

Why: decode on a CPU is memory-bandwidth bound (a batch-1 linear reads every weight once for two
flops). A 2:4 core kept as its kept half plus 2 bits of position per kept value is 53% of the dense
bytes in fp32 and 56% in bf16, so a kernel that streams that form is up to ~1.8x faster than a dense
matmul at small token counts, and the server holds no dense copy.

What: a PyTorch C++ extension (``csrc/sparse24_cpu.cpp``) built with the machine's compiler at first
use and cached under ``~/.cache/armor-vllm/torch_extensions/<hash of sources + torch version>``. One
build runs everywhere: AVX-512 (with AVX512_BF16's ``vdpbf16ps`` when x and storage are bf16),
AVX2+FMA and a scalar path are chosen at run time (``ARMOR_VLLM_CPU_ISA=avx512bf16|avx512|avx2|scalar``
forces a lower one). Threads: ``at::parallel_for`` over 16-row tiles (``torch.set_num_threads``).
If the extension cannot be built, one warning is issued and ``available()`` is False: callers keep
today's kernels.

API::

    available() -> bool                  # the extension is built and loadable here
    isa() -> str                         # the path the kernel takes here (env override applied)
    pack(core, dtype) -> PackedCore      # dense 2:4 core (N, K) -> compressed (plain tensors)
    unpack(packed) -> Tensor             # back to the dense (N, K) core (tests, large batches)
    sparse24_linear(x, packed, bias)     # x (..., K) @ S^T + bias; op armor_vllm::cpu_sparse24_mm
    blockdiag(x, wt, shards, bias)       # block-diagonal wrappers (few tokens); op armor_vllm::cpu_blockdiag
    armor_linear(x, packed, wrapper_in, wrapper_out, bias)   # A (S (B x)) + bias

Accumulation is fp32; the output has x's dtype. Above ``large_batch_tokens()`` tokens (128;
``ARMOR_VLLM_CPU_SPARSE_MAX_TOKENS`` read at first use) the core is decompressed per call into a temporary
dense weight for ``at::linear`` (prefill); nothing dense is kept between calls. Up to 128 tokens the
compressed kernel measured faster than decompress + GEMM on a Zen 4 EPYC (2026, shared machine).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PackedCore", "available", "isa", "pack", "unpack", "sparse24_linear", "blockdiag", "armor_linear"]

# Up to this many tokens the block-diagonal wrappers run the extension's loop (``blockdiag``); above,
# a batched matmul. Chosen from a one-off timing of the two on a Zen 4 EPYC, 2 threads, 576- and
# 4096-wide, bs 64, fp32 and bf16 (the loop faster up to 8-16 tokens); benchmarks/cpu_linear.py's
# ARMOR rows run both sides of it.
CPU_WRAPPER_MAX_TOKENS = 16

_SOURCES = [Path(__file__).resolve().parent / "csrc" / "sparse24_cpu.cpp"]
_EXT = None
_FAILED = False


def _build_dir() -> Path:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "armor-vllm" / "torch_extensions"
    path = root / h.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load():
    """The compiled extension, or None (one warning) when it cannot be built."""
    global _EXT, _FAILED
    if _EXT is not None or _FAILED:
        return _EXT
    try:
        from torch.utils.cpp_extension import load

        _EXT = load(
            name="armor_sparse24_cpu",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            verbose=False,
        )
        _register_fake()
    except Exception as exc:  # no compiler, no headers, unsupported platform ...
        _FAILED = True
        warnings.warn(
            f"armor_vllm: the CPU 2:4 kernel could not be built ({type(exc).__name__}: {exc}); "
            "falling back to the dense kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    return _EXT


def large_batch_tokens() -> int:
    """Token count above which the op decompresses the core per call and runs a dense GEMM."""
    return int(_ext().large_batch_tokens())


def available() -> bool:
    """Whether the extension is built (building it on first call) and usable here."""
    return _load() is not None


def isa() -> str:
    """The vector path ``sparse24_linear`` takes on this machine: ``avx512bf16`` (used when x and
    storage are bf16; otherwise as ``avx512``), ``avx512``, ``avx2`` or ``scalar``; ``none`` when the
    extension is not available. ``ARMOR_VLLM_CPU_ISA`` forces a lower path."""
    ext = _load()
    return ext.isa() if ext is not None else "none"


@dataclass
class PackedCore:
    """A 2:4 core in the kernel's layout: plain contiguous tensors (register them as buffers).

    ``values``: float32 ``(tiles, K/4, 2, 16)`` or bfloat16 ``(tiles, K/4, 16, 2)`` (tiles of 16
    output rows, N padded to a multiple of 16); ``meta``: int32 ``(tiles, ceil(K/32), 16)``, a 4-bit
    code per row and group of 4 inputs. ``n``, ``k``: the dense shape."""

    values: torch.Tensor
    meta: torch.Tensor
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4


def _ext():
    ext = _load()
    if ext is None:
        raise RuntimeError("armor_vllm: the CPU 2:4 kernel is not available (see the earlier warning)")
    return ext


def pack(core: torch.Tensor, dtype: torch.dtype = torch.float32) -> PackedCore:
    """Compress a dense 2:4 core ``(N, K)`` (at most 2 non-zeros in every 4 consecutive inputs;
    raises otherwise) into the kernel's layout with ``dtype`` (float32 or bfloat16) values."""
    values, meta = _ext().pack(core.detach().cpu(), dtype)
    return PackedCore(values, meta, int(core.shape[0]), int(core.shape[1]))


def unpack(packed: PackedCore) -> torch.Tensor:
    """The dense ``(N, K)`` core of ``packed`` in its storage dtype."""
    return _ext().unpack(packed.values, packed.meta, packed.n, packed.k)


_FAKE_REGISTERED = False


def _register_fake() -> None:
    """Shapes for torch.compile: the op itself is defined and implemented in C++ (TORCH_LIBRARY),
    so eager calls dispatch without Python overhead."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return
    try:

        @torch.library.register_fake("armor_vllm::cpu_sparse24_mm")
        def _fake(x, values, meta, n, k, bias=None):
            return x.new_empty((*x.shape[:-1], n))

        @torch.library.register_fake("armor_vllm::cpu_blockdiag")
        def _fake_blockdiag(x, wt, shards, bias=None):
            return x.new_empty(x.shape if shards == 1 else (shards, *x.shape))
    except RuntimeError:  # already registered (module reloaded)
        pass
    _FAKE_REGISTERED = True


def sparse24_linear(x: torch.Tensor, packed: PackedCore, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ S^T + bias`` from the packed core, in x's dtype (fp32 accumulation)."""
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the core {packed.k}")
    _ext()
    return torch.ops.armor_vllm.cpu_sparse24_mm(x, packed.values, packed.meta, packed.n, packed.k, bias)


def blockdiag(x: torch.Tensor, wt: torch.Tensor, shards: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal wrappers for few tokens, the contract of ``kernels.blockdiag.blockdiag_bmm``:
    ``x`` (T, n*bs), ``wt`` (n, bs, shards*bs) from ``stack_wrappers``; (T, n*bs) for one shard (+
    ``bias``), (shards, T, n*bs) for several. One pass per block with fp32 accumulation (op
    ``armor_vllm::cpu_blockdiag``): at decode a batched matmul costs its dispatch and layout copies
    more than its flops."""
    _ext()
    return torch.ops.armor_vllm.cpu_blockdiag(x, wt, shards, bias)


def armor_linear(
    x: torch.Tensor,
    packed: PackedCore,
    wrapper_in: torch.Tensor | None = None,
    wrapper_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = A (S (B x)) + bias``: ``wrapper_in`` = B and ``wrapper_out`` = A as ``stack_wrappers``
    lays them out (``(K/bs, bs, bs)`` and ``(N/bs, bs, bs)``, each block transposed; None = identity),
    the core through ``sparse24_linear``, the wrappers through ``blockdiag``."""
    from armor_vllm.kernels.blockdiag import blockdiag_bmm

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    wrap = blockdiag if x2.shape[0] <= CPU_WRAPPER_MAX_TOKENS else blockdiag_bmm
    h = x2 if wrapper_in is None else wrap(x2, wrapper_in)
    if wrapper_out is None:
        y = sparse24_linear(h, packed, bias)
    else:
        y = wrap(sparse24_linear(h, packed), wrapper_out, 1, bias)
    return y.reshape(*lead, y.shape[-1])
