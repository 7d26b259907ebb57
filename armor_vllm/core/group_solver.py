"""The 2:4 group solver: the best 2-of-4 values of one group of 4 weights under a quadratic loss.

For a group whose loss is ``f(s) = s^T Q s + 2 s^T p`` (everything else fixed), each of the 6 ways to
keep 2 of 4 is a 2x2 least squares with a closed-form solution; the best pattern replaces the current
one only where it lowers ``f`` (so a step never increases the loss). Both ARMOR objectives
(``offline/methods/armor/diag.py`` and ``full.py``) use it for their discrete steps. Pure torch.
"""

from __future__ import annotations

import torch

from armor_vllm.core.factorization import GROUP

# The 6 ways to keep 2 of 4: first and second kept position of each pattern, and one-hot selectors
# (as matmuls they are much cheaper than fancy indexing in the hot loop).
PATTERN_FIRST = torch.tensor([0, 0, 0, 1, 1, 2])
PATTERN_SECOND = torch.tensor([1, 2, 3, 2, 3, 3])
_PICK_FIRST = torch.nn.functional.one_hot(PATTERN_FIRST, GROUP).T.double()  # (4, 6)
_PICK_SECOND = torch.nn.functional.one_hot(PATTERN_SECOND, GROUP).T.double()
_PICK_AA = torch.einsum("ip,jp->ijp", _PICK_FIRST, _PICK_FIRST).reshape(GROUP * GROUP, 6)
_PICK_AB = torch.einsum("ip,jp->ijp", _PICK_FIRST, _PICK_SECOND).reshape(GROUP * GROUP, 6)
_PICK_BB = torch.einsum("ip,jp->ijp", _PICK_SECOND, _PICK_SECOND).reshape(GROUP * GROUP, 6)


def best_group_values(
    quad: torch.Tensor, lin: torch.Tensor, current: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best 2:4 group values under ``f(s) = s^T Q s + 2 s^T p`` (batched over leading dims).

    ``quad`` (..., 4, 4) is ``Q``, ``lin`` (..., 4) is ``p``, ``current`` (..., 4) the current values
    (a 2:4 pattern). For each of the 6 patterns the 2x2 system ``(Q_PP + lambda I) s_P = -p_P`` is
    solved in closed form (``lambda = damping * trace(Q)/4``); the exact ``f`` of each solution is
    compared with ``f(current)``, and the winner is returned with its decrease (``>= 0``): the
    current values are kept where no pattern improves on them."""
    quad = quad.to(torch.float64)
    lin = lin.to(torch.float64)
    cur = current.to(torch.float64)
    pick_first, pick_second, pick_aa, pick_ab, pick_bb = (
        t.to(quad.device) for t in (_PICK_FIRST, _PICK_SECOND, _PICK_AA, _PICK_AB, _PICK_BB)
    )
    flat = quad.reshape(*quad.shape[:-2], GROUP * GROUP)
    q_aa, q_ab, q_bb = flat @ pick_aa, flat @ pick_ab, flat @ pick_bb  # (..., 6)
    p_a, p_b = lin @ pick_first, lin @ pick_second
    lam = damping * (q_aa + q_bb).sum(-1, keepdim=True) / (3 * GROUP) + 1e-30  # damping * trace(Q) / 4
    det = (q_aa + lam) * (q_bb + lam) - q_ab * q_ab
    s_a = -((q_bb + lam) * p_a - q_ab * p_b) / det
    s_b = -((q_aa + lam) * p_b - q_ab * p_a) / det
    value = q_aa * s_a * s_a + 2 * q_ab * s_a * s_b + q_bb * s_b * s_b + 2 * (p_a * s_a + p_b * s_b)
    value = torch.where(torch.isfinite(value), value, torch.full_like(value, float("inf")))
    best_value, best = value.min(-1)
    current_value = ((quad @ cur.unsqueeze(-1)).squeeze(-1) * cur).sum(-1) + 2 * (cur * lin).sum(-1)
    improve = best_value < current_value
    chosen = torch.nn.functional.one_hot(best, 6).to(torch.float64)
    new = (chosen * s_a) @ pick_first.T + (chosen * s_b) @ pick_second.T
    new = torch.where(improve.unsqueeze(-1), new, cur)
    decrease = torch.where(improve, current_value - best_value, torch.zeros_like(best_value))
    return new.to(current.dtype), decrease
