"""Retention benchmark: how much of what the dense model knows a compressed model keeps.

Every model answers the project's question sets (``armor_vllm/retention``: short questions asked
through the chat template, greedy, and multiple choice scored by log-likelihood) through
transformers in float32 (on the CPU unless ``--device``); the table compares each with the
reference (the dense model): correct answers, the share of the reference's correct answers kept,
agreement with the reference's reply, multiple-choice accuracy and accuracy kept above chance.

    python benchmarks/retention.py --model dense=default --model armor=out/armor-default \\
        --out benchmarks/results/retention.json

``NAME=DIR``: ``DIR`` is a local Hugging Face directory, dense or an ARMOR checkpoint (loaded
through ``armor_vllm``'s transformers quantizer, its layers folded into dense ``nn.Linear`` unless
``--no-dequantize``: the same function, faster on a CPU), or ``default`` for the embedded model. A model
already in ``--out`` with the same directory and settings is reused (``--recompute`` to run it
again), so models can be added one run at a time. A bar plot is written beside the JSON.
``--prompt plain`` asks a base model (no chat tuning) "Question: ...\nAnswer:" instead, its reply
cut at the first line break.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resolve_dir(spec: str) -> Path:
    from armor_vllm.models import resolve_model

    return Path(resolve_model(spec)).resolve()


def load_tokenizer(model_dir: Path, fallback: Path | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir), model_dir
    except Exception:
        if fallback is None:
            raise
        return AutoTokenizer.from_pretrained(fallback), fallback


def sets_digest() -> str:
    from armor_vllm import retention

    h = hashlib.sha256()
    for path in (retention.GENERATION_FILE, retention.MULTIPLE_CHOICE_FILE):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def machine() -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def plot(comparison: dict, path: Path, reference: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("gen_accuracy", "generation correct"),
        ("kept", f"kept of {reference}'s correct"),
        ("agreement", f"agreement with {reference}"),
        ("mc_acc", "MC acc"),
        ("mc_acc_norm", "MC acc_norm"),
        ("mc_kept_above_chance", "MC acc kept above chance"),
    ]
    names = list(comparison)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics)), 4.5))
    for k, name in enumerate(names):
        values = [100 * (comparison[name][m] or 0.0) for m, _ in metrics]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        bars = ax.bar(xs, values, width, label=name)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    chance = next(iter(comparison.values()))["chance"]
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=0.8, label="MC chance")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([label for _, label in metrics], fontsize=8, rotation=15)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.set_title("Retention: question sets of armor_vllm/retention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a model to evaluate (repeatable); DIR 'default' is the embedded model (default: dense=default)",
    )
    parser.add_argument("--reference", default="dense", help="the model the others are compared with")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retention.json"))
    parser.add_argument("--plot", default=None, help="bar plot (default: --out with .png)")
    parser.add_argument("--limit", type=int, default=None, help="a subset of N items per set, spread over the kinds")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where the models run (cpu, cuda, ...)")
    parser.add_argument("--recompute", action="store_true", help="evaluate models already in --out again")
    parser.add_argument(
        "--prompt",
        choices=["chat", "plain"],
        default="chat",
        help="how questions are asked: through the model's chat template (chat, for a chat model), or as "
        "'Question: ...\\nAnswer:' with the reply cut at its first line break (plain, for a base model)",
    )
    parser.add_argument(
        "--no-dequantize",
        dest="dequantize",
        action="store_false",
        help="run ARMOR checkpoints through their own layers (default: folded into dense "
        "nn.Linear at load, the same function and faster on a CPU)",
    )
    args = parser.parse_args(argv)

    import torch

    from armor_vllm import retention

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    specs = args.model or ["dense=default"]
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model takes NAME=DIR, got '{spec}'")
        models[name] = path
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    digest = sets_digest()
    settings = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "sets": digest, "dtype": "float32"}
    if args.prompt != "chat":  # chat-prompt results of earlier versions stay comparable
        settings["prompt"] = args.prompt
    stored: dict[str, dict] = {}
    if previous.get("settings") == settings:
        stored = previous.get("models", {})
    elif previous:
        keep = out.with_name(out.stem + ".previous" + out.suffix)
        keep.write_text(json.dumps(previous, indent=1) + "\n")
        print(
            f"{out}: other settings or question sets ({previous.get('settings')}); starting afresh "
            f"(the earlier results moved to {keep})",
            file=sys.stderr,
        )

    reference_dir = resolve_dir(models[args.reference]) if args.reference in models else None
    from armor_vllm.hf.quantizer import load_model

    for name, spec in models.items():
        model_dir = resolve_dir(spec)
        if (
            not args.recompute
            and name in stored
            and stored[name].get("dir") == str(model_dir)
            and stored[name].get("dequantized", args.dequantize) == args.dequantize
        ):
            print(f"{name}: reusing the results in {out}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        tokenizer, tok_dir = load_tokenizer(model_dir, reference_dir)
        model = load_model(model_dir, dtype=torch.float32, dequantize=args.dequantize).to(args.device).eval()
        load_s = time.perf_counter() - t0
        print(f"{name}: {model_dir} loaded in {load_s:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        result = retention.evaluate(
            model,
            tokenizer,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=True,
            prompt=args.prompt,
        )
        eval_s = time.perf_counter() - t0
        print(f"{name}: evaluated in {eval_s:.1f} s", file=sys.stderr)
        stored[name] = {
            "dir": str(model_dir),
            "tokenizer": str(tok_dir),
            "dequantized": args.dequantize,
            "device": args.device,
            "load_s": round(load_s, 1),
            "eval_s": round(eval_s, 1),
            **result,
        }
        del model
        # written after every model, so an interrupted run keeps what it finished
        out.write_text(json.dumps({"settings": settings, "models": stored}, indent=1) + "\n")

    results = {name: stored[name] for name in models}
    for name in stored:  # models of earlier runs stay in the file and the table
        results.setdefault(name, stored[name])
    if args.reference in results:  # the reference first
        results = {args.reference: results[args.reference], **{k: v for k, v in results.items() if k != args.reference}}
    comparison = retention.compare(results, reference=args.reference)
    total_s = time.perf_counter() - started
    report = {
        "settings": settings,
        "reference": args.reference,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine(),
        "total_s": round(total_s, 1),
        "comparison": comparison,
        "models": results,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(comparison, plot_path, args.reference)
    print(retention.markdown_table(comparison, reference=args.reference))
    print(f"\nwrote {out} and {plot_path}; total time {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
