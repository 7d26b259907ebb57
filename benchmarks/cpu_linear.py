"""Speed of one linear on the CPU: the dense path vLLM uses, our 2:4 kernel, and ARMOR (issue 18).

Per linear of Llama-3-8B as vLLM fuses them (q/k/v 6144x4096, o 4096x4096, gate/up 28672x4096,
down 4096x14336) and of the embedded SmolLM2-135M (960x576, 576x576, 3072x576, 576x1536), at 1, 2,
4, 8, 16, 64 tokens, fp32 and bf16 (weights stored in the same dtype as x), three paths:

- ``dense``: what vLLM's CPU backend runs for an unquantized linear: a layer is passed through
  ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (zentorch, SGL or the prepacked
  oneDNN ``onednn_mm``, whichever vLLM picks here; the JSON records which) and ``layer.cpu_linear`` is
  timed; without vLLM, ``F.linear`` (said in the output);
- ``2:4``: a random 2:4 core through ``armor_vllm.kernels.cpu_sparse.sparse24_linear``;
- ``armor``: ``armor_linear`` with bs-64 block-diagonal wrappers: B, core, A (the wrappers through
  ``cpu_sparse.blockdiag``, as the plugin runs them at up to 32 tokens).

Timing: warm-up, then ``--rounds`` rounds in which the three paths are timed one after another
(interleaved, so a busy neighbour slows all of them alike), each round timing enough back-to-back
calls for ~``--min-ms``; the median over rounds is reported. The ratio is dense time / path time
(> 1: faster than dense). GB/s = weight bytes read per call (dense: N*K*itemsize; 2:4: the packed
values + metadata; armor: that + both wrappers) / time, against the machine's memory bandwidth
measured here as the best of several ``torch.sum`` passes over a 1 GiB fp32 tensor with the same
threads (read-only streaming, which is what a GEMV does).

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_linear.py            # full run, writes results/
    PYTHONPATH=. .venv/bin/python benchmarks/cpu_linear.py --quick    # small shapes only
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armor_vllm.kernels import cpu_sparse  # noqa: E402
from armor_vllm.kernels.blockdiag import stack_wrappers  # noqa: E402

SHAPES = {
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
}
TOKENS = [1, 2, 4, 8, 16, 64]
BS = 64


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = val.strip()
            if key.strip() == "Flags":
                info["avx_flags"] = sorted(f for f in val.split() if f.startswith(("avx", "fma", "amx")))
            if key.strip() == "CPU(s)":
                info["cpus"] = int(val.strip())
    except OSError:
        pass
    info["kernel_isa"] = cpu_sparse.isa()
    return info


def memory_bandwidth_gbs(reps: int = 7) -> float:
    """Read bandwidth: best of ``reps`` torch.sum passes over a 1 GiB fp32 tensor."""
    big = torch.ones(256 * 1024 * 1024)
    big.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    del big
    return 1024**3 / best / 1e9


def dense_path(weight: torch.Tensor, bias):
    """vLLM's own CPU dispatch for an unquantized linear, or F.linear; returns (fn, name)."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except Exception as exc:  # vLLM missing or broken
        return (lambda x: F.linear(x, weight, bias)), f"F.linear (vLLM not importable: {type(exc).__name__})"
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    import vllm._custom_ops as ops
    from vllm.platforms import current_platform

    if current_platform.is_zen_cpu() and hasattr(torch.ops, "zentorch"):
        name = "zentorch_linear_unary"
    else:
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

        n, k = weight.shape
        if check_cpu_sgl_kernel(n, k, weight.dtype):
            name = "sgl weight_packed_linear"
        elif ops._supports_onednn:
            name = "oneDNN onednn_mm (prepacked)"
        else:
            name = "F.linear"
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    fn = layer.cpu_linear
    return (lambda x: fn(x, layer.weight, layer.bias)), name


def random_core(n: int, k: int, gen) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    idx = torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).reshape(n, k)
    return w * mask


