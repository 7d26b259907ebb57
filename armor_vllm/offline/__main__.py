"""``python -m armor_vllm.offline``: compress a Hugging Face checkpoint to an ARMOR/2:4 checkpoint.

Examples::

    python -m armor_vllm.offline --output out/smollm2-armor                 # ARMOR, default model
    python -m armor_vllm.offline --model PATH --output DIR --method wanda
    python -m armor_vllm.offline --recipe offline/armor_quick.yaml --output DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from armor_vllm.offline.methods import METHODS
from armor_vllm.offline.pipeline import ORDERS, OfflineOptions, run_offline

# Options a recipe file may set, with the option they stand for.
RECIPE_KEYS = {
    "model", "method", "block_size", "calib_samples", "seq_len", "calib_data", "order", "seed",
    "ignore", "preset", "iterations", "lr",
}
METHOD_OPTION_KEYS = ("preset", "iterations", "lr")


def load_recipe(path: str) -> dict:
    """A recipe is a YAML (safe subset) or JSON mapping of option names to values."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--recipe {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--recipe {p}: expected a mapping of option names to values")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"--recipe {p}: unknown option(s) {unknown}; known: {sorted(RECIPE_KEYS)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m armor_vllm.offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="directory to write; written as OUTPUT.partial then renamed")
    p.add_argument("--recipe", help="YAML/JSON file of options (see offline/); command-line options win")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="compression method (default armor)")
    p.add_argument("--block-size", type=int, default=None, help="wrapper block size, must divide every layer (default 32)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--calib-data", nargs="+", default=None, help=".txt/.jsonl files (default: pydoc_data.topics, calibration split)")
    p.add_argument("--order", choices=ORDERS, default=None,
                   help="statistics from the dense model, or sequential (after earlier layers are compressed; default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore", nargs="+", default=None, help="linears to leave dense (names or re:patterns)")
    p.add_argument("--preset", default=None, help="ARMOR schedule: quick, default or paper")
    p.add_argument("--iterations", type=int, default=None, help="ARMOR iterations (overrides the preset)")
    p.add_argument("--lr", type=float, default=None, help="ARMOR learning rate (overrides the preset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--workers", type=int, default=None,
                   help="compress the groups of each layer in N local Ray worker processes (same bytes; needs armor-vllm[ray])")
    p.add_argument("--ray-address", default=None,
                   help="run the compression tasks on an existing Ray cluster, e.g. auto or HOST:6379 (needs armor-vllm[ray])")
    return p


def options_from_args(args: argparse.Namespace) -> OfflineOptions:
    values = load_recipe(args.recipe) if args.recipe else {}
    for key in RECIPE_KEYS:
        cli = getattr(args, key, None)
        if cli is not None:
            values[key] = cli
    method_options = {k: values.pop(k) for k in METHOD_OPTION_KEYS if values.get(k) is not None}
    values = {k: v for k, v in values.items() if v is not None}
    return OfflineOptions(output=args.output, overwrite=args.overwrite, method_options=method_options,
                          workers=args.workers, ray_address=args.ray_address,
                          **{"model": values.pop("model", None) or "default", **values})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        summary = run_offline(opts)
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
        f"{summary['seconds_compress']:.0f} s compression); peak memory {summary['peak_rss_gib']:.2f} GiB\n"
        f"  report: {summary['output']}/armor_report.json, armor_report.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
