"""End-to-end distillation (``armor_vllm.offline.e2e_distill``): its objective is a divergence, it
never returns a model worse on that objective than it started (even at an absurd learning rate),
lowers it with sane settings, leaves the checkpoint format as it is, resumes an interrupted run to
the same bytes, and refuses bad options clearly."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from armor_vllm.offline import e2e_distill
from armor_vllm.offline.e2e_distill import E2EOptions, Teacher, check_options, sequence_objective
from armor_vllm.offline.pipeline import OfflineOptions, run_offline

SMALL = dict(method="armor", block_size=16, calib_samples=4, seq_len=64)
QUICK = {"preset": "quick", "iterations": 1}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama with larger weights: its next-token distributions are far from uniform,
    so the KL between it and its compressed version is well above float32 noise."""
    from safetensors.torch import load_file, save_file

    from armor_vllm.core.checkpoint import copy_side_files

    out = tmp_path_factory.mktemp("sharp-llama")
    tensors = load_file(tiny_model_dir / "model.safetensors")
    scale = lambda k: 10.0 if "embed" in k else 5.0 if "proj" in k else 1.0  # noqa: E731
    save_file({k: (v * scale(k)).contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    copy_side_files(tiny_model_dir, out)
    (out / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    return out


def _run(model_dir, out, **e2e):
    options = {**QUICK, "e2e": True, **e2e} if e2e else dict(QUICK)
    return run_offline(OfflineOptions(model=str(model_dir), output=str(out), method_options=options, **SMALL))


def test_objective_is_the_kl_divergence_coarsened_to_the_teachers_top_k():
    gen = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 3, 10, generator=gen)
    model = torch.nn.Module()
    model.forward = lambda input_ids, **_: type("Out", (), {"logits": teacher_logits})()
    teacher = e2e_distill.teacher_outputs(model, torch.zeros(2, 3, dtype=torch.long), 9, 1, False, "cpu")
    teacher = teacher.slice(torch.arange(2), "cpu")
    full = torch.nn.functional.kl_div(
        torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1), log_target=True, reduction="none"
    )
    objective, kl = sequence_objective(student_logits, None, teacher, 0.0)  # k = V - 1: exact
    torch.testing.assert_close(objective, full.sum(-1).mean(-1))
    same, _ = sequence_objective(teacher_logits, None, teacher, 0.0)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    top3 = e2e_distill.teacher_outputs(model, torch.zeros(2, 3, dtype=torch.long), 3, 2, False, "cpu")
    coarse, _ = sequence_objective(student_logits, None, top3.slice(torch.arange(2), "cpu"), 0.0)
    assert bool((coarse >= 0).all()) and bool((coarse <= objective + 1e-6).all())  # coarsening never adds


def test_batches_depend_on_the_step_only_and_cover_every_sequence():
    steps = [e2e_distill.batch_rows(s, 3, 5, seed=1) for s in range(5)]
    assert torch.equal(torch.cat(steps).sort().values, torch.arange(5).repeat_interleave(3))
    assert torch.equal(e2e_distill.batch_rows(3, 3, 5, seed=1), steps[3])


E2E = dict(e2e_steps=4, e2e_lr=1e-3)


@pytest.fixture(scope="module")
def e2e_reference(sharp_model_dir, tmp_path_factory):
    """One uninterrupted run with sane settings."""
    out = tmp_path_factory.mktemp("e2e") / "reference"
    return out, _run(sharp_model_dir, out, **E2E)


def test_sane_settings_lower_the_objective_and_the_checkpoint_loads(e2e_reference):
    from armor_vllm.hf.dense import load_dense_hf_model

    out, summary = e2e_reference
    info = summary["e2e"]
    assert info["steps"] == 4 and info["kept"] == 1.0
    assert info["objective_after"] < 0.9 * info["objective_before"]
    report = json.loads((out / "armor_report.json").read_text())["summary"]
    assert report["e2e"]["objective_after"] == info["objective_after"] and report["seconds_e2e"] > 0
    producer = json.loads((out / "config.json").read_text())["quantization_config"]["producer"]
    assert producer["e2e"] is True and producer["e2e_steps"] == 4
    load_dense_hf_model(out)  # the format is unchanged: it loads and validates


def test_bfloat16_steps_lower_the_float32_objective(sharp_model_dir, e2e_reference, tmp_path):
    """Training under bfloat16 autocast (``auto`` on a CPU with AMX/AVX-512 BF16) still lowers the
    objective as measured in float32, and the run says which precision it trained in."""
    precision = "float32" if e2e_reference[1]["e2e"]["precision"] == "bfloat16" else "bfloat16"
    info = _run(sharp_model_dir, tmp_path / "other", **E2E, e2e_precision=precision)["e2e"]
    assert info["precision"] == precision and info["kept"] == 1.0
    assert info["objective_after"] < 0.9 * info["objective_before"]


def test_auto_precision_is_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    from armor_vllm import hardware

    assert e2e_distill.training_dtype("float32", "cpu") == torch.float32
    assert e2e_distill.training_dtype("bfloat16", "cpu") == torch.bfloat16
    for flags, expected in [({"avx2", "fma"}, torch.float32), ({"avx2", "avx512f", "amx_bf16"}, torch.bfloat16)]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert e2e_distill.training_dtype("auto", "cpu") == expected
    assert hardware.cpu_has_native_bf16(frozenset({"avx512_bf16"}))


def test_the_cosine_schedule_warms_up_peaks_and_ends_near_zero():
    options = E2EOptions(steps=200, lr=1e-4, schedule="cosine")
    rates = [e2e_distill.lr_at(s, options) for s in range(200)]
    warmup = round(e2e_distill.WARMUP_SHARE * 200)
    assert rates[0] == pytest.approx(1e-4 / warmup) and max(rates) == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup]))  # rises
    assert all(a >= b for a, b in zip(rates[warmup - 1 :], rates[warmup:]))  # then falls
    assert rates[-1] < 1e-4 / 1000
    assert {e2e_distill.lr_at(s, E2EOptions(lr=2e-5)) for s in (0, 7, 999)} == {2e-5}