def timed(fn, min_ms: float) -> float:
    """ms per call of ``fn`` over enough back-to-back calls for ``min_ms``."""
    t = time.perf_counter()
    fn()
    one = time.perf_counter() - t
    iters = max(1, int(min_ms / 1e3 / max(one, 1e-6)))
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def bench_shape(model, name, n, k, dtype, tokens, args, gen, bw):
    core = random_core(n, k, gen)
    dense_w = core.to(dtype)  # the dense path reads every weight, zeros included
    dense_fn, dense_name = dense_path(dense_w, None)
    packed = cpu_sparse.pack(core, dtype)
    del core
    # the wrappers as the plugin holds them (kernels.blockdiag.stack_wrappers: blocks transposed)
    a = stack_wrappers([torch.eye(BS) + 0.05 * torch.randn(n // BS, BS, BS, generator=gen)]).to(dtype)
    b = stack_wrappers([torch.eye(BS) + 0.05 * torch.randn(k // BS, BS, BS, generator=gen)]).to(dtype)
    bytes_dense = dense_w.numel() * dense_w.element_size()
    bytes_sparse = packed.nbytes()
    bytes_armor = bytes_sparse + (a.numel() + b.numel()) * a.element_size()
    rows = []
    for t in tokens:
        x = torch.randn(t, k, generator=gen).to(dtype)
        fns = {
            "dense": lambda: dense_fn(x),
            "2:4": lambda: cpu_sparse.sparse24_linear(x, packed),
            "armor": lambda: cpu_sparse.armor_linear(x, packed, b, a),
        }
        for f in fns.values():  # warm-up
            f(), f()
        times = {p: [] for p in fns}
        for _ in range(args.rounds):
            for p, f in fns.items():
                times[p].append(timed(f, args.min_ms))
        ms = {p: statistics.median(v) for p, v in times.items()}
        row = {
            "model": model,
            "linear": name,
            "n": n,
            "k": k,
            "dtype": str(dtype).replace("torch.", ""),
            "tokens": t,
            "dense_path": dense_name,
            "ms": ms,
            "ratio": {p: ms["dense"] / ms[p] for p in ms},
            "gbs": {
                "dense": bytes_dense / ms["dense"] / 1e6,
                "2:4": bytes_sparse / ms["2:4"] / 1e6,
                "armor": bytes_armor / ms["armor"] / 1e6,
            },
            "weight_bytes": {"dense": bytes_dense, "2:4": bytes_sparse, "armor": bytes_armor},
        }
        row["bw_fraction"] = {p: row["gbs"][p] / bw for p in ms}
        rows.append(row)
        print(
            f"| {model} | {name} {n}x{k} | {row['dtype']} | {t} | {ms['dense']:.3f} | {ms['2:4']:.3f} "
            f"({row['ratio']['2:4']:.2f}x) | {ms['armor']:.3f} ({row['ratio']['armor']:.2f}x) | "
            f"{row['gbs']['dense']:.1f} / {row['gbs']['2:4']:.1f} / {row['gbs']['armor']:.1f} |",
            flush=True,
        )
    return rows


def plot(rows, path: Path, bw: float, info: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False, sharey=True)
    for ax, dt in zip(axes[0], dtypes):
        keys = sorted({(r["model"], r["linear"]) for r in rows if r["dtype"] == dt})
        for i, (model, lin) in enumerate(keys):
            sel = sorted(
                (r for r in rows if r["dtype"] == dt and r["model"] == model and r["linear"] == lin),
                key=lambda r: r["tokens"],
            )
            ts = [r["tokens"] for r in sel]
            color = f"C{i}"
            ax.plot(ts, [r["ratio"]["2:4"] for r in sel], "-o", color=color, ms=3, label=f"{model} {lin} 2:4")
            ax.plot(ts, [r["ratio"]["armor"] for r in sel], "--x", color=color, ms=3, label=f"{model} {lin} armor")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(f"{dt}: speed vs vLLM dense (> 1 faster)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dense time / path time")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{info.get('cpu', '?')}, {info['threads']} threads, mem bw {bw:.1f} GB/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-ms", type=float, default=40.0)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="embedded-model shapes, 1 and 4 tokens, 3 rounds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_linear.json"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.tokens, args.rounds = "smollm2-135m", "1,4", 3
    torch.set_num_threads(args.threads)
    if not cpu_sparse.available():
        sys.exit("the CPU 2:4 kernel cannot be built here")
    info = machine()
    bw = memory_bandwidth_gbs()
    print(
        f"machine: {info.get('cpu')} ({info.get('cpus')} CPUs), {args.threads} threads, kernel path "
        f"{info['kernel_isa']}, torch {torch.__version__}; memory read bandwidth {bw:.1f} GB/s "
        "(torch.sum over 1 GiB)"
    )
    print(
        "\n| model | linear | dtype | tokens | dense ms | 2:4 ms (x dense) | armor ms (x dense) | GB/s dense / 2:4 / armor |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for model in args.models.split(","):
            for name, (n, k) in SHAPES[model].items():
                rows.extend(bench_shape(model, name, n, k, dtype, tokens, args, gen, bw))
    dense_paths = sorted({r["dense_path"] for r in rows})
    print(f"\ndense path(s): {', '.join(dense_paths)}; memory bandwidth {bw:.1f} GB/s")
    result = {
        "machine": info,
        "memory_bandwidth_gbs": bw,
        "memory_bandwidth_method": "best of 7 torch.sum over a 1 GiB float32 tensor, same thread count",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {
            "threads": args.threads,
            "rounds": args.rounds,
            "min_ms": args.min_ms,
            "bs": BS,
            "large_batch_tokens": cpu_sparse.large_batch_tokens(),
        },
        "dense_paths": dense_paths,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(rows, out.with_suffix(".png"), bw, info)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
