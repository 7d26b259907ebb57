"""Cache X^T X (dense order) of the input groups of decoder layer(s) and their weights.

Statistics live in out/proto/ (benchmarks/layer_stats.py writes them); run from the repository root:

    python benchmarks/layer_stats.py LAYERS N SOURCE TAG [SEQ_LEN]   # e.g. 15 64 mix _mix64; 15 32 fortunes _fortunes
    python benchmarks/layer_stats.py 15 128 mix _mix128x256 256          # N sequences of SEQ_LEN tokens (default 512)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from armor_vllm.models import default_model_dir
from armor_vllm.offline.calibration import mixed_samples, sequence_start, source_texts, spread_windows, token_stream

torch.set_num_threads(1)
want = [int(x) for x in sys.argv[1].split(",")]
n = int(sys.argv[2])
source = sys.argv[3]
tag = sys.argv[4]
seq_len = int(sys.argv[5]) if len(sys.argv) > 5 else 512
md = default_model_dir()
tok = AutoTokenizer.from_pretrained(md)
if source == "mix":
    samples, _ = mixed_samples(tok, n, seq_len)
else:
    samples = spread_windows(token_stream(tok, source_texts(source)), n, seq_len, start=sequence_start(tok))
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
groups = {
    "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj+mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


class Stop(Exception):
    pass


for L in want:
    layer = model.model.layers[L]
    acc = {}
    hooks = []
    for key, mod in groups.items():

        def hook(m, args, key=key):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            a = acc.setdefault(
                key,
                [
                    torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
                    torch.zeros(x.shape[1], dtype=torch.float64),
                    0,
                ],
            )
            a[0] += (x.T @ x).double()
            a[1] += x.double().square().sum(0)
            a[2] += x.shape[0]
            if key == "mlp.down_proj":
                raise Stop

        hooks.append(layer.get_submodule(mod).register_forward_pre_hook(hook))
    with torch.no_grad():
        for chunk in samples.split(4):
            try:
                model(input_ids=chunk, use_cache=False)
            except Stop:
                pass
    for h in hooks:
        h.remove()
    t = {}
    for key, (xtx, sq, cnt) in acc.items():
        t[f"{key}/xtx"] = xtx
        t[f"{key}/sq"] = sq
        t[f"{key}/n"] = torch.tensor([cnt])
        for nme in key.split("+"):
            t[f"{nme}/weight"] = layer.get_submodule(nme).weight.detach().float().contiguous()
    save_file(t, f"out/proto/layer{L}{tag}.safetensors")
    print("saved", L, tag, flush=True)
