"""ARMOR: the closed-form group update, the sweep, monotone descent from NoWag-P, the folding of
the normalisation into the wrappers, presets and block-size errors; on random and real weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from armor_vllm.factorization import is_24_sparse, reconstruct
from armor_vllm.offline.methods.armor import PRESETS, Armor, ArmorProblem, best_group_values, optimise
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.methods.nowag import NoWag
from armor_vllm.offline.objective import normalise, relative_proxy_loss


def random_stats(d_in, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, d_in, generator=g) * (0.2 + 3 * torch.rand(d_in, generator=g))).double()
    return InputStats(sq=x.square().sum(0), n_tokens=tokens, xtx=x.T @ x)


def random_weights(d_outs, d_in, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return {f"w{i}": torch.randn(d, d_in, generator=g) for i, d in enumerate(d_outs)}


def perturbed_problem(d_outs=(16, 8), d_in=16, block_size=8, seed=0):
    """A problem with non-identity wrappers and a random 2:4 core, so no shortcut holds."""
    stats = random_stats(d_in, seed=seed)
    weights = random_weights(d_outs, d_in, seed)
    problem = ArmorProblem([normalise(w)[0] for w in weights.values()], stats.channel_importance(), block_size)
    g = torch.Generator().manual_seed(seed + 2)
    problem.a += 0.3 * torch.randn(problem.a.shape, generator=g)
    problem.b += 0.3 * torch.randn(problem.b.shape, generator=g)
    problem.core = torch.randn(problem.core.shape, generator=g) * problem.mask
    return problem


def tile_loss(problem, k, l):
    bs = problem.bs
    res = problem.residual()[k * bs : (k + 1) * bs, l * bs : (l + 1) * bs].double()
    return float((res.square() * problem.h[l * bs : (l + 1) * bs].double()).sum())


def brute_force_group(problem, k, l, row, group):
    """Best loss of tile (k, l) over the 6 patterns of the group, each solved by lstsq on the
    explicit loss (the 2 kept values enter the tile's residual linearly), or the current values."""
    bs = problem.bs
    i, cols = k * bs + row, [l * bs + 4 * group + c for c in range(4)]
    best = tile_loss(problem, k, l)
    for pattern in itertools.combinations(range(4), 2):
        base = copy.deepcopy(problem)
        base.core[i, cols] = 0
        r0 = -base.residual()[k * bs : (k + 1) * bs, l * bs : (l + 1) * bs].double()
        sqrt_h = problem.h[l * bs : (l + 1) * bs].double().sqrt()
        columns = []
        for p in pattern:
            unit = copy.deepcopy(base)
            unit.core.zero_()
            unit.core[i, cols[p]] = 1.0
            columns.append((unit.reconstruct()[k * bs : (k + 1) * bs, l * bs : (l + 1) * bs].double() * sqrt_h).reshape(-1))
        design = torch.stack(columns, 1)
        target = (r0 * sqrt_h).reshape(-1)
        values = torch.linalg.lstsq(design, target).solution
        best = min(best, float((design @ values - target).square().sum()))
    return best


def test_group_step_equals_brute_force_over_the_6_patterns():
    problem = perturbed_problem()
    n_rb, n_cb = problem.n_rb, problem.n_cb
    g = torch.Generator().manual_seed(5)
    row = torch.randint(0, problem.bs, (n_rb, n_cb), generator=g)
    group = torch.randint(0, problem.bs // 4, (n_rb, n_cb), generator=g)
    before = {(k, l): tile_loss(problem, k, l) for k in range(n_rb) for l in range(n_cb)}
    expected = {
        (k, l): brute_force_group(problem, k, l, int(row[k, l]), int(group[k, l]))
        for k in range(n_rb) for l in range(n_cb)
    }
    residual = problem.residual()
    decrease = problem.group_step(residual, row, group)
    torch.testing.assert_close(residual, problem.residual(), rtol=0, atol=1e-5)  # kept in sync
    assert is_24_sparse(problem.core)
    improved = 0
    for (k, l), best in expected.items():
        after = tile_loss(problem, k, l)
        assert after == pytest.approx(best, rel=1e-4, abs=1e-9)
        assert before[(k, l)] - after == pytest.approx(float(decrease[k, l]), rel=1e-3, abs=1e-8)
        improved += after < before[(k, l)] - 1e-9
    assert improved >= len(expected) // 2  # random cores: most groups can be improved


def test_best_group_values_keeps_an_optimal_current_group():
    quad = torch.tensor([[2.0, 0.3, 0.1, 0.0], [0.3, 1.0, 0.2, 0.1], [0.1, 0.2, 1.5, 0.4], [0.0, 0.1, 0.4, 3.0]])
    lin = torch.tensor([-1.0, 0.5, -2.0, 0.2])
    first = best_group_values(quad, lin, torch.zeros(4), damping=0.0)[0]
    again, decrease = best_group_values(quad, lin, first, damping=0.0)
    assert torch.equal(again, first) and float(decrease) == 0.0
    assert int((first != 0).sum()) == 2


def test_sweep_equals_sequential_group_steps():
    problem = perturbed_problem(d_outs=(16, 16), d_in=32)
    reference = copy.deepcopy(problem)
    order = problem.sweep_order(torch.Generator().manual_seed(1))
    problem.sweep(order, rows_per_flush=3)
    residual = reference.residual()
    shape = (reference.n_rb, reference.n_cb)
    for row, groups in order:
        for group in groups:
            reference.group_step(residual, torch.full(shape, row), torch.full(shape, group))
    assert torch.equal(problem.mask, reference.mask)
    torch.testing.assert_close(problem.core, reference.core, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_armor_descends_from_nowag_on_random_weights(preset):
    weights = random_weights((32, 16), 64)
    stats = random_stats(64)
    h = stats.channel_importance()
    options = {"preset": preset} | ({"iterations": 40} if preset == "paper" else {})
    results = Armor(block_size=16, **options).compress(weights, stats)
    nowag = NoWag(block_size=16).compress(weights, stats)
    for key, result in results.items():
        layer = result.layer
        assert is_24_sparse(layer.core)
        start, end = result.metrics["loss_start"], result.metrics["loss_end"]
        assert start == pytest.approx(nowag[key].metrics["loss_end"], rel=1e-6)
        # folding: the stored A, S, B reproduce exactly the loss that was optimised
        stored = relative_proxy_loss(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in), weights[key], h)
        assert stored == pytest.approx(end, rel=1e-4)
        assert end < start
        if preset == "quick":
            assert end < 0.7 * start  # the wrappers and sweeps must really help


def test_trace_is_monotone_and_folding_is_exact():
    weights = random_weights((32,), 64, seed=3)
    stats = random_stats(64, seed=3)
    w_n, norm = normalise(weights["w0"])
    problem = ArmorProblem([w_n], stats.channel_importance(), 16)
    trace = []
    optimise(problem, PRESETS["quick"], trace=trace)
    losses = [l[0] for _, l in trace]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.7 * losses[0]
    layer = Armor(block_size=16, preset="quick").compress(weights, stats)["w0"].layer
    # diag(1/r) (A' S B') diag(1/c) is the normalised product the loss was computed on
    torch.testing.assert_close(norm.apply(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in)),
                               problem.reconstruct(), rtol=1e-4, atol=1e-5)


def test_bad_block_size_names_the_dimensions():
    weights = {"w0": torch.randn(48, 64)}
    with pytest.raises(ValueError, match="48"):
        Armor(block_size=32).compress(weights, random_stats(64))
    with pytest.raises(ValueError, match="64"):
        Armor(block_size=24).compress({"w0": torch.randn(48, 64)}, random_stats(64))


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="preset"):
        Armor(preset="fastest").compress(random_weights((16,), 16), random_stats(16))


