"""Bounded load test of ``vllm serve`` on loopback: an ARMOR checkpoint, and the dense model to compare.

For each model: start ``vllm serve`` on 127.0.0.1 (``armor_vllm.serve.VllmServer``), send N distinct
prompts one at a time (greedy, temperature 0) to record reference answers, then send R requests at
once (the same prompts repeated; even-numbered prompts as completions, odd ones as chat), check that
every answer arrives and equals its sequential reference, and report requests/s, output tokens/s
and p50/p99 latency. Everything stops at a global deadline (``--timeout``); the request count is
capped. Exit status 0 only when every request was answered and every answer matched.

    python benchmarks/load_test.py --model out/smollm2-armor --out benchmarks/results/load_test.json
    python benchmarks/load_test.py --model DIR --no-dense --requests 8 --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armor_vllm.serve import HOST, VllmServer, cpu_default_args  # noqa: E402

MAX_REQUESTS = 1024  # hard cap on the concurrent phase, whatever the arguments say
PROMPTS = [
    "The three primary colours are",
    "Explain in one sentence what a compiler does.",
    "Water boils at a temperature of",
    "Name two planets of the solar system.",
    "A good way to learn a new language is",
    "What is the square root of 81?",
    "The largest ocean on Earth is",
    "Give me a short tip for writing clean code.",
    "In a library, books are usually sorted by",
    "Which animal is known as the king of the jungle?",
    "The first step of baking bread is",
    "Write one sentence about the moon.",
    "A triangle has three sides, while a square has",
    "What does a thermometer measure?",
    "Trains are a popular way to travel because",
    "Suggest a name for a small black cat.",
]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def kind_of(prompt_index: int) -> str:
    return "chat" if prompt_index % 2 else "completion"


async def one_request(client, name: str, index: int, max_tokens: int, timeout: float) -> dict:
    """Send prompt ``index`` (completion or chat by its parity); return text, tokens, latency or error."""
    prompt = PROMPTS[index]
    t0 = time.perf_counter()
    try:
        if kind_of(index) == "chat":
            r = await asyncio.wait_for(
                client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    seed=0,
                ),
                timeout,
            )
            text = r.choices[0].message.content
        else:
            r = await asyncio.wait_for(
                client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0.0, seed=0),
                timeout,
            )
            text = r.choices[0].text
        return {
            "index": index,
            "text": text,
            "tokens": r.usage.completion_tokens,
            "latency_s": time.perf_counter() - t0,
            "finish": r.choices[0].finish_reason,
        }
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported, never raised
        return {"index": index, "error": f"{type(e).__name__}: {e}"[:300], "latency_s": time.perf_counter() - t0}


async def drive(
    base_url: str, name: str, n_prompts: int, n_requests: int, concurrency: int, max_tokens: int, deadline: float
) -> dict:
    """The two phases against a running server; stops at ``deadline`` (time.monotonic())."""
    from openai import AsyncOpenAI

    assert base_url.startswith(f"http://{HOST}:"), base_url  # loopback only
    client = AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=max(1.0, deadline - time.monotonic())
    )
    out: dict = {"timed_out": False}
    try:
        # Phase 1: one request at a time, the reference answers.
        t0 = time.perf_counter()
        sequential = []
        for i in range(n_prompts):
            left = deadline - time.monotonic()
            if left <= 0:
                out["timed_out"] = True
                break
            sequential.append(await one_request(client, name, i, max_tokens, left))
        seq_wall = time.perf_counter() - t0
        seq_ok = [r for r in sequential if "error" not in r]
        ref = {r["index"]: r["text"] for r in seq_ok}
        out["sequential"] = {
            "requests": len(sequential),
            "answered": len(seq_ok),
            "wall_s": seq_wall,
            "latency_p50_s": percentile([r["latency_s"] for r in seq_ok], 50),
            "output_tokens_per_s": sum(r["tokens"] for r in seq_ok) / seq_wall if seq_wall else None,
            "errors": [r["error"] for r in sequential if "error" in r][:5],
        }
        if out["timed_out"] or not seq_ok:
            return out

        # Phase 2: n_requests at once (at most `concurrency` in flight), the prompts repeated.
        gate = asyncio.Semaphore(concurrency)

        async def gated(j: int) -> dict:
            async with gate:
                return await one_request(client, name, j % n_prompts, max_tokens, max(0.1, deadline - time.monotonic()))

        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(j) for j in range(n_requests)))
        wall = time.perf_counter() - t0
        ok = [r for r in results if "error" not in r]
        mismatched = [r for r in ok if r["index"] in ref and r["text"] != ref[r["index"]]]
        by_prompt: dict[int, set] = {}
        for r in ok:
            by_prompt.setdefault(r["index"], set()).add(r["text"])
        out["timed_out"] = time.monotonic() >= deadline
        lat = [r["latency_s"] for r in ok]
        out["concurrent"] = {
            "requests": n_requests,
            "concurrency": concurrency,
            "answered": len(ok),
            "failed": n_requests - len(ok),
            "errors": [r["error"] for r in results if "error" in r][:5],
            "chat": sum(kind_of(r["index"]) == "chat" for r in results),
            "completion": sum(kind_of(r["index"]) == "completion" for r in results),
            "wall_s": wall,
            "requests_per_s": len(ok) / wall,
            "output_tokens": sum(r["tokens"] for r in ok),
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": percentile(lat, 50),
            "latency_p99_s": percentile(lat, 99),
            "latency_max_s": max(lat) if lat else None,
            "mismatches_vs_sequential": len(mismatched),
            "prompts_with_differing_repeats": sum(len(v) > 1 for v in by_prompt.values()),
            "mismatch_examples": [
                {
                    "prompt": r["index"],
                    "kind": kind_of(r["index"]),
                    "sequential": ref[r["index"]],
                    "concurrent": r["text"],
                }
                for r in mismatched[:3]
            ],
        }
        return out
    finally:
        await client.close()


def run_model(label: str, model_dir: str, quantized: bool, args, deadline: float) -> dict:
    """Start a server for ``model_dir``, drive it, stop it."""
    server_args = tuple(shlex.split(args.server_args)) if args.server_args is not None else cpu_default_args()
    if args.dtype:
        server_args = (*server_args, "--dtype", args.dtype)
    log = Path(args.log_dir) / f"{label}.serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    if left <= 5:
        return {"model": model_dir, "timed_out": True, "error": "no time left before start"}
    server = VllmServer(
        model_dir,
        extra_args=server_args,
        log_path=log,
        startup_timeout=left,
        quantization="armor" if quantized else None,
    )
    result: dict = {"model": model_dir, "command": " ".join(server.command), "log": str(log)}
    print(f"[{label}] $ {result['command']}", flush=True)
    t0 = time.monotonic()
    try:
        with server:
            result["startup_s"] = time.monotonic() - t0
            print(f"[{label}] healthy after {result['startup_s']:.0f} s", flush=True)
            result.update(
                asyncio.run(
                    drive(
                        server.base_url,
                        server.served_name,
                        args.prompts,
                        args.requests,
                        args.concurrency,
                        args.max_tokens,
                        deadline,
                    )
                )
            )
    except (RuntimeError, TimeoutError) as e:
        result["error"] = str(e)
        result["timed_out"] = time.monotonic() >= deadline
    return result


def passed(run: dict) -> bool:
    c = run.get("concurrent")
    return bool(c) and not run.get("timed_out") and c["failed"] == 0 and c["mismatches_vs_sequential"] == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="ARMOR (or plain 2:4) checkpoint directory")
    p.add_argument("--dense", default=None, help="dense model to compare (default: the embedded model)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense comparison run")
    p.add_argument("--prompts", type=int, default=16, help=f"distinct prompts (1..{len(PROMPTS)})")
    p.add_argument("--requests", type=int, default=64, help=f"concurrent-phase requests (at most {MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (default: all)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="vllm serve --dtype (e.g. float32); default: the model's")
    p.add_argument(
        "--server-args",
        default=None,
        help=f"vllm serve arguments replacing the CPU defaults {' '.join(cpu_default_args())!r}",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="global deadline in seconds, all runs included")
    p.add_argument("--log-dir", default="out/load_test", help="where the server logs go")
    p.add_argument("--out", default="benchmarks/results/load_test.json")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in 1..{len(PROMPTS)}")
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in 1..{MAX_REQUESTS}")
    args.concurrency = min(args.concurrency or args.requests, args.requests)

    deadline = time.monotonic() + args.timeout
    runs = {"armor": run_model("armor", args.model, True, args, deadline)}
    if not args.no_dense:
        from armor_vllm.models import default_model_dir

        runs["dense"] = run_model("dense", args.dense or str(default_model_dir()), False, args, deadline)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "settings": {
            "prompts": args.prompts,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "dtype": args.dtype or "model default",
            "timeout_s": args.timeout,
        },
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for label, r in runs.items():
        c = r.get("concurrent")
        if c:
            print(
                f"[{label}] {c['answered']}/{c['requests']} answered, {c['mismatches_vs_sequential']} differ from "
                f"sequential; {c['requests_per_s']:.2f} req/s, {c['output_tokens_per_s']:.1f} output tok/s, "
                f"p50 {c['latency_p50_s']:.2f} s, p99 {c['latency_p99_s']:.2f} s"
            )
        else:
            print(f"[{label}] no concurrent phase: {r.get('error') or 'timed out'}")
    print(f"wrote {args.out}")
    return 0 if all(passed(r) for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
