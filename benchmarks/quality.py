"""Quality benchmark on the embedded SmolLM2-135M: perplexity on the built-in evaluation split and on
held-out English texts, compression wall time, proxy losses and wrapper cost for dense, magnitude,
Wanda, NoWag-P, SparseGPT and ARMOR variants (objective x init x calibration x block size x output
target x distill).

Each run is the real CLI (``python -m armor_vllm.offline``) in a child process (skipped when its
checkpoint directory is already complete, unless ``--recompress``); the perplexities come from
``armor_vllm.eval`` through transformers on every text (``TEXTS``: ``builtin`` = the pydoc
evaluation split; ``fortunes`` and ``devil`` = Debian packages ``fortunes`` and ``dict-devil``,
never in any calibration set). Results accumulate in ``--out`` (JSON; finished runs are skipped on a
rerun); a markdown table is printed and two plots are written next to the JSON: perplexity against
compress time, and per-layer proxy loss by method.

    python benchmarks/quality.py --work out/bench --out benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = ("builtin", "fortunes", "devil")
BASELINES = ("magnitude", "wanda", "sparsegpt", "nowag")
# Every ARMOR run spells out its output and distillation targets: the CLI's defaults (dense, dense,
# distillation on) came from these measurements.
# The runs measured before ARMOR's damping default became 0.1 (2026-12-03) pin the 0.01 they ran with.
_OLD_DAMP = ["--damp", "0.01"]
_FULL = ["--method", "armor", "--objective", "full", "--init", "sparsegpt", *_OLD_DAMP]
_PLAIN = ["--output-target", "layer", "--no-distill"]  # the layer target, no distillation
RUNS = {
    # name: offline options
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "nowag": ["--method", "nowag"],
    "armor-diag-nowag": [
        "--method",
        "armor",
        "--objective",
        "diag",
        "--init",
        "nowag",
        "--preset",
        "default",
        "--block-size",
        "32",
        *_PLAIN,
    ],
    "armor-diag-nowag-quick": [
        "--method",
        "armor",
        "--objective",
        "diag",
        "--init",
        "nowag",
        "--preset",
        "quick",
        "--block-size",
        "32",
        *_PLAIN,
    ],
    "armor-full-sgpt": [*_FULL, "--block-size", "32", *_PLAIN],
    "armor-full-sgpt-quick": [*_FULL, "--preset", "quick", "--block-size", "32", *_PLAIN],
    "armor-full-nowag": ["--method", "armor", "--objective", "full", "--init", "nowag", "--block-size", "64", *_PLAIN],
    "armor-full-sgpt-bs64": [*_FULL, "--block-size", "64", *_PLAIN],
    "armor-full-sgpt-bs64-distill": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "layer",
        "--distill",
        "--distill-steps",
        "16",
        "--distill-lr",
        "3e-4",
        "--distill-target",
        "layer",
    ],
    "armor-full-sgpt-bs64-distill-dense": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "layer",
        "--distill",
        "--distill-steps",
        "16",
        "--distill-lr",
        "3e-4",
        "--distill-target",
        "dense",
    ],
    "sparsegpt-aware": ["--method", "sparsegpt", "--output-target", "dense"],
    "armor-full-sgpt-bs64-aware-mix1": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "dense",
        "--output-target-mix",
        "1",
        "--no-distill",
    ],
    "armor-full-sgpt-bs64-aware": [*_FULL, "--block-size", "64", "--output-target", "dense", "--no-distill"],
    "armor-full-sgpt-bs64-aware-mix50": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "dense",
        "--output-target-mix",
        "0.5",
        "--no-distill",
    ],
    "armor-full-sgpt-bs64-aware-distill-dense": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "dense",
        "--distill",
        "--distill-steps",
        "16",
        "--distill-lr",
        "3e-4",
        "--distill-target",
        "dense",
    ],
    "armor-full-sgpt-bs64-aware-distill-dense8": [
        *_FULL,
        "--block-size",
        "64",
        "--output-target",
        "dense",
        "--distill",
        "--distill-steps",
        "8",
        "--distill-target",
        "dense",
    ],
    "armor-full-sgpt-calib-pydoc": [*_FULL, "--calib-data", "pydoc", "--block-size", "32", *_PLAIN],
    "sparsegpt-calib-pydoc": ["--method", "sparsegpt", "--calib-data", "pydoc"],
    # the CLI default: full objective from SparseGPT, block size auto (64 here), both targets dense,
    # distillation (16 steps, lr 3e-4), damping 0.1; `make demo` runs exactly this
    "armor-default": ["--method", "armor"],
    # ... as it was until 2026-12-03, with SparseGPT's damping (0.01), and the variants measured then
    "armor-default-damp0.01": ["--method", "armor", *_OLD_DAMP],
    "armor-default-calib-32": ["--method", "armor", "--calib-samples", "32", *_OLD_DAMP],
    "armor-default-calib-128": ["--method", "armor", "--calib-samples", "128", *_OLD_DAMP],
    # ... starting from NoWag-P instead of SparseGPT
    "armor-default-init-nowag": ["--method", "armor", "--init", "nowag", *_OLD_DAMP],
    # ... with the damping spelt out (section 0 of BENCHMARKS.md: retention); 0.1 is now the default
    "armor-default-damp0.1": ["--method", "armor", "--damp", "0.1"],
    "armor-default-damp1": ["--method", "armor", "--damp", "1.0"],
    # calibration sources (section 0 of BENCHMARKS.md: retention), on the quick preset (no distillation):
    # the four texts, the texts with the dense model's own conversations and free generations, those alone
    "armor-quick-text": ["--method", "armor", "--preset", "quick"],
    "armor-quick-selfmix": [
        *["--method", "armor", "--preset", "quick"],
        *["--calib-data", "pydoc", "jargon", "opticks", "licenses", "self-chat", "self-free"],
    ],
    "armor-quick-self": ["--method", "armor", "--preset", "quick", "--calib-data", "self-chat", "self-free"],
    # the longer preset (the default's pass, then end-to-end distillation on texts and generated chat)
    "armor-long": ["--method", "armor", "--preset", "long", "--distill-max-seconds", "100000"],
}


def perplexities(model_dir: Path, seq_len: int) -> dict[str, float]:
    import torch

    from armor_vllm.eval import data_windows, eval_windows, hf_nll
    from armor_vllm.hf.dense import load_dense_hf_model

    model = load_dense_hf_model(model_dir, dtype=torch.float32)
    out = {}
    for text in TEXTS:
        windows = (
            eval_windows(model_dir, seq_len, None) if text == "builtin" else data_windows(model_dir, text, seq_len)
        )
        nll, n = hf_nll(model_dir, windows, model)
        out[text] = math.exp(nll / n)
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/bench", help="where the compressed checkpoints go")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--runs", nargs="+", default=[], choices=list(RUNS), help="runs to do (default: none, just report)")
    p.add_argument("--recompress", action="store_true", help="compress even when the checkpoint exists")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    p.add_argument(
        "--model",
        default="default",
        help="the dense model every run compresses (default: the embedded one; e.g. a directory written by "
        "scripts/second_model.py); use its own --out and --work",
    )
    args = p.parse_args()

    from armor_vllm.models import resolve_model

    model_dir = resolve_model(args.model)
    model_args = [] if args.model == "default" else ["--model", str(model_dir)]

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("machine", f"{platform.machine()}, {os.cpu_count()} cores, CPU only")
    results.setdefault("model", str(args.model))
    results.setdefault("runs", {})
    runs = results["runs"]

    def save():  # merged with what other benchmark processes wrote meanwhile
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file():
            on_disk = json.loads(out.read_text())
            runs.update({k: v for k, v in on_disk.get("runs", {}).items() if k not in runs or k not in args.runs})
        out.write_text(json.dumps(results, indent=2) + "\n")

    if "dense" not in runs:
        runs["dense"] = {"perplexity": perplexities(model_dir, args.seq_len), "seconds": 0.0}
        save()
    for name in args.runs:
        ckpt = Path(args.work) / name
        report_file = ckpt / "armor_report.json"
        if args.recompress or not report_file.is_file():
            cmd = [sys.executable, "-m", "armor_vllm.offline", "--output", str(ckpt), "--overwrite", *model_args]
            cmd += RUNS[name]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        report = json.loads(report_file.read_text())
        summary, matrices = report["summary"], report["matrices"]
        t = time.perf_counter()
        runs[name] = {
            "perplexity": perplexities(ckpt, args.seq_len),
            "seconds": summary["seconds_total"],
            "seconds_calibration": summary.get("seconds_calibration"),
            "command": " ".join(["python -m armor_vllm.offline --output DIR", *model_args, *RUNS[name]]),
            "mean_proxy_loss": summary["mean_proxy_loss"],
            "mean_hessian_loss": _mean([m.get("hessian_loss_end", m.get("hessian_loss_damped")) for m in matrices]),
            "wrapper_overhead": summary["wrapper_overhead"],
            "bytes_on_disk": summary["bytes_on_disk"],
            "date": date.today().isoformat(),
        }
        save()
        print(
            f"  {name}: {runs[name]['perplexity']} ({runs[name]['seconds']:.0f} s compress, "
            f"{time.perf_counter() - t:.0f} s eval)",
            flush=True,
        )

    print(table(runs))
    plot_time(runs, out.with_name(out.stem + "_vs_time.png"))
    plot_layers(runs, Path(args.work), out.with_suffix(".png"))
    return 0


def _option(args: list[str], flag: str, default: str) -> str:
    """The value given to ``flag`` in a run's CLI arguments, else the CLI's default."""
    return args[args.index(flag) + 1] if flag in args else default


def armor_settings(command: str) -> tuple[str, str, str]:
    """Block size, output target and distillation of an ARMOR run, from its CLI options (the CLI's
    defaults where an option is not given: auto = 64 on this model, dense targets, 16 steps)."""
    args = command.split()

    def value(flag, default):
        return _option(args, flag, default)

    quick = value("--preset", "default") == "quick"
    distill = "--distill" in args or ("--no-distill" not in args and not quick)
    out = value("--output-target", "dense")
    if out == "dense":
        out += f", mix {value('--output-target-mix', '0.25')}"
    how = f"{value('--distill-target', 'dense')}, {value('--distill-steps', '16')}" if distill else "no"
    return value("--block-size", "64"), out, how


def calibration_size(command: str) -> str:
    """Calibration sequences x tokens of a run, from its CLI options (the CLI's defaults 64 x 512
    where not given); empty for the dense row, which has no command."""
    if not command:
        return ""
    args = command.split()
    return f"{_option(args, '--calib-samples', '64')} x {_option(args, '--seq-len', '512')}"


def table(runs: dict) -> str:
    """The markdown table of BENCHMARKS.md, section 1."""
    dense = runs["dense"]["perplexity"]
    texts = [t for t in TEXTS if t in dense]
    best = {
        t: min((n for n in BASELINES if n in runs), key=lambda n: runs[n]["perplexity"][t], default=None) for t in texts
    }
    head = (
        "| run | calib | bs | out | distill | "
        + " | ".join(f"{t} ppl | gap closed | / dense" for t in texts)
        + " | output loss | MiB | compress time |"
    )
    lines = [head, "|" + "---|" * (3 * len(texts) + 8)]
    order = ["dense", *(n for n in RUNS if n in runs), *(n for n in runs if n != "dense" and n not in RUNS)]
    for name in order:
        r = runs[name]
        cells = []
        for t in texts:
            ppl = r["perplexity"][t]
            b = best[t]
            closed = ""
            if b and name not in BASELINES and name != "dense":
                gap = runs[b]["perplexity"][t] - dense[t]
                closed = f"{100 * (runs[b]['perplexity'][t] - ppl) / gap:.0f}%"
            cells += [f"{ppl:.2f}", closed, f"{ppl / dense[t]:.2f}x"]
        settings = armor_settings(r["command"]) if name.startswith("armor") else ("", "", "")
        settings = (calibration_size(r.get("command", "")), *settings)
        hloss = r.get("mean_hessian_loss")
        mib = r.get("bytes_on_disk", 0) / 2**20 or 256.6  # dense: the source checkpoint
        seconds = "" if name == "dense" else f"{r['seconds']:.0f} s" + (" (load)" if r.get("under_load") else "")
        lines.append(
            f"| {name} | "
            + " | ".join(settings)
            + " | "
            + " | ".join(cells)
            + f" | {'' if hloss is None else f'{hloss:.4f}'} | {mib:.0f} | {seconds} |"
        )
    return "\n".join(lines)


def plot_time(runs: dict, path: Path) -> None:
    """Perplexity (log scale) against compress time, one panel per text, one colour per run (legend);
    runs timed under load (``under_load`` in the JSON) are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = runs["dense"]["perplexity"]
    shown = [n for n, r in runs.items() if n != "dense" and r["perplexity"][TEXTS[0]] < 20 * dense[TEXTS[0]]]
    colours = plt.get_cmap("tab20")(range(len(shown)))
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(5 * len(TEXTS), 4.5))
    for ax, text in zip(axes, TEXTS):
        for colour, name in zip(colours, shown):
            r = runs[name]
            hollow = r.get("under_load", False)
            ax.scatter(
                r["seconds"] / 60,
                r["perplexity"][text],
                s=40,
                marker="o" if name.startswith("armor") else "s",
                facecolors="none" if hollow else colour,
                edgecolors=colour,
                label=name + (" (timed under load)" if hollow else ""),
            )
        ax.axhline(dense[text], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_title(text)
        ax.set_xlabel("compress time (min, whole CLI run)")
        ax.set_ylabel("perplexity (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("SmolLM2-135M at 2:4: perplexity against compress time (runs above 20x dense left out)")
    fig.tight_layout(rect=(0, 0.05 + 0.022 * ((len(shown) + 3) // 3), 1, 1))
    fig.savefig(path, dpi=110)


# the per-layer plot shows the baselines and one ARMOR run per step of the way to the default
LAYER_PLOT_RUNS = (
    "wanda",
    "nowag",
    "sparsegpt",
    "armor-diag-nowag-quick",
    "armor-full-sgpt",
    "armor-full-sgpt-bs64",
    "armor-default",
)


def plot_layers(runs: dict, work: Path, path: Path) -> None:
    from armor_vllm.offline.report import plot_losses

    by_method = {}
    for name in runs:
        report = work / name / "armor_report.json"
        if report.is_file() and name in LAYER_PLOT_RUNS:
            by_method[name] = json.loads(report.read_text())["matrices"]
    if by_method:
        plot_losses(path, by_method, title="SmolLM2-135M: per-layer relative proxy loss by method")


if __name__ == "__main__":
    sys.exit(main())
