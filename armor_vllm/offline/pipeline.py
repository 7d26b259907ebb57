"""The offline pass: walk the decoder layers, calibrate, compress every linear with one method and
write a format-v2 checkpoint (docs/FORMAT.md).

Memory: weights are streamed from the safetensors shards one decoder layer at a time
(``streaming.LayerStream``), calibration activations are kept for one layer at a time, and output
shards are written as they fill.

Crash safety: everything is written under ``OUTPUT.partial/``; each finished decoder layer is saved
there (``.armor_work/layer-00012.safetensors``) so a rerun with the same options resumes after the
last finished layer; only when the checkpoint is complete is the folder renamed to ``OUTPUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from armor_vllm.core.checkpoint import (
    ShardWriter,
    armor_model_config,
    copy_side_files,
    iter_tensors,
    read_json,
    write_json,
)
from armor_vllm.core.format import ArmorConfig, check_layer_block_size, encode_layer
from armor_vllm.offline import dense_budget
from armor_vllm.offline import report as report_mod
from armor_vllm.offline import targets as targets_mod
from armor_vllm.offline.calibration import CALIBRATION_MIX
from armor_vllm.offline.distributed import LocalExecutor, check_options, make_executor
from armor_vllm.offline.layer_walk import (
    LayerInputs,
    StatsGroup,
    capture_layer_inputs,
    collect_layer_stats,
    run_layer,
)
from armor_vllm.offline.methods import InputStats, get_method
from armor_vllm.offline.streaming import LayerStream
from armor_vllm.offline.targets import Target

ORDERS = ("sequential", "dense")
WORK = ".armor_work"


@dataclass
class OfflineOptions:
    """Everything that defines an offline run (and therefore whether a partial run can resume)."""

    model: str
    output: str
    method: str = "armor"
    block_size: int | str = "auto"  # "auto": the largest of targets.AUTO_BLOCK_SIZES fitting every layer
    calib_samples: int = 64
    seq_len: int = 512
    calib_data: list[str] = field(default_factory=list)
    order: str = "sequential"
    seed: int = 0
    ignore: list[str] = field(default_factory=list)
    method_options: dict = field(default_factory=dict)
    overwrite: bool = False
    # Where compress runs (same bytes either way, so not part of the fingerprint): local Ray with
    # this many worker processes, or an existing Ray cluster (armor_vllm.offline.distributed).
    workers: int | None = None
    ray_address: str | None = None
    # --dense-budget's choice (offline.dense_budget.resolve): its matrices are also in ``ignore``.
    dense_budget: dict | None = None

    def fingerprint(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("output", "overwrite", "workers", "ray_address")}
        if keep.get("dense_budget") is None:  # a run without it keeps the fingerprint it always had
            keep.pop("dense_budget", None)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _validate(opts: OfflineOptions) -> None:
    if opts.order not in ORDERS:
        raise ValueError(f"--order {opts.order!r} is not one of {list(ORDERS)}")
    if opts.block_size != "auto" and (
        isinstance(opts.block_size, bool) or not isinstance(opts.block_size, int) or opts.block_size <= 0
    ):
        raise ValueError(f"--block-size must be a positive integer or auto, got {opts.block_size!r}")
    check_options(opts.workers, opts.ray_address)


def _calibration_samples(opts: OfflineOptions, model_dir: Path) -> torch.Tensor:
    """The calibration windows: the default mix of packaged texts; or ``--calib-data`` (files and
    source names, read one after the other); or, when it names a generated source (``self-chat``,
    ``self-free``), a round-robin mix of the named sources with the generated ones written by the
    dense model now (``self_calibration``)."""
    from transformers import AutoTokenizer

    from armor_vllm.offline.calibration import load_texts, mixed_samples, token_samples
    from armor_vllm.offline.self_calibration import SELF_SOURCES, generated_windows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generated = [name for name in opts.calib_data if name in SELF_SOURCES]
    if opts.calib_data and not generated:
        return token_samples(tokenizer, load_texts(opts.calib_data), opts.calib_samples, opts.seq_len)
    model = None

    def generate(name: str, n_windows: int) -> torch.Tensor:
        nonlocal model
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t = time.perf_counter()
        windows = generated_windows(name, model_dir, n_windows, opts.seq_len, opts.seed, model, tokenizer)
        print(f"calibration: {n_windows} x {opts.seq_len} tokens of {name} written in {time.perf_counter() - t:.0f} s")
        return windows

    sources = tuple(opts.calib_data) if opts.calib_data else CALIBRATION_MIX
    samples, used = mixed_samples(tokenizer, opts.calib_samples, opts.seq_len, sources, generate)
    print(f"calibration: {opts.calib_samples} x {opts.seq_len} tokens from {', '.join(used)}")
    return samples


def _layer_file(work: Path, index: int) -> Path:
    return work / f"layer-{index:05d}.safetensors"


def _save_layer(work: Path, index: int, tensors: dict[str, torch.Tensor], metrics: list[dict]) -> None:
    """Metrics first, tensors last: the tensors file appearing is what marks the layer done."""
    write_json(work / f"layer-{index:05d}.json", {"layer": index, "matrices": metrics})
    tmp = work / f".layer-{index:05d}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, _layer_file(work, index))


def _load_layer(work: Path, index: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    with safe_open(str(_layer_file(work, index)), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return tensors, read_json(work / f"layer-{index:05d}.json")["matrices"]


def _relative_proxy_loss(weight: torch.Tensor, w_hat: torch.Tensor, stats: InputStats | None) -> float | None:
    if stats is None:
        return None
    from armor_vllm.offline.objective import relative_proxy_loss

    return float(relative_proxy_loss(w_hat, weight, stats.channel_importance()))


def _compress_layer(
    index: int,
    targets: list[Target],
    layer: nn.Module,
    groups: list[StatsGroup],
    method,
    out_dtype: torch.dtype,
    block_size: int,
    executor=None,
    routing: dict | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Compress the targets of one decoder layer (``targets.plan``); returns checkpoint tensors
    (under the targets' checkpoint names) and metrics. ``executor`` runs the groups'
    ``method.compress`` (``distributed``; default: here, one group after the other). ``routing``:
    per experts module, the routed token counts and fallbacks (``experts.resolve``). A group whose
    statistics hold the dense path's ``cross`` (``--output-target dense``) is compressed towards its
    output-aware weights (``output_target``) instead of the dense ones."""
    from armor_vllm.offline.output_target import DEFAULT_MIX, dense_output_target, relative_shift

    by_name = {t.name: t for t in targets}
    tensors: dict[str, torch.Tensor] = {}
    metrics: list[dict] = []
    jobs = []
    shifts: dict[str, float] = {}
    for group in groups:
        weights = {}
        for name in group.names:
            t = by_name[name]
            check_layer_block_size(t.checkpoint, t.shape[0], t.shape[1], block_size)
            weights[name] = targets_mod.get_weight(layer, t)
            if group.stats is not None and group.stats.cross is not None:
                dense = weights[name]
                weights[name] = dense_output_target(
                    dense,
                    group.stats,
                    float(method.options.get("damp", 0.01)),
                    method.options.get("output_target_mix", DEFAULT_MIX),
                )
                shifts[name] = relative_shift(weights[name], dense)
        jobs.append((weights, group.stats))
    outcomes = (executor or LocalExecutor()).compress_groups(method, jobs)
    for group, (weights, _), (results, group_seconds) in zip(groups, jobs, outcomes):
        seconds = group_seconds / max(len(weights), 1)  # the group's wall time, shared among its matrices
        for name in group.names:
            t = by_name[name]
            result = results[name]
            result.layer.bias = targets_mod.get_bias(layer, t)
            tensors.update(encode_layer(t.checkpoint, result.layer, out_dtype, wrappers=method.uses_wrappers))
            metric = _metric(index, t, result, weights[name], group.stats, seconds, routing)
            if name in shifts:  # against the output-aware target (``output_target``), not the dense weight
                metric["output_target_shift"] = shifts[name]
            metrics.append(metric)
    return tensors, metrics


