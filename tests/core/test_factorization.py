"""The shared maths against explicit dense matrices."""

import pytest
import torch

from armor_vllm.core import factorization as fz


def random_blocks(dim, bs, gen):
    return torch.eye(bs).expand(dim // bs, bs, bs) + 0.3 * torch.randn(dim // bs, bs, bs, generator=gen)


def random_24(rows, cols, gen):
    w = torch.randn(rows, cols, generator=gen)
    return w * fz.mask_from_scores(torch.rand(rows, cols, generator=gen))


def test_block_diag_products_match_dense():
    gen = torch.Generator().manual_seed(0)
    blocks = random_blocks(64, 16, gen)
    dense = fz.block_diag_to_dense(blocks)
    assert dense.shape == (64, 64)
    assert torch.count_nonzero(dense[:16, 16:]) == 0
    x = torch.randn(3, 5, 64, generator=gen)
    torch.testing.assert_close(fz.apply_block_diag(x, blocks), x @ dense.T)
    m = torch.randn(64, 40, generator=gen)
    torch.testing.assert_close(fz.left_block_diag(blocks, m), dense @ m)
    m2 = torch.randn(40, 64, generator=gen)
    torch.testing.assert_close(fz.right_block_diag(m2, blocks), m2 @ dense)


def test_reconstruct_and_factored_linear_match_dense_product():
    gen = torch.Generator().manual_seed(1)
    a, b = random_blocks(48, 16, gen), random_blocks(64, 16, gen)
    core = random_24(48, 64, gen)
    bias = torch.randn(48, generator=gen)
    expect = fz.block_diag_to_dense(a) @ core @ fz.block_diag_to_dense(b)
    torch.testing.assert_close(fz.reconstruct(a, core, b), expect)
    x = torch.randn(7, 64, generator=gen)
    torch.testing.assert_close(fz.factored_linear(x, a, core, b, bias), x @ expect.T + bias, rtol=1e-4, atol=1e-4)


def test_mask_from_scores_keeps_top_two_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 1.0]])
    mask = fz.mask_from_scores(scores)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of 4"):
        fz.mask_from_scores(torch.ones(2, 6))


def test_24_checks_and_kept_mask():
    core = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert fz.is_24_sparse(core)
    kept = fz.kept_mask(core)
    assert kept.sum().item() == 4 and bool(kept[core != 0].all())
    bad = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not fz.is_24_sparse(bad)
    assert fz.first_24_violation(bad) == (0, 0)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        fz.kept_mask(bad)


def test_block_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        fz.identity_blocks(60, 32)
