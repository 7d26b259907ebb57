"""The interface every compression method implements, so the pipeline can walk layers, collect
calibration statistics and write checkpoints without knowing which algorithm runs.

A method receives the float32 weights of the linears that share one input (for example q/k/v of a
decoder layer, or gate/up) together with the statistics of that input, and returns one
``ArmorLayer`` per weight (identity wrappers for the plain 2:4 baselines) plus what it measured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from armor_vllm.core.format import ArmorLayer


@dataclass
class InputStats:
    """Calibration statistics of the activations ``X`` (tokens x d_in) entering a group of linears.

    ``xtx`` is the running sum of ``X^T X`` in float64 when a method asked for the full matrix
    (SparseGPT); ``sq`` is always the running sum of ``X**2`` per input channel. ``cross`` is the
    running sum of ``X_dense^T X`` with ``X_dense`` the dense model's inputs to the same linears, for
    ``--output-target dense`` (``armor_vllm.offline.output_target``)."""

    sq: torch.Tensor  # (d_in,) float64, sum_t X[t, j]^2
    n_tokens: int
    xtx: torch.Tensor | None = None  # (d_in, d_in) float64, sum_t X[t]^T X[t]
    cross: torch.Tensor | None = None  # (d_in, d_in) float64, sum_t X_dense[t]^T X[t]

    def channel_importance(self) -> torch.Tensor:
        """``h_j = (2/N) sum_t X[t, j]^2`` in float32, non-finite or zero entries replaced by the mean
        of the valid ones (the NoWag/ARMOR definition)."""
        h = (2.0 / max(self.n_tokens, 1)) * self.sq
        valid = torch.isfinite(h) & (h > 0)
        fill = h[valid].mean() if bool(valid.any()) else torch.tensor(1.0, dtype=h.dtype)
        return torch.where(valid, h, fill).to(torch.float32)

    def to(self, device: torch.device | str) -> "InputStats":
        """The same statistics on ``device`` (no copy when already there)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return InputStats(sq=move(self.sq), n_tokens=self.n_tokens, xtx=move(self.xtx), cross=move(self.cross))

    def hessian(self) -> torch.Tensor:
        """``H = (2/N) X^T X`` in float64 (needs ``xtx``)."""
        if self.xtx is None:
            raise ValueError("these statistics hold no full X^T X; the method must set needs_full_hessian")
        return (2.0 / max(self.n_tokens, 1)) * self.xtx


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device``: ``cpu``, ``cuda`` (or ``cuda:N``); ``None`` means ``cuda`` when available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda are supported")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available here")
    return resolved


@dataclass
class LayerResult:
    """What a method returns for one weight: the factorized layer and its measurements."""

    layer: ArmorLayer
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. loss_start, loss_end, seconds


class CompressionMethod(ABC):
    """Base class of the compression methods. Subclasses set ``name`` and implement ``compress``."""

    name: ClassVar[str] = ""
    needs_full_hessian: ClassVar[bool] = False
    uses_wrappers: ClassVar[bool] = False  # False: identity wrappers (plain 2:4)

    def __init__(self, block_size: int = 32, seed: int = 0, **options):
        self.block_size = block_size
        self.seed = seed
        self.options = options

    @abstractmethod
    def compress(self, weights: dict[str, torch.Tensor], stats: InputStats) -> dict[str, LayerResult]:
        """Compress every ``(d_out, d_in)`` float32 weight of ``weights`` (all share ``stats``)."""
