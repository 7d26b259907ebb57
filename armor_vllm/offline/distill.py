"""Distillation after compression, block by block: with the 2:4 masks fixed, tune ``A``, ``B`` and the
kept values of every compressed matrix of one decoder layer so that the layer's output on the
calibration inputs matches the dense layer's output (SparseGPT-era "block reconstruction").

Each matrix's weight in the layer's forward is ``A · S · B`` (``factorization.reconstruct``, kept
values masked), substituted with ``torch.func.functional_call``, so gradients reach the factors; Adam
runs on one calibration batch per step, for ``steps`` steps or ``max_seconds``. The mean squared
error over all calibration batches is measured before and after, and the distilled factors are
kept only when it went down, so distillation never makes a layer worse on its calibration inputs.
The checkpoint format does not change (the result is again ``A``, ``S``, ``B`` per matrix).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from armor_vllm.core.factorization import reconstruct
from armor_vllm.core.format import ArmorLayer


@dataclass(frozen=True)
class DistillOptions:
    # 16 Adam steps at lr 3e-4: measured on the embedded model (BENCHMARKS.md, section 1)
    steps: int = 16
    lr: float = 3e-4
    max_seconds: float | None = 60.0  # per decoder layer
    seed: int = 0


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _param_name(target) -> str:
    if target.kind not in ("linear", "conv1d"):
        raise ValueError(
            f"--distill: {target.checkpoint} is a {target.kind} target; distillation supports "
            f"plain linear (and conv1d) projections only"
        )
    return f"{target.module}.weight"


@dataclass
class Distilled:
    """What ``distill_layer`` returns: the factors it chose, what it measured, and the layer's outputs
    on the calibration batches with those factors (the next decoder layer's inputs in sequential
    order, so the pipeline does not run the layer once more)."""

    factors: dict[str, ArmorLayer]
    info: dict[str, float]
    outputs: list[torch.Tensor]


def distill_layer(
    layer: nn.Module,
    targets: list,
    factors: dict[str, ArmorLayer],
    batches: list[tuple[torch.Tensor, tuple, dict]],
    dense_hidden: list[torch.Tensor],
    options: DistillOptions = DistillOptions(),
    as_stored: Callable[[dict[str, ArmorLayer]], dict[str, ArmorLayer]] = lambda factors: factors,
) -> Distilled:
    """Tune ``factors`` (per target name; masks fixed) so that ``layer`` called on every batch
    ``(hidden, args, kwargs)`` reproduces that batch's ``dense_hidden``. The tuned factors are judged
    as they will be stored (``as_stored``: e.g. rounded to the checkpoint's dtype) against the given
    ones, which are taken as stored already; the better of the two is returned."""
    start = time.perf_counter()
    names = {t.name: _param_name(t) for t in targets}
    kinds = {t.name: t.kind for t in targets}
    params, masks = {}, {}
    for name, f in factors.items():
        params[name] = [p.detach().float().clone().requires_grad_(True) for p in (f.wrapper_out, f.core, f.wrapper_in)]
        masks[name] = f.core != 0
    sequences = list(zip(batches, dense_hidden))

    def substituted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # conv1d stores (d_in, d_out); contiguous, as a module's own parameter is
        return {names[n]: (w.T.contiguous() if kinds[n] == "conv1d" else w) for n, w in weights.items()}

    def trained_weights():
        return substituted({n: reconstruct(a, core * masks[n], b) for n, (a, core, b) in params.items()})

    def evaluate(chosen: dict[str, ArmorLayer]) -> tuple[float, list[torch.Tensor]]:
        with torch.no_grad():
            w = substituted({n: f.weight() for n, f in chosen.items()})
            outputs = [
                _output(torch.func.functional_call(layer, w, (h, *args), kwargs)) for (h, args, kwargs), _ in sequences
            ]
            total = sum(float((o - d).square().sum()) for o, (_, d) in zip(outputs, sequences))
        return total / max(sum(d.numel() for _, d in sequences), 1), outputs

    before, before_outputs = evaluate(factors)
    optimizer = torch.optim.Adam([p for group in params.values() for p in group], lr=options.lr)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(options.seed))
    steps = 0
    for step in range(options.steps):
        if options.max_seconds is not None and time.perf_counter() - start > options.max_seconds:
            break
        (h, args, kwargs), d = sequences[int(order[step % len(sequences)])]
        optimizer.zero_grad()
        out = _output(torch.func.functional_call(layer, trained_weights(), (h, *args), kwargs))
        loss = (out - d).square().mean() / d.square().mean().clamp_min(1e-30)
        loss.backward()
        optimizer.step()
        steps += 1
    tuned = as_stored(
        {
            n: ArmorLayer(a.detach(), (core * masks[n]).detach(), b.detach(), bias=factors[n].bias)
            for n, (a, core, b) in params.items()
        }
    )
    after, after_outputs = evaluate(tuned)
    info = {
        "distill_mse_before": before,
        "distill_mse_after": after,
        "distill_steps": steps,
        "distill_seconds": time.perf_counter() - start,
    }
    if not after < before:
        return Distilled(factors, info | {"distill_kept": 0.0}, before_outputs)
    return Distilled(tuned, info | {"distill_kept": 1.0}, after_outputs)


TUNABLE_KINDS = ("linear", "conv1d")


def distill_tensors(
    layer, targets, tensors, metrics, inputs, dense_out, block_size, out_dtype, options: DistillOptions
) -> tuple[dict[str, torch.Tensor], list[dict], list[torch.Tensor]]:
    """The pipeline's step: decode one decoder layer's checkpoint tensors, distill them against the
    dense layer's outputs ``dense_out`` on the (sequential) calibration ``inputs``, encode them again.
    Adds the distillation measurements to every matrix's metrics and returns, too, the layer's
    outputs on ``inputs`` with the stored result (what the next layer sees in sequential order).

    Linear (and conv1d) projections are tuned; other targets (MoE experts) stay as compressed: their
    compressed weights are written into ``layer`` first, so the tuned projections see them."""
    from armor_vllm.core.format import decode_layer, encode_layer
    from armor_vllm.offline.targets import set_weight

    tunable = [t for t in targets if t.kind in TUNABLE_KINDS]
    with torch.no_grad():
        for t in targets:
            if t.kind not in TUNABLE_KINDS:
                set_weight(layer, t, decode_layer(t.checkpoint, tensors, block_size, True).weight())
    if not tunable:
        return tensors, [m | {"distill_steps": 0, "distill_kept": 0.0} for m in metrics], None
    by_name = {t.name: t for t in tunable}
    tuned_tensors: dict[str, torch.Tensor] = {}

    def as_stored(factors):  # rounded to the checkpoint's dtype: what a resumed run reads back
        for name, f in factors.items():
            tuned_tensors.update(encode_layer(by_name[name].checkpoint, f, out_dtype, wrappers=True))
        return {name: decode_layer(by_name[name].checkpoint, tuned_tensors, block_size, True) for name in factors}

    factors = {t.name: decode_layer(t.checkpoint, tensors, block_size, True) for t in tunable}
    batches = [(h, *inputs.arguments(b)) for b, h in enumerate(inputs.hidden)]
    result = distill_layer(layer, tunable, factors, batches, dense_out.hidden, options, as_stored)
    info = result.info
    fixed = {
        "distill_steps": 0,
        "distill_kept": 0.0,
        "distill_mse_before": info["distill_mse_before"],
        "distill_mse_after": info["distill_mse_after"],
    }
    # kept: the tensors encoded once, in as_stored; not kept: the given tensors, untouched
    out = {**tensors, **tuned_tensors} if info["distill_kept"] else tensors
    return out, [m | (info if m["name"] in by_name else fixed) for m in metrics], result.outputs
