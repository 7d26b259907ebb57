"""Prototype: full-objective ARMOR on cached layer statistics.

Statistics live in out/proto/ (benchmarks/layer_stats.py writes them); run from the repository root:

    python benchmarks/layer_full_objective.py 15 sparsegpt '{"iterations": 8, "bs": 64}' [q_proj] [-v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json
import sys
import time

import torch
from safetensors.torch import load_file

from armor_vllm.offline.methods.armor.full import FullArmorProblem, FullSchedule, optimise_full
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.methods.nowag import nowag_mask
from armor_vllm.offline.methods.sparsegpt import damped_hessian, sparsegpt_prune
from armor_vllm.offline.objective import normalise

torch.set_num_threads(1)


def groups(layer):
    t = load_file(f"out/proto/layer{layer}.safetensors")
    out = []
    for key in sorted({k.split("/")[0] for k in t if k.endswith("/xtx")}):
        names = key.split("+")
        st = InputStats(sq=t[f"{key}/sq"], n_tokens=int(t[f"{key}/n"][0]), xtx=t[f"{key}/xtx"])
        out.append((names, {n: t[f"{n}/weight"] for n in names}, st))
    return out


def init_cores(weights, st, init, hd):
    cores = []
    for n, w in weights.items():
        if init == "sparsegpt":
            c, _ = sparsegpt_prune(w, st.hessian(), damp=0.01)
        elif init == "nowag":
            c = w * nowag_mask(normalise(w)[0], st.channel_importance())
        cores.append(c)
    return cores


if __name__ == "__main__":
    layer = int(sys.argv[1])
    init = sys.argv[2]
    kw = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    only = sys.argv[4] if len(sys.argv) > 4 else None
    bs = kw.pop("bs", 32)
    for names, weights, st in groups(layer):
        if only and only not in names[0]:
            continue
        hd, _ = damped_hessian(st.hessian(), 0.01)
        t = time.perf_counter()
        cores = init_cores(weights, st, init, hd)
        ti = time.perf_counter() - t
        p = FullArmorProblem(list(weights.values()), hd, bs, cores)
        trace = []
        t = time.perf_counter()
        loss = optimise_full(p, FullSchedule(**kw), trace=trace)
        el = time.perf_counter() - t
        start = trace[0][2]
        print(
            f"L{layer} {'+'.join(n.split('.')[-1] for n in names):12s} init {init} ({ti:.1f}s) start {[round(x, 4) for x in start]} end {[round(x, 4) for x in loss.tolist()]} ratio {[round(b / a, 3) for a, b in zip(start, loss.tolist())]} {el:.1f}s"  # noqa: E501
        )
        if kw.get("verbose", False) or "-v" in sys.argv:
            for s, step, l in trace:
                print(f"   {s:6.2f}s {step:5s} {[round(x, 4) for x in l]}")
