"""``python -m armor_vllm.offline``: compress a Hugging Face checkpoint to an ARMOR/2:4 checkpoint
(a thin wrapper over the Python API ``armor_vllm.compress``).

Examples::

    python -m armor_vllm.offline --output out/smollm2-armor                 # ARMOR, default model
    python -m armor_vllm.offline --model PATH --output DIR --method wanda
    python -m armor_vllm.offline --recipe recipes/armor_quick.yaml --output DIR
"""

from __future__ import annotations

import argparse
import sys

# The option names and recipe reading live with the Python API that this CLI wraps.
from armor_vllm.api import METHOD_OPTION_KEYS, RECIPE_KEYS, RUN_KEYS, compress, load_recipe, offline_options  # noqa: F401
from armor_vllm.offline.methods import METHODS
from armor_vllm.offline.pipeline import ORDERS, OfflineOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m armor_vllm.offline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="directory to write; written as OUTPUT.partial then renamed")
    p.add_argument("--recipe", help="YAML/JSON file of options (see offline/); command-line options win")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="compression method (default armor)")
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=None,
        help="wrapper block size: N (a multiple of 4 dividing every compressed layer) or auto (default: "
        "the largest of 64, 32, 16 that fits; 64 measured best, BENCHMARKS.md section 1)",
    )
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument(
        "--calib-data",
        nargs="+",
        default=None,
        help=".txt/.jsonl files or text source names, e.g. pydoc (default: a mix of pydoc, jargon, opticks, licenses; armor_vllm.offline.calibration)",  # noqa: E501
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default=None,
        help="statistics from the dense model, or sequential (after earlier layers are compressed; default)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore", nargs="+", default=None, help="linears to leave dense (names or re:patterns)")
    p.add_argument(
        "--dense-budget",
        type=float,
        default=None,
        metavar="F",
        help="leave the most sensitive matrices dense, up to this share (0 < F < 1) of the compressible weights: "
        "chosen by KL gain per weight from --sensitivity (armor_vllm.offline.dense_budget), added to --ignore",
    )
    p.add_argument(
        "--sensitivity",
        default=None,
        metavar="REPORT.json",
        help="with --dense-budget: a report of python -m armor_vllm.sensitivity for this --model",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="ARMOR schedule: quick, default, long (the default + end-to-end distillation on a self-generated mix) "
        "or paper",
    )
    p.add_argument("--iterations", type=int, default=None, help="ARMOR iterations (overrides the preset)")
    p.add_argument("--lr", type=float, default=None, help="ARMOR learning rate (overrides the preset)")
    p.add_argument(
        "--objective",
        choices=["diag", "full"],
        default=None,
        help="ARMOR objective: full = output error tr(E H E^T) with H = X^T X (default), diag = the NoWag proxy",
    )
    p.add_argument(
        "--init",
        choices=["nowag", "sparsegpt", "wanda"],
        default=None,
        help="the 2:4 pruning ARMOR starts from (default: sparsegpt for --objective full, nowag for diag)",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=None,
        help="armor and sparsegpt: the share of the mean of diag(X^T X) added to its diagonal (SparseGPT's "
        "damping, llm-compressor's dampening_frac); larger values weigh the plain weight error more against "
        "the calibration inputs' (default: 0.1 for armor, 0.01 for sparsegpt)",
    )
    p.add_argument(
        "--output-target",
        choices=["layer", "dense"],
        default=None,
        help="what each matrix is compressed to reproduce on its calibration inputs: the dense matrix's "
        "outputs (layer) or a mix with the dense model's own outputs at that matrix (dense: output-aware, "
        "also corrects part of the error of earlier layers; armor_vllm.offline.output_target). Default: "
        "dense for --method armor in sequential order, else layer",
    )
    p.add_argument(
        "--output-target-mix",
        type=float,
        default=None,
        help="with --output-target dense: the share (0, 1] of the dense model's outputs in each matrix's "
        "target, the rest the dense matrix's (default 0.25)",
    )
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after compressing each decoder layer, tune A, B and the kept values (masks fixed) "
        "so the layer's output matches the dense layer's (armor_vllm.offline.distill); "
        "default: on for --method armor except with --preset quick",
    )
    p.add_argument("--distill-steps", type=int, default=None, help="Adam steps per decoder layer (default 16)")
    p.add_argument(
        "--distill-target",
        choices=["layer", "dense"],
        default=None,
        help="what --distill matches: the dense layer on the compressed model's inputs (layer) or the "
        "dense model's own hidden states (dense: output-aware, corrects earlier layers' error). "
        "Default: dense in sequential order, else layer",
    )
    p.add_argument("--distill-lr", type=float, default=None, help="Adam learning rate of distillation (default 3e-4)")
    p.add_argument(
        "--distill-max-seconds",
        type=float,
        default=None,
        help="wall-time cap of distillation per decoder layer (default 60)",
    )
    p.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the layer-wise pass, tune A, B and the kept values (masks fixed) of the whole model "
        "so its next-token distributions match the dense model's on the calibration sequences (KL on the "
        "teacher's top-k tokens; armor_vllm.offline.e2e_distill); kept only when it lowers that objective. "
        "Default: off",
    )
    p.add_argument("--e2e-steps", type=int, default=None, help="--e2e: Adam steps at most (default 1000)")
    p.add_argument(
        "--e2e-seconds",
        type=float,
        default=None,
        help="--e2e: training time budget in seconds (default 600; the teacher pass and the before/after "
        "measurements come on top)",
    )
    p.add_argument(
        "--e2e-lr", type=float, default=None, help="--e2e: Adam learning rate (default 3e-5; the peak with cosine)"
    )
    p.add_argument(
        "--e2e-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="--e2e: the learning rate by step: constant (default), or cosine (a warmup over 5%% of "
        "--e2e-steps, then down to 0 at the last step)",
    )
    p.add_argument("--e2e-topk", type=int, default=None, help="--e2e: teacher tokens kept per position (default 64)")
    p.add_argument("--e2e-batch", type=int, default=None, help="--e2e: calibration sequences per step (default 2)")
    p.add_argument(
        "--e2e-hidden",
        type=float,
        default=None,
        help="--e2e: weight of the final hidden states' relative squared error in the objective (default 0)",
    )
    p.add_argument(
        "--e2e-precision",
        choices=("auto", "float32", "bfloat16"),
        default=None,
        help="--e2e: what the training steps compute in (default auto: bfloat16 on a GPU or a CPU with "
        "AMX/AVX-512 BF16, else float32); the factors and the kept/not-kept check stay float32",
    )
    p.add_argument(
        "--e2e-data",
        nargs="+",
        default=None,
        help="--e2e: what it trains on, as --calib-data takes it (files, text source names, and the dense "
        "model's generated self-chat / self-free); default: the layer-wise pass's calibration windows",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where per-layer compression and --e2e run: cpu or cuda (default: cuda when available)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="compress the groups of each layer in N local Ray worker processes (same bytes; needs armor-vllm[ray])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="run the compression tasks on an existing Ray cluster, e.g. auto or HOST:6379 (needs armor-vllm[ray])",
    )
    return p


def _block_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def options_from_args(args: argparse.Namespace) -> OfflineOptions:
    return offline_options(args.model, args.output, args.method, args.recipe, **_cli_options(args))


def _cli_options(args: argparse.Namespace) -> dict:
    """The options given on the command line (None: not given), as ``armor_vllm.compress`` takes them."""
    return {k: getattr(args, k, None) for k in (*RECIPE_KEYS, *RUN_KEYS) if k not in ("model", "method")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = compress(args.model, args.output, args.method, args.recipe, **_cli_options(args))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loss = summary["mean_proxy_loss"]
    print(
        f"\nwrote {summary['output']}: {summary['matrices']} matrices compressed with {summary['method']} "
        f"({summary['order']} order, block size {summary['block_size']})\n"
        f"  mean relative proxy loss {'n/a' if loss is None else f'{loss:.4f}'}; "
        f"wrapper overhead {100 * summary['wrapper_overhead']:.1f}% of the kept weights\n"
        f"  {summary['bytes_on_disk'] / 2**20:.1f} MiB on disk in {len(summary['shards'])} shard(s); "
        f"global sparsity {summary['global_sparsity']:.3f}\n"
        f"  {summary['seconds_total']:.0f} s in all ({summary['seconds_calibration']:.0f} s calibration, "
        f"{summary['seconds_compress']:.0f} s compression"
        f"{_distill_part(summary)}); peak memory {summary['peak_rss_gib']:.2f} GiB\n"
        f"  report: {summary['output']}/armor_report.json, armor_report.png"
    )
    print(_dense_line(summary))
    return 0


def _distill_part(summary: dict) -> str:
    seconds = summary.get("seconds_distill")
    part = f", {seconds:.0f} s distillation" if seconds else ""
    e2e = summary.get("e2e")
    if e2e and e2e.get("objective_before") is not None:
        part += (
            f", {summary.get('seconds_e2e', 0):.0f} s end-to-end distillation ({e2e['steps']} steps: "
            f"objective {e2e['objective_before']:.4f} -> {e2e['objective_after']:.4f}, "
            f"{'kept' if e2e['kept'] else 'not kept'})"
        )
    return part


def _dense_line(summary: dict) -> str:
    """What stayed dense and why (the checkpoint's ``ignore``), and the experts' calibration."""
    reasons: dict[str, list[str]] = {}
    for entry in summary.get("dense", []):
        reasons.setdefault(entry["reason"], []).append(entry["name"])
    parts = [
        f"{reason}: {len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})" for reason, names in reasons.items()
    ]
    line = f"  left dense: {'; '.join(parts) or 'nothing'}"
    budget = summary.get("dense_budget")
    if budget:
        line += (
            f"\n  dense budget {budget['budget']:g}: {len(budget['matrices'])} matrices "
            f"({', '.join(budget['groups'])}), {100 * budget['share_of_run']:.1f}% of the compressible weights "
            f"(report {budget['sensitivity']})"
        )
    if summary.get("experts"):
        line += (
            f"\n  experts: {summary['experts']} compressed, {summary['experts_stats_fallback']} with too few "
            f"routed calibration tokens (statistics of their whole MoE block, see armor_vllm/offline/experts.py)"
        )
    return line


if __name__ == "__main__":
    sys.exit(main())
