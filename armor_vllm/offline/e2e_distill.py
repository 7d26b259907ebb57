"""End-to-end distillation after the layer-wise pass: with every 2:4 mask fixed, tune ``A``, ``B`` and
the kept values of ``S`` of every compressed matrix of the WHOLE model so that its next-token
distributions match the dense model's on the calibration sequences.

Why: the layer-wise pass (and ``distill``) matches each decoder layer (or its hidden states) on its
own; errors of different layers add up and nothing there looks at what a user sees, the next-token
distribution. A model that keeps fluent text but loses facts ("The capital of Japan is Japan.") is
exactly what local objectives miss. Distillation from the dense model as teacher is what recovers
most of that in the literature (``../shared/RETENTION_NOTES.md``); here only the factors move, so the
checkpoint format does not change.

How:

* **Teacher, once.** The dense model (transformers, float32, from the run's model directory) runs
  over every calibration sequence once; of each next-token distribution it keeps the top-``k``
  log-probabilities and their token ids, plus the log of the remaining mass (and, with
  ``hidden > 0``, the final hidden states). That is ``N·T·(2k+1)`` numbers, cached in the work
  directory, so no teacher model is needed afterwards: the same model object becomes the student
  (ONE model copy in memory while training; its dense copies of the compressed weights are dropped).
* **Objective.** Per token, the KL divergence ``KL(teacher || student)`` between the two
  distributions coarsened to ``k + 1`` outcomes (the teacher's top-``k`` tokens and "any other
  token"): a true divergence (never negative, zero when they agree on those outcomes), exact for the
  mass the teacher puts on its top ``k``. Averaged over the tokens of a sequence, plus ``hidden``
  times the relative squared error of the final hidden states; the objective of a set of sequences
  is the mean over them.
* **Student.** Every compressed linear's weight in the forward is ``reconstruct(A, S, B)`` with ``S``
  built from its trainable kept values on the fixed mask (``torch.func.functional_call``); all other
  parameters stay frozen (biases, norms, embeddings, MoE experts: experts stay as compressed).
* **Data.** The layer-wise pass's calibration windows, or windows of the phase's own sources
  (``--e2e-data``, e.g. the dense model's own conversations: what a user will ask of the model),
  built and cached by the pipeline as the pass's are; the phase only sees token ids.
* **Training.** Adam, ``batch`` sequences a step (a seeded permutation per pass over the data, so
  the order depends only on the step number), until ``steps`` steps or ``seconds`` of training; the
  learning rate constant or on a warmed-up cosine over ``steps`` (``lr_at``).
* **Never worse.** The objective is measured on all calibration sequences before (the factors as the
  layer files hold them) and after (the tuned factors as they will be STORED: kept values rounded to
  the checkpoint dtype, wrappers float32); the layer files are rewritten only when it went down.
* **Resumable.** In the work directory: ``e2e-teacher.safetensors`` (teacher cache),
  ``e2e-before.json`` (the starting objective), ``e2e-state.safetensors`` (step, training seconds, the factors
  and Adam's state: saved every ``SAVE_SECONDS`` and when training ends, so a resumed run continues
  exactly where the saved one stood and gives the same bytes for a step budget) and
  ``e2e-done.json`` (written after the layer files: a rerun skips the whole phase). The time budget
  counts training seconds across interruptions; the teacher pass and the two measurements are
  fixed costs reported beside it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from armor_vllm.core.factorization import reconstruct
from armor_vllm.core.format import BITMASK, COMPRESSED, SHAPE, WRAPPER_IN, WRAPPER_OUT, decode_layer

TEACHER_FILE = "e2e-teacher.safetensors"
BEFORE_FILE = "e2e-before.json"
STATE_FILE = "e2e-state.safetensors"
DONE_FILE = "e2e-done.json"
SAVE_SECONDS = 120.0  # how often the training state is saved (seconds of training)
TUNABLE_KINDS = ("linear", "conv1d")

# method_options key -> (E2EOptions field, command-line option)
OPTION_KEYS = {
    "e2e_steps": ("steps", "--e2e-steps"),
    "e2e_seconds": ("seconds", "--e2e-seconds"),
    "e2e_lr": ("lr", "--e2e-lr"),
    "e2e_schedule": ("schedule", "--e2e-schedule"),
    "e2e_topk": ("topk", "--e2e-topk"),
    "e2e_batch": ("batch", "--e2e-batch"),
    "e2e_hidden": ("hidden", "--e2e-hidden"),
    "e2e_precision": ("precision", "--e2e-precision"),
}
PRECISIONS = ("auto", "float32", "bfloat16")
SCHEDULES = ("constant", "cosine")
WARMUP_SHARE = 0.05  # cosine: the share of the steps the learning rate rises over (linearly, to lr)
# The phase's own calibration sources (``--e2e-data``: files and source names, generated ones such as
# ``self-chat`` included, as ``--calib-data`` takes them); not given: the layer-wise pass's windows.
# The pipeline builds and caches these windows (``offline.pipeline``); the training never sees names.
DATA_KEY = "e2e_data"


@dataclass(frozen=True)
class E2EOptions:
    steps: int = 1000  # Adam steps (at most); the time budget usually ends training first
    seconds: float = 600.0  # training seconds (across interruptions); teacher pass and measurements extra
    lr: float = 3e-5  # constant: every step's; cosine: the peak
    schedule: str = "constant"  # learning rate by step: ``lr_at``
    topk: int = 64  # teacher tokens kept per position
    batch: int = 2  # calibration sequences per step
    hidden: float = 0.0  # weight of the final hidden states' relative squared error (0: KL only)
    precision: str = "auto"  # training forward/backward: see ``training_dtype``
    seed: int = 0

    def __post_init__(self):
        def integer(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_cli(name)} must be a positive integer, got {value!r}")

        def number(name, value, positive):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if positive else value < 0):
                what = "a positive number" if positive else "a number >= 0"
                raise ValueError(f"{_cli(name)} must be {what}, got {value!r}")

        for name in ("steps", "topk", "batch"):
            integer(name, getattr(self, name))
        number("seconds", self.seconds, positive=True)
        number("lr", self.lr, positive=True)
        number("hidden", self.hidden, positive=False)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--e2e-schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--e2e-precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def lr_at(step: int, options: E2EOptions) -> float:
    """The learning rate of step ``step`` (0-based). ``constant``: ``lr``. ``cosine``: a linear rise
    over the first ``WARMUP_SHARE`` of ``steps`` (so that Adam's first, largest normalised updates are
    small), then half a cosine from ``lr`` down to 0 at ``steps``. A function of the step number only,
    so a resumed run follows the same schedule; when the time budget ends training first, the rate
    has not reached 0."""
    if options.schedule == "constant":
        return options.lr
    warmup = max(1, round(WARMUP_SHARE * options.steps))
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def training_dtype(precision: str, device) -> torch.dtype:
    """The dtype the training steps compute in (under autocast; the factors, Adam's state and the
    before/after measurements stay float32). ``auto``: bfloat16 where the hardware multiplies it
    natively (CUDA with bf16 support; a CPU with AMX or AVX-512 BF16, detected at run time: on this
    project's AMX machines a SmolLM2 step is about 2x faster, ``BENCHMARKS.md`` section 0), else
    float32 (an AVX2-only CPU would emulate bfloat16, slower than float32)."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    from armor_vllm.hardware import cpu_has_native_bf16

    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cli(field_name: str) -> str:
    return next(cli for f, cli in OPTION_KEYS.values() if f == field_name)


def check_options(method: str, method_options: dict) -> E2EOptions | None:
    """Validate the ``e2e`` options of a run (before any work): the settings when ``e2e`` is on,
    None when it is off; clear errors for bad values, for ``e2e_*`` settings without ``e2e``, and
    for a method without wrappers to tune."""
    on = method_options.get("e2e")
    if on is not None and not isinstance(on, bool):
        raise ValueError(f"--e2e must be true or false, got {on!r}")
    cli = {**{k: option for k, (_, option) in OPTION_KEYS.items()}, DATA_KEY: "--e2e-data"}
    given = [k for k in cli if method_options.get(k) is not None]
    if not on:
        if given:
            raise ValueError(f"{', '.join(cli[k] for k in given)} given without --e2e (it is off)")
        return None
    if method != "armor":
        raise ValueError("--e2e tunes ARMOR's wrappers and kept values: it needs --method armor")
    data = method_options.get(DATA_KEY)
    if data is not None:
        from armor_vllm.offline.calibration import SOURCES
        from armor_vllm.offline.self_calibration import SELF_SOURCES

        if isinstance(data, str) or not isinstance(data, (list, tuple)) or not data:
            raise ValueError(f"--e2e-data must be a list of files or source names, got {data!r}")
        for name in data:
            if not (isinstance(name, str) and (name in SOURCES or name in SELF_SOURCES or Path(name).is_file())):
                raise ValueError(
                    f"--e2e-data {name!r} is not a file nor a source name "
                    f"({sorted(SOURCES)} or generated: {sorted(SELF_SOURCES)})"
                )
    return options_from(method_options)


def options_from(method_options: dict, seed: int = 0) -> E2EOptions:
    return E2EOptions(
        **{field: method_options[k] for k, (field, _) in OPTION_KEYS.items() if method_options.get(k) is not None},
        seed=seed,
    )


# -- the teacher --------------------------------------------------------------------------------


@dataclass
class Teacher:
    """Per calibration sequence and position: the dense model's top-k log-probabilities ``logp``
    ``(N, T, k)`` and their token ids ``index``, the log of the remaining mass ``rest`` ``(N, T)``,
    and (only with a hidden-state term) its final hidden states ``hidden`` ``(N, T, H)``."""

    logp: torch.Tensor
    index: torch.Tensor
    rest: torch.Tensor
    hidden: torch.Tensor | None = None

    def slice(self, rows: torch.Tensor, device) -> "Teacher":
        take = lambda t: None if t is None else t[rows].to(device)  # noqa: E731
        return Teacher(take(self.logp), take(self.index).long(), take(self.rest), take(self.hidden))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"logp": self.logp, "index": self.index, "rest": self.rest}
        return out if self.hidden is None else out | {"hidden": self.hidden}


