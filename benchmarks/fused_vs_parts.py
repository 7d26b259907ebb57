"""Checkpoint-fused projections (Phi-3 stores ``qkv_proj`` and ``gate_up_proj`` as one matrix):
is the fused matrix better compressed as ONE problem (one input wrapper ``B``, one normalisation)
or as its PARTS (q, k, v each with its own ``B``, as for models that store them apart)?

Measured on the embedded model, whose q/k/v and gate/up are stored apart, by fusing them
artificially: for a few decoder layers (dense statistics), each method compresses
``[q; k; v]`` (and ``[gate; up]``) once as one matrix and once as its parts, and the script prints
for both the relative proxy loss of the whole fused matrix (the method's objective, in the fused
matrix's normalisation) and the relative output error on the calibration tokens
``tr(E H E^T) / tr(W H W^T)``, plus the wrapper numbers each variant stores.

    python benchmarks/fused_vs_parts.py --layers 0 15 29 --methods armor nowag wanda
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def output_error(w_hat: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    e = (w_hat - w).double()
    return float(
        torch.einsum("ij,jk,ik->", e, hessian, e) / torch.einsum("ij,jk,ik->", w.double(), hessian, w.double())
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--methods", nargs="+", default=["armor", "nowag", "wanda"])
    p.add_argument("--preset", default="quick")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from armor_vllm.core.factorization import reconstruct
    from armor_vllm.models import resolve_model
    from armor_vllm.offline import targets as targets_mod
    from armor_vllm.offline.calibration import mixed_samples
    from armor_vllm.offline.layer_walk import capture_layer_inputs, collect_layer_stats, run_layer
    from armor_vllm.offline.methods import get_method
    from armor_vllm.offline.objective import relative_proxy_loss
    from armor_vllm.offline.streaming import LayerStream

    model_dir = resolve_model(args.model)
    samples, _ = mixed_samples(AutoTokenizer.from_pretrained(model_dir), args.calib_samples, args.seq_len)
    stream = LayerStream(model_dir)
    plan = targets_mod.plan(stream, [], args.block_size)
    inputs = capture_layer_inputs(stream.model, samples)
    fusions = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
    rows = []
    for index in range(max(args.layers) + 1):
        layer = stream.load_layer(index)
        if index in args.layers:
            targets = plan.targets[index]
            groups = collect_layer_stats(layer, inputs, targets, full_hessian=True).groups
            stats_of = {n: g.stats for g in groups for n in g.names}
            weights = {t.name: targets_mod.get_weight(layer, t) for t in targets}
            for fused_name, parts in fusions.items():
                names = [n for n in weights if n.rpartition(".")[2] in parts]
                stats = stats_of[names[0]]
                h = stats.channel_importance()
                hessian = stats.hessian()
                fused_w = torch.cat([weights[n] for n in names])
                for method_name in args.methods:
                    options = {"preset": args.preset} if method_name == "armor" else {}
                    method = get_method(method_name)(block_size=args.block_size, seed=0, **options)
                    for variant, problem in (("parts", {n: weights[n] for n in names}), ("one", {fused_name: fused_w})):
                        t0 = time.perf_counter()
                        results = method.compress(problem, stats)
                        seconds = time.perf_counter() - t0
                        w_hat = torch.cat(
                            [
                                reconstruct(r.layer.wrapper_out, r.layer.core, r.layer.wrapper_in)
                                for r in results.values()
                            ]
                        )
                        wrappers = sum(
                            r.layer.wrapper_out.numel() + r.layer.wrapper_in.numel() for r in results.values()
                        )
                        row = {
                            "layer": index,
                            "matrix": fused_name,
                            "shape": list(fused_w.shape),
                            "method": method_name,
                            "variant": variant,
                            "proxy_loss": relative_proxy_loss(w_hat, fused_w, h),
                            "output_error": output_error(w_hat, fused_w, hessian),
                            "wrapper_numbers": wrappers,
                            "seconds": round(seconds, 2),
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        inputs = run_layer(layer, inputs)
        stream.release_layer(index)
    print("\nmean over layers: method matrix variant proxy_loss output_error wrapper_numbers")
    for method_name in args.methods:
        for fused_name in fusions:
            for variant in ("one", "parts"):
                sel = [
                    r
                    for r in rows
                    if r["method"] == method_name and r["matrix"] == fused_name and r["variant"] == variant
                ]
                print(
                    f"{method_name:7s} {fused_name:8s} {variant:6s} {sum(r['proxy_loss'] for r in sel) / len(sel):.5f} "
                    f"{sum(r['output_error'] for r in sel) / len(sel):.5f} {sel[0]['wrapper_numbers']}"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
