"""Which compressed matrices to leave dense under a budget: ``--dense-budget F --sensitivity REPORT``.

``REPORT`` is what ``python -m armor_vllm.sensitivity`` writes: for groups of a compressed
checkpoint's matrices, the mean KL(dense || model) of next-token distributions on calibration-kind
text with that group alone restored to its dense weights (``kl``), against the checkpoint as it is
(the ``compressed`` row). Only ``kl`` is read here: the report's perplexity and retention figures are
measured on evaluation data, which never decides anything (calibration and evaluation stay apart).

The choice (``choose_dense``), simple and deterministic:

* candidates: the report's finest rows that vLLM can serve dense whole, its per-layer fused units
  (``unit`` rows: q/k/v together, o, gate/up together, down; ``--groups unit``) when it has them,
  else whole decoder layers (``layer`` rows). The per-kind rows (one projection in every layer)
  overlap every layer and are reported only;
* each candidate's gain is ``kl(compressed) - kl(candidate restored)``, its cost the number of
  weights it holds; ranked by gain per weight, highest first (ties: the report's order);
* taken greedily while the weights left dense stay within ``F`` of the report's compressed weights:
  a candidate that would overshoot is skipped and smaller ones after it may still fit; a candidate
  whose restoration does not lower the KL is never taken.

Gains are measured one group at a time and do not add up exactly (restoring one layer also changes
what the next ones see); the report's ``budget`` rows measure each chosen set restored together.
The chosen names (checkpoint names, as ``--ignore`` takes them) join the run's ``ignore``; the run's
report says what the budget left dense and its share (``summary``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from armor_vllm.core.checkpoint import shard_files

REPORT_KIND = "armor-sensitivity"
REPORT_VERSION = 1
CANDIDATE_TYPES = ("unit", "layer")  # finest first
REASON = "--dense-budget"


def model_signature(model_dir: str | Path) -> str:
    """A fingerprint of a model directory's weights that is cheap to compute: every tensor's name,
    shape, dtype and the bytes of its first row (a different model, or the same architecture with
    other weights, differs; the shard layout does not matter)."""
    where: dict[str, Path] = {}
    for path in shard_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as handle:
            where.update({name: path for name in handle.keys()})
    if not where:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(where.values())}
        for name in sorted(where):
            part = handles[where[name]].get_slice(name)
            shape = list(part.get_shape())
            digest.update(f"{name}|{shape}|{part.get_dtype()}\n".encode())
            head = part[0:1] if shape and shape[0] > 0 else handles[where[name]].get_tensor(name)
            digest.update(head.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1), or a clear error."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(
            f"--dense-budget {budget!r}: expected the share of the compressible weights left dense, 0 < F < 1"
        )
    return float(budget)


def check_report(report, where: str = "the sensitivity report") -> None:
    """Raise a clear ``ValueError`` unless ``report`` has what ``choose_dense`` reads."""
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise ValueError(f"{where}: not a sensitivity report (python -m armor_vllm.sensitivity writes one)")
    if report.get("version") != REPORT_VERSION:
        raise ValueError(f"{where}: report version {report.get('version')!r}, this code reads {REPORT_VERSION}")
    rows = report.get("rows")
    total = report.get("total_params")
    if not isinstance(rows, list) or not isinstance(total, int) or total <= 0:
        raise ValueError(f"{where}: no 'rows' list or no positive 'total_params'")
    for row in rows:
        if not isinstance(row, dict) or not {"name", "type", "matrices", "params", "kl"} <= set(row):
            raise ValueError(f"{where}: a row without name, type, matrices, params and kl: {str(row)[:120]}")
    if not any(r["name"] == "compressed" for r in rows):
        raise ValueError(f"{where}: no 'compressed' row (the KL with nothing restored)")
    if not any(r["type"] in CANDIDATE_TYPES for r in rows):
        raise ValueError(f"{where}: no per-layer ('layer') or per-unit ('unit') rows to choose from")


def candidates(report: dict) -> list[dict]:
    """The rows ``choose_dense`` picks among: the ``unit`` rows when the report has them, else the
    ``layer`` rows, each with ``gain`` (KL lowered by restoring it) and ``gain_per_weight``."""
    check_report(report)
    kind = next(t for t in CANDIDATE_TYPES if any(r["type"] == t for r in report["rows"]))
    base = next(r["kl"] for r in report["rows"] if r["name"] == "compressed")
    out = []
    for row in report["rows"]:
        if row["type"] == kind and row["params"] > 0:
            gain = base - row["kl"]
            out.append({**row, "gain": gain, "gain_per_weight": gain / row["params"]})
    return out


def choose_dense(report: dict, budget: float) -> list[str]:
    """The matrices (checkpoint names, as ``--ignore`` takes them) to leave dense: the candidates
    (``candidates``) by KL gain per weight, highest first, taken while the weights left dense stay
    within ``budget`` (a share of the report's ``total_params``); in the report's order of matrices.
    Deterministic; only ``kl`` is read (never the evaluation figures)."""
    budget = check_budget(budget)
    pool = candidates(report)
    total = report["total_params"]
    ranked = sorted(range(len(pool)), key=lambda i: (-pool[i]["gain_per_weight"], i))
    chosen: set[str] = set()
    spent = 0
    for i in ranked:
        row = pool[i]
        if row["gain"] <= 0:
            break  # ranked by gain per weight: the rest do not help either
        if (spent + row["params"]) / total <= budget:
            chosen.update(row["matrices"])
            spent += row["params"]
    order = _matrix_order(report)
    return sorted(chosen, key=lambda n: (order.get(n, len(order)), n))


def _matrix_order(report: dict) -> dict[str, int]:
    names = [m["name"] for m in report.get("matrices", []) if isinstance(m, dict) and "name" in m]
    if not names:  # the dense row lists every matrix
        names = next((r["matrices"] for r in report["rows"] if r["name"] == "dense"), [])
    return {n: i for i, n in enumerate(names)}


def share_of(report: dict, names: list[str]) -> float:
    """The share of the report's compressed weights that ``names`` hold."""
    params = {m["name"]: m["params"] for m in report.get("matrices", [])}
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the sensitivity report has no size for {missing[:3]}")
    return sum(params[n] for n in names) / report["total_params"]


def load_report(path: str | Path) -> dict:
    """Read and check a sensitivity report; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--sensitivity {path} does not exist (python -m armor_vllm.sensitivity writes it)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--sensitivity {path}: not valid JSON ({exc})") from None
    check_report(report, f"--sensitivity {path}")
    if not report.get("matrices"):
        raise ValueError(f"--sensitivity {path}: no 'matrices' (names and sizes of the compressed matrices)")
    return report


def resolve(budget, report_path, model_dir: str | Path) -> dict:
    """The budget's choice for a run on ``model_dir``: ``{"budget", "sensitivity", "matrices",
    "params", "share", "groups"}``, or a clear error (an option without the other, a budget out of
    range, a missing or malformed report, a report measured on another model, a budget too small to
    leave anything dense)."""
    if budget is None:
        raise ValueError("--sensitivity is read only to choose what --dense-budget leaves dense; pass --dense-budget F")
    if report_path is None:
        raise ValueError(
            "--dense-budget needs --sensitivity REPORT.json "
            "(python -m armor_vllm.sensitivity --compressed DIR writes one)"
        )
    budget = check_budget(budget)
    report = load_report(report_path)
    signature = model_signature(model_dir)
    if report.get("model_signature") != signature:
        raise ValueError(
            f"--sensitivity {report_path} was measured on {report.get('dense_model')} (weights signature "
            f"{report.get('model_signature')}), not on {model_dir} ({signature}); run python -m "
            f"armor_vllm.sensitivity --dense {model_dir} --compressed DIR for this model"
        )
    names = choose_dense(report, budget)
    if not names:
        pool = [c for c in candidates(report) if c["gain"] > 0]
        if not pool:
            raise ValueError(f"--sensitivity {report_path}: restoring no group lowers the KL; nothing to leave dense")
        small = min(pool, key=lambda c: c["params"])
        raise ValueError(
            f"--dense-budget {budget}: smaller than every candidate that helps (the smallest, {small['name']}, "
            f"holds {small['params'] / report['total_params']:.4f} of the compressed weights); "
            "nothing would be left dense"
        )
    chosen = set(names)
    groups = [c["name"] for c in candidates(report) if chosen.issuperset(c["matrices"]) and c["matrices"]]
    params = {m["name"]: m["params"] for m in report["matrices"]}
    return {
        "budget": budget,
        "sensitivity": str(report_path),
        "groups": groups,
        "matrices": names,
        "params": sum(params.get(n, 0) for n in names),
        "share": share_of(report, names),
    }


def summary(record: dict, metrics: list[dict]) -> dict:
    """What a run's report says of the budget: the record, plus ``share_of_run``: the share of the
    weights the run would otherwise have compressed (what it compressed plus what the budget left
    dense) that the budget left dense."""
    compressed = sum(m["shape"][0] * m["shape"][1] for m in metrics)
    left = record["params"]
    return {**record, "share_of_run": left / (left + compressed) if left + compressed else 0.0}


def dense_entries(plan_dense, record: dict | None) -> list[dict]:
    """The run report's ``dense`` list (``targets.Dense``: name, reason), the budget's matrices
    given the reason ``--dense-budget`` rather than ``--ignore``."""
    chosen = set(record["matrices"]) if record else set()
    return [{"name": d.checkpoint, "reason": REASON if d.checkpoint in chosen else d.reason} for d in plan_dense]