@torch.no_grad()
def real_layer_stats(model_dir, layer_index=2, sequences=2, tokens=64):
    """sq statistics of the q/k/v input of one decoder layer of the default model, from the stdlib's
    pydoc text; the forward stops after that layer."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(list(topics.values())[:40]), return_tensors="pt").input_ids[0]
    ids = ids[: sequences * tokens].reshape(sequences, tokens)
    layer = model.model.layers[layer_index]
    stats = InputStats(torch.zeros(model.config.hidden_size, dtype=torch.float64), 0)

    class Stop(Exception):
        pass

    def collect(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        stats.sq += x.square().sum(0)
        stats.n_tokens += x.shape[0]
        raise Stop

    handle = layer.self_attn.q_proj.register_forward_pre_hook(collect)
    try:
        for seq in ids:
            try:
                model(seq[None])
            except Stop:
                pass
    finally:
        handle.remove()
    weights = {n: getattr(layer.self_attn, n).weight.detach().float().clone() for n in ("q_proj", "k_proj", "v_proj")}
    return weights, stats


def test_armor_beats_nowag_on_a_real_layer(default_model_dir):
    weights, stats = real_layer_stats(default_model_dir)
    h = stats.channel_importance()
    results = Armor(block_size=32, preset="quick", iterations=2).compress(weights, stats)
    nowag = NoWag(block_size=32).compress(weights, stats)
    for key, result in results.items():
        layer = result.layer
        assert is_24_sparse(layer.core)
        assert result.metrics["loss_start"] == pytest.approx(nowag[key].metrics["loss_end"], rel=1e-6)
        stored = relative_proxy_loss(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in), weights[key], h)
        assert stored == pytest.approx(result.metrics["loss_end"], rel=1e-4)
        assert result.metrics["loss_end"] < 0.9 * result.metrics["loss_start"]
