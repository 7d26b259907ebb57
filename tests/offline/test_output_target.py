"""Output-aware targets (``--output-target dense``, ``armor_vllm.offline.output_target``): the target
weight is the least-squares match of the dense model's outputs, the layer walk measures the cross
statistics it needs on the very same tokens, and the offline pass uses it."""

import json

import pytest
import torch

from armor_vllm.offline.layer_walk import capture_layer_inputs, collect_layer_stats, run_layer
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.output_target import dense_output_target
from armor_vllm.offline.pipeline import OfflineOptions, run_offline

SMALL = dict(calib_samples=4, seq_len=64)


def _stats(x_seq, x_dense):
    x64, d64 = x_seq.double(), x_dense.double()
    return InputStats(sq=x64.square().sum(0), n_tokens=x64.shape[0], xtx=x64.T @ x64, cross=d64.T @ x64)


@pytest.mark.parametrize("mix", [1.0, 0.25])
def test_dense_output_target_is_the_damped_least_squares_match_of_the_mixed_outputs(mix):
    gen = torch.Generator().manual_seed(0)
    tokens, d_in, d_out, damp = 200, 24, 8, 0.05
    x_dense = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64) * torch.linspace(
        0.2, 3, d_in, dtype=torch.float64
    )
    x_seq = x_dense + 0.3 * torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)  # earlier layers' error
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    got = dense_output_target(weight, _stats(x_seq, x_dense), damp, mix)

    # min mix ||X_s Ŵᵀ - X_d Wᵀ||² + (1 - mix) ||X_s Ŵᵀ - X_s Wᵀ||² + λ' ||Ŵ - W||² (λ' = λ N / 2 in the
    # unscaled sums), as one stacked least squares
    h = (2.0 / tokens) * x_seq.T @ x_seq
    lam = damp * torch.diagonal(h).mean() * tokens / 2
    eye = torch.eye(d_in, dtype=torch.float64)
    a = torch.cat([mix**0.5 * x_seq, (1 - mix) ** 0.5 * x_seq, lam.sqrt() * eye])
    b = torch.cat([mix**0.5 * x_dense @ weight.T, (1 - mix) ** 0.5 * x_seq @ weight.T, lam.sqrt() * weight.T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # so it reproduces the dense outputs better than the dense weight does (strictly: the other terms
    # are zero at W and positive at the minimiser)
    assert (x_seq @ got.T - x_dense @ weight.T).norm() < (x_seq @ weight.T - x_dense @ weight.T).norm()


def test_dense_output_target_is_the_weight_when_both_paths_agree():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 16, generator=gen, dtype=torch.float64)
    x[:, 3] = 0  # a dead channel keeps its weight too
    weight = torch.randn(4, 16, generator=gen)
    torch.testing.assert_close(dense_output_target(weight, _stats(x, x)), weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cross statistics"):
        dense_output_target(weight, InputStats(sq=x.square().sum(0), n_tokens=100, xtx=x.T @ x))


def test_layer_walk_measures_the_cross_statistics_on_the_same_tokens(tiny_model_dir):
    from armor_vllm.offline import targets as targets_mod
    from armor_vllm.offline.streaming import LayerStream

    stream = LayerStream(tiny_model_dir, dtype=torch.float32)
    plan = targets_mod.plan(stream, [], 32)
    samples = torch.randint(0, stream.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(stream.model, samples, batch=2)
    layer = stream.load_layer(0)
    shifted = inputs.next([h + 0.1 * torch.randn_like(h) for h in inputs.hidden])  # "compressed" path
    shifted.index = 0
    measured = collect_layer_stats(layer, shifted, plan.targets[0], True, dense_inputs=inputs)

    # brute force: the inputs of q_proj and down_proj on both paths, token by token
    seen = {"dense": {}, "seq": {}}
    handles = []
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        module = dict(layer.named_modules())[name]
        handles.append(
            module.register_forward_pre_hook(
                lambda m, args, name=name: (
                    seen[path].setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
                )
            )
        )
    outputs = {}
    for path, walk in (("dense", inputs), ("seq", shifted)):
        outputs[path] = run_layer(layer, walk)
    for handle in handles:
        handle.remove()
    by_first = {g.names[0]: g.stats for g in measured.groups}
    for name, group in (("self_attn.q_proj", "self_attn.q_proj"), ("mlp.down_proj", "mlp.down_proj")):
        xd, xs = torch.cat(seen["dense"][name]).double(), torch.cat(seen["seq"][name]).double()
        stats = by_first[group]
        torch.testing.assert_close(stats.cross, xd.T @ xs, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.xtx, xs.T @ xs, rtol=1e-4, atol=1e-3)
    for got, want in zip(measured.dense_outputs.hidden, outputs["dense"].hidden):  # the dense path goes on
        torch.testing.assert_close(got, want)


def test_output_aware_run_targets_the_dense_model(tiny_model_dir, tmp_path):
    """Layer 0 sees the dense model's own inputs (nothing compressed before it): its target is the
    dense weight. Later layers' targets move, and the checkpoint is valid and resumable as usual."""
    out = tmp_path / "aware"
    run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="sparsegpt",
            block_size=32,
            method_options={"output_target": "dense"},
            **SMALL,
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    shifts = {(m["layer"], m["name"]): m["output_target_shift"] for m in matrices}
    assert len(shifts) == 14
    assert all(s < 1e-4 for (layer, _), s in shifts.items() if layer == 0)
    assert all(s > 1e-3 for (layer, _), s in shifts.items() if layer == 1)

    plain = tmp_path / "plain"
    run_offline(
        OfflineOptions(model=str(tiny_model_dir), output=str(plain), method="sparsegpt", block_size=32, **SMALL)
    )
    from armor_vllm.core.checkpoint import load_tensors

    aware_t, plain_t = load_tensors(out), load_tensors(plain)
    assert all(torch.equal(aware_t[k], plain_t[k]) for k in aware_t if ".layers.0." in k)  # same inputs, same result
    assert any(not torch.equal(aware_t[k], plain_t[k]) for k in aware_t if ".layers.1." in k and "compressed" in k)


def test_output_aware_armor_with_distillation_to_the_dense_model(tiny_model_dir, tmp_path):
    out = tmp_path / "armor"
    summary = run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="armor",
            block_size=32,
            **SMALL,
            method_options={
                "preset": "quick",
                "iterations": 1,
                "output_target": "dense",
                "distill": True,
                "distill_steps": 2,
                "distill_target": "dense",
            },
        )
    )
    assert summary["matrices"] == 14
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    assert all(m["hessian_loss_end"] <= m["hessian_loss_start"] for m in matrices)
    # the distilled factors are kept exactly when they lowered the error against the dense model's outputs
    assert all((m["distill_mse_after"] < m["distill_mse_before"]) == (m["distill_kept"] == 1.0) for m in matrices)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(method="sparsegpt", order="dense", method_options={"output_target": "dense"}),
            "--output-target dense needs --order sequential",
        ),
        (dict(method="magnitude", method_options={"output_target": "dense"}), "--method magnitude takes none"),
        (dict(method="sparsegpt", method_options={"output_target": "model"}), "--output-target 'model' is not one of"),
        (
            dict(method="armor", method_options={"distill": True, "distill_target": "x"}),
            "--distill-target 'x' is not one of",
        ),
        (
            dict(method="sparsegpt", method_options={"output_target": "dense", "output_target_mix": 0}),
            r"--output-target-mix must be a number in \(0, 1\], got 0",
        ),
        (dict(method="armor", method_options={"damp": -0.1}), "--damp must be a finite number >= 0, got -0.1"),
        (dict(method="sparsegpt", method_options={"damp": "1"}), "--damp must be a finite number >= 0, got '1'"),
        (dict(method="wanda", method_options={"damp": 0.1}), "--method wanda does not use it"),
    ],
)
def test_bad_output_target_options_fail_before_any_work(tiny_model_dir, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "x"), block_size=32, **SMALL, **options)
        )
    assert not (tmp_path / "x.partial").exists()


