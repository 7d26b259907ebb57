"""Speed of ARMOR linears on CUDA against dense cuBLAS and plain 2:4 cuSPARSELt.

Per linear of Llama-3-8B and Qwen2.5-7B, at 1..8192 tokens: dense ``F.linear``, plain 2:4
(``torch._cslt_sparse_mm``, and CUTLASS), ARMOR with ``bs`` 128 and 32 with batched-matmul and
Triton wrappers. Then a decoder block's linears (fused q/k/v, o, fused gate/up, SiLU-and-mul, down;
attention itself left out): dense vs 2:4 vs ARMOR (bmm wrappers, and ``auto``, which may keep a dense
copy for decode). CUDA-event timing, warmup, median of repetitions, each repetition ``--inner`` back-
to-back calls (weights up to ~30 MB may stay in the 50 MB L2 between calls at decode; ``--cold``
flushes L2 before every single call instead). Prints markdown tables of time relative to dense
(< 1 is faster) and writes everything as JSON with ``--out``.

Needs only torch (+ triton for the Triton columns) and this repository::

    PYTHONPATH=. python benchmarks/cuda_linear.py --out /tmp/cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from armor_vllm.factorization import mask_from_scores  # noqa: E402
from armor_vllm.kernels.base import ArmorShards  # noqa: E402
from armor_vllm.kernels.cuda import CudaArmorKernel, _triton_usable, backend_available  # noqa: E402

MODELS = {
    "llama3-8b": {
        "hidden": 4096,
        "linears": {"q": (4096, 4096), "k/v": (1024, 4096), "o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
        "qkv": (4096, 1024, 1024),
        "inter": 14336,
    },
    "qwen2.5-7b": {
        "hidden": 3584,
        "linears": {"q": (3584, 3584), "k/v": (512, 3584), "o": (3584, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)},
        "qkv": (3584, 512, 512),
        "inter": 18944,
    },
}
TOKENS = (1, 16, 128, 2048, 8192)


class Timer:
    def __init__(self, warmup: int, reps: int, inner: int, cold: bool):
        self.warmup, self.reps, self.inner, self.cold = warmup, reps, inner, cold
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if cold else None

    def __call__(self, fn) -> float:
        """Median milliseconds per call."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            inner = 1 if self.cold else self.inner
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return statistics.median(times)


def sparse_core(rows: int, cols: int, dtype) -> torch.Tensor:
    w = torch.randn(rows, cols, device="cuda", dtype=torch.float32) / cols**0.5
    return (w * mask_from_scores(w.abs())).to(dtype)


def near_identity(dim: int, bs: int) -> torch.Tensor:
    eye = torch.eye(bs, device="cuda")
    return eye + 0.05 * torch.randn(dim // bs, bs, bs, device="cuda")


def armor_shards(out_sizes, d_in: int, bs: int, dtype) -> ArmorShards:
    return ArmorShards(
        wrapper_out=near_identity(sum(out_sizes), bs),
        cores=[sparse_core(r, d_in, dtype).float() for r in out_sizes],
        wrappers_in=[near_identity(d_in, bs) for _ in out_sizes],
    )


def cslt_linear(packed):
    return lambda x: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)


def cutlass_linear(core):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        sparse = to_sparse_semi_structured(core)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return lambda x: F.linear(x, sparse)


def armor_fn(shards, dtype, **kwargs):
    kernel = CudaArmorKernel(strict=kwargs.get("backend", "auto") != "auto", **kwargs)
    tensors = kernel.prepare(shards, dtype)
    return lambda x: kernel.apply(tensors, x, None)


