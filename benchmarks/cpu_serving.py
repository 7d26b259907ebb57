"""CPU serving benchmark (issue 18): vLLM on the dense model and on one or more 2:4 checkpoints (a
plain one such as SparseGPT's, an ARMOR one) with each CPU kernel (``folded``: the dense fold;
``factored``: A·S·B with a dense core; ``cpu24``: the C++ kernel that reads the compressed 2:4
core), in vLLM's eager mode (``enforce_eager=True``) and its default compiled mode
(``torch.compile``), same prompts. Per configuration: start-up time (engine ready, compile
included), output tokens/s of a batch and of a single request, time to first token of a single
request, the server's resident memory, and the checkpoint size on disk.

Each configuration runs in its own process (a fresh engine); the kernel is chosen as a server
chooses it, with ``$ARMOR_VLLM_KERNEL``, and ``$ARMOR_VLLM_KERNEL_REPORT`` shows which kernel really
served each ARMOR linear: a run that did not serve the selected one (e.g. ``cpu24`` falling back to
the folded weight) fails. The dense model runs once per mode. Compiled mode is started twice with
the same, initially empty, vLLM cache directory: "cold" (compiles) and "warm" (vLLM reuses its
compile cache, as a restarted server does).

Memory: vLLM V1 runs the engine core in a child process of the one holding ``LLM``, so the worker
sums RSS over its own process tree (itself, the front end as in ``vllm serve``'s API server, plus
the engine core and any other children; psutil), sampled after load, after the batch and after the
single request; the row keeps the largest sum (``rss_gib``) and the engine children's own part
(``engine_rss_gib``). The KV cache is given one fixed size for every configuration
(``--kv-cache-gib``): left to vLLM, a CPU engine sizes it to fill its process up to
``gpu_memory_utilization`` of the machine's memory, so every engine would show the same RSS whatever
its weights. Shared pages (torch's libraries) count once per process, equally for every
configuration. The weights' bytes as loaded are not read from the model object: vLLM's CPU GEMM
moves dense weights into oneDNN/SGL handles and leaves empty parameters behind, so walking the
model's tensors undercounts. Instead the ARMOR linears' served bytes (and the dense bytes of the
same layers) come from the kernel report (``served_linear_mib``, ``dense_linear_mib``; none for
dense rows); RSS covers everything else.

Results go to a JSON file (each row with its ratios to the dense run of the same mode and start),
a markdown table and a plot beside the JSON (single-request tok/s and RSS against dense).

    python benchmarks/cpu_serving.py --checkpoint sparsegpt=out/bench/sparsegpt \
        --checkpoint armor=out/bench/armor-default --out benchmarks/results/cpu_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KERNELS = ("dense", "folded", "factored", "cpu24")
# the plan backend the kernel report shows for every ARMOR linear when the selected kernel serves
SERVED_BACKEND = {"folded": "folded", "factored": "dense", "cpu24": "cpu24"}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that decide vLLM's CPU GEMM path (without
    AVX-512 oneDNN builds no bf16 matmul and vLLM falls back to a slow one; ``armor_vllm.serve``)."""
    from armor_vllm.hardware import cpu_flags

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{name} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores, CPU only"


def tree_rss() -> tuple[int, int]:
    """RSS bytes of this process plus all its descendants, and of the descendants alone."""
    import psutil

    def rss(proc) -> int:
        try:
            return proc.memory_info().rss
        except psutil.NoSuchProcess:  # a short-lived helper that has exited
            return 0

    me = psutil.Process()
    children = sum(rss(c) for c in me.children(recursive=True))
    return rss(me) + children, children