def _metric(index: int, t: Target, result, weight: torch.Tensor, stats, seconds: float, routing) -> dict:
    """What the report says of one compressed matrix."""
    w_hat = result.layer.weight()
    metric = {
        **{k: float(v) for k, v in result.metrics.items()},
        "layer": index,
        "name": t.name,
        "checkpoint": t.checkpoint,
        "kind": t.kind,
        "replaces": list(t.replaces),
        "shape": list(weight.shape),
        "proxy_loss": _relative_proxy_loss(weight, w_hat, stats),
        "seconds": seconds,
    }
    if t.kind == "expert" and routing is not None:
        info = routing[t.module]
        metric["routed_tokens"] = info["tokens"][t.expert]
        metric["stats_fallback"] = t.expert in info["fell_back"]
    return metric


def _check_targets(opts: OfflineOptions, method_cls) -> None:
    """``--output-target`` and ``--distill-target``: known values, in an order where they mean something."""
    from armor_vllm.offline.methods.sparsegpt import check_damp
    from armor_vllm.offline.output_target import OUTPUT_TARGETS, check_mix

    for key in ("output_target", "distill_target"):
        value = opts.method_options.get(key, "layer")
        option = "--" + key.replace("_", "-")
        if value not in OUTPUT_TARGETS:
            raise ValueError(f"{option} {value!r} is not one of {list(OUTPUT_TARGETS)}")
        if value == "dense" and opts.order != "sequential":
            raise ValueError(f"{option} dense needs --order sequential (in dense order both targets are the same)")
    if "damp" in opts.method_options:
        check_damp(opts.method_options["damp"], method_cls.name, opts.method_options.get("output_target", "layer"))
    if "output_target_mix" in opts.method_options:
        check_mix(opts.method_options["output_target_mix"])
    if opts.method_options.get("output_target") == "dense" and method_cls.name == "magnitude":
        raise ValueError("--output-target dense needs calibration statistics; --method magnitude takes none")
    from armor_vllm.offline.e2e_distill import check_options as check_e2e

    check_e2e(opts.method, opts.method_options)  # --e2e and its settings (armor_vllm.offline.e2e_distill)