def safe(name, make, errors):
    """Build a method; record and skip it when this machine cannot run it."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001
        errors.setdefault(name, f"{type(err).__name__}: {err}")
        return None


def bench_linears(args, timer, dtype, errors):
    rows = []
    methods_seen: list[str] = []
    for model in args.models:
        for layer, (d_out, d_in) in MODELS[model]["linears"].items():
            dense_w = sparse_core(d_out, d_in, dtype)  # same size as a dense weight; values do not matter
            fns = {"dense": lambda x, w=dense_w: F.linear(x, w)}
            if backend_available("cusparselt", torch.device("cuda")):
                fns["2:4-cusparselt"] = safe("2:4-cusparselt", lambda: cslt_linear(torch._cslt_compress(dense_w)), errors)
            fns["2:4-cutlass"] = safe("2:4-cutlass", lambda: cutlass_linear(dense_w), errors)
            for bs in args.block_sizes:
                shards = armor_shards([d_out], d_in, bs, dtype)
                for wrapper in ("bmm", "triton"):
                    if wrapper == "triton" and not _triton_usable(bs):
                        continue
                    name = f"armor{bs}-{wrapper}"
                    fns[name] = safe(name, lambda: armor_fn(shards, dtype, backend="cusparselt", wrapper=wrapper, dense_below=0), errors)
                del shards
            fns = {k: v for k, v in fns.items() if v is not None}
            methods_seen += [k for k in fns if k not in methods_seen]
            for tokens in args.tokens:
                x = torch.randn(tokens, d_in, device="cuda", dtype=dtype)
                ms = {}
                for name, fn in fns.items():
                    try:
                        ms[name] = timer(lambda: fn(x))
                    except Exception as err:  # noqa: BLE001
                        errors.setdefault(name, f"{type(err).__name__}: {err}")
                rows.append({"model": model, "layer": layer, "out": d_out, "in": d_in, "tokens": tokens, "ms": ms})
                print(f"  {model} {layer} T={tokens}: " + ", ".join(f"{k} {v:.4f}" for k, v in ms.items()), file=sys.stderr)
            del fns, dense_w
            torch.cuda.empty_cache()
    return rows, methods_seen


def bench_blocks(args, timer, dtype, errors):
    """q/k/v fused, o, gate/up fused, SiLU-and-mul, down; no attention kernel."""
    rows = []
    for model in args.models:
        spec = MODELS[model]
        hidden, inter, qkv = spec["hidden"], spec["inter"], spec["qkv"]
        shapes = {"qkv": (list(qkv), hidden), "o": ([hidden], hidden), "gate_up": ([inter, inter], hidden), "down": ([hidden], inter)}
        variants: dict[str, dict] = {}
        dense = {k: sparse_core(sum(o), i, dtype) for k, (o, i) in shapes.items()}
        variants["dense"] = {k: (lambda x, w=w: F.linear(x, w)) for k, w in dense.items()}
        if backend_available("cusparselt", torch.device("cuda")):
            variants["2:4-cusparselt"] = safe("block 2:4", lambda: {k: cslt_linear(torch._cslt_compress(w)) for k, w in dense.items()}, errors)
        del dense
        for name, kwargs in (
            ("armor128-bmm", dict(backend="cusparselt", wrapper="bmm", dense_below=0)),
            ("armor128-triton", dict(backend="cusparselt", wrapper="triton", dense_below=0)),
            ("armor128-auto", dict(backend="auto", wrapper="auto")),
        ):
            if "triton" in name and not _triton_usable(128):
                continue

            def build(kwargs=kwargs):
                return {k: armor_fn(armor_shards(o, i, 128, dtype), dtype, **kwargs) for k, (o, i) in shapes.items()}

            variants[name] = safe(f"block {name}", build, errors)
        variants = {k: v for k, v in variants.items() if v is not None}

        def block(f, x):
            h = f["qkv"](x)
            a = f["o"](h[:, :hidden].contiguous())
            gu = f["gate_up"](x + a)
            return f["down"](F.silu(gu[:, :inter]) * gu[:, inter:])

        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
            ms = {}
            for name, f in variants.items():
                try:
                    ms[name] = timer(lambda: block(f, x))
                except Exception as err:  # noqa: BLE001
                    errors.setdefault(f"block {name}", f"{type(err).__name__}: {err}")
            rows.append({"model": model, "tokens": tokens, "ms": ms})
            print(f"  block {model} T={tokens}: " + ", ".join(f"{k} {v:.4f}" for k, v in ms.items()), file=sys.stderr)
        del variants
        torch.cuda.empty_cache()
    return rows


def table(rows, keys, methods) -> str:
    head = "| " + " | ".join(keys) + " | dense ms | " + " | ".join(m for m in methods if m != "dense") + " |"
    sep = "|" + "---|" * (len(keys) + len(methods))
    lines = [head, sep]
    for r in rows:
        base = r["ms"].get("dense")
        cells = [str(r[k]) for k in keys] + [f"{base:.4f}" if base else "-"]
        for m in methods:
            if m == "dense":
                continue
            v = r["ms"].get(m)
            cells.append(f"{v / base:.2f}" if v and base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write all timings as JSON here")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--block-sizes", nargs="+", type=int, default=[128, 32])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed repetition")
    p.add_argument("--cold", action="store_true", help="flush L2 before each (single) timed call")
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--skip-blocks", action="store_true")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("cuda_linear.py: no CUDA device (torch.cuda.is_available() is False); nothing to measure.", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    timer = Timer(args.warmup, args.reps, args.inner, args.cold)
    errors: dict[str, str] = {}
    started = time.time()
    info = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cusparselt": bool(backend_available("cusparselt", torch.device("cuda"))),
        "triton": _triton_usable(128),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "timing": {"warmup": args.warmup, "reps": args.reps, "inner": args.inner, "cold": args.cold, "stat": "median ms per call"},
    }
    print(f"# ARMOR CUDA linears on {info['device']} (torch {info['torch']}, {args.dtype})\n")
    result = {"info": info}
    with torch.inference_mode():
        if not args.skip_linears:
            rows, methods = bench_linears(args, timer, dtype, errors)
            result["linears"] = rows
            print("## Linears: time relative to dense cuBLAS (< 1 is faster)\n")
            print(table(rows, ["model", "layer", "out", "in", "tokens"], methods) + "\n")
        if not args.skip_blocks:
            rows = bench_blocks(args, timer, dtype, errors)
            result["blocks"] = rows
            methods = list(dict.fromkeys(m for r in rows for m in r["ms"]))
            print("## Decoder block linears (qkv, o, gate/up, SiLU-mul, down; no attention), relative to dense\n")
            print(table(rows, ["model", "tokens"], methods) + "\n")
    result["errors"] = errors
    result["seconds"] = round(time.time() - started, 1)
    if errors:
        print("## Methods that failed\n")
        for k, v in errors.items():
            print(f"- {k}: {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
