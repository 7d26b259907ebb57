"""ARMOR: the closed-form group update, the sweep, monotone descent from NoWag-P, the folding of
the normalisation into the wrappers, presets and block-size errors; on random and real weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from armor_vllm.core.factorization import identity_blocks, is_24_sparse, mask_from_scores, reconstruct
from armor_vllm.core.group_solver import best_group_values
from armor_vllm.offline.methods.armor import PRESETS, Armor
from armor_vllm.offline.methods.armor.diag import ArmorProblem, optimise
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
            columns.append(
                (unit.reconstruct()[k * bs : (k + 1) * bs, l * bs : (l + 1) * bs].double() * sqrt_h).reshape(-1)
            )
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
        for k in range(n_rb)
        for l in range(n_cb)
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
    options = {"preset": preset, "objective": "diag"} | ({"iterations": 40} if preset == "paper" else {})
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
    layer = Armor(block_size=16, preset="quick", objective="diag").compress(weights, stats)["w0"].layer
    # diag(1/r) (A' S B') diag(1/c) is the normalised product the loss was computed on
    torch.testing.assert_close(
        norm.apply(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in)),
        problem.reconstruct(),
        rtol=1e-4,
        atol=1e-5,
    )


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
    """sq and X^T X statistics of the q/k/v input of one decoder layer of the default model, from the stdlib's
    pydoc text; the forward stops after that layer."""
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(list(topics.values())[:40]), return_tensors="pt").input_ids[0]
    ids = ids[: sequences * tokens].reshape(sequences, tokens)
    layer = model.model.layers[layer_index]
    d = model.config.hidden_size
    stats = InputStats(torch.zeros(d, dtype=torch.float64), 0, torch.zeros(d, d, dtype=torch.float64))

    class Stop(Exception):
        pass

    def collect(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        stats.sq += x.square().sum(0)
        stats.xtx += x.T @ x
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
    results = Armor(block_size=32, preset="quick", iterations=2, objective="diag").compress(weights, stats)
    nowag = NoWag(block_size=32).compress(weights, stats)
    for key, result in results.items():
        layer = result.layer
        assert is_24_sparse(layer.core)
        assert result.metrics["loss_start"] == pytest.approx(nowag[key].metrics["loss_end"], rel=1e-6)
        stored = relative_proxy_loss(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in), weights[key], h)
        assert stored == pytest.approx(result.metrics["loss_end"], rel=1e-4)
        assert result.metrics["loss_end"] < 0.9 * result.metrics["loss_start"]


# ---- the full objective tr(E H E^T) (armor_full) ----------------------------------------------

from armor_vllm.offline.methods.armor.full import FullArmorProblem, FullSchedule, optimise_full  # noqa: E402
from armor_vllm.offline.methods.sparsegpt import damped_hessian, sparsegpt_prune  # noqa: E402


def full_problem(d_outs=(16, 8), d_in=16, block_size=8, seed=0, perturb=True):
    """A full-objective problem on correlated inputs, with non-identity wrappers and a random 2:4 core."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, d_in, generator=g, dtype=torch.float64) @ torch.randn(
        d_in, d_in, generator=g, dtype=torch.float64
    )
    hessian, _ = damped_hessian((2.0 / 128) * x.T @ x, 0.01)
    weights = [torch.randn(d, d_in, generator=g) for d in d_outs]
    cores = [w * mask_from_scores(torch.rand(w.shape, generator=g)) for w in weights]
    problem = FullArmorProblem(weights, hessian, block_size, cores, damping=0.0)
    if perturb:
        problem.a += 0.3 * torch.randn(problem.a.shape, generator=g)
        problem.b += 0.3 * torch.randn(problem.b.shape, generator=g)
    return problem


def hessian_sqrt(problem):
    return torch.linalg.cholesky(problem.h.double())  # H = G G^T


def explicit_loss(problem, a=None, core=None, b=None):
    """tr(E H E^T) from dense matrices, without the problem's own block products."""
    a = problem.a if a is None else a
    core = problem.core if core is None else core
    b = problem.b if b is None else b
    total = 0.0
    for m, s in enumerate(problem.slices):
        dense_a = torch.block_diag(*a[problem.row_blocks(m)].double().unbind(0))
        dense_b = torch.block_diag(*b[m].double().unbind(0))
        err = dense_a @ core[s].double() @ dense_b - problem.target[s].double()
        total += float(torch.trace(err @ problem.h.double() @ err.T))
    return total


