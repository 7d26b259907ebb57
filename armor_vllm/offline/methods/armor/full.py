"""ARMOR on the layer's output error: ``min tr(E H E^T)``, ``E = A S B - W``, ``H = X^T X`` damped as
SparseGPT damps it (``sparsegpt.damped_hessian``), for a 2:4 core ``S`` and block-diagonal ``A``, ``B``.

Unlike the NoWag proxy (``armor.py``, which sees only ``diag(H)`` on a normalised weight), this is the
squared error of the layer's outputs on the calibration inputs, in the original weight space, so the
input correlations that SparseGPT exploits are seen too. Every coordinate block has an exact or
monotone update, vectorised over blocks:

* ``A`` (rows of different output blocks are independent): ``A_k = (W_k H M_k^T)(M_k H M_k^T)^-1``,
  ``M = S B``; one closed-form block least squares.
* ``B``: its column blocks are coupled through the off-diagonal blocks of ``H``. Either conjugate
  gradients on the joint problem, preconditioned by the exact diagonal-block inverse
  ``(N_l^T N_l)^-1 C (H_ll)^-1`` (``N = A S``), or exact block solves in Gauss-Seidel order
  (``b_solver``). Both are monotone from the current ``B``.
* kept values of ``S`` (mask fixed): a quadratic ``tr(G_A S F S^T) - 2 tr(S^T A^T W H B^T)`` with
  ``G_A = A^T A`` (block-diagonal) and the effective Hessian ``F = B H B^T``; output row blocks are
  independent, so preconditioned CG runs on every row block at once.
* the discrete step (``discrete_every`` > 0; off by default: it measured less gain per second than
  more continuous rounds), under the effective Hessian ``F = B H B^T``, either
  ``sweep``: Gauss-Seidel over the 2:4 groups, each row choosing the best of the 6 patterns with the
  rest of its error in the linear term (an exact decrease per output block), or
  ``repick``: the unconstrained optimum ``S* = G_A^-1 A^T W H B^T F^-1`` re-pruned by SparseGPT under
  ``F`` (each pruned weight compensated on the later columns of its row), every output row block
  keeping whichever of its new and current core gives the lower exact loss.

The best iterate of every matrix is kept, so the result is never worse than the start (the ``init``
pruning: SparseGPT, NoWag-P or Wanda, with ``A = B = I``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from armor_vllm.core.factorization import (
    identity_blocks,
    left_block_diag,
    right_block_diag,
    stacked_row_slices,
)
from armor_vllm.offline.methods.sparsegpt import sparsegpt_prune

B_SOLVERS = ("cg", "gauss-seidel")


@dataclass(frozen=True)
class FullSchedule:
    """Rounds of (A, B, CG on S, discrete step); see the module docstring."""

    iterations: int = 8
    b_solver: str = "cg"
    b_steps: int = 4  # CG steps, or Gauss-Seidel sweeps, per B update
    cg_steps: int = 8  # CG steps on the kept values per round
    discrete_every: int = 0  # the discrete step every N rounds (0: never)
    repick_polish: int = 8  # CG steps on a re-picked core's values before it is compared
    discrete: str = "sweep"  # "sweep" (exact local Gauss-Seidel over groups) or "repick" (SparseGPT under F)
    damping: float = 1e-6  # relative damping of the small solves
    max_seconds: float | None = None


def _block_diag_part(left: torch.Tensor, right: torch.Tensor, bs: int) -> torch.Tensor:
    """The diagonal ``bs x bs`` blocks of ``left^T right`` (both ``rows x d``): ``(d/bs, bs, bs)``."""
    rows, d = left.shape
    lb = left.reshape(rows, d // bs, bs).permute(1, 2, 0)
    rb = right.reshape(rows, d // bs, bs).transpose(0, 1)
    return torch.bmm(lb, rb)


def _spd_solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``gram^-1 rhs`` for batched symmetric PSD ``gram`` (relative damping), in float64."""
    gram = gram.double()
    lam = damping * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).abs() + 1e-12
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam[..., None, None] * eye, rhs.double())


