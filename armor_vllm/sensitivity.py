"""``python -m armor_vllm.sensitivity``: where a compressed model loses what the dense one knows.

For a compressed checkpoint and the dense model it came from, each GROUP of compressed matrices is
restored to its dense weights, alone, and the model measured:

* ``kl``: the mean KL(dense || model) of next-token distributions over every position of
  calibration-kind text windows (the default calibration mix, ``offline.calibration``: never the
  evaluation texts). The selection signal: ``--dense-budget`` reads only this
  (``armor_vllm.offline.dense_budget``). ``top1_agree``: the share of positions whose most likely
  token is the dense model's.
* ``ppl``: perplexity on held-out evaluation text (``--eval-data``: the built-in pydoc evaluation
  split, or ``fortunes``, ``devil``, a file), computed as ``armor_vllm.eval`` does. Reported only.
* with ``--retention``: multiple-choice accuracy on the retention questions
  (``armor_vllm.retention``, log-likelihood scoring) and the share of the dense model's accuracy
  above chance it keeps. Reported only; slow.

Groups: every decoder layer (``layer``: all its compressed matrices), every projection kind
(``kind``: e.g. ``self_attn.q_proj`` in every layer) and, with ``--groups unit``, each layer's
parts that vLLM runs as one layer (q/k/v, gate/up, and every other projection alone), the finest
choice ``--dense-budget`` can make. Baseline rows: ``compressed`` (nothing restored) and ``dense``
(everything). Each row records its matrices, their weights and ``weight_share`` (of all compressed
weights), and its gains over ``compressed``. Then, for each of ``--budgets``, the matrices
``--dense-budget`` would leave dense (chosen from ``kl`` alone) are restored together and measured:
quality against the share left dense, so a user can pick a budget.

One model is loaded (the checkpoint folded dense: ``hf.quantizer.load_model(dequantize=True)``)
and the dense weights of the compressed matrices are kept beside it on the CPU; restoring a group
swaps those weight tensors in and back, in place.

    python -m armor_vllm.sensitivity --compressed out/smollm2-armor --out out/smollm2-armor.sensitivity.json
    python -m armor_vllm.offline --output out/smollm2-armor-d10 --dense-budget 0.1 \\
        --sensitivity out/smollm2-armor.sensitivity.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from armor_vllm.offline.dense_budget import REPORT_KIND, REPORT_VERSION, choose_dense, model_signature

GROUPS = ("layer", "kind", "unit")
DEFAULT_GROUPS = ("layer", "kind")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2)
WINDOWS = 16  # calibration windows (KL) and evaluation windows (perplexity) by default


@dataclass(frozen=True)
class Matrix:
    """One compressed matrix: its checkpoint name (what ``--ignore`` takes), the transformers module
    holding it, its decoder layer, its kind (the path inside the layer) and its number of weights."""

    name: str
    module: str
    layer: int
    kind: str
    params: int


class Restorer:
    """Swaps dense weights into the compressed (folded) model and back, in place: ``model`` keeps
    its own (folded) weight tensors, ``dense`` holds the dense weight of every compressed module."""

    def __init__(self, model: nn.Module, matrices: list[Matrix], dense: dict[str, torch.Tensor]):
        self.matrices = {m.name: m for m in matrices}
        self.modules = {m.name: model.get_submodule(m.module) for m in matrices}
        self.folded = {n: mod.weight for n, mod in self.modules.items()}
        self.dense = {n: nn.Parameter(dense[n], requires_grad=False) for n in self.modules}

    @contextlib.contextmanager
    def restored(self, names):
        """The matrices ``names`` hold their dense weights inside the block, their folded ones after."""
        names = list(names)
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise KeyError(f"not compressed matrices of this checkpoint: {unknown[:3]}")
        try:
            for n in names:
                self.modules[n].weight = self.dense[n]
            yield
        finally:
            for n in names:
                self.modules[n].weight = self.folded[n]


def load(dense_dir: Path, compressed_dir: Path) -> tuple[nn.Module, list[Matrix], Restorer]:
    """The compressed checkpoint folded dense (float32, one model), its compressed matrices, and a
    ``Restorer`` holding the dense model's weights of those matrices (the rest of the dense model is
    dropped)."""
    from armor_vllm.core.validate import validate_checkpoint_dir
    from armor_vllm.hf.quantizer import _checkpoint_name, is_armor_checkpoint, load_model
    from armor_vllm.offline.layer_walk import decoder_layers

    if not is_armor_checkpoint(compressed_dir):
        raise ValueError(f"--compressed {compressed_dir}: not an ARMOR checkpoint (no quantization_config armor)")
    layout = validate_checkpoint_dir(compressed_dir)
    model = load_model(compressed_dir, dtype=torch.float32, dequantize=True)
    layers = decoder_layers(model)
    layers_prefix = next(n for n, m in model.named_modules() if m is layers)
    owner = {}
    for index, layer in enumerate(layers):
        for name, _ in layer.named_modules():
            owner[f"{layers_prefix}.{index}.{name}" if name else f"{layers_prefix}.{index}"] = (index, name)
    matrices = []
    for module_name, module in model.named_modules():
        ckpt = _checkpoint_name(model, module_name, layout.compressed)
        if ckpt is None:
            continue
        if module_name not in owner:
            raise ValueError(f"{compressed_dir}: compressed matrix {ckpt} is outside the decoder layers")
        index, kind = owner[module_name]
        matrices.append(Matrix(ckpt, module_name, index, kind, module.weight.numel()))
    if not matrices:
        raise ValueError(f"--compressed {compressed_dir}: no compressed matrix to restore")
    dense_model = load_model(dense_dir, dtype=torch.float32)
    if getattr(dense_model.config, "quantization_config", None) is not None:
        raise ValueError(f"--dense {dense_dir}: a quantized checkpoint, not the dense model")
    dense = {}
    for m in matrices:
        try:
            weight = dense_model.get_submodule(m.module).weight.detach()
        except AttributeError:
            raise ValueError(f"--dense {dense_dir} has no module {m.module}: not the model {compressed_dir} came from")
        if weight.shape != model.get_submodule(m.module).weight.shape:
            raise ValueError(
                f"{m.name}: {tuple(weight.shape)} in --dense {dense_dir} against "
                f"{tuple(model.get_submodule(m.module).weight.shape)} in --compressed: not the model it came from"
            )
        dense[m.name] = weight
    del dense_model
    return model, matrices, Restorer(model, matrices, dense)


def _unit_key(kind: str) -> str:
    """The part of a layer that vLLM runs as one layer (``targets.VLLM_FUSED``) a kind belongs to."""
    from armor_vllm.offline.targets import VLLM_FUSED

    parent, _, last = kind.rpartition(".")
    for group in VLLM_FUSED:
        if last in group:
            return f"{parent}.{'+'.join(group)}" if parent else "+".join(group)
    return kind


def group_rows(matrices: list[Matrix], groups=DEFAULT_GROUPS) -> list[dict]:
    """The rows to measure: the baselines, then the requested groups (in model order)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"--groups {unknown}: known groups are {list(GROUPS)}")
    every = [m.name for m in matrices]
    rows = [_row("compressed", "baseline", []), _row("dense", "baseline", every)]
    if "layer" in groups:
        for index in sorted({m.layer for m in matrices}):
            rows.append(_row(f"layer {index}", "layer", [m.name for m in matrices if m.layer == index], layer=index))
    if "kind" in groups:
        for kind in dict.fromkeys(m.kind for m in matrices):
            rows.append(_row(kind, "kind", [m.name for m in matrices if m.kind == kind], kind=kind))
    if "unit" in groups:
        units: dict[tuple[int, str], list[str]] = {}
        for m in matrices:
            units.setdefault((m.layer, _unit_key(m.kind)), []).append(m.name)
        for (index, unit), names in units.items():
            rows.append(_row(f"layer {index} {unit}", "unit", names, layer=index, kind=unit))
    return rows