def test_a_cosine_run_trains_at_the_schedule_s_rates(sharp_model_dir, tmp_path, monkeypatch):
    """The optimiser steps at ``lr_at`` of each step, and the run says which schedule it followed."""
    used = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    info = _run(sharp_model_dir, tmp_path / "cosine", e2e_steps=4, e2e_lr=1e-3, e2e_schedule="cosine")["e2e"]
    options = E2EOptions(steps=4, lr=1e-3, schedule="cosine")
    assert used == [e2e_distill.lr_at(s, options) for s in range(4)] and len(set(used)) > 1
    assert info["schedule"] == "cosine" and info["lr"] == 1e-3


def test_an_absurd_learning_rate_leaves_the_layer_wise_result_untouched(sharp_model_dir, tmp_path, monkeypatch):
    from armor_vllm.hf.dense import load_dense_hf_model

    monkeypatch.setattr(e2e_distill._Student, "write", lambda *a: pytest.fail("a worse model was written"))
    info = _run(sharp_model_dir, tmp_path / "absurd", e2e_steps=2, e2e_lr=10.0)["e2e"]
    assert info["kept"] == 0.0 and not info["objective_after"] < info["objective_before"]
    load_dense_hf_model(tmp_path / "absurd")


def test_an_interrupted_e2e_run_resumes_to_the_same_bytes(sharp_model_dir, e2e_reference, tmp_path, monkeypatch):
    monkeypatch.setattr(e2e_distill, "SAVE_SECONDS", 0.0)  # save the state after every step
    real_save, real_rows = e2e_distill._save_state, e2e_distill.batch_rows
    steps = []

    def save_then_die(path, step, *rest):
        real_save(path, step, *rest)
        if step == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(e2e_distill, "_save_state", save_then_die)
    monkeypatch.setattr(
        e2e_distill, "batch_rows", lambda step, *a, **k: (steps.append(step), real_rows(step, *a, **k))[1]
    )
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(sharp_model_dir, out, **E2E)
    work = tmp_path / "resumed.partial" / ".armor_work"
    assert not out.exists()
    assert (work / e2e_distill.STATE_FILE).is_file() and (work / e2e_distill.TEACHER_FILE).is_file()

    monkeypatch.setattr(e2e_distill, "_save_state", real_save)
    steps.clear()
    summary = _run(sharp_model_dir, out, **E2E)
    assert steps == [2, 3], "the saved steps are not done again"
    assert summary["e2e"]["steps"] == 4 and summary["e2e"]["kept"] == 1.0
    assert sha(out / "model.safetensors") == sha(e2e_reference[0] / "model.safetensors")


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("armor", {"e2e": True, "e2e_steps": 0}, "--e2e-steps must be a positive integer"),
        ("armor", {"e2e": True, "e2e_lr": -1.0}, "--e2e-lr must be a positive number"),
        ("armor", {"e2e": True, "e2e_seconds": float("nan")}, "--e2e-seconds must be a positive number"),
        ("armor", {"e2e": True, "e2e_topk": 2.5}, "--e2e-topk must be a positive integer"),
        ("armor", {"e2e": True, "e2e_batch": True}, "--e2e-batch must be a positive integer"),
        ("armor", {"e2e": True, "e2e_hidden": -0.5}, "--e2e-hidden must be a number >= 0"),
        ("armor", {"e2e": True, "e2e_precision": "fp8"}, "--e2e-precision must be one of auto, float32, bfloat16"),
        ("armor", {"e2e": True, "e2e_schedule": "linear"}, "--e2e-schedule must be one of constant, cosine"),
        ("armor", {"e2e": "yes"}, "--e2e must be true or false"),
        ("armor", {"e2e_steps": 10}, "--e2e-steps given without --e2e"),
        ("armor", {"e2e_data": ["pydoc"]}, "--e2e-data given without --e2e"),
        ("armor", {"e2e": True, "e2e_data": "pydoc"}, "--e2e-data must be a list"),
        ("armor", {"e2e": True, "e2e_data": ["pydoc", "no-such-text"]}, "--e2e-data 'no-such-text' is not a file"),
        ("wanda", {"e2e": True}, "needs --method armor"),
    ],
)
def test_bad_options_are_refused_before_any_work(tiny_model_dir, tmp_path, method, options, message):
    with pytest.raises(ValueError, match=message):
        check_options(method, options)
    with pytest.raises(ValueError, match=message):
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "x"), method=method, method_options=options)
        )
    assert not (tmp_path / "x.partial").exists()


