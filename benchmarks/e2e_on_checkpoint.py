"""End-to-end distillation measured on a FINISHED ARMOR checkpoint (issue 17, lever 3).

The offline pass runs the distillation (``--e2e``) after its layer walk; measuring how much it buys
that way means re-running the whole walk per setting. This benchmark instead takes a checkpoint the
pass already wrote, splits it into the pass's per-layer files, runs the very same
``offline.e2e_distill.run_e2e`` on them (same objective, same never-worse rule) and writes a new
checkpoint beside it, so settings (steps, learning rate, data) can be compared on one starting point.
Then run ``benchmarks/retention.py`` on the result.

    python benchmarks/e2e_on_checkpoint.py --checkpoint out/bench/armor-default \\
        --output out/bench/armor-default-e2e --steps 60 --lr 3e-5

Calibration: ``--calib-samples`` windows of ``--calib-data`` (default: the default calibration mix,
``CALIBRATION_MIX``; generated sources such as ``self-chat`` are written by the dense model as the
offline pass writes them; never evaluation text), ``--seq-len`` tokens each, kept in the work folder
so an interrupted run resumes on the same windows. The summary (objective before/after, steps, seconds) is
printed and stored in ``OUTPUT/e2e_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armor_vllm.core.checkpoint import read_armor_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an ARMOR checkpoint written by the offline pass")
    p.add_argument("--model", default="default", help="its dense model (the teacher)")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seconds", type=float, default=1e9, help="training-time cap (default: none, steps decide)")
    p.add_argument("--lr", type=float, default=3e-5, help="Adam's learning rate (the peak with --schedule cosine)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning rate by step")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--calib-data",
        nargs="+",
        default=None,
        help="calibration sources as the offline pass takes them (e.g. pydoc jargon opticks licenses self-chat "
        "self-free; default: its default mix); generated sources are written by the dense model now",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated sources and of the batch order")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--work", default=None, help="work folder (default: OUTPUT.work; reused to resume)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from armor_vllm.models import resolve_model
    from armor_vllm.offline import targets as targets_mod
    from armor_vllm.offline.calibration import CALIBRATION_MIX, mixed_samples
    from armor_vllm.offline.e2e_distill import E2EOptions, run_e2e
    from armor_vllm.offline.streaming import LayerStream

    src, out = Path(args.checkpoint), Path(args.output)
    config = read_armor_config(src)
    if config is None or not config.wrappers:
        raise SystemExit(f"--checkpoint {src}: not an ARMOR checkpoint with wrappers")
    model_dir = resolve_model(args.model)
    plan = targets_mod.plan(
        LayerStream(model_dir, dtype=torch.float32), [n for n in config.ignore if n != "lm_head"], config.block_size
    )
    work = Path(args.work or f"{out}.work")
    work.mkdir(parents=True, exist_ok=True)

    # the checkpoint as the pass's layer files (compressed tensors of decoder layer i only)
    files = [work / f"layer-{i:05d}.safetensors" for i in range(len(plan.targets))]
    shards = sorted(src.glob("*.safetensors"))
    handles = [safe_open(str(s), framework="pt") for s in shards]
    where = {k: h for h in handles for k in h.keys()}
    for path, targets in zip(files, plan.targets):
        if not path.is_file():
            names = {t.checkpoint for t in targets}
            save_file({k: h.get_tensor(k) for k, h in where.items() if k.rsplit(".", 1)[0] in names}, str(path))

    stored = next(h.get_slice(k).get_dtype() for k, h in where.items() if k.endswith(".compressed"))
    out_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[stored]
    cached = work / "calibration.safetensors"  # a resumed run distils on the very same windows
    if cached.is_file():
        with safe_open(str(cached), framework="pt") as h:
            samples = h.get_tensor("samples")
    elif args.calib_data:  # exactly as the offline pass builds them (generated sources included)
        from armor_vllm.offline.pipeline import OfflineOptions, _calibration_samples

        opts = OfflineOptions(
            model=str(model_dir),
            output=str(out),
            calib_data=list(args.calib_data),
            calib_samples=args.calib_samples,
            seq_len=args.seq_len,
            seed=args.seed,
        )
        samples = _calibration_samples(opts, model_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        samples, used = mixed_samples(tokenizer, args.calib_samples, args.seq_len, CALIBRATION_MIX, None)
        print(f"calibration: {args.calib_samples} x {args.seq_len} tokens from {', '.join(used)}")
    save_file({"samples": samples.contiguous()}, str(cached))
    options = E2EOptions(
        steps=args.steps,
        seconds=args.seconds,
        lr=args.lr,
        schedule=args.schedule,
        topk=args.topk,
        batch=args.batch,
        precision=args.precision,
        seed=args.seed,
    )
    t = time.perf_counter()
    info = run_e2e(model_dir, work, files, plan.targets, samples, config.block_size, out_dtype, options, "cpu")
    info["wall_seconds"] = time.perf_counter() - t

    # the new checkpoint: the source with every tuned tensor replaced (same shards, same names)
    tuned = {}
    for path in files:
        with safe_open(str(path), framework="pt") as h:
            tuned.update({k: h.get_tensor(k) for k in h.keys()})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    for shard, h in zip(shards, handles):
        save_file({k: tuned.get(k, h.get_tensor(k)) for k in h.keys()}, str(tmp / shard.name), metadata=h.metadata())
    info |= {"checkpoint": str(src), "options": vars(args)}
    (tmp / "e2e_summary.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
