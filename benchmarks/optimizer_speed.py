"""Proxy loss against wall time of ARMOR's optimiser on real layers of the default model.

Compares, per group of linears sharing an input (q/k/v, o, gate/up, down of one decoder layer):

* the plain 2:4 baselines (Wanda, SparseGPT, NoWag-P) -- one number each;
* ``reference``: the reference implementation's schedule (one Adam step, lr 1e-4, on A, B and the
  kept values of S, then one discrete step with one gradient-sampled group per tile, per
  iteration), run for ``--reference-seconds`` per group and extrapolated to its 3000 iterations;
* ``armor quick`` / ``armor default``: this package's presets (closed-form block updates + discrete
  sweeps), with the loss after every round.

Statistics come from one pass of the dense model (float32) over ``--sequences`` x ``--tokens``
tokens of the Python documentation shipped with the standard library (``pydoc_data.topics``).
Writes ``benchmarks/results/optimizer_speed.json`` and ``.png``.

    python benchmarks/optimizer_speed.py                 # layer 5, about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from armor_vllm.offline.methods.armor import PRESETS
from armor_vllm.offline.methods.armor.diag import ArmorProblem, optimise
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.methods.nowag import NoWag
from armor_vllm.offline.methods.sparsegpt import SparseGPT
from armor_vllm.offline.methods.wanda import Wanda
from armor_vllm.offline.objective import normalise

RESULTS = Path(__file__).parent / "results"
GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def calibration_text_ids(tokenizer, sequences: int, tokens: int) -> torch.Tensor:
    """``sequences`` x ``tokens`` token ids from the stdlib's pydoc topics (no download needed)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics.values()), return_tensors="pt").input_ids[0]
    if ids.numel() < sequences * tokens:
        raise ValueError(f"only {ids.numel()} calibration tokens, need {sequences * tokens}")
    return ids[: sequences * tokens].reshape(sequences, tokens)