def _forward(model: nn.Module, weights: dict, input_ids: torch.Tensor, hidden: bool):
    out = torch.func.functional_call(
        model, weights, (), {"input_ids": input_ids, "use_cache": False, "output_hidden_states": hidden}
    )
    return out.logits.float(), (out.hidden_states[-1].float() if hidden else None)


@torch.no_grad()
def teacher_outputs(model: nn.Module, samples: torch.Tensor, topk: int, batch: int, hidden: bool, device) -> Teacher:
    """Run the (dense) ``model`` once over ``samples`` ``(N, T)`` and keep what the objective needs."""
    parts = []
    for chunk in samples.split(batch):
        logits, h = _forward(model, {}, chunk.to(device), hidden)
        logp = torch.log_softmax(logits, -1)
        k = min(topk, logp.shape[-1] - 1)  # at least one token in "the rest"
        top, index = logp.topk(k, dim=-1)
        rest = torch.logsumexp(logp.scatter(-1, index, float("-inf")), -1)
        parts.append((top.cpu(), index.to(torch.int32).cpu(), rest.cpu(), None if h is None else h.cpu()))
        del logits, logp
    cat = lambda i: None if parts[0][i] is None else torch.cat([p[i] for p in parts])  # noqa: E731
    return Teacher(cat(0), cat(1), cat(2), cat(3))


