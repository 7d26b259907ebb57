"""``python -m armor_vllm.sensitivity`` on the tiny random Llama and an ARMOR checkpoint of it (random
non-identity wrappers): each row is what restoring its group by hand gives, the baselines are the
two models as ``armor_vllm.eval`` measures them, and ``--dense-budget`` turns the report into a run
whose chosen matrices stay dense."""

import json
import math

import pytest
import torch
from armor_checkpoints import write_armor_checkpoint
from torch import nn

from armor_vllm import sensitivity as sens
from armor_vllm.eval import eval_windows, hf_nll
from armor_vllm.hf.quantizer import load_model
from armor_vllm.offline.dense_budget import choose_dense, model_signature

WINDOWS, SEQ_LEN = 2, 32


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    return write_armor_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("sens") / "armor", "v2-wrappers")


@pytest.fixture(scope="module")
def report(tiny_model_dir, checkpoint):
    return sens.sensitivity(
        tiny_model_dir,
        checkpoint,
        windows=WINDOWS,
        seq_len=SEQ_LEN,
        groups=("layer", "kind", "unit"),
        budgets=(0.3, 0.6),
        progress=False,
    )


def row(report, name):
    return next(r for r in report["rows"] if r["name"] == name)


def by_hand(tiny_model_dir, checkpoint, restore):
    """KL, top-1 agreement and perplexity of the folded checkpoint after ``restore(model, dense)``
    copied dense weights into it, against a separately loaded dense model."""
    from transformers import AutoTokenizer

    from armor_vllm.offline.calibration import mixed_samples

    calib, _ = mixed_samples(AutoTokenizer.from_pretrained(tiny_model_dir), WINDOWS, SEQ_LEN)
    dense = load_model(tiny_model_dir, dtype=torch.float32)
    model = load_model(checkpoint, dtype=torch.float32, dequantize=True)
    with torch.no_grad():
        restore(model, dense)
    total, agree, positions = 0.0, 0, 0
    for window in calib:
        kl, top = sens.window_kl(sens.logits(dense, window), sens.logits(model, window))
        total, agree, positions = total + kl, agree + top, positions + window.numel()
    nll, count = hf_nll(checkpoint, eval_windows(tiny_model_dir, SEQ_LEN, WINDOWS), model)
    return total / positions, agree / positions, math.exp(nll / count)


def copy_layer(index):
    def restore(model, dense):
        for name, module in model.model.layers[index].named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(dense.model.layers[index].get_submodule(name).weight)

    return restore


def copy_kind(kind):
    def restore(model, dense):
        for layer, dense_layer in zip(model.model.layers, dense.model.layers):
            layer.get_submodule(kind).weight.copy_(dense_layer.get_submodule(kind).weight)

    return restore


@pytest.mark.parametrize(
    "name, restore",
    [("layer 0", copy_layer(0)), ("layer 1", copy_layer(1)), ("mlp.down_proj", copy_kind("mlp.down_proj"))],
)
def test_a_row_is_what_restoring_its_group_by_hand_gives(report, tiny_model_dir, checkpoint, name, restore):
    kl, agree, ppl = by_hand(tiny_model_dir, checkpoint, restore)
    r = row(report, name)
    assert r["kl"] == kl and r["top1_agree"] == agree  # exactly: the same forward on the same weights
    assert r["ppl"] == ppl
    assert 0 < r["kl"] < row(report, "compressed")["kl"]


def test_baselines_are_the_two_models(report, tiny_model_dir, checkpoint):
    dense, compressed = row(report, "dense"), row(report, "compressed")
    assert dense["kl"] == 0.0 and dense["top1_agree"] == 1.0 and dense["weight_share"] == 1.0
    assert compressed["kl"] > 0 and compressed["matrices"] == [] and compressed["weight_share"] == 0.0
    nothing = by_hand(tiny_model_dir, checkpoint, lambda model, dense: None)
    assert compressed["kl"] == nothing[0] and compressed["ppl"] == nothing[2]
    windows = eval_windows(tiny_model_dir, SEQ_LEN, WINDOWS)
    nll, count = hf_nll(tiny_model_dir, windows, load_model(tiny_model_dir, dtype=torch.float32))
    assert dense["ppl"] == math.exp(nll / count)


