"""ARMOR (Liu et al., arXiv 2510.05528): the compression method and its presets.

``W ≈ A · S · B`` with a 2:4 core ``S`` and block-diagonal wrappers. Two objectives, one module each:
``full.py`` (the default: the layer's output error ``tr(E H E^T)``, from a SparseGPT start) and
``diag.py`` (the paper's NoWag proxy, from NoWag-P). This module holds what a user chooses:

Presets (``preset=``; explicit options override them):

* ``quick``   -- 4 rounds of (exact A, exact B, 4 CG steps on S, one full discrete sweep), then a
  last A/B/CG polish: about a quarter of the default's time; smoke tests, large models on CPU.
* ``default`` -- the same with 16 rounds: SmolLM2-135M (210 linears) in about 12 minutes of optimiser
  time on 2 CPU cores, loss still falling slowly (see ``benchmarks/optimizer_speed.py``). CG converges
  in 2-4 steps; the discrete sweeps bring most of the gain after the first round.
* ``long``    -- the default's layer-wise pass (on the default's text calibration), then end-to-end
  distillation of the whole model against the dense one (``LONG_EXTRAS``: ``offline.e2e_distill``) on
  windows of its own that mix the dense model's conversations and free generations with the texts
  (``LONG_E2E_DATA``): 2-3.5x the default's time (29-32 minutes on 2 idle cores, against 9-14), for
  the retention it buys (``BENCHMARKS.md``, section 0: calibrating the layer-wise pass on that mix too measured fewer
  answers). Every extra can be overridden.
* ``paper``   -- the reference implementation's schedule as near as feasible: 3000 iterations of one
  Adam step (lr 1e-4) on ``A``, ``B`` and the kept values of ``S`` followed by one discrete step with
  one group per tile sampled with probability proportional to the L1 norm of the loss gradient on the
  group; early stop after 100 iterations without a relative improvement of 1e-6. Hours for a whole
  model on CPU; kept to compare against.

Options: ``preset``, ``iterations`` (rounds, or Adam iterations for ``paper``), ``cg_steps``,
``sweeps`` (full discrete sweeps per round), ``lr`` (Adam), ``patience``, ``damping`` (relative
damping of the 2x2 and block solves), ``max_seconds`` (wall-time cap per call, best iterate kept),
``solver`` (``alternating`` or ``adam``), ``progress`` (tqdm bar per call). ``block_size`` must divide
both dimensions of every weight and be a multiple of 4; ``seed`` fixes the sweep orders / sampling.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from armor_vllm.core.factorization import GROUP, check_block_size, mask_from_scores
from armor_vllm.core.format import ArmorLayer
from armor_vllm.offline.methods.armor.diag import ArmorProblem, Schedule, optimise
from armor_vllm.offline.methods.armor.full import (
    FullArmorProblem,
    FullSchedule,
    optimise_full,
)
from armor_vllm.offline.methods.base import (
    CompressionMethod,
    InputStats,
    LayerResult,
    resolve_device,
)
from armor_vllm.offline.methods.nowag import nowag_mask
from armor_vllm.offline.methods.sparsegpt import damped_hessian, sparsegpt_prune
from armor_vllm.offline.objective import fold_normalisation, normalise

DEFAULT_OBJECTIVE = "full"
DEFAULT_INIT = {"diag": "nowag", "full": "sparsegpt"}  # by objective
# SparseGPT's relative damping of ``H`` for ARMOR (``--damp``): 0.1 rather than SparseGPT's 0.01 kept
# more of the dense model's answers on the quick and default presets (BENCHMARKS.md, section 0).
DEFAULT_DAMP = 0.1

PRESETS: dict[str, Schedule] = {
    "quick": Schedule(iterations=4),
    "default": Schedule(iterations=16),
    "long": Schedule(iterations=16),  # the default's layer-wise schedule; what it adds is in LONG_EXTRAS
    "paper": Schedule(solver="adam", iterations=3000, lr=1e-4, patience=100, rtol=1e-6, damping=1e-9),
}

# What ``--preset long`` adds to the default (explicit options win): end-to-end distillation, on its
# own windows (``--e2e-data``: the default texts plus the dense model's generated ones).
LONG_E2E_DATA = ("pydoc", "jargon", "opticks", "licenses", "self-chat", "self-free")
LONG_EXTRAS = {  # the steps decide on 2 idle cores (4-5 s a step), not the time cap
    "e2e": True,
    "e2e_steps": 200,
    "e2e_seconds": 1500.0,
    "e2e_data": list(LONG_E2E_DATA),
}


def preset_with_overrides(presets: dict, options: dict, what: str = ""):
    """The schedule of ``presets`` named by ``options['preset']`` (default ``"default"``), with every
    explicit option that is one of its fields overriding it."""
    preset = options.get("preset", "default")
    if preset not in presets:
        raise ValueError(f"ARMOR preset {preset!r} is not one of {sorted(presets)}{what}")
    schedule = presets[preset]
    fields = {k: options[k] for k in type(schedule).__dataclass_fields__ if k in options}
    return replace(schedule, **fields)


def schedule_from_options(options: dict) -> Schedule:
    """The diag-objective schedule of ``options['preset']`` with explicit overrides."""
    return preset_with_overrides(PRESETS, options)


OBJECTIVES = ("diag", "full")
INITS = ("nowag", "sparsegpt", "wanda")
FULL_PRESETS: dict[str, FullSchedule] = {
    "quick": FullSchedule(iterations=3),
    "default": FullSchedule(iterations=8),
    "long": FullSchedule(iterations=8),
}


def full_schedule_from_options(options: dict) -> FullSchedule:
    """The full-objective schedule of ``options['preset']`` with explicit overrides."""
    return preset_with_overrides(FULL_PRESETS, options, " for --objective full")


def initial_cores(
    weights: dict[str, torch.Tensor], stats: InputStats, init: str, damp: float
) -> dict[str, torch.Tensor]:
    """The plain 2:4 pruning ARMOR starts from (``A = B = I``), in the original weight space."""
    if init == "sparsegpt":
        hessian = stats.hessian()
        return {n: sparsegpt_prune(w, hessian, damp=damp)[0] for n, w in weights.items()}
    if init == "wanda":
        act_norm = stats.sq.to(device=next(iter(weights.values())).device, dtype=torch.float32).sqrt()
        return {n: w * mask_from_scores(w.abs() * act_norm) for n, w in weights.items()}
    h = stats.channel_importance().to(next(iter(weights.values())).device)
    return {n: w * nowag_mask(normalise(w)[0], h) for n, w in weights.items()}


class Armor(CompressionMethod):
    """Options beyond the schedule's: ``objective`` (``diag``: the NoWag proxy of the paper;
    ``full``: the output error ``tr(E H E^T)``, ``armor_full``), ``init`` (``nowag``, ``sparsegpt``,
    ``wanda``: the pruning ARMOR starts from), ``damp`` (SparseGPT's relative damping of ``H``),
    ``device`` (``cpu``/``cuda``: where the optimisation runs)."""

    name = "armor"
    uses_wrappers = True

    def __init__(self, block_size: int = 32, seed: int = 0, **options):
        super().__init__(block_size=block_size, seed=seed, **options)
        self.objective = options.get("objective", DEFAULT_OBJECTIVE)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r} is not one of {list(OBJECTIVES)}")
        self.init = options.get("init", DEFAULT_INIT[self.objective])
        if self.init not in INITS:
            raise ValueError(f"--init {self.init!r} is not one of {list(INITS)}")
        if self.objective == "full" and options.get("preset") == "paper":
            raise ValueError("--preset paper is the reference's schedule for --objective diag only")
        self.device = resolve_device(options.get("device"))
        # the schedule is validated here, so that a bad preset fails before any work
        self.schedule = (full_schedule_from_options if self.objective == "full" else schedule_from_options)(options)
        self.needs_full_hessian = self.objective == "full" or self.init == "sparsegpt"

    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        names = list(weights)
        if self.block_size % GROUP:
            raise ValueError(f"block size {self.block_size} must be a multiple of {GROUP} for 2:4 groups")
        for name in names:
            d_out, d_in = weights[name].shape
            check_block_size(d_out, self.block_size, what=f"output dimension of {name} ({d_out}x{d_in})")
            check_block_size(d_in, self.block_size, what=f"input dimension of {name} ({d_out}x{d_in})")
        weights = {n: w.to(device=self.device, dtype=torch.float32) for n, w in weights.items()}
        stats = stats.to(self.device)
        damp = float(self.options.get("damp", DEFAULT_DAMP))
        start = time.perf_counter()
        cores = (
            initial_cores(weights, stats, self.init, damp) if self.init != "nowag" or self.objective == "full" else None
        )
        if self.objective == "full":
            return self._compress_full(weights, stats, cores, damp, start)
        schedule = self.schedule
        h = stats.channel_importance()
        results: dict[str, LayerResult] = {}
        # Stack the matrices of equal d_in (all of them, as they share the stats).
        normalised = {name: normalise(weights[name]) for name in names}
        init_n = None if cores is None else [normalised[n][1].apply(cores[n]) for n in names]
        problem = ArmorProblem([normalised[n][0] for n in names], h, self.block_size, schedule.damping, init_n)
        loss_start = problem.losses()
        loss_end = optimise(problem, schedule, seed=self.seed, progress=bool(self.options.get("progress", False)))
        seconds = time.perf_counter() - start
        for m, name in enumerate(names):
            s = problem.slices[m]
            blocks = slice(s.start // problem.bs, s.stop // problem.bs)
            a_blocks, b_blocks = fold_normalisation(problem.a[blocks], problem.b[m], normalised[name][1])
            layer = ArmorLayer(
                a_blocks.contiguous().cpu(), problem.core[s].contiguous().cpu(), b_blocks.contiguous().cpu()
            )
            results[name] = LayerResult(
                layer,
                {
                    "loss_start": float(loss_start[m]),
                    "loss_end": float(loss_end[m]),
                    "iterations": problem.iterations_run,
                    "seconds": seconds,  # of the whole call (all matrices optimised together)
                },
            )
        return results

    def _compress_full(self, weights, stats, cores, damp, start) -> dict[str, LayerResult]:
        schedule = self.schedule
        names = list(weights)
        hessian, _ = damped_hessian(stats.hessian(), damp)
        problem = FullArmorProblem(
            [weights[n] for n in names], hessian, self.block_size, [cores[n] for n in names], schedule.damping
        )
        loss_start = problem.losses()
        loss_end = optimise_full(problem, schedule, progress=bool(self.options.get("progress", False)), seed=self.seed)
        seconds = time.perf_counter() - start
        results = {}
        for m, name in enumerate(names):
            s, blocks = problem.slices[m], problem.row_blocks(m)
            layer = ArmorLayer(
                problem.a[blocks].contiguous().cpu(),
                problem.core[s].contiguous().cpu(),
                problem.b[m].contiguous().cpu(),
            )
            results[name] = LayerResult(
                layer,
                {
                    "hessian_loss_start": float(loss_start[m]),  # tr(E H E^T) / tr(W H W^T), H damped
                    "hessian_loss_end": float(loss_end[m]),
                    "iterations": problem.iterations_run,
                    "seconds": seconds,
                },
            )
        return results