def _spd_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    return _spd_solve(gram, eye.expand_as(gram), damping)


class FullArmorProblem:
    """ARMOR state for matrices sharing ``H`` (and ``d_in``), stacked along the outputs; ``a`` and
    ``core`` stacked, ``b`` one wrapper per matrix. ``hessian`` is the damped ``H`` (float64)."""

    def __init__(
        self,
        targets: list[torch.Tensor],
        hessian: torch.Tensor,
        block_size: int,
        init_cores: list[torch.Tensor],
        damping: float = 1e-6,
    ):
        device = targets[0].device
        self.bs = block_size
        self.damping = damping
        self.h = hessian.to(device=device, dtype=torch.float32)
        self.target = torch.cat(targets).to(torch.float32)
        self.core = torch.cat(init_cores).to(device=device, dtype=torch.float32)
        self.mask = self.core != 0
        rows, d_in = self.target.shape
        self.n_rb, self.n_cb = rows // block_size, d_in // block_size
        self.slices = stacked_row_slices(targets)
        self.wh = self.target @ self.h  # W H, constant
        self.scales = torch.stack([(self.wh[s].double() * self.target[s].double()).sum() for s in self.slices])
        self.a = identity_blocks(rows, block_size, device=device)
        self.b = identity_blocks(d_in, block_size, device=device).expand(len(targets), -1, -1, -1).clone()
        self.iterations_run = 0

    # ---- products and the loss ------------------------------------------------------------------
    def row_blocks(self, m: int) -> slice:
        s = self.slices[m]
        return slice(s.start // self.bs, s.stop // self.bs)

    def times_b(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x @ B`` (``x @ B^T``) with each matrix's rows multiplied by its own ``B``."""
        parts = [
            right_block_diag(x[s], self.b[i].transpose(1, 2) if transpose else self.b[i])
            for i, s in enumerate(self.slices)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def reconstruct(self, core: torch.Tensor | None = None) -> torch.Tensor:
        return left_block_diag(self.a, self.times_b(self.core if core is None else core))

    def row_losses(self, core: torch.Tensor | None = None) -> torch.Tensor:
        """``(E H E^T)_ii`` for every output row (float64)."""
        err = self.reconstruct(core) - self.target
        return ((err @ self.h).double() * err.double()).sum(1)

    def losses(self) -> torch.Tensor:
        """Relative output error of each matrix: ``tr(E H E^T) / tr(W H W^T)``."""
        per_row = self.row_losses()
        return torch.stack([per_row[s].sum() for s in self.slices]) / self.scales

    def effective_hessian(self, m: int) -> torch.Tensor:
        """``F = B_m H B_m^T`` (``d_in x d_in``)."""
        bh = left_block_diag(self.b[m], self.h)
        return right_block_diag(bh, self.b[m].transpose(1, 2))

    # ---- A ------------------------------------------------------------------------------------
    def solve_a(self) -> None:
        """Exact least squares for every output block: ``A_k = (W_k H M_k^T)(M_k H M_k^T)^-1``."""
        m = self.times_b(self.core)
        mh = (m @ self.h).reshape(self.n_rb, self.bs, -1)
        m = m.reshape(self.n_rb, self.bs, -1)
        gram = torch.bmm(mh, m.transpose(1, 2))  # M_k H M_k^T
        cross = torch.bmm(mh, self.target.reshape(self.n_rb, self.bs, -1).transpose(1, 2))  # M_k H W_k^T
        self.a = _spd_solve(gram, cross, self.damping).transpose(1, 2).to(torch.float32).contiguous()

    # ---- B ------------------------------------------------------------------------------------
    def solve_b(self, steps: int, solver: str = "cg") -> None:
        """Monotone update of every ``B`` on the joint (H-coupled) problem: CG or Gauss-Seidel."""
        if solver not in B_SOLVERS:
            raise ValueError(f"ARMOR b_solver {solver!r} is not one of {list(B_SOLVERS)}")
        for m, s in enumerate(self.slices):
            n = left_block_diag(self.a[self.row_blocks(m)], self.core[s])  # N = A S
            if solver == "cg":
                self.b[m] = self._b_cg(n, self.wh[s], self.b[m], steps)
            else:
                self.b[m] = self._b_gauss_seidel(n, self.target[s], self.b[m], steps)

    def _b_blocks_inverse(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ntn_inv = _spd_inverse(_block_diag_part(n, n, self.bs), self.damping).float()
        h_blocks = torch.stack(
            [self.h[l * self.bs : (l + 1) * self.bs, l * self.bs : (l + 1) * self.bs] for l in range(self.n_cb)]
        )
        return ntn_inv, _spd_inverse(h_blocks, self.damping).float()

    def _b_cg(self, n: torch.Tensor, wh: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
        bs = self.bs

        def apply(blocks):  # the Hessian (halved) of tr(E H E^T) in B, on block-diagonal directions
            return _block_diag_part(n, right_block_diag(n, blocks) @ self.h, bs)

        ntn_inv, h_inv = self._b_blocks_inverse(n)
        res = _block_diag_part(n, wh, bs) - apply(b)
        z = torch.bmm(torch.bmm(ntn_inv, res), h_inv)
        direction, rz = z, (res * z).sum()
        for _ in range(steps):
            hd = apply(direction)
            curv = (direction * hd).sum()
            if not bool(curv > 0):
                break
            alpha = rz / curv
            b = b + alpha * direction
            res = res - alpha * hd
            z = torch.bmm(torch.bmm(ntn_inv, res), h_inv)
            rz_new = (res * z).sum()
            direction = z + (rz_new / rz.clamp_min(1e-30)) * direction
            rz = rz_new
        return b

    def _b_gauss_seidel(self, n: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sweeps: int) -> torch.Tensor:
        """Exact block minimisation in turn: the block Hessian is ``N_l^T N_l (x) H_ll``, so the
        Newton step ``(N_l^T N_l)^-1 G_l (H_ll)^-1`` is the block's exact minimiser."""
        bs = self.bs
        b = b.clone()
        ntn_inv, h_inv = self._b_blocks_inverse(n)
        r = (right_block_diag(n, b) - w) @ self.h  # E H
        for _ in range(sweeps):
            for l in range(self.n_cb):
                cols = slice(l * bs, (l + 1) * bs)
                grad = n[:, cols].T @ r[:, cols]
                step = ntn_inv[l] @ grad @ h_inv[l]
                b[l] -= step
                r -= (n[:, cols] @ step) @ self.h[cols, :]
        return b

    # ---- kept values of S ----------------------------------------------------------------------
    def _core_terms(self):
        gram_a = torch.bmm(self.a.transpose(1, 2), self.a)  # (n_rb, bs, bs)
        f = [self.effective_hessian(m) for m in range(len(self.slices))]
        rhs = left_block_diag(self.a.transpose(1, 2), self.times_b(self.wh, transpose=True))  # A^T W H B^T
        return gram_a, f, rhs

    def _times_f(self, x: torch.Tensor, f: list[torch.Tensor]) -> torch.Tensor:
        parts = [x[s] @ f[m] for m, s in enumerate(self.slices)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def refine_core(self, steps: int) -> None:
        """Jacobi-preconditioned CG on the kept values, every output row block on its own."""
        if steps <= 0:
            return
        gram_a, f, rhs = self._core_terms()
        mask = self.mask.to(torch.float32)

        def apply(d):
            return left_block_diag(gram_a, self._times_f(d, f)) * mask

        diag_f = torch.cat([torch.diagonal(f[m]).expand(s.stop - s.start, -1) for m, s in enumerate(self.slices)])
        diag_a = torch.diagonal(gram_a, dim1=1, dim2=2).reshape(-1, 1)
        precond = (diag_a * diag_f).clamp_min(1e-30).reciprocal() * mask

        def block_sum(x):
            return x.reshape(self.n_rb, -1).sum(1)

        def per_block(v, x):
            return (x.reshape(self.n_rb, -1) * v[:, None]).reshape(x.shape)

        res = rhs * mask - apply(self.core)
        z = res * precond
        direction, rz = z, block_sum(res * z)
        for _ in range(steps):
            hd = apply(direction)
            curv = block_sum(direction * hd)
            alpha = torch.where(curv > 0, rz / curv.clamp_min(1e-30), torch.zeros_like(rz))
            self.core = self.core + per_block(alpha, direction)
            res = res - per_block(alpha, hd)
            z = res * precond
            rz_new = block_sum(res * z)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
            direction = z + per_block(beta, direction)
            rz = rz_new
        self.core = self.core * mask

    # ---- the discrete step ----------------------------------------------------------------------
    def repick(self, block_columns: int = 128, polish_steps: int = 0) -> int:
        """Re-prune the unconstrained optimum under ``F`` with SparseGPT (its kept values then
        polished by ``polish_steps`` CG steps) and keep, per output row block, the better of the new
        and the current core. Returns how many row blocks changed."""
        gram_a, f, rhs = self._core_terms()
        ga_inv = _spd_inverse(gram_a, self.damping).float()
        candidate = torch.empty_like(self.core)
        for m, s in enumerate(self.slices):
            f_inv = torch.cholesky_inverse(torch.linalg.cholesky(f[m].double() + self._ridge(f[m]))).float()
            unconstrained = left_block_diag(ga_inv[self.row_blocks(m)], rhs[s]) @ f_inv  # S*
            candidate[s], _ = sparsegpt_prune(unconstrained, f[m], damp=self.damping, block_columns=block_columns)
        before = self.row_losses().reshape(self.n_rb, self.bs).sum(1)
        if polish_steps:
            current = self.core, self.mask
            self.core, self.mask = candidate, candidate != 0
            self.refine_core(polish_steps)
            candidate, (self.core, self.mask) = self.core, current
        after = self.row_losses(candidate).reshape(self.n_rb, self.bs).sum(1)
        better = (after < before).repeat_interleave(self.bs)[:, None]
        self.core = torch.where(better, candidate, self.core)
        self.mask = torch.where(better, candidate != 0, self.mask)
        return int((after < before).sum())

    def sweep(self, generator: torch.Generator | None = None, groups: list[int] | None = None) -> float:
        """Gauss-Seidel over the 2:4 groups (columns ``J``, in random order), all rows at once: each
        row picks the best of the 6 patterns with everything else fixed (quadratic ``G_A[i,i] F_JJ``,
        linear term the gradient ``Psi = A^T E H B^T`` on ``J``, i.e. the rest of the row's error);
        rows of one output block interact through ``G_A``, so a block takes all its rows' picks only
        when their joint change lowers the loss, else only its single best row (an exact decrease).
        Returns the total loss decrease (unnormalised); never negative."""
        from armor_vllm.core.group_solver import best_group_values

        gram_a, f, rhs = self._core_terms()
        psi = left_block_diag(gram_a, self._times_f(self.core, f)) - rhs
        diag_a = torch.diagonal(gram_a, dim1=1, dim2=2).reshape(-1)
        order = torch.randperm(self.core.shape[1] // 4, generator=generator).tolist() if groups is None else groups
        total = 0.0
        for m, s in enumerate(self.slices):
            fm, ga = f[m], gram_a[self.row_blocks(m)]
            n_rb = ga.shape[0]
            for g in order:
                cols = slice(4 * g, 4 * g + 4)
                f_jj = fm[cols, cols]
                quad = diag_a[s, None, None] * f_jj
                old = self.core[s, cols]
                lin = psi[s, cols] - (quad @ old.unsqueeze(-1)).squeeze(-1)
                new, decrease = best_group_values(quad, lin, old, self.damping)
                delta = (new - old).to(torch.float32)
                ga_delta = left_block_diag(ga, delta)
                joint = (2 * delta * psi[s, cols] + (ga_delta @ f_jj) * delta).reshape(n_rb, -1).sum(1)
                ok = joint < 0
                if not bool(ok.all()):  # those blocks take their single best row only
                    dec = decrease.reshape(n_rb, self.bs)
                    best_row = torch.nn.functional.one_hot(dec.argmax(1), self.bs).bool() & (dec > 0)
                    keep_rows = torch.where(ok[:, None], torch.ones_like(best_row), best_row).reshape(-1, 1)
                    delta = delta * keep_rows
                    ga_delta = left_block_diag(ga, delta)
                    joint = (2 * delta * psi[s, cols] + (ga_delta @ f_jj) * delta).reshape(n_rb, -1).sum(1)
                new = old + delta
                self.core[s, cols] = torch.where(delta != 0, new, old)
                self.mask[s, cols] = self.core[s, cols] != 0
                psi[s] += ga_delta @ fm[cols, :]
                total -= float(joint.clamp_max(0).sum())
        return total

    def _ridge(self, f: torch.Tensor) -> torch.Tensor:
        lam = self.damping * torch.diagonal(f).double().mean() + 1e-12
        return lam * torch.eye(f.shape[0], dtype=torch.float64, device=f.device)

    # ---- best iterate -----------------------------------------------------------------------------
    def snapshot(self):
        return self.a.clone(), self.core.clone(), self.mask.clone(), self.b.clone()

    def restore_matrices(self, state, which: list[int]) -> None:
        for m in which:
            s, blocks = self.slices[m], self.row_blocks(m)
            for src, dst, part in zip(state, (self.a, self.core, self.mask, self.b), (blocks, s, s, m)):
                dst[part] = src[part]


def optimise_full(problem: FullArmorProblem, schedule: FullSchedule, progress: bool = False, trace=None, seed: int = 0):
    """Run ``schedule``; leaves the best iterate of every matrix in ``problem``, returns its losses.
    ``trace`` (optional list) receives ``(seconds, step, losses)`` after every update."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    best_loss = problem.losses()
    best = problem.snapshot()
    if trace is not None:
        trace.append((0.0, "start", best_loss.tolist()))

    def keep_best(step):
        nonlocal best
        if trace is None and step != "round":  # the loss once per round unless traced (it costs a step)
            return
        losses = problem.losses()
        if trace is not None:
            trace.append((time.perf_counter() - start, step, losses.tolist()))
        worse = [m for m in range(len(problem.slices)) if not bool(losses[m] <= best_loss[m])]
        best_loss.copy_(torch.where(losses <= best_loss, losses, best_loss))
        problem.restore_matrices(best, worse)
        best = problem.snapshot()

    for it in tqdm(range(schedule.iterations), desc="armor-full", leave=False, disable=not progress):
        if schedule.max_seconds is not None and time.perf_counter() - start > schedule.max_seconds:
            break
        problem.solve_a()
        keep_best("a")
        problem.solve_b(schedule.b_steps, schedule.b_solver)
        keep_best("b")
        problem.refine_core(schedule.cg_steps)
        keep_best("s")
        if schedule.discrete_every and it % schedule.discrete_every == schedule.discrete_every - 1:
            if schedule.discrete == "repick":
                problem.repick(polish_steps=schedule.repick_polish)
            else:
                problem.sweep(generator)
            keep_best("mask")
        problem.iterations_run += 1
        keep_best("round")
    return best_loss
