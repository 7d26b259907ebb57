"""Generalisation of one layer's compression: calibrate on one set of statistics, measure the
relative output error tr(E H E^T)/tr(W H W^T) on statistics of other texts (held out).

Statistics live in out/proto/ (benchmarks/layer_stats.py writes them); run from the repository root:

    python benchmarks/layer_generalisation.py 15 _mix64,_pydoc64 sparsegpt,full,full-bs64,diag-quick
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sys
import time

import torch
from safetensors.torch import load_file

from armor_vllm.core.factorization import reconstruct
from armor_vllm.offline.methods import get_method
from armor_vllm.offline.methods.base import InputStats

torch.set_num_threads(1)
layer = int(sys.argv[1])
calibs = sys.argv[2].split(",")
methods = sys.argv[3].split(",")
only = sys.argv[4] if len(sys.argv) > 4 else None
tests = ["_fortunes", "_devil", "_pydoceval"]


def load(tag):
    t = load_file(f"out/proto/layer{layer}{tag}.safetensors")
    out = {}
    for key in sorted({k.split("/")[0] for k in t if k.endswith("/xtx")}):
        out[key] = (
            InputStats(sq=t[f"{key}/sq"], n_tokens=int(t[f"{key}/n"][0]), xtx=t[f"{key}/xtx"]),
            {n: t[f"{n}/weight"] for n in key.split("+")},
        )
    return out


test_stats = {tg: load(tg) for tg in tests}


def rel(w_hat, w, st):
    H = st.hessian()
    e = (w_hat - w).double()
    w = w.double()
    return float(torch.einsum("ij,jk,ik->", e, H, e) / torch.einsum("ij,jk,ik->", w, H, w))


opts = {
    "sparsegpt": ("sparsegpt", {}),
    "full": ("armor", {"objective": "full", "init": "sparsegpt"}),
    "full-bs64": ("armor", {"objective": "full", "init": "sparsegpt", "bs": 64}),
    "diag-quick": ("armor", {"objective": "diag", "init": "nowag", "preset": "quick"}),
    "wanda": ("wanda", {}),
}
for calib in calibs:
    stats = load(calib)
    for mname in methods:
        meth, o = opts[mname]
        o = dict(o)
        bs = o.pop("bs", 32)
        res = {t: [] for t in ["calib"] + tests}
        t0 = time.perf_counter()
        for key, (st, weights) in stats.items():
            if only and only not in key:
                continue
            r = get_method(meth)(block_size=bs, **o).compress(weights, st)
            for n, lr in r.items():
                w_hat = reconstruct(lr.layer.wrapper_out, lr.layer.core, lr.layer.wrapper_in)
                res["calib"].append(rel(w_hat, weights[n], st))
                for tg in tests:
                    res[tg].append(rel(w_hat, weights[n], test_stats[tg][key][0]))
        mean = {k: round(sum(v) / len(v), 4) for k, v in res.items()}
        print(
            f"L{layer} calib{calib:10s} {mname:11s} mean rel output error {mean} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
