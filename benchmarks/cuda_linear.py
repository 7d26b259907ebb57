"""Speed of ARMOR linears on a GPU against dense cuBLAS and plain 2:4, as vLLM would run them.

Per linear of Llama-3-8B and Qwen2.5-7B as vLLM fuses them (q/k/v fused, o, gate/up fused, down) and
per decoder block (those four with SiLU-and-mul; attention left out), at 1 .. 8192 tokens, fp16 and
bf16, in one run:

- ``dense``: ``F.linear`` (cuBLAS) on a dense weight of the same shape;
- ``2:4``: a plain 2:4 weight through the plugin's kernel (identity wrappers, cuSPARSELt; the tokens
  padded to 8 inside the op as the library needs);
- ``2:4-raw``: ``torch._cslt_sparse_mm`` called directly (padded too): what the op adds on top;
- ``armor-bmm`` / ``armor-triton``: ARMOR (``bs`` 128) through the plugin's kernel, cuSPARSELt core,
  batched-matmul or Triton wrappers, sparse at every size;
- ``armor-auto``: the plugin's default (``ARMOR_VLLM_KERNEL=auto``): measured backend, wrappers and
  cuSPARSELt algorithm/split-k, no dense copy (never more weight memory than dense);
- ``armor-auto+dense``: the same with ``ARMOR_VLLM_DENSE_BELOW=auto``: a folded dense copy kept for
  the token counts where dense measured faster (costs the dense weight's memory again).

Timing follows what vLLM does: token counts up to ``--graph-max`` (vLLM captures decode batches in
CUDA graphs) are timed as replays of a CUDA graph holding ``--inner`` back-to-back calls; larger
counts run eagerly. Median of ``--reps`` repetitions, CUDA events. Prints markdown tables of time
relative to dense (< 1 is faster) and writes everything as JSON with ``--out``.

Needs only torch (+ triton for the Triton rows) and this repository::

    PYTHONPATH=. python benchmarks/cuda_linear.py --out benchmarks/results/cuda_linear_h100.json

``--smoke`` runs tiny shapes on the CPU through the stand-in backends (the tests use it, so the
script cannot rot between GPU sessions); its numbers mean nothing.
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

from armor_vllm.core.factorization import identity_blocks, mask_from_scores  # noqa: E402
from armor_vllm.kernels import FactoredKernel  # noqa: E402
from armor_vllm.kernels import backends as kb  # noqa: E402
from armor_vllm.kernels.base import ArmorShards  # noqa: E402
from armor_vllm.kernels.blockdiag import triton_supported  # noqa: E402

MODELS = {
    # vLLM's fused layers: qkv (q, k, v rows), o, gate_up (gate, up rows), down; input size each
    "llama3-8b": {"hidden": 4096, "inter": 14336, "qkv": (4096, 1024, 1024)},
    "qwen2.5-7b": {"hidden": 3584, "inter": 18944, "qkv": (3584, 512, 512)},
    "smoke": {"hidden": 128, "inter": 256, "qkv": (128, 64, 64)},
}
TOKENS = (1, 2, 4, 8, 16, 64, 128, 512, 2048, 8192)
METHODS = ("dense", "2:4", "2:4-raw", "armor-bmm", "armor-triton", "armor-auto", "armor-auto+dense")


def layer_shapes(model: str) -> dict[str, tuple[list[int], int]]:
    spec = MODELS[model]
    h, i = spec["hidden"], spec["inter"]
    return {"qkv": (list(spec["qkv"]), h), "o": ([h], h), "gate_up": ([i, i], h), "down": ([h], i)}


# ---------------------------------------------------------------------------------------------
# timing


class Timer:
    """Median ms per call; CUDA graphs for ``tokens <= graph_max`` (as vLLM replays decode)."""

    def __init__(self, device, warmup=5, reps=15, inner=10, graph_max=512):
        self.device, self.warmup, self.reps, self.inner, self.graph_max = device, warmup, reps, inner, graph_max

    def __call__(self, fn, tokens: int) -> tuple[float, str]:
        if self.device.type != "cuda":
            return self._cpu(fn), "eager"
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        if tokens <= self.graph_max:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.inner):
                    fn()
            run, mode = graph.replay, "graph"
        else:

            def run():
                for _ in range(self.inner):
                    fn()

            mode = "eager"
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.inner)
        return statistics.median(times), mode

    def _cpu(self, fn) -> float:
        fn()
        times = []
        for _ in range(max(2, self.reps // 5)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# methods


def random_core(rows: int, cols: int, device, gen) -> torch.Tensor:
    w = torch.randn(rows, cols, device=device, generator=gen) / cols**0.5
    return w * mask_from_scores(w.abs())


def shards_for(out_sizes, d_in, bs, device, gen, wrapped: bool) -> ArmorShards:
    def blocks(d):
        eye = identity_blocks(d, bs, device=device)
        return eye + 0.05 * torch.randn(eye.shape, device=device, generator=gen) if wrapped else eye

    return ArmorShards(
        wrapper_out=blocks(sum(out_sizes)),
        cores=[random_core(r, d_in, device, gen) for r in out_sizes],
        wrappers_in=[blocks(d_in) for _ in out_sizes],
    )


def raw_cslt(core: torch.Tensor):
    """``torch._cslt_sparse_mm`` with the tokens padded to 8 (what the library needs)."""
    stored = kb.CUSPARSELT.compress(core)

    def run(x):
        pad = (-x.shape[0]) % kb.CUSPARSELT.token_multiple
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x
        y = kb.CUSPARSELT.matmul(stored, xp, None)
        return y[: x.shape[0]] if pad else y

    return run


def build_methods(out_sizes, d_in, dtype, device, bs, errors, gen) -> dict:
    """Callables ``x -> y`` of every method for one (possibly fused) linear; a method this machine
    cannot run is recorded in ``errors`` and left out."""
    methods = {}
    dense_w = torch.cat([random_core(r, d_in, device, gen) for r in out_sizes]).to(dtype)
    methods["dense"] = lambda x, w=dense_w: F.linear(x, w)

    def kernel(shards, **kwargs):
        k = FactoredKernel(device=device, **kwargs)
        tensors = k.prepare(shards, dtype)
        return lambda x: k.apply(tensors, x, None)

    plain = shards_for(out_sizes, d_in, bs, device, gen, wrapped=False)
    armor = shards_for(out_sizes, d_in, bs, device, gen, wrapped=True)
    sparse = "cusparselt" if "cusparselt" in kb.usable_sparse_backends(device, dtype) else "cutlass"
    makers = {
        "2:4": lambda: kernel(plain, backend=sparse, wrapper="bmm", dense_below=0, strict=True),
        "2:4-raw": lambda: raw_cslt(torch.cat(plain.cores).to(dtype)),
        "armor-bmm": lambda: kernel(armor, backend=sparse, wrapper="bmm", dense_below=0, strict=True),
        "armor-triton": lambda: kernel(armor, backend=sparse, wrapper="triton", dense_below=0, strict=True),
        "armor-auto": lambda: kernel(armor, backend="auto", wrapper="auto"),
        # auto with a dense copy where measured faster (ARMOR_VLLM_DENSE_BELOW=auto): more memory than dense
        "armor-auto+dense": lambda: kernel(armor, backend="auto", wrapper="auto", dense_below="auto"),
    }
    for name, make in makers.items():
        if name == "armor-triton" and not triton_supported(bs, device):
            continue
        try:
            methods[name] = make()
        except Exception as err:  # noqa: BLE001 - recorded and reported, never hidden
            errors.setdefault(name, f"{type(err).__name__}: {err}")
    return methods


def time_all(methods: dict, x_for, tokens_list, timer, errors, label) -> list[dict]:
    rows = []
    for tokens in tokens_list:
        x = x_for(tokens)
        ms, modes = {}, {}
        for name, fn in methods.items():
            try:
                ms[name], modes[name] = timer(lambda: fn(x), tokens)
            except Exception as err:  # noqa: BLE001
                errors.setdefault(f"{label} {name}", f"{type(err).__name__}: {err}")
        rows.append({**label_fields(label), "tokens": tokens, "ms": ms, "timing": modes})
        print(f"  {label} T={tokens}: " + ", ".join(f"{k} {v:.4f}" for k, v in ms.items()), file=sys.stderr)
    return rows


def label_fields(label: str) -> dict:
    model, dtype, layer = label.split("/")
    return {"model": model, "dtype": dtype, "layer": layer}


def bench(args, device, errors) -> dict:
    timer = Timer(device, args.warmup, args.reps, args.inner, args.graph_max)
    gen = torch.Generator(device=device).manual_seed(0)
    result = {"linears": [], "blocks": []}
    for dtype_name in args.dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        for model in args.models:
            shapes = layer_shapes(model)
            per_layer = {}
            for layer, (outs, d_in) in shapes.items():
                methods = build_methods(outs, d_in, dtype, device, args.block_size, errors, gen)
                per_layer[layer] = methods
                result["linears"] += time_all(
                    methods,
                    lambda t, d=d_in: torch.randn(t, d, device=device, dtype=dtype),
                    args.tokens,
                    timer,
                    errors,
                    f"{model}/{dtype_name}/{layer}",
                )
            hidden, inter = MODELS[model]["hidden"], MODELS[model]["inter"]
            q_rows = MODELS[model]["qkv"][0]
            common = [m for m in METHODS if all(m in per_layer[k] for k in per_layer)]

            def block(m, x, f=per_layer):
                h = f["qkv"][m](x)
                a = f["o"][m](h[:, :q_rows].contiguous())
                gu = f["gate_up"][m](x + a)
                return f["down"][m](F.silu(gu[:, :inter]) * gu[:, inter:])

            blocks = {m: (lambda x, m=m: block(m, x)) for m in common}
            result["blocks"] += time_all(
                blocks,
                lambda t: torch.randn(t, hidden, device=device, dtype=dtype),
                args.tokens,
                timer,
                errors,
                f"{model}/{dtype_name}/block",
            )
            del blocks
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def table(rows) -> str:
    methods = [m for m in METHODS if any(m in r["ms"] for r in rows) and m != "dense"]
    head = "| model | dtype | layer | tokens | dense ms | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (5 + len(methods))]
    for r in rows:
        base = r["ms"].get("dense")
        cells = [r["model"], r["dtype"], r["layer"], str(r["tokens"]), f"{base:.4f}" if base else "-"]
        cells += [f"{r['ms'][m] / base:.2f}" if m in r["ms"] and base else "-" for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write all timings as JSON here")
    p.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"], choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["fp16", "bf16"])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed repetition")
    p.add_argument("--graph-max", type=int, default=512, help="largest token count timed as a CUDA graph replay")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with the stand-in backends (tests)")
    args = p.parse_args(argv)

    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import standin  # tests/standin.py: the CPU stand-ins of the raw 2:4 ops

        standin.install()
        device = torch.device("cpu")
        args.models, args.tokens, args.dtypes, args.block_size, args.reps = ["smoke"], [1, 9], ["fp16"], 32, 2
    elif not torch.cuda.is_available():
        print(
            "cuda_linear.py: no CUDA device (torch.cuda.is_available() is False); nothing to measure.", file=sys.stderr
        )
        return 2
    else:
        device = torch.device("cuda")
    errors: dict[str, str] = {}
    started = time.time()
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (stand-in smoke run)",
        "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "sparse_backends": {
            d: kb.usable_sparse_backends(device, {"fp16": torch.float16, "bf16": torch.bfloat16}[d])
            for d in args.dtypes
        },
        "triton": triton_supported(args.block_size, device),
        "tokens": args.tokens,
        "block_size": args.block_size,
        "timing": {
            "warmup": args.warmup,
            "reps": args.reps,
            "inner": args.inner,
            "graph_max": args.graph_max,
            "stat": "median ms per call; CUDA-graph replays up to graph_max tokens",
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"# ARMOR linears on {info['device']} (torch {info['torch']})\n")
    with torch.inference_mode():
        result = {"info": info, **bench(args, device, errors)}
    print("## Linears: time relative to dense cuBLAS (< 1 is faster)\n")
    print(table(result["linears"]) + "\n")
    print("## Decoder block linears (qkv, o, gate/up, SiLU-mul, down; no attention), relative to dense\n")
    print(table(result["blocks"]) + "\n")
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
