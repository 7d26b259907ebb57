"""The plain 2:4 methods and the properties every method shares (2:4 cores, wrapper shapes)."""

from __future__ import annotations

import pytest
import torch

from armor_vllm.core.factorization import identity_blocks, is_24_sparse, reconstruct
from armor_vllm.offline.methods import METHODS, get_method
from armor_vllm.offline.methods.base import InputStats
from armor_vllm.offline.methods.nowag import NoWag
from armor_vllm.offline.methods.sparsegpt import sparsegpt_prune
from armor_vllm.offline.objective import normalise, proxy_loss, relative_proxy_loss


def random_problem(d_outs=(32, 16), d_in=64, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) * (0.2 + 3 * torch.rand(d_in, generator=g))
    x64 = x.double()
    stats = InputStats(sq=x64.square().sum(0), n_tokens=tokens, xtx=x64.T @ x64)
    weights = {f"w{i}": torch.randn(d, d_in, generator=g) for i, d in enumerate(d_outs)}
    return weights, stats, x


def test_registry_has_all_methods():
    assert {"magnitude", "wanda", "sparsegpt", "nowag", "armor"} <= set(METHODS)
    assert get_method("armor").uses_wrappers and get_method("sparsegpt").needs_full_hessian


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_returns_24_layers(name):
    weights, stats, _ = random_problem()
    options = {"preset": "quick", "iterations": 1} if name == "armor" else {}
    results = get_method(name)(block_size=16, **options).compress(weights, stats)
    assert set(results) == set(weights)
    for key, result in results.items():
        layer, (d_out, d_in) = result.layer, weights[key].shape
        assert layer.core.shape == (d_out, d_in) and is_24_sparse(layer.core)
        assert layer.wrapper_out.shape == (d_out // 16, 16, 16)
        assert layer.wrapper_in.shape == (d_in // 16, 16, 16)
        if not get_method(name).uses_wrappers:
            assert torch.equal(layer.wrapper_out, identity_blocks(d_out, 16))
            assert torch.equal(layer.wrapper_in, identity_blocks(d_in, 16))
        # every group keeps 2 (a pruned weight that happens to be 0 is the only exception)
        assert int((layer.core != 0).sum()) > 0.49 * d_out * d_in


def test_nowag_mask_is_the_best_plain_mask_of_its_loss():
    """With identity wrappers the proxy loss is the h-weighted mass of the pruned normalised
    weights, so NoWag-P's mask must beat every other 2:4 mask, e.g. magnitude's and Wanda's."""
    weights, stats, _ = random_problem()
    h = stats.channel_importance()
    nowag = NoWag(block_size=16).compress(weights, stats)
    for other in ("magnitude", "wanda"):
        results = get_method(other)(block_size=16).compress(weights, stats)
        for key, w in weights.items():
            theirs = relative_proxy_loss(results[key].layer.core, w, h)
            assert nowag[key].metrics["loss_end"] <= theirs + 1e-12
    for key, w in weights.items():
        r = nowag[key]
        assert r.layer.core[r.layer.core != 0].equal(w[r.layer.core != 0])  # kept values are W's
        assert r.metrics["loss_end"] == pytest.approx(relative_proxy_loss(r.layer.core, w, h), rel=1e-9)
        w_n, _ = normalise(w)
        # a brute-force per-group check: the 2 pruned entries have the 2 lowest scores
        scores = (w_n.square() * h).reshape(w.shape[0], -1, 4)
        kept = (r.layer.core != 0).reshape(w.shape[0], -1, 4)
        assert bool(
            (scores.masked_fill(~kept, float("inf")).amin(-1) >= scores.masked_fill(kept, -float("inf")).amax(-1)).all()
        )


@pytest.mark.parametrize("pruned_column", [0, 5, 9])
def test_sparsegpt_obs_update_matches_least_squares(pruned_column):
    """Pruning one weight: SparseGPT's update of the later columns is the least-squares
    compensation ``min ||X (w' - w)||`` with w'_p = 0 and the earlier columns frozen (all columns
    free when p = 0). Blocks of 4 columns exercise the lazy cross-block update."""
    g = torch.Generator().manual_seed(1)
    d_in, tokens = 12, 40
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(3, d_in, generator=g)
    hessian = (2.0 / tokens) * x.T @ x
    keep = torch.ones(3, d_in, dtype=torch.bool)
    keep[:, pruned_column] = False
    pruned, _ = sparsegpt_prune(w, hessian, damp=0.0, block_columns=4, keep_mask=keep)

    later = x[:, pruned_column + 1 :]
    target = (w.double() @ x.T).T - x[:, :pruned_column] @ w.double()[:, :pruned_column].T  # (tokens, 3)
    free = torch.linalg.lstsq(later, target).solution.T  # (3, d_in - p - 1)
    expected = w.double().clone()
    expected[:, pruned_column] = 0
    expected[:, pruned_column + 1 :] = free
    torch.testing.assert_close(pruned.double(), expected, rtol=1e-4, atol=1e-4)


def test_sparsegpt_beats_wanda_on_its_own_loss():
    """On correlated inputs OBS compensation must lower the Hessian loss well below Wanda's."""
    weights, stats, _ = random_problem(d_outs=(32,), d_in=64)
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats.xtx = mix.T @ stats.xtx @ mix + stats.xtx
    sgpt = get_method("sparsegpt")(block_size=16).compress(weights, stats)["w0"]
    wanda = get_method("wanda")(block_size=16).compress(weights, stats)["w0"]
    hessian, w = stats.hessian(), weights["w0"].double()

    def hessian_loss(core):
        d = core.double() - w
        return float(torch.einsum("ij,jk,ik->", d, hessian, d) / torch.einsum("ij,jk,ik->", w, hessian, w))

    assert sgpt.metrics["hessian_loss"] == pytest.approx(hessian_loss(sgpt.layer.core), rel=1e-6)
    assert hessian_loss(sgpt.layer.core) < 0.8 * hessian_loss(wanda.layer.core)


def test_proxy_loss_is_relative():
    weights, stats, _ = random_problem(d_outs=(16,))
    w_n, _ = normalise(weights["w0"])
    h = stats.channel_importance()
    assert proxy_loss(torch.zeros_like(w_n), w_n, h) == pytest.approx(1.0)
    assert proxy_loss(w_n, w_n, h) == 0.0
    layer = NoWag(block_size=16).compress(weights, stats)["w0"].layer
    recon = reconstruct(layer.wrapper_out, layer.core, layer.wrapper_in)
    assert torch.equal(recon, layer.core)