def sequence_objective(logits: torch.Tensor, h: torch.Tensor | None, teacher: Teacher, hidden_weight: float):
    """The objective of every sequence of a batch ``(B,)``, and its KL part: the mean over positions
    of the coarsened KL divergence, plus ``hidden_weight`` times the relative squared error of the
    final hidden states."""
    logp = torch.log_softmax(logits, -1)
    student_top = logp.gather(-1, teacher.index)
    student_rest = torch.logsumexp(logp.scatter(-1, teacher.index, float("-inf")), -1)
    kl = (teacher.logp.exp() * (teacher.logp - student_top)).sum(-1)
    kl = kl + teacher.rest.exp() * (teacher.rest - student_rest)
    kl = kl.mean(-1)
    if hidden_weight == 0 or h is None:
        return kl, kl
    t = teacher.hidden
    rel = (h - t).square().sum((1, 2)) / t.square().sum((1, 2)).clamp_min(1e-30)
    return kl + hidden_weight * rel, kl


# -- the student --------------------------------------------------------------------------------


@dataclass
class _Matrix:
    """One tunable compressed matrix: where its weight goes in the model, its fixed mask and what it
    is stored as."""

    layer: int
    checkpoint: str
    param: str  # the model's parameter name ("model.layers.3.mlp.up_proj.weight")
    kind: str
    mask: torch.Tensor  # (d_out, d_in) bool