def linear_lstsq(problem, unknowns, apply):
    """min over ``unknowns`` (a flat vector) of ||apply(u) G - W G||_F^2 by dense least squares,
    building the design matrix column by column from unit vectors."""
    g = hessian_sqrt(problem)
    target = (problem.target.double() @ g).reshape(-1)
    offset = (apply(torch.zeros(unknowns)) @ g).reshape(-1)
    columns = []
    for i in range(unknowns):
        unit = torch.zeros(unknowns)
        unit[i] = 1.0
        columns.append((apply(unit) @ g).reshape(-1) - offset)
    design = torch.stack(columns, 1)
    solution = torch.linalg.lstsq(design, target - offset).solution
    return solution, float((design @ solution + offset - target).square().sum())


def test_full_a_step_is_the_block_least_squares():
    problem = full_problem()
    n = problem.a.numel()
    dense_b = [torch.block_diag(*problem.b[m].double().unbind(0)) for m in range(2)]

    def apply(vec):
        a = vec.reshape(problem.a.shape).double()
        return torch.cat(
            [
                torch.block_diag(*a[problem.row_blocks(m)].unbind(0)) @ problem.core[s].double() @ dense_b[m]
                for m, s in enumerate(problem.slices)
            ]
        )

    _, best = linear_lstsq(problem, n, apply)
    before = explicit_loss(problem)
    problem.solve_a()
    assert explicit_loss(problem) == pytest.approx(best, rel=1e-4)
    assert best < 0.9 * before


@pytest.mark.parametrize("solver,steps", [("cg", 40), ("gauss-seidel", 60)])
def test_full_b_step_reaches_the_joint_least_squares(solver, steps):
    problem = full_problem(d_outs=(16,), d_in=24, block_size=8)
    nb = problem.b[0].numel()
    n_mat = torch.block_diag(*problem.a.double().unbind(0)) @ problem.core.double()

    def apply(vec):
        return n_mat @ torch.block_diag(*vec.reshape(problem.b[0].shape).double().unbind(0))

    _, best = linear_lstsq(problem, nb, apply)
    losses = [explicit_loss(problem)]
    for _ in range(3):  # monotone step by step
        problem.solve_b(1, solver)
        losses.append(explicit_loss(problem))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:]))
    problem.solve_b(steps, solver)
    assert explicit_loss(problem) == pytest.approx(best, rel=1e-3)
    assert best < 0.9 * losses[0]


def test_full_core_cg_reaches_the_masked_least_squares():
    problem = full_problem()
    kept = problem.mask.nonzero()
    dense_a = torch.block_diag(*problem.a.double().unbind(0))
    dense_b = [torch.block_diag(*problem.b[m].double().unbind(0)) for m in range(2)]

    def apply(vec):
        core = torch.zeros(problem.core.shape, dtype=torch.float64)
        core[kept[:, 0], kept[:, 1]] = vec.double()
        prod = dense_a @ core
        return torch.cat([prod[s] @ dense_b[m] for m, s in enumerate(problem.slices)])

    _, best = linear_lstsq(problem, kept.shape[0], apply)
    losses = [explicit_loss(problem)]
    for _ in range(3):
        problem.refine_core(1)
        losses.append(explicit_loss(problem))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:]))
    problem.refine_core(200)
    assert explicit_loss(problem) == pytest.approx(best, rel=1e-3)
    assert is_24_sparse(problem.core)


def test_full_repick_keeps_the_better_core_per_row_block():
    problem = full_problem(d_outs=(32,), d_in=32)
    before = problem.row_losses().reshape(problem.n_rb, problem.bs).sum(1)
    changed = problem.repick()
    after = problem.row_losses().reshape(problem.n_rb, problem.bs).sum(1)
    assert bool((after <= before * (1 + 1e-6)).all())
    assert changed >= 1 and float(after.sum()) < float(before.sum())  # a random mask is easy to beat
    assert is_24_sparse(problem.core)


def test_full_optimise_is_monotone_and_keeps_the_best_iterate():
    problem = full_problem(perturb=False)
    trace = []
    best = optimise_full(problem, FullSchedule(iterations=3, discrete_every=1, damping=1e-9), trace=trace)
    start = trace[0][2]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(start, best.tolist()))
    torch.testing.assert_close(problem.losses(), best)
    assert float(best.sum()) < 0.5 * sum(start)