def _row(name: str, type_: str, matrices: list[str], **extra) -> dict:
    return {"name": name, "type": type_, **extra, "matrices": matrices}


def calibration_windows(model_dir: Path, n_windows: int, seq_len: int) -> tuple[torch.Tensor, list[str]]:
    """Calibration-kind windows: the default calibration mix (``CALIBRATION_MIX``), never evaluation text."""
    from transformers import AutoTokenizer

    from armor_vllm.offline.calibration import CALIBRATION_MIX, mixed_samples

    return mixed_samples(AutoTokenizer.from_pretrained(model_dir), n_windows, seq_len, CALIBRATION_MIX)


def evaluation_windows(model_dir: Path, text: str, n_windows: int, seq_len: int) -> torch.Tensor:
    """Held-out evaluation windows: the built-in pydoc evaluation split (``builtin``) or a
    ``--data`` text of ``armor_vllm.eval``; a calibration source is refused."""
    from armor_vllm.eval import data_windows, eval_windows
    from armor_vllm.offline.calibration import CALIBRATION_MIX

    if text == "builtin":
        return eval_windows(model_dir, seq_len, n_windows)
    if text in CALIBRATION_MIX:
        raise ValueError(
            f"--eval-data {text}: a calibration source; evaluate on held-out text (builtin, fortunes, devil)"
        )
    return data_windows(model_dir, text, seq_len, n_windows)