def test_options_reach_the_run_and_its_fingerprint():
    from armor_vllm.api import offline_options
    from armor_vllm.offline.__main__ import build_parser, options_from_args
    from armor_vllm.offline.pipeline import _with_armor_defaults

    args = build_parser().parse_args(["--output", "o", "--e2e", "--e2e-steps", "7", "--e2e-lr", "2e-5"])
    opts = options_from_args(args)
    assert opts.method_options == {"e2e": True, "e2e_steps": 7, "e2e_lr": 2e-5}
    assert e2e_distill.options_from(opts.method_options, seed=3) == E2EOptions(steps=7, lr=2e-5, seed=3)
    assert build_parser().parse_args(["--output", "o", "--no-e2e"]).e2e is False
    base = OfflineOptions(model="m", output="o")
    assert _with_armor_defaults(base).method_options["e2e"] is False  # off by default
    assert opts.fingerprint() != offline_options(None, "o", e2e=True, e2e_steps=8, e2e_lr=2e-5).fingerprint()
    assert isinstance(Teacher, type)


def test_e2e_trains_on_its_own_data_and_the_layer_wise_pass_on_the_calibration(sharp_model_dir, tmp_path, monkeypatch):
    """``--e2e-data``: the end-to-end phase gets windows of its own sources (built as ``--calib-data``
    builds them), the layer-wise pass keeps its calibration windows; both are options of the run."""
    from dataclasses import replace

    from armor_vllm.offline.pipeline import _calibration_samples

    seen = {}
    real = e2e_distill.run_e2e
    monkeypatch.setattr(e2e_distill, "run_e2e", lambda *a, **k: (seen.setdefault("samples", a[4]), real(*a, **k))[1])
    opts = OfflineOptions(
        model=str(sharp_model_dir),
        output=str(tmp_path / "own-data"),
        calib_data=["jargon"],
        method_options={**QUICK, "e2e": True, "e2e_steps": 1, "e2e_data": ["pydoc"]},
        **SMALL,
    )
    summary = run_offline(opts)
    assert summary["e2e"]["steps"] == 1
    expected = _calibration_samples(replace(opts, calib_data=["pydoc"]), sharp_model_dir)
    assert torch.equal(seen["samples"], expected)
    assert not torch.equal(expected, _calibration_samples(opts, sharp_model_dir))
    args = ["--output", "o", "--e2e", "--e2e-data", "pydoc", "self-chat"]
    from armor_vllm.offline.__main__ import build_parser, options_from_args

    parsed = options_from_args(build_parser().parse_args(args))
    assert parsed.method_options["e2e_data"] == ["pydoc", "self-chat"]
    assert parsed.fingerprint() != replace(parsed, method_options={"e2e": True}).fingerprint()

    # the calibration's own sources: the pass's windows, not built a second time
    from armor_vllm.offline import pipeline

    built = []
    real_build = pipeline._calibration_samples
    monkeypatch.setattr(pipeline, "_calibration_samples", lambda *a: (built.append(a), real_build(*a))[1])
    seen.clear()
    run_offline(
        replace(
            opts, output=str(tmp_path / "same-data"), method_options={**opts.method_options, "e2e_data": ["jargon"]}
        )
    )
    assert len(built) == 1 and torch.equal(seen["samples"], real_build(opts, sharp_model_dir))