def test_output_aware_moe_model_keeps_the_layer_target_for_its_experts(tmp_path, default_model_dir):
    """Experts see other tokens on the dense and the compressed path (routing differs), so they keep
    the layer target; the attention projections around them are output-aware."""
    from tiny_archs import make_tiny

    model_dir = make_tiny("mixtral", tmp_path / "mixtral", default_model_dir)
    out = tmp_path / "out"
    run_offline(
        OfflineOptions(
            model=str(model_dir),
            output=str(out),
            method="sparsegpt",
            method_options={"output_target": "dense"},
            **SMALL,
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    experts = [m for m in matrices if m["kind"] == "expert"]
    linears = [m for m in matrices if m["kind"] == "linear"]
    assert experts and all("output_target_shift" not in m for m in experts)
    assert linears and all("output_target_shift" in m for m in linears)
    assert any(m["output_target_shift"] > 1e-3 for m in linears if m["layer"] == 1)


def test_damp_reaches_the_compression_and_the_command_line(tiny_model_dir, tmp_path):
    """``--damp`` is SparseGPT's damping of ``X^T X`` (and of the output-aware target): given on the
    command line it reaches the method, and a large one changes what is written."""
    import hashlib

    from armor_vllm.offline.__main__ import build_parser, options_from_args

    assert options_from_args(build_parser().parse_args(["--output", "o", "--damp", "0.5"])).method_options == {
        "damp": 0.5
    }
    digests = []
    for damp in (0.01, 10.0):
        out = tmp_path / f"damp{damp}"
        opts = dict(output_target="dense", damp=damp)
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(out), method="sparsegpt", method_options=opts, **SMALL)
        )
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] != digests[1]