def _with_armor_defaults(opts: OfflineOptions, model_dir: Path | None = None) -> OfflineOptions:
    """ARMOR's defaults beyond its schedule, each measured to lower perplexity on every text
    (BENCHMARKS.md, section 1): distillation (``--distill``) except with ``--preset quick``, the
    fastest schedule; and in sequential order, output-aware targets for the compression
    (``--output-target dense``) and for the distillation (``--distill-target dense``); with
    ``--preset long``, end-to-end distillation on a self-generated mix (``LONG_EXTRAS``; measured
    for retention, BENCHMARKS.md section 0); and ``--damp 0.1`` (``DEFAULT_DAMP``, measured for
    retention, section 0). Resolved before the run's fingerprint, so a resumed run
    does exactly what the first one did."""
    if opts.method != "armor":
        return opts
    from armor_vllm.offline.e2e_distill import DATA_KEY
    from armor_vllm.offline.methods.armor import DEFAULT_DAMP, LONG_EXTRAS

    options = dict(opts.method_options)
    if options.get("preset") == "long":  # the default plus what it adds (explicit options win)
        extras = {k: v for k, v in LONG_EXTRAS.items() if options.get(k) is None}
        if DATA_KEY in extras:
            extras[DATA_KEY] = _long_calibration(tuple(extras[DATA_KEY]), model_dir)
        options |= extras
    if options.get("distill") is None:
        options["distill"] = options.get("preset", "default") != "quick"
    if options.get("damp") is None:
        options["damp"] = DEFAULT_DAMP
    if opts.order == "sequential":
        options.setdefault("output_target", "dense")
        if options["distill"]:
            options.setdefault("distill_target", "dense")
    if options.get("e2e") is None:  # end-to-end distillation: opt-in until measured (e2e_distill)
        options["e2e"] = False
    return replace(opts, method_options=options)