def test_the_long_preset_is_the_default_plus_e2e_on_a_self_generated_mix():
    from armor_vllm.offline.methods.armor import FULL_PRESETS, LONG_E2E_DATA, PRESETS
    from armor_vllm.offline.pipeline import _with_armor_defaults

    def resolved(calib_data=(), **options):
        opts = OfflineOptions(model="m", output="o", calib_data=list(calib_data), method_options=options)
        return _with_armor_defaults(opts)

    assert PRESETS["long"] == PRESETS["default"] and FULL_PRESETS["long"] == FULL_PRESETS["default"]
    long = resolved(preset="long")
    assert long.method_options["e2e"] is True and long.method_options["e2e_steps"] == 200
    assert long.method_options["e2e_seconds"] >= 200 * 5  # the steps decide, not the time cap
    assert long.method_options["distill"] is True  # the default's layer-wise pass, distillation included
    assert long.calib_data == []  # ... on the default's text calibration
    e2e_data = long.method_options["e2e_data"]
    assert e2e_data == list(LONG_E2E_DATA) and {"self-chat", "self-free"} <= set(e2e_data)
    mine = resolved(["pydoc"], preset="long", e2e_steps=5, e2e_data=["jargon"])  # explicit options win
    assert mine.calib_data == ["pydoc"] and mine.method_options["e2e_steps"] == 5
    assert mine.method_options["e2e_data"] == ["jargon"]
    assert resolved(preset="long", e2e=False).method_options["e2e"] is False
    default = resolved()  # nothing of it leaks into the default
    assert default.calib_data == [] and default.method_options["e2e"] is False
    assert "e2e_data" not in default.method_options
    assert long.fingerprint() != default.fingerprint()
    check_options("armor", long.method_options)  # what the preset resolves to is valid


def test_the_long_preset_writes_no_conversations_for_a_model_without_chat_template(tiny_model_dir, monkeypatch):
    from armor_vllm.offline import self_calibration
    from armor_vllm.offline.methods.armor import LONG_E2E_DATA
    from armor_vllm.offline.pipeline import _with_armor_defaults

    opts = OfflineOptions(model=str(tiny_model_dir), output="o", method_options={"preset": "long"})
    assert _with_armor_defaults(opts, tiny_model_dir).method_options["e2e_data"] == list(LONG_E2E_DATA)
    monkeypatch.setattr(self_calibration, "has_chat_template", lambda tokenizer: False)
    sources = _with_armor_defaults(opts, tiny_model_dir).method_options["e2e_data"]
    assert "self-chat" not in sources and "self-free" in sources


@pytest.mark.parametrize("option", ["calib_data", "e2e_data"])
def test_self_chat_without_a_chat_template_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch, option):
    from armor_vllm.offline import self_calibration

    monkeypatch.setattr(self_calibration, "has_chat_template", lambda tokenizer: False)
    given = {"e2e": True, "e2e_data": ["pydoc", "self-chat"]} if option == "e2e_data" else {}
    opts = OfflineOptions(
        model=str(tiny_model_dir),
        output=str(tmp_path / "x"),
        calib_data=["pydoc", "self-chat"] if option == "calib_data" else [],
        method_options={**QUICK, **given},
        **SMALL,
    )
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} self-chat needs a model with a chat template"):
        run_offline(opts)
    assert not (tmp_path / "x.partial").exists()
