"""ARMOR (Liu et al., arXiv 2510.05528): ``W ≈ A · S · B`` with a 2:4 core ``S`` and block-diagonal
wrappers ``A`` (outputs) and ``B`` (inputs). Two objectives (option ``objective``):

* ``full`` (the default, ``armor_full.py``): the layer's output error ``tr(E H E^T)`` with the full,
  SparseGPT-damped ``H = X^T X``, starting from a SparseGPT pruning (option ``init``);
* ``diag`` (the paper's, this module): block coordinate descent on the NoWag proxy loss
``L = sum_ij h_j (A S B - W_n)_ij^2 / sum_ij h_j W_n_ij^2`` of the normalised weight ``W_n``
(``armor_vllm.offline.objective``), starting from NoWag-P (``A = B = I``).

Why it is fast: every coordinate block has an exact minimiser that costs a few batched matmuls.

* ``A`` (``S``, ``B`` fixed): row block ``k`` of the output only depends on ``A_k``, and the loss is an
  ``h``-weighted least squares ``A_k = (W_k D M_k^T)(M_k D M_k^T)^-1`` with ``M = S B``, ``D = diag(h)``.
* ``B`` (``A``, ``S`` fixed): each column ``j`` of a block ``B_l`` is an independent ordinary least
  squares in ``N_l = (A S)[:, block l]`` (its weight ``h_j`` is a common factor):
  ``B_l = (N_l^T N_l)^-1 N_l^T W_l``.
* kept values of ``S`` (mask fixed): every (row block, column block) tile is an independent quadratic;
  a few steps of tile-wise, Jacobi-preconditioned conjugate gradients (monotone from the start point).
* the discrete step: for a group of 4 weights of one row of a tile, the loss is a quadratic in the 4
  values, ``s^T Q s + 2 s^T p``. For each of the 6 two-of-four patterns the 2x2 system is solved in
  closed form; the best pattern replaces the current one only if it lowers the exact loss. Tiles do
  not interact, so one group per tile is updated at once (vectorised over tiles); a *sweep* visits
  every group position of the tile in turn (Gauss-Seidel), instead of sampling one group per step.

Matrices compressed in one call share their input statistics and their ``d_in``; they are stacked
along the outputs so that each step handles all of them at once (q/k/v or gate/up together). The best
iterate of each matrix is kept, so its final loss is never above its NoWag-P start. The returned
layer folds the normalisation in: ``A <- diag(r) A``, ``B <- B diag(c)``, so ``reconstruct(A, S, B)``
approximates the original ``W``.

Presets and the method class that dispatches between the two objectives: ``armor/__init__.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from armor_vllm.core.factorization import (
    GROUP,
    identity_blocks,
    left_block_diag,
    right_block_diag,
    stacked_row_slices,
)
from armor_vllm.core.group_solver import (  # noqa: F401
    _PICK_AA,
    _PICK_AB,
    _PICK_BB,
    _PICK_FIRST,
    _PICK_SECOND,
    PATTERN_FIRST,
    PATTERN_SECOND,
    best_group_values,
)
from armor_vllm.offline.methods.nowag import nowag_mask
from armor_vllm.offline.objective import loss_scale


@dataclass(frozen=True)
class Schedule:
    """How long and with what ARMOR optimises (see the module docstring for the presets)."""

    solver: str = "alternating"  # "alternating" (closed-form blocks + sweeps) or "adam" (reference)
    iterations: int = 16
    cg_steps: int = 4
    sweeps: int = 1
    polish: bool = True  # a last A, B, CG round after the final sweep
    lr: float = 1e-4
    patience: int = 100
    rtol: float = 1e-6
    damping: float = 1e-6
    max_seconds: float | None = None  # wall-time limit on the optimisation (best iterate kept)


class ArmorProblem:
    """The state of ARMOR for matrices sharing ``d_in`` and ``h``, stacked along the outputs.

    ``a`` (n_row_blocks, bs, bs) and ``core`` (rows, d_in) are stacked; ``b`` is (n_mat, n_col_blocks,
    bs, bs), one wrapper per matrix; ``mask`` the 2:4 mask of ``core``. All in the normalised space."""

    def __init__(
        self,
        targets: list[torch.Tensor],
        h: torch.Tensor,
        block_size: int,
        damping: float = 1e-6,
        init_cores: list[torch.Tensor] | None = None,
    ):
        device = targets[0].device
        self.bs = block_size
        self.h = h.to(device=device, dtype=torch.float32)
        self.damping = damping
        self.target = torch.cat(targets).to(torch.float32)
        rows, d_in = self.target.shape
        self.n_rb, self.n_cb = rows // block_size, d_in // block_size
        self.slices = stacked_row_slices(targets)
        self.matrix_of_row_block = torch.cat(
            [torch.full((t.shape[0] // block_size,), m, dtype=torch.long, device=device) for m, t in enumerate(targets)]
        )
        self.scales = torch.stack([loss_scale(t.to(torch.float64), self.h.double()) for t in targets])
        if init_cores is None:  # NoWag-P: the best plain 2:4 core of this loss
            self.mask = nowag_mask(self.target, self.h)
            self.core = self.target * self.mask
        else:  # another pruning (normalised like the targets), its zeros pruned
            self.core = torch.cat(init_cores).to(device=device, dtype=torch.float32)
            self.mask = self.core != 0
        self.a = identity_blocks(rows, block_size, device=device)
        self.b = identity_blocks(d_in, block_size, device=device).expand(len(targets), -1, -1, -1).clone()
        self.weighted_target = self.target * self.h
        self.iterations_run = 0  # rounds (alternating) or Adam iterations done by ``optimise``

    # ---- products -------------------------------------------------------------------------
    def times_b(self, m: torch.Tensor, b: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
        """``m @ B`` (or ``m @ B^T``) with each matrix's rows multiplied by its own ``B``."""
        b = self.b if b is None else b
        parts = [right_block_diag(m[s], b[i].transpose(1, 2) if transpose else b[i]) for i, s in enumerate(self.slices)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def reconstruct(self, a=None, core=None, b=None) -> torch.Tensor:
        a = self.a if a is None else a
        core = self.core if core is None else core
        return left_block_diag(a, self.times_b(core, b))

    def residual(self) -> torch.Tensor:
        return self.reconstruct() - self.target

    def losses(self, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Relative proxy loss of each matrix (float64)."""
        residual = self.residual() if residual is None else residual
        per_row = (residual.double().square() * self.h.double()).sum(1)
        return torch.stack([per_row[s].sum() for s in self.slices]) / self.scales

    # ---- closed-form continuous blocks ------------------------------------------------------
    def _solve_spd(self, gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``gram^-1 rhs`` for a batch of symmetric PSD ``gram``, relatively damped, in float64."""
        gram = gram.double()
        lam = self.damping * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1) + 1e-12
        gram = gram + lam[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram, rhs.double())

    def solve_a(self) -> None:
        """Exact ``h``-weighted least squares for every block of ``A``."""
        sb = self.times_b(self.core).reshape(self.n_rb, self.bs, -1)  # M_k
        gram = torch.bmm(sb * self.h, sb.transpose(1, 2))  # M_k D M_k^T
        cross = torch.bmm(sb, self.weighted_target.reshape(self.n_rb, self.bs, -1).transpose(1, 2))  # M_k D W_k^T
        self.a = self._solve_spd(gram, cross).transpose(1, 2).to(torch.float32).contiguous()

    def solve_b(self) -> None:
        """Exact least squares for every block of every ``B`` (columns are independent)."""
        a_core = left_block_diag(self.a, self.core)
        new_b = []
        for s in self.slices:
            n = a_core[s].reshape(-1, self.n_cb, self.bs).transpose(0, 1)  # (n_cb, rows, bs)
            w = self.target[s].reshape(-1, self.n_cb, self.bs).transpose(0, 1)
            new_b.append(self._solve_spd(torch.bmm(n.transpose(1, 2), n), torch.bmm(n.transpose(1, 2), w)))
        self.b = torch.stack(new_b).to(torch.float32)

    def _hessian_apply(self, direction: torch.Tensor) -> torch.Tensor:
        """``mask * A^T ((A P B) h) B^T``: the loss Hessian (halved) applied to a core direction."""
        out = self.reconstruct(core=direction) * self.h
        return left_block_diag(self.a.transpose(1, 2), self.times_b(out, transpose=True)) * self.mask

    def _tile_sum(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.n_rb, self.bs, self.n_cb, self.bs).sum((1, 3))

    def _scale_tiles(self, per_tile: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``m`` with every tile multiplied by its own scalar ``per_tile[k, l]``."""
        tiles = m.reshape(self.n_rb, self.bs, self.n_cb, self.bs)
        return (tiles * per_tile.reshape(self.n_rb, 1, self.n_cb, 1)).reshape(m.shape)

    def refine_core(self, steps: int) -> None:
        """Tile-wise preconditioned conjugate gradients on the kept values (mask fixed)."""
        if steps <= 0:
            return
        shape = self.core.shape
        diag_a = self.a.square().sum(1).reshape(-1)  # (A^T A)_ii
        b_sq = self.b.square() * self.h.reshape(self.n_cb, 1, self.bs)
        diag_b = torch.stack([b_sq[i].sum(-1).reshape(-1) for i in range(len(self.slices))])  # (B D B^T)_jj
        diag_b_rows = diag_b[self.matrix_of_row_block].repeat_interleave(self.bs, 0)
        precond = (diag_a[:, None] * diag_b_rows).clamp_min(1e-30).reciprocal() * self.mask
        rhs = left_block_diag(self.a.transpose(1, 2), self.times_b(self.weighted_target, transpose=True)) * self.mask
        res = rhs - self._hessian_apply(self.core)
        z = res * precond
        direction = z
        rz = self._tile_sum(res * z)
        for _ in range(steps):
            hd = self._hessian_apply(direction)
            curv = self._tile_sum(direction * hd)
            alpha = torch.where(curv > 0, rz / curv.clamp_min(1e-30), torch.zeros_like(rz))
            self.core = self.core + self._scale_tiles(alpha, direction)
            res = res - self._scale_tiles(alpha, hd)
            z = res * precond
            rz_new = self._tile_sum(res * z)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
            direction = z + self._scale_tiles(beta, direction)
            rz = rz_new
        self.core = (self.core * self.mask).reshape(shape)

    # ---- discrete step ----------------------------------------------------------------------
    def group_step(self, residual: torch.Tensor, row: torch.Tensor, group: torch.Tensor, b_rows=None) -> torch.Tensor:
        """Update one group per tile: in tile ``(k, l)`` row ``row[k, l]`` and the 4 columns starting at
        ``4 * group[k, l]`` of the tile. Updates ``core``, ``mask`` and ``residual`` in place and
        returns the loss decrease of every tile (unnormalised)."""
        bs, n_rb, n_cb = self.bs, self.n_rb, self.n_cb
        device = self.core.device
        k = torch.arange(n_rb, device=device)[:, None].expand(n_rb, n_cb)
        l = torch.arange(n_cb, device=device)[None, :].expand(n_rb, n_cb)
        cols = (GROUP * group)[..., None] + torch.arange(GROUP, device=device)  # (n_rb, n_cb, 4), inside the tile
        if b_rows is None:
            b_rows = self.b[self.matrix_of_row_block]  # (n_rb, n_cb, bs, bs)
        b_group = b_rows[k[..., None], l[..., None], cols]  # (n_rb, n_cb, 4, bs): rows of B_l
        a_col = self.a.transpose(1, 2)[k, row]  # (n_rb, n_cb, bs): column `row` of A_k
        res4 = residual.view(n_rb, bs, n_cb, bs)
        core4 = self.core.view(n_rb, bs, n_cb, bs)
        mask4 = self.mask.view(n_rb, bs, n_cb, bs)
        h_tile = self.h.reshape(n_cb, 1, bs)
        hb_group = b_group * h_tile  # B_g D
        quad = torch.einsum("klgd,klhd->klgh", hb_group, b_group) * a_col.square().sum(-1)[..., None, None]
        a_res = torch.einsum("klb,kbld->kld", a_col, res4)  # a^T R on the tile
        index = (k[..., None], row[..., None], l[..., None], cols)
        old = core4[index]  # (n_rb, n_cb, 4)
        lin = torch.einsum("klgd,kld->klg", hb_group, a_res) - torch.einsum("klgh,klh->klg", quad, old)
        new, decrease = best_group_values(quad, lin, old, self.damping)
        delta = new - old
        core4[index] = new
        mask4[index] = new != 0
        change = torch.einsum("klg,klgd->kld", delta, b_group)
        res4 += torch.einsum("klb,kld->kbld", a_col, change)
        return decrease

    def sweep_order(self, generator: torch.Generator) -> list[tuple[int, list[int]]]:
        """A random visiting order: tile rows in random order, each with its groups in random order."""
        groups_per_row = self.bs // GROUP
        return [
            (int(r), torch.randperm(groups_per_row, generator=generator).tolist())
            for r in torch.randperm(self.bs, generator=generator)
        ]

    def sweep(self, order: list[tuple[int, list[int]]], rows_per_flush: int = 8) -> None:
        """Gauss-Seidel over every group position of the tiles (``order``: (tile row, [groups]) pairs),
        one group per tile per step, all tiles at once.

        Equivalent to calling ``group_step`` for each position, but cheaper: only ``P = A^T R`` (per
        row block) is needed, and changes of the core in tile row ``r`` move it by the rank-one
        ``(A_k^T A_k)[:, r] x change``; those updates are applied lazily every ``rows_per_flush``
        rows, the pending ones being added to the single row of ``P`` a step reads."""
        bs, n_rb, n_cb = self.bs, self.n_rb, self.n_cb
        d_in = n_cb * bs
        proj = left_block_diag(self.a.transpose(1, 2), self.residual()).view(n_rb, bs, d_in)
        gram_a = torch.bmm(self.a.transpose(1, 2), self.a)  # A_k^T A_k
        b_rows = self.b[self.matrix_of_row_block]  # (n_rb, n_cb, bs, bs)
        hb_rows = b_rows * self.h.reshape(n_cb, 1, bs)
        # 4x4 diagonal blocks of B_l D B_l^T, per group position: (n_rb, n_cb, bs/4, 4, 4)
        gb = torch.einsum("klgd,klhd->klgh", hb_rows, b_rows).reshape(
            n_rb, n_cb, bs // GROUP, GROUP, bs // GROUP, GROUP
        )
        gb_diag = torch.diagonal(gb, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)
        core4 = self.core.view(n_rb, bs, n_cb, bs)
        mask4 = self.mask.view(n_rb, bs, n_cb, bs)
        for chunk_start in range(0, len(order), rows_per_flush):
            chunk = order[chunk_start : chunk_start + rows_per_flush]
            rows = torch.tensor([r for r, _ in chunk], device=self.core.device)
            pending = torch.zeros(n_rb, len(chunk), d_in, device=self.core.device)
            for i, (r, groups) in enumerate(chunk):
                coupling = gram_a[:, r, rows[: i + 1]].unsqueeze(1)  # (n_rb, 1, i+1)
                for c in groups:
                    cols = slice(GROUP * c, GROUP * c + GROUP)
                    u = torch.baddbmm(proj[:, r : r + 1, :], coupling, pending[:, : i + 1]).view(n_rb, n_cb, bs)
                    b_group, hb_group = b_rows[:, :, cols], hb_rows[:, :, cols]
                    quad = gb_diag[:, :, c] * gram_a[:, r, r].reshape(n_rb, 1, 1, 1)
                    old = core4[:, r, :, cols].clone()
                    lin = (hb_group * u.unsqueeze(2)).sum(-1) - (quad * old.unsqueeze(2)).sum(-1)
                    new, _ = best_group_values(quad, lin, old, self.damping)
                    core4[:, r, :, cols] = new
                    mask4[:, r, :, cols] = new != 0
                    change = ((new - old).unsqueeze(-1) * b_group).sum(2)
                    pending[:, i] += change.reshape(n_rb, d_in)
            proj += torch.bmm(gram_a[:, :, rows], pending)

    def sampled_step(self, generator: torch.Generator) -> None:
        """The reference's discrete step: one group per tile, sampled with probability proportional
        to the L1 norm of the loss gradient on the group."""
        residual = self.residual()
        grad = left_block_diag(self.a.transpose(1, 2), self.times_b(residual * self.h, transpose=True))
        per_group = grad.abs().reshape(self.n_rb, self.bs, self.n_cb, self.bs // GROUP, GROUP).sum(-1)
        weights = per_group.permute(0, 2, 1, 3).reshape(self.n_rb * self.n_cb, -1) + 1e-30
        pick = torch.multinomial(weights.cpu(), 1, generator=generator).to(weights.device).reshape(self.n_rb, self.n_cb)
        self.group_step(residual, pick // (self.bs // GROUP), pick % (self.bs // GROUP))

    # ---- the reference's continuous step ------------------------------------------------------
    def adam_loss(self, a, core_values, b) -> torch.Tensor:
        residual = self.reconstruct(a, core_values * self.mask, b) - self.target
        per_row = (residual.square() * self.h).sum(1)
        return sum(per_row[s].sum() / self.scales[i].float() for i, s in enumerate(self.slices))

    # ---- best iterate -----------------------------------------------------------------------
    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return self.a.clone(), self.core.clone(), self.mask.clone(), self.b.clone()

    def copy_matrices(self, source, target, which: list[int]) -> None:
        """Copy the state of the matrices ``which`` from ``source`` to ``target`` (snapshots)."""
        for m in which:
            s = self.slices[m]
            blocks = slice(s.start // self.bs, s.stop // self.bs)
            for src, dst, part in zip(source, target, (blocks, s, s, m)):
                dst[part] = src[part]

    def restore_matrices(self, state, which: list[int]) -> None:
        """Put back the snapshot ``state`` for the matrices ``which``."""
        self.copy_matrices(state, (self.a, self.core, self.mask, self.b), which)


def optimise(problem: ArmorProblem, schedule: Schedule, seed: int = 0, progress: bool = False, trace=None):
    """Run ``schedule`` on ``problem``; leaves the best iterate of every matrix in it.

    ``trace`` (optional list) receives ``(seconds, losses)`` after every round / logged iteration."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    best_loss = problem.losses()
    best = problem.snapshot()
    if trace is not None:
        trace.append((0.0, best_loss.tolist()))

    def keep_best(losses):
        nonlocal best
        worse = [m for m in range(len(problem.slices)) if losses[m] > best_loss[m]]
        best_loss.copy_(torch.minimum(best_loss, losses))
        problem.restore_matrices(best, worse)  # continue from the best iterate of those matrices
        best = problem.snapshot()

    if schedule.solver == "alternating":
        rounds = tqdm(range(schedule.iterations), desc="armor", leave=False, disable=not progress)
        for _ in rounds:
            if schedule.max_seconds is not None and time.perf_counter() - start > schedule.max_seconds:
                break
            problem.solve_a()
            problem.solve_b()
            problem.refine_core(schedule.cg_steps)
            for _ in range(schedule.sweeps):
                problem.sweep(problem.sweep_order(generator))
            problem.iterations_run += 1
            losses = problem.losses()
            keep_best(losses)
            if trace is not None:
                trace.append((time.perf_counter() - start, problem.losses().tolist()))
        if schedule.polish:
            problem.solve_a()
            problem.solve_b()
            problem.refine_core(schedule.cg_steps)
            keep_best(problem.losses())
            if trace is not None:
                trace.append((time.perf_counter() - start, problem.losses().tolist()))
    elif schedule.solver == "adam":
        best_loss = _optimise_adam(problem, schedule, generator, start, best_loss, best, progress, trace)
    else:
        raise ValueError(f"unknown ARMOR solver {schedule.solver!r}")
    return best_loss


def _optimise_adam(problem, schedule, generator, start, best_loss, best, progress, trace, log_every=25):
    """The reference schedule: per iteration one Adam step on A, B, kept S values, one sampled
    discrete step; early stop on ``patience`` iterations without relative improvement ``rtol``.
    Ends with the best iterate of every matrix in ``problem``; returns their losses."""
    a = problem.a.clone().requires_grad_(True)
    b = problem.b.clone().requires_grad_(True)
    core = problem.core.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([a, core, b], lr=schedule.lr)
    previous = float(problem.losses().sum())
    patience = schedule.patience
    bar = tqdm(range(schedule.iterations), desc="armor-adam", leave=False, disable=not progress)
    for it in bar:
        if schedule.max_seconds is not None and time.perf_counter() - start > schedule.max_seconds:
            break
        optimizer.zero_grad()
        problem.iterations_run += 1
        problem.adam_loss(a, core, b).backward()
        optimizer.step()
        with torch.no_grad():
            problem.a, problem.b, problem.core = a.detach().clone(), b.detach().clone(), (core * problem.mask).detach()
            problem.sampled_step(generator)
            core.copy_(problem.core)  # the discrete step rewrites values and mask
            losses = problem.losses()
            improved = [m for m in range(len(problem.slices)) if losses[m] < best_loss[m]]
            if improved:  # remember the best iterate of each matrix (Adam is not monotone)
                problem.copy_matrices(problem.snapshot(), best, improved)
                best_loss[improved] = losses[improved]
            current = float(losses.sum())
            if current > (1 - schedule.rtol) * previous:
                patience -= 1
                if patience == 0:
                    break
            else:
                patience = schedule.patience
            previous = current
            if trace is not None and (it % log_every == log_every - 1 or it < 10):
                trace.append((time.perf_counter() - start, losses.tolist()))
    problem.restore_matrices(best, list(range(len(problem.slices))))
    losses = problem.losses()
    if trace is not None:
        trace.append((time.perf_counter() - start, losses.tolist()))
    return losses