def _check_chat_sources(opts: OfflineOptions, model_dir: Path) -> None:
    """``self-chat`` in ``--calib-data`` or ``--e2e-data`` needs a chat template: refused before any
    work (the end-to-end windows are otherwise only built after the whole layer-wise pass)."""
    from armor_vllm.offline.e2e_distill import DATA_KEY

    for option, sources in (("--calib-data", opts.calib_data), ("--e2e-data", opts.method_options.get(DATA_KEY))):
        if sources and "self-chat" in sources:
            from transformers import AutoTokenizer

            from armor_vllm.offline.self_calibration import has_chat_template

            if not has_chat_template(AutoTokenizer.from_pretrained(model_dir)):
                raise ValueError(f"{option} self-chat needs a model with a chat template; {model_dir} has none")


def _long_calibration(sources: tuple[str, ...], model_dir: Path | None) -> list[str]:
    """``--preset long``'s end-to-end sources for this model: without a chat template there are no
    conversations to write, so ``self-chat`` is left out (given explicitly it is an error instead)."""
    if model_dir is None or "self-chat" not in sources:
        return list(sources)
    from transformers import AutoTokenizer

    from armor_vllm.offline.self_calibration import has_chat_template

    if has_chat_template(AutoTokenizer.from_pretrained(model_dir)):
        return list(sources)
    print("--preset long: the tokenizer has no chat template; calibrating without self-chat")
    return [s for s in sources if s != "self-chat"]


def _distill(layer, targets, tensors, metrics, inputs, dense_out, opts: OfflineOptions, out_dtype):
    from armor_vllm.offline.distill import DistillOptions, distill_tensors

    if opts.method != "armor" or inputs is None:
        raise ValueError("--distill tunes ARMOR's wrappers and kept values: it needs --method armor")
    settings = DistillOptions(
        **{
            k[len("distill_") :]: v
            for k, v in opts.method_options.items()
            if k.startswith("distill_") and k != "distill_target"
        },
        seed=opts.seed,
    )
    return distill_tensors(layer, targets, tensors, metrics, inputs, dense_out, opts.block_size, out_dtype, settings)