@torch.no_grad()
def collect_group_stats(model, layer_index: int, sequences: int, tokens: int, tokenizer) -> dict:
    """Dense-model input statistics (sq and full X^T X) of every group of decoder layer
    ``layer_index``, plus the float32 weights of its linears."""
    layer = model.model.layers[layer_index]
    stats = {}

    def hook(group):
        def run(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            s = stats.setdefault(
                group,
                InputStats(
                    torch.zeros(x.shape[1], dtype=torch.float64),
                    0,
                    torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
                ),
            )
            s.sq += x.square().sum(0)
            s.xtx += x.T @ x
            s.n_tokens += x.shape[0]

        return run

    class StopAfterLayer(Exception):
        pass

    def stop(module, args, output):
        raise StopAfterLayer

    handles = [layer.get_submodule(names[0]).register_forward_pre_hook(hook(g)) for g, names in GROUPS.items()]
    handles.append(layer.register_forward_hook(stop))
    try:
        for seq in calibration_text_ids(tokenizer, sequences, tokens):
            try:
                model(seq[None])
            except StopAfterLayer:
                pass
    finally:
        for h in handles:
            h.remove()
    weights = {
        g: {n: layer.get_submodule(n).weight.detach().float().clone() for n in names} for g, names in GROUPS.items()
    }
    return stats, weights


def baseline_losses(weights: dict, stats: InputStats) -> dict:
    out = {}
    for method in (Wanda(), SparseGPT(), NoWag()):
        t = time.perf_counter()
        results = method.compress(weights, stats)
        seconds = time.perf_counter() - t
        if method.name == "wanda":  # Wanda reports no loss; measure it the same way
            from armor_vllm.core.factorization import reconstruct
            from armor_vllm.offline.objective import relative_proxy_loss

            h = stats.channel_importance()
            losses = [
                relative_proxy_loss(reconstruct(r.layer.wrapper_out, r.layer.core, r.layer.wrapper_in), weights[n], h)
                for n, r in results.items()
            ]
        else:
            losses = [r.metrics["loss_end"] for r in results.values()]
        out[method.name] = {"losses": losses, "seconds": seconds}
    return out


def run_schedule(weights: dict, stats: InputStats, schedule, block_size: int, seed: int = 0) -> dict:
    h = stats.channel_importance()
    problem = ArmorProblem([normalise(w)[0] for w in weights.values()], h, block_size, schedule.damping)
    trace: list = []
    t = time.perf_counter()
    optimise(problem, schedule, seed=seed, trace=trace)
    return {"trace": trace, "seconds": time.perf_counter() - t, "iterations_run": problem.iterations_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--reference-seconds",
        type=float,
        default=25.0,
        help="wall time given to the reference schedule per group (then extrapolated)",
    )
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "optimizer_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armor_vllm.models import default_model_dir

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stats, weights = collect_group_stats(model, args.layer, args.sequences, args.tokens, tokenizer)
    del model

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "load_average_at_start": os.getloadavg()[0],  # the CPU is shared: timings are only as clean as this
        "layer": args.layer,
        "block_size": args.block_size,
        "calibration_tokens": args.sequences * args.tokens,
        "groups": {},
    }
    for group in args.groups.split(","):
        w, s = weights[group], stats[group]
        entry = {"shapes": {n: list(t.shape) for n, t in w.items()}, "baselines": baseline_losses(w, s)}
        for preset in ("quick", "default"):
            entry[f"armor_{preset}"] = run_schedule(w, s, PRESETS[preset], args.block_size)
        # The reference schedule (3000 iterations), cut at --reference-seconds; its iteration rate
        # gives the cost of the full schedule.
        ref_run = run_schedule(w, s, replace(PRESETS["paper"], max_seconds=args.reference_seconds), args.block_size)
        iters = ref_run["iterations"] = ref_run.pop("iterations_run")
        ref_run.update(
            seconds_per_iteration=ref_run["seconds"] / iters, seconds_for_3000=3000 * ref_run["seconds"] / iters
        )
        entry["reference"] = ref_run
        report["groups"][group] = entry
        print_group(group, entry)
        seconds = {k: sum(e[k]["seconds"] for e in report["groups"].values()) for k in ("armor_quick", "armor_default")}
        report["load_average_at_end"] = os.getloadavg()[0]
        report["whole_model_estimate_seconds"] = {k: 30 * v for k, v in seconds.items()}  # 30 decoder layers
        RESULTS.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    plot(report, args.out + ".png")
    print("\nwhole SmolLM2-135M (30 x this layer's groups), seconds:", report["whole_model_estimate_seconds"])


def summary(entry: dict) -> dict:
    """Per method: mean loss over the group's matrices and seconds."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = {name: (mean(b["losses"]), b["seconds"]) for name, b in entry["baselines"].items()}
    for key in ("armor_quick", "armor_default", "reference"):
        run = entry[key]
        rows[key] = (mean(run["trace"][-1][1]), run["seconds"])
    return rows


def print_group(group: str, entry: dict) -> None:
    print(f"\n{group} {entry['shapes']}")
    for name, (loss, seconds) in summary(entry).items():
        print(f"  {name:15s} loss {loss:.5f}  {seconds:7.2f} s")
    ref = entry["reference"]
    print(
        f"  reference: {ref['iterations']} iterations, {ref['seconds_per_iteration'] * 1e3:.1f} ms each, "
        f"3000 would take {ref['seconds_for_3000']:.0f} s"
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (group, entry) in zip(axes[0], groups.items()):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        for key, style in (("reference", "C3-"), ("armor_default", "C0o-"), ("armor_quick", "C2s--")):
            trace = entry[key]["trace"]
            ax.plot([max(t, 1e-2) for t, _ in trace], [mean(l) for _, l in trace], style, label=key, ms=3)
        for name, style in (("nowag", "k:"), ("sparsegpt", "m:"), ("wanda", "y:")):
            ax.axhline(mean(entry["baselines"][name]["losses"]), ls=":", color=style[0], label=name)
        ax.set_xscale("log")
        ax.set_title(f"layer {report['layer']} {group}")
        ax.set_xlabel(f"optimiser wall time (s; {report['machine']})", fontsize=7)
        ax.set_ylabel("relative proxy loss (mean over matrices)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