def worker(
    model_dir: str, batch: int, prompt_len: int, out_len: int, ttft_reps: int, eager: bool, dtype: str, kv_gib: float
) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from armor_vllm.eval import make_llm
    from armor_vllm.offline.calibration import default_texts, first_windows, sequence_start, token_stream

    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream(tok, default_texts("evaluation"))
    windows = first_windows(stream, batch, prompt_len, sequence_start(tok))
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    t = time.perf_counter()
    llm = make_llm(
        model_dir,
        dtype=dtype,
        max_model_len=prompt_len + out_len + 16,
        enable_prefix_caching=False,
        enforce_eager=eager,
        kv_cache_memory_bytes=int(kv_gib * 2**30),
    )
    load_s = time.perf_counter() - t
    rss = [tree_rss()]
    gen = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], gen, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, gen, use_tqdm=False)
    wall = time.perf_counter() - t
    rss.append(tree_rss())
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttfts = []
    for i in range(ttft_reps):
        t = time.perf_counter()
        llm.generate([prompts[i % batch]], first, use_tqdm=False)
        ttfts.append(time.perf_counter() - t)
    t = time.perf_counter()
    llm.generate([prompts[0]], gen, use_tqdm=False)
    single_wall = time.perf_counter() - t
    rss.append(tree_rss())
    return {
        "load_seconds": load_s,
        "output_tokens_per_s": n_out / wall,
        "batch_wall_seconds": wall,
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "single_request_tokens_per_s": out_len / single_wall,
        "rss_gib": max(total for total, _ in rss) / 2**30,
        "engine_rss_gib": max(children for _, children in rss) / 2**30,
        "rss_samples_gib": [total / 2**30 for total, _ in rss],  # after load, batch, single request
    }


