"""Does the offline pass give the same checkpoint twice? Same options, run in fresh processes, at
one or more thread counts (``OMP_NUM_THREADS``), on the first layers of a real model.

Why: two runs of the same ARMOR command gave checkpoints that answer 30 and 36 of the 180 retention
questions (BENCHMARKS.md, section 0). This measures where that spread comes from: for each pair of
runs, whether the bytes are equal, and if not how many of the kept 2:4 positions moved and how far
the rebuilt weights are apart.

    python benchmarks/reproducibility.py --layers 2 --threads 1 1 2 2 --calib-samples 16

The model is cut to its first ``--layers`` decoder layers (real weights, the embedded model by
default), written to ``--work``; each run is ``python -m armor_vllm.offline`` with the default
options (distillation's time cap lifted, so the machine's load cannot change the work done).
Results: ``benchmarks/results/reproducibility.json``. Run it on an idle machine: the times are
reported, though the bytes do not depend on them.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armor_vllm.core.checkpoint import load_tensors  # noqa: E402
from armor_vllm.core.format import decode_layer  # noqa: E402
from armor_vllm.core.reader import compressed_prefixes  # noqa: E402
from armor_vllm.core.validate import validate_checkpoint_dir  # noqa: E402
from armor_vllm.hardware import cpu_flags  # noqa: E402
from armor_vllm.models import resolve_model  # noqa: E402


def cut_model(src: Path, out: Path, layers: int) -> None:
    """``src`` with its first ``layers`` decoder layers only (same tensors, same side files)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as h:
            for k in h.keys():
                if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= layers:
                    continue
                tensors[k] = h.get_tensor(k)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _layers(path: Path) -> dict:
    """Every compressed matrix of a checkpoint as the project reads it (``core.format.decode_layer``)."""
    config = validate_checkpoint_dir(path).config
    tensors = load_tensors(path)
    return {p: decode_layer(p, tensors, config.block_size, config.wrappers) for p in compressed_prefixes(tensors)}


def compare(a: Path, b: Path) -> dict:
    """Kept positions that moved (share of all kept ones) and the largest relative difference of a
    rebuilt compressed weight (``A·S·B``), between two checkpoints of the same model."""
    la, lb = _layers(a), _layers(b)
    kept = moved = 0
    worst = 0.0
    for name, x in la.items():
        y = lb[name]
        ka, kb = x.core != 0, y.core != 0
        kept += int(ka.sum())
        moved += int((ka & ~kb).sum())
        wa, wb = x.weight(), y.weight()
        worst = max(worst, float((wa - wb).norm() / wa.norm()))
    return {"kept": kept, "moved": moved, "moved_share": moved / max(kept, 1), "max_relative_difference": worst}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layers", type=int, default=2, help="decoder layers kept (default 2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 1, 2, 2], help="one run per entry")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--work", default="out/reproducibility")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reproducibility.json"))
    args = p.parse_args()

    work = Path(args.work)
    model = work / "model"
    if not (model / "model.safetensors").is_file():
        cut_model(resolve_model(args.model), model, args.layers)
    runs = []
    for i, threads in enumerate(args.threads):
        out = work / f"run{i}-{threads}threads"
        cmd = [sys.executable, "-m", "armor_vllm.offline", "--model", str(model), "--output", str(out)]
        cmd += ["--calib-samples", str(args.calib_samples), "--distill-max-seconds", "100000", "--overwrite"]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        digest = sha(out / "model.safetensors")
        compute = json.loads((out / "armor_report.json").read_text())["summary"].get("compute")
        runs.append({"threads": threads, "seconds": seconds, "sha256": digest, "compute": compute, "dir": str(out)})
        print(f"run {i}: {threads} thread(s), {seconds:.0f} s, sha256 {digest[:16]}")
    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(runs), 2):
        pair = {"runs": [i, j], "threads": [a["threads"], b["threads"]], "same_bytes": a["sha256"] == b["sha256"]}
        if not pair["same_bytes"]:
            pair |= compare(Path(a["dir"]), Path(b["dir"]))
        pairs.append(pair)
        more = "" if pair["same_bytes"] else f": {100 * pair['moved_share']:.3f}% of kept positions moved"
        print(f"runs {i} and {j} ({a['threads']} vs {b['threads']} threads): same bytes {pair['same_bytes']}{more}")
    flags = cpu_flags()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
            "torch": torch.__version__,
        },
        "settings": {"model": args.model, "layers": args.layers, "calib_samples": args.calib_samples},
        "runs": runs,
        "pairs": pairs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
