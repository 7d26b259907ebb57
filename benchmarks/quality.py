"""Quality benchmark on the embedded SmolLM2-135M: held-out perplexity and compression wall time for
dense, magnitude, Wanda, SparseGPT, NoWag-P and ARMOR (presets), plus the calibration-order
comparison. Each run is the real CLI (``python -m armor_vllm.offline``) in a child process; the
perplexity is ``armor_vllm.eval`` through transformers on the evaluation split (disjoint from the
calibration split). Results accumulate in ``--out`` (JSON; finished runs are skipped on a rerun),
with a markdown table printed and a plot of per-layer proxy loss by method.

    python benchmarks/quality.py --work out/bench --out benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = {
    # name: offline options
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "wanda-dense-order": ["--method", "wanda", "--order", "dense"],
    "sparsegpt": ["--method", "sparsegpt"],
    "nowag": ["--method", "nowag"],
    "armor-quick": ["--method", "armor", "--preset", "quick"],
    "armor-quick-dense-order": ["--method", "armor", "--preset", "quick", "--order", "dense"],
    "armor-default": ["--method", "armor", "--preset", "default"],
}


def perplexity(model_dir: Path, seq_len: int) -> float:
    from armor_vllm.eval import eval_windows, hf_nll

    nll, n = hf_nll(model_dir, eval_windows(model_dir, seq_len, None))
    return math.exp(nll / n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/bench", help="where the compressed checkpoints go")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    args = p.parse_args()

    from armor_vllm.models import default_model_dir

    dense = default_model_dir()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("machine", f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only")
    results.setdefault("runs", {})
    runs = results["runs"]

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    if "dense" not in runs:
        runs["dense"] = {"perplexity": perplexity(dense, args.seq_len), "seconds": 0.0}
        save()
    for name in args.runs:
        if name in runs:
            continue
        ckpt = Path(args.work) / name
        cmd = [sys.executable, "-m", "armor_vllm.offline", "--output", str(ckpt), "--overwrite", *RUNS[name]]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds = time.perf_counter() - t
        report = json.loads((ckpt / "armor_report.json").read_text())
        runs[name] = {
            "perplexity": perplexity(ckpt, args.seq_len),
            "seconds": seconds,
            "command": "python -m armor_vllm.offline --output DIR " + " ".join(RUNS[name]),
            "mean_proxy_loss": report["summary"]["mean_proxy_loss"],
            "wrapper_overhead": report["summary"]["wrapper_overhead"],
            "bytes_on_disk": report["summary"]["bytes_on_disk"],
            "date": date.today().isoformat(),
        }
        save()
        print(f"  {name}: perplexity {runs[name]['perplexity']:.2f}, {seconds:.0f} s", flush=True)

    print(table(runs))
    plot(runs, Path(args.work), out.with_suffix(".png"))
    return 0


def table(runs: dict) -> str:
    dense = runs["dense"]["perplexity"]
    baselines = [n for n in ("magnitude", "wanda", "sparsegpt", "nowag") if n in runs]
    best = min(baselines, key=lambda n: runs[n]["perplexity"]) if baselines else None
    lines = ["| run | perplexity | gap to dense closed vs best baseline | mean proxy loss | compress time | wrappers |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        closed = ""
        if best and name.startswith("armor"):
            closed = f"{100 * (runs[best]['perplexity'] - r['perplexity']) / (runs[best]['perplexity'] - dense):.0f}% (vs {best})"
        loss = r.get("mean_proxy_loss")
        lines.append(f"| {name} | {r['perplexity']:.2f} | {closed} | {'' if loss is None else f'{loss:.4f}'} | "
                     f"{r['seconds']:.0f} s | {100 * r.get('wrapper_overhead', 0):.0f}% |")
    return "\n".join(lines)


def plot(runs: dict, work: Path, path: Path) -> None:
    from armor_vllm.offline.report import plot_losses

    by_method = {}
    for name in runs:
        report = work / name / "armor_report.json"
        if report.is_file() and "dense-order" not in name:
            by_method[name] = json.loads(report.read_text())["matrices"]
    if by_method:
        plot_losses(path, by_method, title="SmolLM2-135M: per-layer relative proxy loss by method")


if __name__ == "__main__":
    sys.exit(main())