def _set_weights(layer: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> None:
    for t in targets:
        targets_mod.set_weight(layer, t, weights[t.name])


def _rebuilt_from_tensors(
    targets: list[Target], tensors: dict[str, torch.Tensor], block_size: int, wrappers: bool = True
) -> dict:
    from armor_vllm.core.format import decode_layer

    out = {}
    for t in targets:
        out[t.name] = decode_layer(t.checkpoint, tensors, block_size, wrappers).weight()
    return out


@dataclass
class _Run:
    """The state of one offline run as the layer walk advances: the options (defaults resolved), where
    it writes, what it compresses, and the calibration inputs of the current decoder layer (``inputs``:
    through the compressed layers in sequential order; ``dense_inputs``: through the dense ones, kept
    when an output-aware target or the distillation follows the dense model)."""

    opts: OfflineOptions
    model_dir: Path
    output: Path
    partial: Path
    stream: LayerStream
    plan: object  # targets.TargetPlan
    method: object
    out_dtype: torch.dtype
    samples: torch.Tensor | None = None  # the calibration windows (token ids)
    inputs: LayerInputs | None = None
    dense_inputs: LayerInputs | None = None
    calib_seconds: float = 0.0
    metrics: list = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.partial / WORK

    @property
    def output_aware(self) -> bool:
        return self.opts.method_options.get("output_target") == "dense"

    @property
    def follows_dense(self) -> bool:
        return self.output_aware or self.opts.method_options.get("distill_target") == "dense"


def run_offline(opts: OfflineOptions) -> dict:
    """Run the offline pass; returns the summary (also written into the report). The shape of
    llm-compressor's sequential pipeline: calibrate once, then for every decoder layer one step
    (statistics, compress, distill; or read back a finished layer) and propagate its inputs."""
    t0 = time.perf_counter()
    run = _start(opts)
    _calibrate(run)
    executor = make_executor(run.opts.workers, run.opts.ray_address)
    try:
        progress = tqdm(range(len(run.stream.layers)), desc=f"{run.opts.method} ({run.opts.order})", unit="layer")
        for index in progress:
            layer = run.stream.load_layer(index)
            tensors, metrics, ahead, dense_next = _layer_step(run, index, layer, executor)
            _propagate(run, index, layer, tensors, ahead, dense_next)
            run.stream.release_layer(index)
            run.metrics.extend(metrics)
            losses = [m["proxy_loss"] for m in metrics if m.get("proxy_loss") is not None]
            if losses:
                progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
    finally:
        executor.close()
    return _finish(run, t0)


def _start(opts: OfflineOptions) -> _Run:
    """Validate everything that can fail before any work, resolve the defaults and the block size,
    and create (or resume) ``OUTPUT.partial``."""
    from armor_vllm.models import resolve_model

    _validate(opts)
    model_dir = resolve_model(opts.model)
    output = Path(opts.output)
    partial = output.with_name(output.name + ".partial")
    if output.exists() and not opts.overwrite:
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    method_cls = get_method(opts.method)
    _check_targets(opts, method_cls)
    opts = _with_armor_defaults(opts, model_dir)
    # Before anything is written: an architecture or option the pass cannot handle fails here.
    targets_mod.check_architecture(model_dir)
    _check_chat_sources(opts, model_dir)
    stream = LayerStream(model_dir, dtype=torch.float32)
    plan = targets_mod.plan(stream, list(opts.ignore), opts.block_size)
    # From here on the block size is a number ("auto" resolved), so an explicit --block-size of the
    # same value resumes the same run.
    opts = replace(opts, block_size=plan.block_size)
    method = method_cls(block_size=opts.block_size, seed=opts.seed, **opts.method_options)
    _resume_or_begin(opts, partial)
    source_config = read_json(model_dir / "config.json")
    out_dtype = getattr(torch, str(source_config.get("dtype") or source_config.get("torch_dtype") or "bfloat16"))
    return _Run(opts, model_dir, output, partial, stream, plan, method, out_dtype)


def _resume_or_begin(opts: OfflineOptions, partial: Path) -> None:
    """Resume the unfinished run in ``partial`` when its options are these, refuse when they differ."""
    fingerprint = opts.fingerprint()
    run_file = partial / "run.json"
    if run_file.is_file():
        previous = read_json(run_file)
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{partial} holds an unfinished run with other options ({previous.get('options')}); "
                f"rerun with those options to resume it, or delete {partial} to start again"
            )
        print(f"resuming the unfinished run in {partial}")
    (partial / WORK).mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"fingerprint": fingerprint, "options": asdict(opts)})


def _calibrate(run: _Run) -> None:
    """The first decoder layer's calibration inputs (none for a method without statistics). The
    samples are kept in the work folder, so a resumed run calibrates on the very same windows
    (generated ones included) without writing them again."""
    if run.method.name == "magnitude":
        return
    tc = time.perf_counter()
    run.samples = _cached_samples(run.work / "calibration.safetensors", run.opts, run.model_dir)
    run.inputs = capture_layer_inputs(run.stream.model, run.samples)
    run.dense_inputs = run.inputs if run.follows_dense else None
    run.calib_seconds += time.perf_counter() - tc


def _cached_samples(cached: Path, opts: OfflineOptions, model_dir: Path) -> torch.Tensor:
    """``opts``' calibration windows, read from ``cached`` when a previous run wrote them, else built
    (``_calibration_samples``) and written there (atomically: a half-written file never counts)."""
    if cached.is_file():
        with safe_open(str(cached), framework="pt") as handle:
            return handle.get_tensor("samples")
    samples = _calibration_samples(opts, model_dir)
    tmp = cached.with_name(f".{cached.name}.tmp")
    save_file({"samples": samples.contiguous()}, str(tmp))
    os.replace(tmp, cached)
    return samples


def _e2e_samples(run: _Run) -> torch.Tensor:
    """What end-to-end distillation trains on: the layer-wise pass's windows, or with ``--e2e-data``
    windows of its own sources (same count and length; cached in the work folder like the pass's;
    the same sources as the calibration's are the same windows, not written twice)."""
    from armor_vllm.offline.e2e_distill import DATA_KEY

    sources = run.opts.method_options.get(DATA_KEY)
    if not sources or list(sources) == list(run.opts.calib_data):
        return run.samples
    opts = replace(run.opts, calib_data=list(sources))
    return _cached_samples(run.work / "e2e-calibration.safetensors", opts, run.model_dir)