def test_full_objective_on_random_weights_matches_its_stored_layer():
    weights = random_weights((32, 16), 64)
    stats = random_stats(64)
    results = Armor(block_size=16, objective="full", init="sparsegpt", preset="quick", damp=0.01).compress(
        weights, stats
    )
    hessian, _ = damped_hessian(stats.hessian(), 0.01)
    for key, result in results.items():
        layer, w = result.layer, weights[key].double()
        assert is_24_sparse(layer.core)
        err = reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in).double() - w
        stored = float(torch.trace(err @ hessian @ err.T) / torch.trace(w @ hessian @ w.T))
        assert stored == pytest.approx(result.metrics["hessian_loss_end"], rel=1e-4)
        assert result.metrics["hessian_loss_end"] < 0.8 * result.metrics["hessian_loss_start"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="objective"):
        Armor(objective="exact")
    with pytest.raises(ValueError, match="init"):
        Armor(init="magnitude")
    with pytest.raises(ValueError, match="paper"):
        Armor(objective="full", preset="paper")
    with pytest.raises(ValueError, match="device"):
        Armor(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Armor(device="cuda")
    assert Armor(device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("init", ["sparsegpt", "nowag", "wanda"])
def test_full_objective_on_a_real_layer_never_ends_above_its_start(default_model_dir, init):
    """On real q/k/v weights and activations: the full-objective loss starts at the init's own loss
    and never ends above it; from SparseGPT it is never worse than SparseGPT on SparseGPT's own
    objective (the damped H its updates are exact for), matrix by matrix."""
    weights, stats = real_layer_stats(default_model_dir)
    hessian, _ = damped_hessian(stats.hessian(), 0.01)
    results = Armor(block_size=32, objective="full", init=init, preset="quick", iterations=2, damp=0.01).compress(
        weights, stats
    )
    sgpt = {k: sparsegpt_prune(w, stats.hessian(), damp=0.01)[0] for k, w in weights.items()}
    for key, result in results.items():
        w = weights[key].double()

        def loss(w_hat):
            err = w_hat.double() - w
            return float(torch.trace(err @ hessian @ err.T) / torch.trace(w @ hessian @ w.T))

        layer = result.layer
        end = loss(reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in))
        assert is_24_sparse(layer.core)
        assert end == pytest.approx(result.metrics["hessian_loss_end"], rel=1e-4)
        assert end <= result.metrics["hessian_loss_start"]
        if init == "sparsegpt":
            assert result.metrics["hessian_loss_start"] == pytest.approx(loss(sgpt[key]), rel=1e-5)
            assert end < 0.9 * loss(sgpt[key])


def test_full_objective_in_the_offline_pass_on_cpu(tiny_model_dir, tmp_path):
    """The pipeline collects X^T X for the full objective (per run, not per class) and the
    per-matrix output loss never ends above the SparseGPT start; ``device="cpu"`` is honoured."""
    import json

    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    out = tmp_path / "full"
    run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="armor",
            block_size=16,
            calib_samples=4,
            seq_len=64,
            method_options={"preset": "quick", "iterations": 2, "device": "cpu"},
        )
    )
    matrices = json.loads((out / "armor_report.json").read_text())["matrices"]
    assert len(matrices) == 14
    for m in matrices:
        assert m["hessian_loss_end"] <= m["hessian_loss_start"]
    assert sum(m["hessian_loss_end"] for m in matrices) < 0.9 * sum(m["hessian_loss_start"] for m in matrices)


def test_full_sweep_decreases_the_loss_by_what_it_reports():
    """The group sweep: exact loss accounting (the reported decrease is the measured one), 2:4 kept,
    and a random core's patterns get better; a second sweep from its own result does not go up."""
    problem = full_problem(d_outs=(16, 8), d_in=32)
    before = float(problem.row_losses().sum())
    decrease = problem.sweep(torch.Generator().manual_seed(0))
    after = float(problem.row_losses().sum())
    assert decrease > 0 and before - after == pytest.approx(decrease, rel=1e-3)
    assert is_24_sparse(problem.core)
    assert problem.sweep(torch.Generator().manual_seed(1)) >= 0
    assert float(problem.row_losses().sum()) <= after * (1 + 1e-6)


def test_full_sweep_of_one_group_matches_brute_force():
    """With A = I the rows do not interact: sweeping group 0 alone gives every row the best of the
    6 patterns with its 2 kept values solved by least squares on the explicit output error."""
    problem = full_problem(d_outs=(8,), d_in=16, block_size=8)
    problem.a = identity_blocks(8, 8)
    g = hessian_sqrt(problem)
    dense_b = torch.block_diag(*problem.b[0].double().unbind(0))
    expected = []
    for i in range(8):
        rest = problem.core[i].double().clone()
        rest[:4] = 0
        target = (problem.target[i].double() - rest @ dense_b) @ g
        best = float("inf")
        for pattern in itertools.combinations(range(4), 2):
            design = torch.stack([dense_b[p] @ g for p in pattern], 1)
            values = torch.linalg.lstsq(design, target).solution
            best = min(best, float((design @ values - target).square().sum()))
        expected.append(min(best, float(problem.row_losses()[i])))
    problem.sweep(groups=[0])
    torch.testing.assert_close(problem.row_losses(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert is_24_sparse(problem.core)
