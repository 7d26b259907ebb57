"""``--dense-budget F --sensitivity REPORT``: which matrices the budget leaves dense
(``armor_vllm.offline.dense_budget.choose_dense``, on hand-written reports), and the clear errors of
the options. The run itself, from a measured report, is in tests/test_sensitivity.py."""

import json

import pytest

from armor_vllm.api import offline_options
from armor_vllm.offline import dense_budget
from armor_vllm.offline.dense_budget import REPORT_KIND, REPORT_VERSION, choose_dense, model_signature
from armor_vllm.offline.pipeline import OfflineOptions

# name: (params, kl with it restored); the compressed model's kl is 1.0, total 200 weights
UNITS = {"A": (100, 0.0), "B": (10, 0.5), "C": (50, 0.4), "D": (5, 0.99), "E": (1, 1.1), "F": (34, 1.0)}


def make_report(units=UNITS, kind="unit", ppl=None, signature="sig", extra_rows=()):
    rows = [
        {"name": "compressed", "type": "baseline", "matrices": [], "params": 0, "kl": 1.0},
        {"name": "dense", "type": "baseline", "matrices": list(units), "params": 200, "kl": 0.0},
    ]
    for name, (params, kl) in units.items():
        rows.append({"name": name, "type": kind, "matrices": [name], "params": params, "kl": kl})
        if ppl:
            rows[-1]["ppl"] = ppl[name]
    return {
        "kind": REPORT_KIND,
        "version": REPORT_VERSION,
        "dense_model": "somewhere",
        "model_signature": signature,
        "total_params": sum(p for p, _ in units.values()),
        "matrices": [{"name": n, "params": p} for n, (p, _) in units.items()],
        "rows": rows + list(extra_rows),
    }


@pytest.mark.parametrize(
    "budget, chosen",
    [
        (0.04, ["D"]),  # B (gain/weight 0.05) does not fit; D (5 weights) still does
        (0.05, ["B"]),  # B first: the highest gain per weight, not the highest gain (A)
        (0.3, ["B", "C"]),  # 60 of 200 weights exactly
        (0.35, ["B", "C", "D"]),  # A (100) would overshoot: skipped, the smaller D after it fits
        (0.99, ["A", "B", "C", "D"]),  # E makes the KL worse, F changes nothing: never taken
    ],
)
def test_choice_by_gain_per_weight_within_budget(budget, chosen):
    report = make_report()
    assert choose_dense(report, budget) == chosen
    assert dense_budget.share_of(report, chosen) <= budget
    assert choose_dense(json.loads(json.dumps(report)), budget) == chosen  # deterministic, JSON round trip


def test_only_the_calibration_kl_decides():
    upside_down = {name: 1000.0 - 10 * i for i, name in enumerate(UNITS)}  # evaluation figures: ignored
    assert choose_dense(make_report(ppl=upside_down), 0.3) == choose_dense(make_report(), 0.3)


def test_ties_go_to_the_report_order():
    tied = {"X": (10, 0.5), "Y": (10, 0.5), "Z": (10, 0.5)}
    assert choose_dense(make_report(tied), 0.7) == ["X", "Y"]


def test_units_are_preferred_to_layers_and_kinds_are_never_chosen():
    units = {"X": (10, 0.5), "Y": (20, 0.9), "W": (70, 1.0)}
    layer = [{"name": "layer 0", "type": "layer", "matrices": ["X", "Y"], "params": 30, "kl": 0.2}]
    assert choose_dense(make_report(units, extra_rows=layer), 0.15) == ["X"]  # the finer unit rows
    only_layers = make_report(units, kind="kind", extra_rows=layer)  # per-kind rows: reported only
    assert choose_dense(only_layers, 0.15) == [] and choose_dense(only_layers, 0.3) == ["X", "Y"]


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, True, "0.1", None])
def test_budget_out_of_range_is_refused(budget):
    with pytest.raises(ValueError, match="0 < F < 1"):
        choose_dense(make_report(), budget)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(kind="other"), "not a sensitivity report"),
        (lambda r: r.update(version=99), "report version 99"),
        (lambda r: r.pop("rows"), "no 'rows' list"),
        (lambda r: r["rows"].pop(0), "no 'compressed' row"),
        (lambda r: [x.pop("kl") for x in r["rows"][2:3]], "a row without"),
        (lambda r: r.update(rows=r["rows"][:2]), "no per-layer"),
    ],
)
def test_malformed_reports_are_refused(change, message):
    report = make_report()
    change(report)
    with pytest.raises(ValueError, match=message):
        choose_dense(report, 0.5)


def test_option_errors_are_clear(tiny_model_dir, tmp_path):
    signature = model_signature(tiny_model_dir)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_report(signature=signature)))
    opts = dict(model=tiny_model_dir, output=tmp_path / "o", method="magnitude")
    cases = [
        (dict(dense_budget=0.3), ValueError, "needs --sensitivity"),
        (dict(sensitivity=str(good)), ValueError, "pass --dense-budget"),
        (dict(dense_budget=1.2, sensitivity=str(good)), ValueError, "0 < F < 1"),
        (dict(dense_budget=0.3, sensitivity=str(tmp_path / "none.json")), FileNotFoundError, "does not exist"),
        (dict(dense_budget=0.01, sensitivity=str(good)), ValueError, "smaller than every candidate"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases.append((dict(dense_budget=0.3, sensitivity=str(bad)), ValueError, "not valid JSON"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(make_report(signature="0123456789abcdef")))
    cases.append((dict(dense_budget=0.3, sensitivity=str(other)), ValueError, "not on"))
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            offline_options(**opts, **options)
    chosen = offline_options(**opts, dense_budget=0.3, sensitivity=str(good), ignore=["lm_head"])
    assert chosen.ignore == ["lm_head", "B", "C"] and chosen.dense_budget["matrices"] == ["B", "C"]
    assert chosen.dense_budget["share"] == 0.3 and chosen.dense_budget["groups"] == ["B", "C"]


def test_cli_reports_option_errors(tiny_model_dir, tmp_path, capsys):
    from armor_vllm.offline.__main__ import main as offline_main

    args = ["--model", str(tiny_model_dir), "--output", str(tmp_path / "x"), "--method", "magnitude"]
    assert offline_main([*args, "--dense-budget", "0.2"]) == 2
    assert "--dense-budget needs --sensitivity" in capsys.readouterr().err
    assert not (tmp_path / "x.partial").exists()


def test_no_budget_keeps_the_fingerprint():
    import hashlib
    from dataclasses import asdict

    opts = OfflineOptions(model="m", output="o")
    keep = {k: v for k, v in asdict(opts).items() if k not in ("output", "overwrite", "workers", "ray_address")}
    keep.pop("dense_budget")
    assert opts.fingerprint() == hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
    assert OfflineOptions(model="m", output="o", dense_budget={"matrices": ["x"]}).fingerprint() != opts.fingerprint()


def test_signature_tells_models_apart(tiny_model_dir, tp_dense_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    assert model_signature(tiny_model_dir) == model_signature(tiny_model_dir)
    assert model_signature(tiny_model_dir) != model_signature(tp_dense_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 1  # the same architecture, another weight
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_signature(copy) != model_signature(tiny_model_dir)