def _layer_step(run: _Run, index: int, layer: nn.Module, executor):
    """One decoder layer: read it back when a previous run finished it, else measure its statistics,
    compress its targets, distil them, and save it. Returns its checkpoint tensors and metrics, the
    next layer's inputs when the step already computed them (distillation ran the layer as stored; in
    dense order, the statistics pass ran the dense layer), and the dense model's next inputs."""
    opts, targets = run.opts, run.plan.targets[index]
    if _layer_file(run.work, index).is_file():
        tensors, metrics = _load_layer(run.work, index)
        return tensors, metrics, None, None
    dense_out = dense_next = next_hidden = None
    if run.inputs is not None:
        tc = time.perf_counter()
        measured = collect_layer_stats(
            layer, run.inputs, targets, run.method.needs_full_hessian, run.dense_inputs if run.output_aware else None
        )
        groups, dense_out, routing, dense_next = (
            measured.groups,
            measured.outputs,
            measured.routing,
            measured.dense_outputs,
        )
        run.calib_seconds += time.perf_counter() - tc
    else:
        groups, routing = [StatsGroup(names=[t.name], stats=None) for t in targets], None
    if run.dense_inputs is not None and dense_next is None:  # weights still dense here
        dense_next = run_layer(layer, run.dense_inputs)
    tensors, metrics = _compress_layer(
        index, targets, layer, groups, run.method, run.out_dtype, opts.block_size, executor, routing
    )
    if opts.method_options.get("distill"):  # armor_vllm.offline.distill
        to_match = dense_next if opts.method_options.get("distill_target") == "dense" else dense_out
        tensors, metrics, next_hidden = _distill(
            layer, targets, tensors, metrics, run.inputs, to_match, opts, run.out_dtype
        )
    _save_layer(run.work, index, tensors, metrics)
    if opts.order == "sequential":
        ahead = run.inputs.next(next_hidden) if next_hidden is not None else None
    else:
        ahead = dense_out
    return tensors, metrics, ahead, dense_next


def _propagate(run: _Run, index: int, layer: nn.Module, tensors, ahead, dense_next) -> None:
    """The next decoder layer's inputs: in sequential order through this layer as the checkpoint holds
    it (factors in the stored dtype: the same bytes whether it was just compressed or read back), in
    dense order through the dense layer; and the dense model's own path when it is followed."""
    if run.dense_inputs is not None and dense_next is None:  # read back: the dense path goes on
        dense_next = run_layer(layer, run.dense_inputs)
    if run.inputs is not None:
        tc = time.perf_counter()
        if ahead is not None:  # the step already ran the layer
            run.inputs = ahead
        elif run.opts.order == "sequential":
            targets = run.plan.targets[index]
            rebuilt = _rebuilt_from_tensors(targets, tensors, run.opts.block_size, run.method.uses_wrappers)
            _set_weights(layer, targets, rebuilt)
            run.inputs = run_layer(layer, run.inputs)
        else:
            run.inputs = run_layer(layer, run.inputs)
        run.dense_inputs = dense_next
        run.calib_seconds += time.perf_counter() - tc