def _layer_prefix(model: nn.Module) -> str:
    from armor_vllm.offline.layer_walk import decoder_layers

    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _atomic_save_file(tensors: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


class _Student:
    """The model with every tunable compressed matrix as trainable factors (masks fixed)."""

    def __init__(self, model, layer_files, targets, block_size, out_dtype, device):
        from compressed_tensors.utils import unpack_bitmasks

        from armor_vllm.offline.layer_walk import decoder_layers
        from armor_vllm.offline.targets import set_weight

        self.model, self.out_dtype, self.device = model, out_dtype, device
        prefix = _layer_prefix(model)
        layers = decoder_layers(model)
        self.matrices: list[_Matrix] = []
        self.start: list[list[torch.Tensor]] = []  # [A, values, B] as the layer files hold them
        for index, path in enumerate(layer_files):
            tensors = _read(path)
            for t in targets[index]:
                decoded = decode_layer(t.checkpoint, tensors, block_size, True)  # validates every tensor
                if t.kind not in TUNABLE_KINDS:  # MoE experts: fixed, as compressed
                    set_weight(layers[index], t, decoded.weight())
                    continue
                rows, cols = decoded.core.shape
                mask = unpack_bitmasks(tensors[f"{t.checkpoint}.{BITMASK}"], [rows, cols]).bool()
                module = f"{prefix}.{index}.{t.module}"
                self.matrices.append(_Matrix(index, t.checkpoint, f"{module}.weight", t.kind, mask.to(device)))
                values = tensors[f"{t.checkpoint}.{COMPRESSED}"].float()
                self.start.append([decoded.wrapper_out.float(), values, decoded.wrapper_in.float()])
                # the dense copy is never used again (every forward substitutes the factors)
                owner = model.get_submodule(module)
                owner.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self.params = [[p.to(device).clone().requires_grad_(True) for p in group] for group in self.start]

    def weights(self, factors=None) -> dict[str, torch.Tensor]:
        weights = {}
        for m, (a, values, b) in zip(self.matrices, factors if factors is not None else self.params):
            core = torch.zeros(m.mask.shape, device=values.device, dtype=values.dtype).masked_scatter(m.mask, values)
            w = reconstruct(a, core, b)
            weights[m.param] = w.T.contiguous() if m.kind == "conv1d" else w
        return weights

    def as_stored(self, factors) -> list[list[torch.Tensor]]:
        """The factors as the checkpoint will hold them (kept values in its dtype, wrappers float32)."""
        return [[a.detach().float(), v.detach().to(self.out_dtype).float(), b.detach().float()] for a, v, b in factors]

    def write(self, layer_files: list[Path], factors) -> None:
        """Rewrite every layer file with ``factors`` (bitmask, shape and bias untouched)."""
        by_layer: dict[int, list] = {}
        for m, f in zip(self.matrices, factors):
            by_layer.setdefault(m.layer, []).append((m, f))
        for index, items in sorted(by_layer.items()):
            tensors = _read(layer_files[index])
            for m, (a, v, b) in items:
                assert tuple(tensors[f"{m.checkpoint}.{SHAPE}"].tolist()) == tuple(m.mask.shape)
                tensors[f"{m.checkpoint}.{COMPRESSED}"] = v.to(self.out_dtype).cpu().contiguous()
                tensors[f"{m.checkpoint}.{WRAPPER_OUT}"] = a.float().cpu().contiguous()
                tensors[f"{m.checkpoint}.{WRAPPER_IN}"] = b.float().cpu().contiguous()
            _atomic_save_file(tensors, layer_files[index])


@torch.no_grad()
def measure(student: _Student, samples, teacher: Teacher, options: E2EOptions, factors) -> tuple[float, float]:
    """The objective (and its KL part) of ``factors`` on all ``samples``: mean over sequences."""
    weights = student.weights([[t.to(student.device) for t in f] for f in factors])
    total = kl_total = 0.0
    for rows in torch.arange(samples.shape[0]).split(options.batch):
        logits, h = _forward(student.model, weights, samples[rows].to(student.device), options.hidden > 0)
        objective, kl = sequence_objective(logits, h, teacher.slice(rows, student.device), options.hidden)
        total += float(objective.sum())
        kl_total += float(kl.sum())
    n = samples.shape[0]
    return total / n, kl_total / n


def batch_rows(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The sequences of training step ``step``: slots ``step*batch ...`` of a stream that walks a
    fresh seeded permutation of the ``n`` sequences per pass (depends on the step number only)."""
    rows = []
    for slot in range(step * batch, step * batch + batch):
        epoch, at = divmod(slot, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        rows.append(int(order[at]))
    return torch.tensor(rows)


def _save_state(path: Path, step: int, seconds: float, params: list[list[torch.Tensor]], optimizer) -> None:
    """The training state as safetensors (tensors) + JSON metadata (counters, Adam's param groups):
    only safetensors and JSON are ever read back."""
    tensors = {f"param.{g}.{i}": p.detach().contiguous() for g, group in enumerate(params) for i, p in enumerate(group)}
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).contiguous()
    meta = {"step": step, "seconds": seconds, "param_groups": opt["param_groups"]}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def _load_state(path: Path, params: list[list[torch.Tensor]], optimizer, device) -> tuple[int, float]:
    """Restore what ``_save_state`` wrote into ``params`` and ``optimizer``; returns (step, seconds)."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = json.loads(handle.metadata()["state"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    with torch.no_grad():
        for g, group in enumerate(params):
            for i, p in enumerate(group):
                p.copy_(tensors[f"param.{g}.{i}"])
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), float(meta["seconds"])


def _teacher(model, samples, work: Path, options: E2EOptions, device) -> Teacher:
    path = work / TEACHER_FILE
    if path.is_file():
        t = _read(path)
        return Teacher(t["logp"], t["index"], t["rest"], t.get("hidden"))
    teacher = teacher_outputs(model, samples, options.topk, options.batch, options.hidden > 0, device)
    _atomic_save_file({k: v.contiguous() for k, v in teacher.tensors().items()}, path)
    return teacher


def run_e2e(
    model_dir: Path,
    work: Path,
    layer_files: list[Path],
    targets: list[list],
    samples: torch.Tensor,
    block_size: int,
    out_dtype: torch.dtype,
    options: E2EOptions,
    device=None,
) -> dict:
    """End-to-end distillation of the finished layer files (``layer_files[i]``: decoder layer ``i``,
    checkpoint format; ``targets[i]``: its ``Target`` list) against the dense model in ``model_dir``
    on the calibration ``samples`` ``(N, T)``. Rewrites the layer files only when the objective, with
    the factors as stored, went down. Returns what it measured (also in ``work/e2e-done.json``)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline.methods.base import resolve_device

    work = Path(work)
    done = work / DONE_FILE
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    device = resolve_device(device)
    samples = samples.cpu()
    n = samples.shape[0]
    options = E2EOptions(**(asdict(options) | {"batch": min(options.batch, n)}))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    teacher = _teacher(model, samples, work, options, device)  # the dense model, run once
    seconds_teacher = time.perf_counter() - start
    student = _Student(model, layer_files, targets, block_size, out_dtype, device)  # the same object
    if not student.matrices:
        info = {"kept": 0.0, "steps": 0, "note": "no linear projection to tune"}
        done.write_text(json.dumps(info))
        return info

    before_file = work / BEFORE_FILE
    if before_file.is_file():
        before, kl_before = json.loads(before_file.read_text())["objective"]
    else:  # the layer files as they are: as stored already
        before, kl_before = measure(student, samples, teacher, options, student.start)
        before_file.write_text(json.dumps({"objective": [before, kl_before]}))
    student.start = None  # measured: the trainable copies are all that is needed from here

    optimizer = torch.optim.Adam([p for group in student.params for p in group], lr=options.lr)
    state_file = work / STATE_FILE
    step, trained = 0, 0.0
    if state_file.is_file():
        step, trained = _load_state(state_file, student.params, optimizer, device)

    def save():
        _save_state(state_file, step, trained, student.params, optimizer)

    dtype = training_dtype(options.precision, device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    progress = tqdm(total=options.steps, initial=step, desc=f"e2e distillation ({dtype_name(dtype)})", unit="step")
    last_save = trained
    loss_value = float("nan")
    while step < options.steps and trained < options.seconds:
        t0 = time.perf_counter()
        rows = batch_rows(step, options.batch, n, options.seed)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, options)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits, h = _forward(model, student.weights(), samples[rows].to(device), options.hidden > 0)
        objective, _ = sequence_objective(logits, h, teacher.slice(rows, device), options.hidden)  # float32
        loss = objective.mean()
        loss.backward()
        optimizer.step()
        del logits, h, objective
        loss_value = float(loss.detach())
        step += 1
        trained += time.perf_counter() - t0
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", before=f"{before:.4f}")
        if trained - last_save >= SAVE_SECONDS or step >= options.steps or trained >= options.seconds:
            save()
            last_save = trained
    progress.close()

    tuned = student.as_stored(student.params)
    after, kl_after = measure(student, samples, teacher, options, tuned)
    kept = after < before  # NaN (diverged) is never kept
    if kept:
        student.write(layer_files, tuned)
    info = {
        "objective_before": before,
        "objective_after": after,
        "kl_before": kl_before,
        "kl_after": kl_after,
        "kept": float(kept),
        "steps": step,
        "lr": options.lr,
        "schedule": options.schedule,
        "precision": dtype_name(dtype),
        "sequences": n,
        "seconds_train": trained,
        "seconds_per_step": trained / step if step else None,
        "seconds_teacher": seconds_teacher,
        "seconds": time.perf_counter() - start,  # this run's part (teacher, measurements, training)
        "last_loss": loss_value,
    }
    tmp = done.with_name(f".{done.name}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, done)  # after the layer files: from here a rerun skips the phase
    for name in (STATE_FILE, TEACHER_FILE):
        (work / name).unlink(missing_ok=True)
    return info
