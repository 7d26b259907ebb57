"""Block-level measurement of distillation: one decoder layer of the real model, compressed with full
ARMOR from its calibration X^T X, then distilled against the dense layer's outputs; the layer's
relative output error on calibration and on held-out (fortunes, devil) inputs before and after.

Statistics live in out/proto/ (benchmarks/layer_stats.py writes them); run from the repository root:

    python benchmarks/layer_distill.py 15 16 3e-4 16   # layer, Adam steps, lr, calibration sequences
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sys
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from armor_vllm.models import default_model_dir
from armor_vllm.offline.calibration import mixed_samples, sequence_start, source_texts, spread_windows, token_stream
from armor_vllm.offline.distill import DistillOptions, distill_layer
from armor_vllm.offline.methods.armor import Armor
from armor_vllm.offline.methods.base import InputStats

torch.set_num_threads(1)
L = int(sys.argv[1])
steps = int(sys.argv[2])
lr = float(sys.argv[3])
n_cal = int(sys.argv[4]) if len(sys.argv) > 4 else 16
md = default_model_dir()
tok = AutoTokenizer.from_pretrained(md)
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
layer = model.model.layers[L]


class Stop(Exception):
    pass


def capture(samples):
    got = []

    def pre(m, args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        got.append(((args[0] if args else kwargs["hidden_states"]).detach(), (), kw))
        raise Stop

    h = layer.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        for c in samples.split(4):
            try:
                model(input_ids=c, use_cache=False)
            except Stop:
                pass
    h.remove()
    return got


cal, _ = mixed_samples(tok, n_cal, 512)
batches = {"calib": capture(cal)}
for src in ("fortunes", "devil"):
    batches[src] = capture(spread_windows(token_stream(tok, source_texts(src)), 8, 512, start=sequence_start(tok)))


def out(b, w=None):
    with torch.no_grad():
        h, a, kw = b
        o = torch.func.functional_call(layer, w, (h, *a), kw) if w else layer(h, *a, **kw)
        return o[0] if isinstance(o, (tuple, list)) else o


dense = {k: [out(b) for b in v] for k, v in batches.items()}
# stats of the linears' inputs on calibration
groups = {
    "q": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "g": ["mlp.gate_proj", "mlp.up_proj"],
    "d": ["mlp.down_proj"],
}
acc = {}
hooks = []
for g, names in groups.items():

    def hk(m, args, g=g):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        a = acc.setdefault(
            g,
            InputStats(
                torch.zeros(x.shape[1], dtype=torch.float64),
                0,
                torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
            ),
        )
        a.sq += x.double().square().sum(0)
        a.n_tokens += x.shape[0]
        a.xtx += (x.T @ x).double()

    hooks.append(layer.get_submodule(names[0]).register_forward_pre_hook(hk))
for b in batches["calib"]:
    out(b)
for h in hooks:
    h.remove()
factors = {}
t0 = time.perf_counter()
for g, names in groups.items():
    res = Armor(block_size=32, objective="full", init="sparsegpt").compress(
        {n: layer.get_submodule(n).weight.detach().float() for n in names}, acc[g]
    )
    factors.update({n: r.layer for n, r in res.items()})
print(f"compressed in {time.perf_counter() - t0:.0f}s", flush=True)


def rel_err(fs):
    w = {f"{n}.weight": f.weight() for n, f in fs.items()}
    r = {}
    for k, bs in batches.items():
        num = sum(float((out(b, w) - d).square().sum()) for b, d in zip(bs, dense[k]))
        den = sum(float(d.square().sum()) for d in dense[k])
        r[k] = round(num / den, 6)
    return r


print("ARMOR full (no distill): relative layer-output error", rel_err(factors), flush=True)
targets = [SimpleNamespace(name=n, module=n, kind="linear", checkpoint=n) for n in factors]
t0 = time.perf_counter()
result = distill_layer(
    layer, targets, factors, batches["calib"], dense["calib"], DistillOptions(steps=steps, lr=lr, max_seconds=None)
)
tuned, info = result.factors, result.info
print(f"distilled {steps} steps lr {lr} in {time.perf_counter() - t0:.0f}s: {info}", flush=True)
print("after distill: relative layer-output error", rel_err(tuned), flush=True)