@torch.no_grad()
def logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """The model's float32 next-token logits over one window, ``(seq_len, vocab)``."""
    return model(input_ids=window.unsqueeze(0)).logits[0].float()


def window_kl(teacher: torch.Tensor, student: torch.Tensor) -> tuple[float, int]:
    """Summed KL(teacher || student) over a window's positions (natural log), and how many positions
    have the teacher's most likely token on top of the student's too."""
    t_log = torch.log_softmax(teacher, dim=-1)
    s_log = torch.log_softmax(student, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum(dim=-1).double().sum()
    agree = int((teacher.argmax(dim=-1) == student.argmax(dim=-1)).sum())
    return float(kl), agree


def measure_kl(model, restorer: Restorer, windows: torch.Tensor, rows: list[dict], bar=None) -> None:
    """``kl`` (mean over every position of every window) and ``top1_agree`` of each row. Window by
    window: the dense model's logits (everything restored), then each row's, so only one window's
    teacher is held."""
    every = list(restorer.modules)
    sums = [0.0] * len(rows)
    agrees = [0] * len(rows)
    positions = 0
    for window in windows:
        with restorer.restored(every):
            teacher = logits(model, window)
        for i, row in enumerate(rows):
            with restorer.restored(row["matrices"]):
                kl, agree = window_kl(teacher, logits(model, window))
            sums[i] += kl
            agrees[i] += agree
            if bar is not None:
                bar.update(1)
        positions += window.numel()
    for row, total, agree in zip(rows, sums, agrees):
        row["kl"] = total / positions
        row["top1_agree"] = agree / positions


def measure_ppl(model, restorer: Restorer, windows: torch.Tensor, rows: list[dict], bar=None) -> None:
    """``ppl`` of each row on the evaluation windows (``armor_vllm.eval.hf_nll``)."""
    from armor_vllm.eval import hf_nll

    for row in rows:
        with restorer.restored(row["matrices"]):
            nll, count = hf_nll(None, windows, model)
        row["ppl"] = math.exp(nll / count)
        if bar is not None:
            bar.update(len(windows))


def measure_retention(model, restorer: Restorer, tokenizer, items: list[dict], rows: list[dict], bar=None) -> None:
    """``mc_acc`` of each row on the multiple-choice retention questions (log-likelihood scoring)."""
    from armor_vllm.retention import multiple_choice_scores

    for row in rows:
        with restorer.restored(row["matrices"]):
            scored = multiple_choice_scores(model, tokenizer, items)
        row["mc_acc"] = sum(r["correct"] for r in scored) / len(scored)
        if bar is not None:
            bar.update(1)


def _gains(rows: list[dict], total: int, params: dict[str, int], chance: float | None) -> None:
    base = next(r for r in rows if r["name"] == "compressed")
    dense = next(r for r in rows if r["name"] == "dense")
    for row in rows:
        row["params"] = sum(params[n] for n in row["matrices"])
        row["weight_share"] = row["params"] / total
        row["kl_gain"] = base["kl"] - row["kl"]
        row["kl_gain_per_share"] = row["kl_gain"] / row["weight_share"] if row["params"] else None
        row["kl_closed"] = row["kl_gain"] / base["kl"] if base["kl"] > 0 else None
        if "ppl" in row:
            row["ppl_gain"] = base["ppl"] - row["ppl"]
        if "mc_acc" in row and chance is not None and dense["mc_acc"] > chance:
            row["mc_kept_above_chance"] = (row["mc_acc"] - chance) / (dense["mc_acc"] - chance)


def sensitivity(
    dense_dir: Path,
    compressed_dir: Path,
    windows: int = WINDOWS,
    seq_len: int = 512,
    eval_data: str = "builtin",
    groups=DEFAULT_GROUPS,
    budgets=DEFAULT_BUDGETS,
    retention: bool = False,
    retention_limit: int | None = None,
    progress: bool = True,
) -> dict:
    """The sensitivity report (``armor_vllm.offline.dense_budget`` reads it): settings, the
    compressed matrices, and one row per baseline, group and budget."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from armor_vllm.core.checkpoint import read_json

    if windows <= 0 or seq_len <= 1:
        raise ValueError(f"--limit-windows ({windows}) must be positive and --seq-len ({seq_len}) above 1")
    for b in budgets:
        if not 0 < b < 1:
            raise ValueError(f"--budgets {b}: a budget is a share of the compressed weights, 0 < F < 1")
    t0 = time.perf_counter()
    calib, sources = calibration_windows(dense_dir, windows, seq_len)
    evaluation = evaluation_windows(dense_dir, eval_data, windows, seq_len)
    model, matrices, restorer = load(dense_dir, compressed_dir)
    rows = group_rows(matrices, groups)
    items, tokenizer = [], None
    if retention:
        from armor_vllm.retention import load_multiple_choice

        items, tokenizer = load_multiple_choice(retention_limit), AutoTokenizer.from_pretrained(dense_dir)
    params = {m.name: m.params for m in matrices}
    total = sum(params.values())
    chance = sum(1 / len(i["choices"]) for i in items) / len(items) if items else None
    qcfg = read_json(compressed_dir / "config.json").get("quantization_config", {})
    report = {
        "kind": REPORT_KIND,
        "version": REPORT_VERSION,
        "dense_model": str(dense_dir),
        "compressed": str(compressed_dir),
        "method": qcfg.get("method"),
        "model_signature": model_signature(dense_dir),
        "settings": {
            "seq_len": seq_len,
            "calib_windows": int(calib.shape[0]),
            "calib_sources": sources,
            "eval_data": eval_data,
            "eval_windows": int(evaluation.shape[0]),
            "groups": list(groups),
            "budgets": list(budgets),
            "retention": bool(retention),
            "retention_items": len(items),
            "mc_chance": chance,
        },
        "total_params": total,
        "matrices": [
            {"name": m.name, "module": m.module, "layer": m.layer, "kind": m.kind, "params": m.params} for m in matrices
        ],
        "rows": rows,
    }

    def run(batch: list[dict], what: str) -> None:
        forwards = len(calib) * (len(batch) + 1) + len(evaluation) * len(batch) + (len(batch) if retention else 0)
        with tqdm(total=forwards, desc=what, unit="fwd", disable=not progress) as bar:
            measure_kl(model, restorer, calib, batch, bar)
            measure_ppl(model, restorer, evaluation, batch, bar)
            if retention:
                measure_retention(model, restorer, tokenizer, items, batch, bar)

    run(rows, f"sensitivity ({len(rows)} rows)")
    _gains(rows, total, params, chance)
    budget_rows = [_row(f"budget {b:g}", "budget", choose_dense(report, b), budget=b) for b in budgets]
    if budget_rows:
        run(budget_rows, f"budgets ({len(budget_rows)})")
        rows.extend(budget_rows)
        _gains(rows, total, params, chance)
    report["seconds"] = time.perf_counter() - t0
    return report


def plot(report: dict, path: Path) -> None:
    """Bars of the KL gain per decoder layer and per projection kind, and the budget curve (KL and
    perplexity against the share of the compressed weights left dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = [t for t in ("layer", "kind") if any(r["type"] == t for r in rows)] + ["budget"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel in ("layer", "kind"):
            chosen = [r for r in rows if r["type"] == panel]
            labels = [str(r["layer"]) if panel == "layer" else r["kind"].rpartition(".")[2] for r in chosen]
            ax.bar(range(len(chosen)), [r["kl_gain"] for r in chosen], color="tab:blue")
            ax.set_xticks(range(len(chosen)), labels, rotation=90 if panel == "kind" else 0, fontsize=7)
            ax.set_xlabel("decoder layer restored" if panel == "layer" else "projection restored (every layer)")
            ax.set_ylabel("KL gain (calibration text)")
            ax.set_title(f"KL(dense || model) lowered, per {panel}")
        else:
            points = sorted(
                [r for r in rows if r["type"] == "budget" or r["type"] == "baseline"], key=lambda r: r["weight_share"]
            )
            x = [r["weight_share"] for r in points]
            ax.plot(x, [r["kl"] for r in points], "o-", color="tab:blue", label="KL (calibration)")
            ax.set_xlabel("share of compressed weights left dense")
            ax.set_ylabel("KL(dense || model)", color="tab:blue")
            twin = ax.twinx()
            twin.plot(x, [r["ppl"] for r in points], "s--", color="tab:red", label="perplexity (evaluation)")
            twin.set_ylabel(f"perplexity ({report['settings']['eval_data']})", color="tab:red")
            ax.set_title("chosen by KL per weight, restored together")
            ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(report['compressed']).name}: sensitivity ({report['settings']['calib_windows']} windows)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_text(report: dict, top: int = 5) -> str:
    rows = report["rows"]
    base = next(r for r in rows if r["name"] == "compressed")
    dense = next(r for r in rows if r["name"] == "dense")
    retention = report["settings"]["retention"]

    def line(r: dict) -> str:
        text = f"  {r['name']:<32} share {r['weight_share']:6.3f}  kl {r['kl']:.4f}  ppl {r['ppl']:9.3f}"
        if retention:
            text += f"  mc {r['mc_acc']:.3f}"
        return text

    out = [
        f"sensitivity of {report['compressed']} against {report['dense_model']} "
        f"({report['settings']['calib_windows']} calibration windows, {report['settings']['eval_windows']} evaluation "
        f"windows of {report['settings']['seq_len']} tokens; {report['seconds']:.0f} s)",
        line(base),
        line(dense),
    ]
    for kind in ("layer", "kind", "unit"):
        ranked = sorted((r for r in rows if r["type"] == kind), key=lambda r: -(r["kl_gain_per_share"] or 0))
        if ranked:
            out.append(f" most sensitive {kind}s (KL gain per share of weights):")
            out += [line(r) for r in ranked[:top]]
    budgets = [r for r in rows if r["type"] == "budget"]
    if budgets:
        out.append(" budgets (chosen by KL on calibration text, restored together):")
        out += [line(r) for r in budgets]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from armor_vllm.models import resolve_model

    p = argparse.ArgumentParser(
        prog="python -m armor_vllm.sensitivity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dense", default="default", help="the dense model directory (default: the embedded model)")
    p.add_argument("--compressed", required=True, help="the ARMOR / 2:4 checkpoint made from it")
    p.add_argument(
        "--out", default=None, help="report JSON (default: COMPRESSED.sensitivity.json beside the checkpoint)"
    )
    p.add_argument("--plot", default=None, help="report PNG (default: the --out path with .png)")
    p.add_argument("--limit-windows", type=int, default=WINDOWS, help="calibration and evaluation windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument(
        "--eval-data", default="builtin", help="held-out text for perplexity: builtin, fortunes, devil or a file"
    )
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(DEFAULT_GROUPS), help="groups to restore")
    p.add_argument("--budgets", nargs="*", type=float, default=list(DEFAULT_BUDGETS), help="dense budgets to measure")
    p.add_argument("--retention", action="store_true", help="also multiple-choice retention per row (slow)")
    p.add_argument("--retention-limit", type=int, default=None, help="with --retention: this many questions")
    args = p.parse_args(argv)
    try:
        compressed = Path(args.compressed)
        if not (compressed / "config.json").is_file():
            raise FileNotFoundError(f"--compressed {compressed}: not a checkpoint directory (no config.json)")
        report = sensitivity(
            resolve_model(args.dense),
            compressed,
            windows=args.limit_windows,
            seq_len=args.seq_len,
            eval_data=args.eval_data,
            groups=tuple(args.groups),
            budgets=tuple(args.budgets),
            retention=args.retention,
            retention_limit=args.retention_limit,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else compressed.with_name(compressed.name + ".sensitivity.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(report, png)
    print(summary_text(report))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
