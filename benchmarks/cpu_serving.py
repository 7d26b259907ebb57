"""CPU serving benchmark: vLLM on the dense model and on a compressed checkpoint with each CPU kernel
(``folded``, ``factored``), in vLLM's eager mode (``enforce_eager=True``) and its default compiled
mode (``torch.compile``), same prompts: start-up time (engine ready, compile included), output
tokens/s of a batch, time to first token of a single request, and the checkpoint size on disk.

Each configuration runs in its own process (a fresh engine). Compiled mode is started twice with
the same, initially empty, vLLM cache directory: "cold" (compiles) and "warm" (vLLM reuses its
compile cache, as a restarted server does). Results go to a JSON file and a markdown table.

    python benchmarks/cpu_serving.py --armor out/bench/armor-default --out benchmarks/results/cpu_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that decide vLLM's CPU GEMM path (without
    AVX-512 oneDNN builds no bf16 matmul and vLLM falls back to a slow one; ``armor_vllm.serve``)."""
    from armor_vllm.serve import cpu_flags

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{name} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores, CPU only"


def worker(model_dir: str, batch: int, prompt_len: int, out_len: int, ttft_reps: int, eager: bool, dtype: str) -> dict:
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
    )
    load_s = time.perf_counter() - t
    gen = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], gen, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, gen, use_tqdm=False)
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttfts = []
    for i in range(ttft_reps):
        t = time.perf_counter()
        llm.generate([prompts[i % batch]], first, use_tqdm=False)
        ttfts.append(time.perf_counter() - t)
    single = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([prompts[0]], single, use_tqdm=False)
    single_wall = time.perf_counter() - t
    return {
        "load_seconds": load_s,
        "output_tokens_per_s": n_out / wall,
        "batch_wall_seconds": wall,
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "single_request_tokens_per_s": out_len / single_wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--armor", required=True, help="compressed checkpoint directory")
    p.add_argument("--dense", default=None, help="dense model directory (default: the embedded model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--ttft-reps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument(
        "--kernels", nargs="+", default=["dense", "folded", "factored"], choices=["dense", "folded", "factored"]
    )
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
        )
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0

    from armor_vllm.models import default_model_dir

    dense = args.dense or str(default_model_dir())
    kernels = {"dense": (dense, None), "folded": (args.armor, "folded"), "factored": (args.armor, "factored")}
    results = {
        "date": date.today().isoformat(),
        "machine": cpu_description(),
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "out_len": args.out_len,
        "runs": {},
    }
    for kernel_name in args.kernels:
        model, kernel = kernels[kernel_name]
        for mode in args.modes:
            cache = tempfile.mkdtemp(prefix="vllm-cache-")  # cold: nothing compiled yet
            for start in ("cold", "warm") if mode == "compiled" else ("",):
                name = " ".join(x for x in ((f"armor {kernel_name}" if kernel else "dense"), mode, start) if x)
                tmp = Path(args.out).with_suffix(f".{name.replace(' ', '_')}.tmp.json")
                env = {**os.environ, "VLLM_CACHE_ROOT": cache, **({"ARMOR_VLLM_KERNEL": kernel} if kernel else {})}
                cmd = [
                    sys.executable,
                    __file__,
                    "--armor",
                    args.armor,
                    "--batch",
                    str(args.batch),
                    "--prompt-len",
                    str(args.prompt_len),
                    "--out-len",
                    str(args.out_len),
                    "--ttft-reps",
                    str(args.ttft_reps),
                    "--dtype",
                    args.dtype,
                    "--worker",
                    model,
                    str(tmp),
                    mode,
                ]
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results["runs"][name] = {
                    **json.loads(tmp.read_text()),
                    "checkpoint_mib": dir_bytes(Path(model)) / 2**20,
                    "mode": mode,
                    "start": start or "n/a",
                }
                tmp.unlink()
                print(name, results["runs"][name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    base = next((r for n, r in results["runs"].items() if n.startswith("dense")), None)
    dense_tps = base["output_tokens_per_s"] if base else None
    print(
        "| config | start-up (s) | output tok/s (batch) | vs dense eager | single-request tok/s | TTFT (ms, median) | checkpoint (MiB) |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        rel = f"{r['output_tokens_per_s'] / dense_tps:.2f}x" if dense_tps else "-"
        print(
            f"| {name} | {r['load_seconds']:.0f} | {r['output_tokens_per_s']:.1f} | {rel} | "
            f"{r['single_request_tokens_per_s']:.1f} | {r['ttft_ms_median']:.0f} | {r['checkpoint_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