def served_kernel(report: Path, kernel: str) -> dict:
    """Check from the kernel report that every ARMOR linear was served by ``kernel``; its byte totals."""
    lines = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    if not lines:
        raise SystemExit(f"{kernel}: the plugin wrote no kernel report ({report}): was the checkpoint served by it?")
    want = SERVED_BACKEND[kernel]
    wrong = sorted({f"{e['kernel']}/{e['plan']['backend']}" for e in lines if e["plan"]["backend"] != want})
    if wrong:
        raise SystemExit(f"selected kernel {kernel!r} (backend {want!r}) did not serve every layer: {wrong}")
    return {
        "served_kernel": f"{lines[0]['kernel']}/{want}",
        "armor_linears": len(lines),
        "served_linear_mib": sum(e["weight_bytes"] for e in lines) / 2**20,
        "dense_linear_mib": sum(e["dense_bytes"] for e in lines) / 2**20,
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r["kernel"] != "dense"]
    if not rows:
        return
    labels = [r["name"].replace(" ", "\n", 2) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    for offset, key, label in ((-0.2, "single_tps_vs_dense", "single-request tok/s"), (0.2, "rss_vs_dense", "RSS")):
        ax.bar([i + offset for i in x], [r[key] or 0 for r in rows], width=0.4, label=f"{label} / dense")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("ratio to dense (same mode)")
    dtype = rows[0]["dtype"]
    ax.set_title(f"vLLM CPU serving, {dtype}: 2:4 kernels against the dense model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a compressed checkpoint to serve with each non-dense kernel (repeatable)",
    )
    p.add_argument("--armor", default=None, metavar="DIR", help="shorthand for --checkpoint armor=DIR")
    p.add_argument("--dense", default=None, help="dense model directory (default: the embedded model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--ttft-reps", type=int, default=5)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size, the same for every run")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--kernels", nargs="+", default=["dense", "folded", "cpu24"], choices=KERNELS)
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="serving dtype (bfloat16 is slow on CPUs without AVX-512: see cpu_description)",
    )
    p.add_argument("--out", default="benchmarks/results/cpu_serving.json")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "RESULT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(
            args.worker[0],
            args.batch,
            args.prompt_len,
            args.out_len,
            args.ttft_reps,
            eager=args.worker[2] == "eager",
            dtype=args.dtype,
            kv_gib=args.kv_cache_gib,
        )
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0

    from armor_vllm import envs
    from armor_vllm.models import default_model_dir

    checkpoints = dict(c.split("=", 1) for c in args.checkpoint if "=" in c)
    if len(checkpoints) != len(args.checkpoint):
        p.error("--checkpoint takes NAME=DIR")
    if args.armor:
        checkpoints.setdefault("armor", args.armor)
    if not checkpoints and set(args.kernels) != {"dense"}:
        p.error("name a compressed checkpoint (--checkpoint NAME=DIR or --armor DIR)")
    dense = args.dense or str(default_model_dir())
    configs = [("dense", dense, "dense")] if "dense" in args.kernels else []
    configs += [(name, d, k) for name, d in checkpoints.items() for k in args.kernels if k != "dense"]
    results = {
        "date": date.today().isoformat(),
        "command": shlex.join(["python", *sys.argv]),
        "machine": cpu_description(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("ARMOR_VLLM_", "VLLM_", "MALLOC_"))},
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "out_len": args.out_len,
        "kv_cache_gib": args.kv_cache_gib,
        "checkpoints": {"dense": dense, **checkpoints},
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for checkpoint, model, kernel in configs:
        for mode in args.modes:
            cache = tempfile.mkdtemp(prefix="vllm-cache-")  # cold: nothing compiled yet
            for start in ("cold", "warm") if mode == "compiled" else ("",):
                name = " ".join(x for x in (checkpoint, kernel if kernel != "dense" else "", mode, start) if x)
                tmp = out.with_suffix(f".{name.replace(' ', '_')}.tmp.json")
                report = tmp.with_suffix(".report.jsonl")
                report.unlink(missing_ok=True)
                env = {**os.environ, "VLLM_CACHE_ROOT": cache, envs.KERNEL_REPORT: str(report)}
                env.pop(envs.KERNEL, None)
                if kernel != "dense":
                    env[envs.KERNEL] = kernel
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len)]
                cmd += ["--out-len", str(args.out_len), "--ttft-reps", str(args.ttft_reps), "--dtype", args.dtype]
                cmd += ["--kv-cache-gib", str(args.kv_cache_gib)]
                cmd += ["--worker", model, str(tmp), mode]
                proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{name}: the worker failed (exit {proc.returncode})")
                row = {
                    "name": name,
                    "checkpoint": checkpoint,
                    "kernel": kernel,
                    "mode": mode,
                    "start": start or "n/a",
                    "dtype": args.dtype,
                    **json.loads(tmp.read_text()),
                    "checkpoint_mib": dir_bytes(Path(model)) / 2**20,
                    **(served_kernel(report, kernel) if kernel != "dense" else {}),
                }
                tmp.unlink()
                report.unlink(missing_ok=True)
                results["runs"].append(row)
                print(name, row, flush=True)
    for r in results["runs"]:
        same = (r["mode"], r["start"])
        base = next((b for b in results["runs"] if b["kernel"] == "dense" and (b["mode"], b["start"]) == same), None)
        for key, of in (("single_tps_vs_dense", "single_request_tokens_per_s"), ("rss_vs_dense", "rss_gib")):
            r[key] = r[of] / base[of] if base else None
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results["runs"], out.with_suffix(".png"))

    def ratio(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    sizes = f"batch {args.batch}, prompt {args.prompt_len}, out {args.out_len}, KV cache {args.kv_cache_gib} GiB"
    print(f"\n{results['machine']}; {args.dtype}; {sizes}\n")
    print(
        "| config | dtype | start-up (s) | batch tok/s | single-request tok/s | vs dense | TTFT (ms) "
        "| RSS (GiB) | vs dense | checkpoint (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(
            f"| {r['name']} | {r['dtype']} | {r['load_seconds']:.0f} | {r['output_tokens_per_s']:.1f} | "
            f"{r['single_request_tokens_per_s']:.1f} | {ratio(r['single_tps_vs_dense'])} | {r['ttft_ms_median']:.0f} | "
            f"{r['rss_gib']:.2f} | {ratio(r['rss_vs_dense'])} | {r['checkpoint_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
