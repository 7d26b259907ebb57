"""Distillation after compression (``armor_vllm.offline.distill``): on a small layer it lowers the
output error against the dense layer with the 2:4 masks unchanged, refuses targets it cannot
handle, and runs inside the offline pass without changing the checkpoint format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from armor_vllm.core.factorization import identity_blocks, mask_from_scores
from armor_vllm.core.format import ArmorLayer
from armor_vllm.offline.distill import DistillOptions, distill_layer


class TwoLinears(nn.Module):
    def __init__(self, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x, scale=1.0):
        return (self.down(torch.relu(self.up(x))) * scale,)


def pruned_factors(layer, bs=8):
    out = {}
    for name in ("up", "down"):
        w = getattr(layer, name).weight.detach()
        out[name] = ArmorLayer(
            identity_blocks(w.shape[0], bs), w * mask_from_scores(w.abs()), identity_blocks(w.shape[1], bs)
        )
    return out


def test_distill_lowers_the_layer_error_and_keeps_the_masks():
    layer = TwoLinears()
    targets = [SimpleNamespace(name=n, module=n, kind="linear", checkpoint=f"layers.0.{n}") for n in ("up", "down")]
    hidden = [torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        dense = [layer(h, scale=2.0)[0] for h in hidden]
    factors = pruned_factors(layer)
    batches = [(h, (), {"scale": 2.0}) for h in hidden]
    result = distill_layer(layer, targets, factors, batches, dense, DistillOptions(steps=60, lr=3e-3, max_seconds=None))
    tuned, info = result.factors, result.info
    assert info["distill_kept"] == 1.0 and info["distill_steps"] == 60
    assert info["distill_mse_after"] < 0.7 * info["distill_mse_before"]
    for name in ("up", "down"):
        assert torch.equal(tuned[name].core != 0, factors[name].core != 0)  # masks fixed
        assert not torch.equal(tuned[name].wrapper_out, factors[name].wrapper_out)  # wrappers tuned


def test_distill_keeps_the_given_factors_when_it_does_not_help():
    layer = TwoLinears()
    targets = [SimpleNamespace(name=n, module=n, kind="linear", checkpoint=n) for n in ("up", "down")]
    hidden = [torch.randn(2, 4, 16)]
    factors = pruned_factors(layer)
    with torch.no_grad():  # the pruned layer's own outputs: the error starts at 0
        w = {f"{n}.weight": f.weight() for n, f in factors.items()}
        dense = [torch.func.functional_call(layer, w, (hidden[0],))[0]]
    result = distill_layer(layer, targets, factors, [(hidden[0], (), {})], dense, DistillOptions(steps=5, lr=1e-2))
    assert result.info["distill_kept"] == 0.0 and result.factors is factors
    torch.testing.assert_close(result.outputs[0], dense[0])  # the outputs of the factors it kept


def test_distill_refuses_expert_targets():
    layer = TwoLinears()
    targets = [SimpleNamespace(name="up", module="up", kind="expert", checkpoint="layers.0.experts.0.up")]
    with pytest.raises(ValueError, match="experts.0.up"):
        distill_layer(layer, targets, pruned_factors(layer), [(torch.randn(1, 2, 16), (), {})], [torch.randn(1, 2, 16)])


def test_distill_in_the_offline_pass(tiny_model_dir, tmp_path):
    from armor_vllm.hf.dense import load_dense_hf_model
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    out = tmp_path / "distilled"
    run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="armor",
            block_size=16,
            calib_samples=4,
            seq_len=64,
            method_options={"preset": "quick", "iterations": 1, "distill": True, "distill_steps": 4},
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    assert all(m["distill_steps"] == 4 for m in matrices)
    assert all(m["distill_mse_after"] <= m["distill_mse_before"] for m in matrices)
    assert any(m["distill_kept"] == 1.0 for m in matrices)
    load_dense_hf_model(out)  # the format is unchanged: it loads and validates
    with pytest.raises(ValueError, match="--method armor"):
        run_offline(
            OfflineOptions(
                model=str(tiny_model_dir),
                output=str(tmp_path / "w"),
                method="wanda",
                calib_samples=4,
                seq_len=64,
                method_options={"distill": True},
            )
        )


def test_output_aware_distillation_follows_the_dense_model(tiny_model_dir, tmp_path):
    """--distill-target dense: the targets are the dense model's own hidden states; after the first
    layer they differ from the dense layer's outputs on the compressed inputs, so the measured
    errors differ from a --distill-target layer run, and both runs stay valid checkpoints."""
    from armor_vllm.hf.dense import load_dense_hf_model
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    errors = {}
    for target in ("layer", "dense"):
        out = tmp_path / target
        run_offline(
            OfflineOptions(
                model=str(tiny_model_dir),
                output=str(out),
                method="armor",
                block_size=16,
                calib_samples=4,
                seq_len=64,
                method_options={
                    "preset": "quick",
                    "iterations": 1,
                    "distill": True,
                    "distill_steps": 2,
                    "distill_target": target,
                },
            )
        )
        matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
        errors[target] = [m["distill_mse_before"] for m in matrices if m["layer"] == 1][0]
        load_dense_hf_model(out)
    assert errors["dense"] > errors["layer"]  # upstream error is part of what the dense target asks to fix
    with pytest.raises(ValueError, match="distill-target"):
        run_offline(
            OfflineOptions(
                model=str(tiny_model_dir),
                output=str(tmp_path / "bad"),
                method="armor",
                calib_samples=4,
                seq_len=64,
                method_options={"distill": True, "distill_target": "x"},
            )
        )


def test_armor_defaults_distil_and_target_the_dense_model(tiny_model_dir, tmp_path):
    from armor_vllm.offline.__main__ import build_parser
    from armor_vllm.offline.pipeline import OfflineOptions, _with_armor_defaults, run_offline

    def resolved(method="armor", order="sequential", **method_options):
        opts = OfflineOptions(model="m", output="o", method=method, order=order, method_options=method_options)
        got = _with_armor_defaults(opts).method_options
        return got.get("distill"), got.get("output_target"), got.get("distill_target")

    assert resolved() == (True, "dense", "dense") and resolved(preset="default") == (True, "dense", "dense")
    assert resolved(preset="quick") == (False, "dense", None)  # the fastest schedule does not distil
    assert resolved(distill=False) == (False, "dense", None)
    assert resolved(preset="quick", distill=True) == (True, "dense", "dense")
    assert resolved(output_target="layer", distill_target="layer") == (True, "layer", "layer")  # explicit wins
    assert resolved(order="dense") == (True, None, None)  # both paths are the dense model's there
    assert resolved("wanda") == (None, None, None)  # baselines stay as published

    def damp(method="armor", **method_options):
        opts = OfflineOptions(model="m", output="o", method=method, method_options=method_options)
        return _with_armor_defaults(opts).method_options.get("damp")

    assert damp() == damp(preset="quick") == damp(preset="long") == 0.1  # measured for retention (section 0)
    assert damp(damp=0.01) == 0.01 and damp(damp=0.0) == 0.0  # an explicit value wins, zero included
    assert damp("sparsegpt") is None  # SparseGPT keeps its published 0.01 (its own default)
    assert build_parser().parse_args(["--output", "o"]).damp is None  # not given: resolved above
    assert build_parser().parse_args(["--output", "o", "--no-distill"]).distill is False
    assert build_parser().parse_args(["--output", "o"]).distill is None  # not given: the default above

    out = tmp_path / "default"
    run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="armor",
            block_size=16,
            calib_samples=4,
            seq_len=64,
            method_options={"iterations": 1, "distill_steps": 2},
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    assert all(m["distill_steps"] == 2 and "output_target_shift" in m for m in matrices)
    producer = json.loads((out / "config.json").read_text())["quantization_config"]["producer"]
    assert producer["distill"] is True and producer["output_target"] == producer["distill_target"] == "dense"
    assert producer["damp"] == 0.1  # the resolved default is what the checkpoint records


def test_distillation_tunes_the_projections_and_keeps_moe_experts_as_compressed(tmp_path, default_model_dir):
    from tiny_archs import make_tiny

    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    model_dir = make_tiny("mixtral", tmp_path / "mixtral", default_model_dir)
    out = tmp_path / "out"
    run_offline(
        OfflineOptions(
            model=str(model_dir),
            output=str(out),
            method="armor",
            calib_samples=4,
            seq_len=64,
            method_options={"preset": "quick", "iterations": 1, "distill": True, "distill_steps": 2},
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    experts = [m for m in matrices if m["kind"] == "expert"]
    linears = [m for m in matrices if m["kind"] == "linear"]
    assert experts and linears
    assert all(m["distill_steps"] == 0 and m["distill_kept"] == 0.0 for m in experts)
    assert all(m["distill_steps"] == 2 for m in linears)


def _distill_tensors_case(dense_target: bool):
    """One TwoLinears layer stored as bf16 checkpoint tensors, with calibration inputs and dense
    outputs: either another layer's (distillation helps) or the stored layer's own (it cannot)."""
    from armor_vllm.core.format import decode_layer, encode_layer
    from armor_vllm.offline.layer_walk import LayerInputs

    layer = TwoLinears()
    targets = [SimpleNamespace(name=n, module=n, kind="linear", checkpoint=f"layers.0.{n}") for n in ("up", "down")]
    tensors = {}
    for name, f in pruned_factors(layer).items():
        tensors.update(encode_layer(f"layers.0.{name}", f, torch.bfloat16))
    hidden = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    inputs = LayerInputs(hidden=hidden, calls=[[((), {}) for _ in hidden]], index=0)
    stored = {f"{n}.weight": decode_layer(f"layers.0.{n}", tensors, 8).weight() for n in ("up", "down")}
    with torch.no_grad():
        source = layer if dense_target else (lambda h: torch.func.functional_call(layer, stored, (h,)))
        dense = SimpleNamespace(hidden=[source(h)[0] for h in hidden])
    metrics = [{"name": n} for n in ("up", "down")]
    return layer, targets, tensors, inputs, dense, metrics


@pytest.mark.parametrize("helps", [True, False])
def test_distill_tensors_returns_what_it_stored_and_the_outputs_of_exactly_that(helps):
    """The pipeline writes the returned tensors and feeds the returned outputs to the next layer: the
    outputs must be those of the stored (bf16-rounded) tensors, and a distillation that does not
    help must leave the given tensors untouched."""
    from armor_vllm.core.format import decode_layer
    from armor_vllm.offline.distill import distill_tensors

    layer, targets, tensors, inputs, dense, metrics = _distill_tensors_case(dense_target=helps)
    out, metrics, outputs = distill_tensors(
        layer,
        targets,
        tensors,
        metrics,
        inputs,
        dense,
        8,
        torch.bfloat16,
        DistillOptions(steps=20, lr=3e-3, max_seconds=None),
    )
    assert all(m["distill_kept"] == float(helps) for m in metrics)
    if not helps:
        assert all(out[k] is tensors[k] for k in tensors) and out.keys() == tensors.keys()
    else:
        assert out.keys() == tensors.keys() and any(not torch.equal(out[k], tensors[k]) for k in tensors)
    weights = {f"{n}.weight": decode_layer(f"layers.0.{n}", out, 8).weight() for n in ("up", "down")}
    with torch.no_grad():
        for h, o in zip(inputs.hidden, outputs):
            torch.testing.assert_close(o, torch.func.functional_call(layer, weights, (h,))[0], rtol=0, atol=0)