def test_groups_partition_the_compressed_weights(report, checkpoint):
    names = [m["name"] for m in report["matrices"]]
    assert len(names) == 14 and report["total_params"] == sum(m["params"] for m in report["matrices"])
    assert set(row(report, "dense")["matrices"]) == set(names)
    for kind, count in (("layer", 2), ("kind", 7), ("unit", 8)):  # units: q+k+v, o, gate+up, down per layer
        rows = [r for r in report["rows"] if r["type"] == kind]
        assert len(rows) == count
        assert sorted(n for r in rows for n in r["matrices"]) == sorted(names)
        assert sum(r["weight_share"] for r in rows) == pytest.approx(1.0)
    assert row(report, "layer 1 self_attn.q_proj+k_proj+v_proj")["matrices"] == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkv"
    ]
    assert report["model_signature"] == model_signature(report["dense_model"])
    assert report["settings"]["calib_sources"][0] == "pydoc" and report["settings"]["eval_data"] == "builtin"


def test_budget_rows_measure_the_choice_together(report):
    for budget in (0.3, 0.6):
        r = row(report, f"budget {budget:g}")
        assert r["matrices"] == choose_dense(report, budget) and r["matrices"]
        assert r["weight_share"] <= budget
        assert r["kl"] < row(report, "compressed")["kl"]


def test_restoring_swaps_back_in_place(tiny_model_dir, checkpoint):
    model, matrices, restorer = sens.load(tiny_model_dir, checkpoint)
    module = model.get_submodule(matrices[0].module)
    folded = module.weight
    with restorer.restored([matrices[0].name]):
        assert module.weight is restorer.dense[matrices[0].name] and not torch.equal(module.weight, folded)
    assert module.weight is folded


def test_cli_writes_report_and_plot(tiny_model_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--dense", str(tiny_model_dir), "--compressed", str(checkpoint), "--out", str(out)]
    assert sens.main([*args, "--limit-windows", "1", "--seq-len", "16", "--budgets", "0.5"]) == 0
    report = json.loads(out.read_text())
    assert [r["type"] for r in report["rows"]].count("layer") == 2 and report["rows"][-1]["name"] == "budget 0.5"
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "most sensitive layers" in capsys.readouterr().out
    for bad, message in [
        (["--compressed", str(tiny_model_dir)], "not an ARMOR checkpoint"),
        (["--dense", str(checkpoint)], "a quantized checkpoint"),
        (["--eval-data", "pydoc"], "a calibration source"),
        (["--budgets", "1.5"], "0 < F < 1"),
    ]:
        assert sens.main([*args, "--limit-windows", "1", "--seq-len", "16", *bad]) == 2
        assert message in capsys.readouterr().err


def test_dense_budget_run_leaves_the_chosen_matrices_dense(report, tiny_model_dir, tmp_path, capsys):
    from armor_vllm.core.checkpoint import load_tensors, read_armor_config
    from armor_vllm.offline.__main__ import main as offline_main

    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(report))
    chosen = choose_dense(report, 0.3)
    out = tmp_path / "budget"
    args = ["--model", str(tiny_model_dir), "--output", str(out), "--method", "magnitude"]
    assert offline_main([*args, "--dense-budget", "0.3", "--sensitivity", str(path)]) == 0
    assert "dense budget 0.3" in capsys.readouterr().out
    cfg = read_armor_config(out)
    assert set(chosen) <= set(cfg.ignore)
    stored, source = load_tensors(out), load_tensors(tiny_model_dir)
    for name in chosen:
        assert torch.equal(stored[f"{name}.weight"], source[f"{name}.weight"]) and f"{name}.compressed" not in stored
    summary = json.loads((out / "armor_report.json").read_text())["summary"]
    assert summary["matrices"] == 14 - len(chosen)
    assert {d["name"] for d in summary["dense"] if d["reason"] == "--dense-budget"} == set(chosen)
    budget = summary["dense_budget"]
    assert budget["matrices"] == chosen and budget["budget"] == 0.3 and 0 < budget["share_of_run"] <= 0.3
    assert budget["share_of_run"] == pytest.approx(row(report, "budget 0.3")["weight_share"])


def test_retention_rows_score_the_restored_model(tiny_model_dir, checkpoint):
    from transformers import AutoTokenizer

    from armor_vllm.retention import load_multiple_choice, multiple_choice_scores

    report = sens.sensitivity(
        tiny_model_dir,
        checkpoint,
        windows=1,
        seq_len=16,
        groups=("layer",),
        budgets=(),
        retention=True,
        retention_limit=3,
        progress=False,
    )
    items, tokenizer = load_multiple_choice(3), AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, model in (("dense", load_model(tiny_model_dir)), ("compressed", load_model(checkpoint, dequantize=True))):
        scored = multiple_choice_scores(model, tokenizer, items)
        assert row(report, name)["mc_acc"] == sum(r["correct"] for r in scored) / 3
    assert report["settings"]["retention_items"] == 3 and all("mc_acc" in r for r in report["rows"])