def _finish(run: _Run, t0: float) -> dict:
    """Write the checkpoint and the report into ``OUTPUT.partial``, then rename it to ``OUTPUT``."""
    e2e = None
    if run.opts.method_options.get("e2e"):  # after every layer, before the checkpoint is written
        from armor_vllm.offline.e2e_distill import options_from, run_e2e

        run.inputs = run.dense_inputs = None  # the walk's activations are not needed any more
        e2e = run_e2e(
            run.model_dir,
            run.work,
            [_layer_file(run.work, i) for i in range(len(run.plan.targets))],
            run.plan.targets,
            _e2e_samples(run),
            run.opts.block_size,
            run.out_dtype,
            options_from(run.opts.method_options, run.opts.seed),
            run.opts.method_options.get("device"),
        )
    source_config = read_json(run.model_dir / "config.json")
    summary = _assemble(run.opts, run.model_dir, run.partial, run.work, source_config, run.plan, run.metrics)
    if e2e is not None:
        summary["e2e"] = e2e
        summary["seconds_e2e"] = e2e.get("seconds", 0.0)
    summary["seconds_total"] = time.perf_counter() - t0
    summary["seconds_calibration"] = run.calib_seconds
    summary["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report_mod.write_report(run.partial, summary, run.metrics)
    shutil.rmtree(run.work)
    (run.partial / "run.json").unlink()
    if run.output.exists():
        shutil.rmtree(run.output)
    os.replace(run.partial, run.output)
    return summary


def _assemble(opts, model_dir, partial, work, source_config, plan, metrics) -> dict:
    """Write shards (dense tensors of the source plus every compressed layer), config and side files.
    ``ignore`` lists every linear-like module the plan left dense, by its checkpoint name."""
    owned = {name for m in metrics for name in m["replaces"]}
    writer = ShardWriter(partial)
    total_params = 0
    for name, tensor in iter_tensors(model_dir):
        total_params += tensor.numel()
        if name in owned:
            continue
        writer.add(name, tensor)
    pruned = 0
    wrapper_numbers = 0
    for index in sorted({m["layer"] for m in metrics}):
        tensors, _ = _load_layer(work, index)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
            if name.endswith(".compressed"):
                pruned += tensor.numel()
            if name.endswith((".wrapper_out", ".wrapper_in")):
                wrapper_numbers += tensor.numel()
    shards = writer.close()

    ignore = ["lm_head"] + plan.ignore()
    qcfg = ArmorConfig(
        block_size=opts.block_size,
        method=opts.method,
        targets=("Linear",),
        ignore=tuple(dict.fromkeys(ignore)),
        global_sparsity=round(pruned / max(total_params, 1), 6),
        wrappers=get_method(opts.method).uses_wrappers,  # plain 2:4 methods store no wrappers (format v2)
        extra={
            "producer": {
                "name": "armor-vllm",
                "order": opts.order,
                "calib_samples": opts.calib_samples,
                "seq_len": opts.seq_len,
                "seed": opts.seed,
                **opts.method_options,
            }
        },
    )
    config = armor_model_config(source_config, qcfg)
    write_json(partial / "config.json", config)
    copy_side_files(model_dir, partial)
    kept = pruned  # the stored values: as many as were pruned
    losses = [m["proxy_loss"] for m in metrics if m.get("proxy_loss") is not None]
    return {
        "model": str(model_dir),
        "output": str(opts.output),
        "method": opts.method,
        "order": opts.order,
        "block_size": opts.block_size,
        "matrices": len(metrics),
        "shards": shards,
        "bytes_on_disk": sum((partial / s).stat().st_size for s in shards),
        "global_sparsity": qcfg.global_sparsity,
        "wrapper_overhead": (wrapper_numbers / kept) if kept else 0.0,
        "mean_proxy_loss": (sum(losses) / len(losses)) if losses else None,
        "seconds_compress": sum(m["seconds"] for m in metrics),
        "seconds_distill": sum({m["layer"]: m.get("distill_seconds", 0.0) for m in metrics}.values()),
        "model_type": plan.model_type,
        "compressed_kinds": sorted({m["kind"] for m in metrics}),
        "dense": dense_budget.dense_entries(plan.dense, opts.dense_budget),
        **({"dense_budget": dense_budget.summary(opts.dense_budget, metrics)} if opts.dense_budget else {}),
        "experts": len({(m["layer"], m["name"].rsplit(".", 1)[0]) for m in metrics if m["kind"] == "expert"}),
        "experts_stats_fallback": len(
            {(m["layer"], m["name"].rsplit(".", 1)[0]) for m in metrics if m.get("stats_fallback")}
        ),
        # What else decides the bytes: the same options give the same checkpoint for the same torch
        # and thread count, but another thread count sums in another order, and the discrete 2:4
        # choices turn those last-bit differences into other masks (BENCHMARKS.md, section 0).
        "compute": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
