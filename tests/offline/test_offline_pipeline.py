"""The offline pass on a tiny random Llama: format, report, resume after an interruption, and
clear errors for bad options and files."""

import hashlib
import json

import pytest
import torch

from armor_vllm.core.checkpoint import load_tensors, read_armor_config
from armor_vllm.core.factorization import is_24_sparse
from armor_vllm.core.reader import dense_state_dict
from armor_vllm.offline import pipeline
from armor_vllm.offline.__main__ import main as offline_main
from armor_vllm.offline.pipeline import OfflineOptions, run_offline

SMALL = dict(calib_samples=4, seq_len=64)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wanda_writes_a_valid_checkpoint_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "wanda"
    summary = run_offline(
        OfflineOptions(model=str(tiny_model_dir), output=str(out), method="wanda", block_size=32, **SMALL)
    )
    assert summary["matrices"] == 14  # 2 layers x 7 linears
    assert not (tmp_path / "wanda.partial").exists()
    cfg = read_armor_config(out)
    assert cfg.method == "wanda" and cfg.block_size == 32 and not cfg.is_compressed("lm_head")
    report = json.loads((out / "armor_report.json").read_text())
    assert len(report["matrices"]) == 14 and all(0 < m["proxy_loss"] < 1 for m in report["matrices"])
    assert (out / "armor_report.png").stat().st_size > 1000
    for f in ("tokenizer.json", "generation_config.json"):
        assert (out / f).is_file()

    source = load_tensors(tiny_model_dir)
    dense = dense_state_dict(out)
    for name, w in source.items():
        if ".layers." in name and name.endswith("proj.weight"):
            rebuilt = dense[name]
            assert is_24_sparse(rebuilt)
            kept = rebuilt != 0
            assert torch.equal(rebuilt[kept], w[kept])  # identity wrappers: kept weights unchanged
        else:
            assert torch.equal(dense[name], w)


@pytest.mark.parametrize(
    "order, method, method_options",
    [
        ("sequential", "wanda", {}),
        ("dense", "wanda", {}),
        # ARMOR's defaults: output-aware targets, distillation (whose outputs feed the next layer)
        ("sequential", "armor", {"iterations": 1, "distill_steps": 2}),
    ],
)
def test_interrupted_run_resumes_to_identical_bytes(
    tiny_model_dir, tmp_path, monkeypatch, order, method, method_options
):
    opts = dict(
        model=str(tiny_model_dir), method=method, block_size=32, order=order, method_options=method_options, **SMALL
    )
    reference = tmp_path / "reference"
    summary = run_offline(OfflineOptions(output=str(reference), **opts))
    # what else decides the bytes is in the report (another thread count sums in another order)
    stored = json.loads((reference / "armor_report.json").read_text())["summary"]["compute"]
    assert stored == summary["compute"] == {"torch": torch.__version__, "threads": torch.get_num_threads()}

    out = tmp_path / "resumed"
    real = pipeline._compress_layer
    calls = []

    def crash_on_second_layer(index, *args, **kwargs):
        if index == 1:
            raise KeyboardInterrupt("simulated kill")
        calls.append(index)
        return real(index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_compress_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run_offline(OfflineOptions(output=str(out), **opts))
    assert not out.exists(), "a half-written checkpoint must never look complete"
    assert (tmp_path / "resumed.partial" / ".armor_work" / "layer-00000.safetensors").is_file()

    monkeypatch.setattr(
        pipeline, "_compress_layer", lambda index, *a, **k: (calls.append(index), real(index, *a, **k))[1]
    )
    run_offline(OfflineOptions(output=str(out), **opts))
    assert calls == [0, 1], "layer 0 must be reused, not recomputed"
    assert sha(out / "model.safetensors") == sha(reference / "model.safetensors")


def test_partial_run_with_other_options_is_refused(tiny_model_dir, tmp_path):
    partial = tmp_path / "x.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"fingerprint": "something-else", "options": {"method": "armor"}}))
    with pytest.raises(ValueError, match="unfinished run with other options"):
        run_offline(OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "x"), method="magnitude"))


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "done").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_offline(OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "done"), method="magnitude"))


def test_block_size_that_does_not_divide_names_the_layer(tiny_model_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"model.layers.0.self_attn.q_proj: block size 48 does not divide the output dimension 64"
    ):
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "y"), method="magnitude", block_size=48)
        )


def _target(name, shape, parts=None):
    from armor_vllm.offline.targets import Target

    return Target(
        name=name,
        checkpoint=f"model.layers.0.{name}",
        replaces=(),
        kind="linear",
        module=name,
        shape=shape,
        parts=parts,
    )


def test_auto_block_size_is_the_largest_that_fits_every_target():
    from armor_vllm.offline.targets import UnsupportedModel, choose_block_size

    assert choose_block_size([[_target("q", (576, 576)), _target("down", (576, 1536))]]) == 64
    assert choose_block_size([[_target("q", (576, 576))], [_target("k", (32, 576))]]) == 32  # any layer's shape counts
    assert choose_block_size([[_target("qkv", (640, 576), parts=(576, 32, 32))]]) == 32  # vLLM's split parts count
    assert choose_block_size([[_target("v", (48, 64))]]) == 16
    with pytest.raises(UnsupportedModel, match=r"none of \[64, 32, 16\] divides model.layers.0.o \(72 columns\)"):
        choose_block_size([[_target("q", (64, 64)), _target("o", (64, 72))]])


def test_auto_block_size_is_the_default_and_is_recorded(tiny_model_dir, tmp_path):
    assert OfflineOptions(model="m", output="o").block_size == "auto"
    out = tmp_path / "auto"
    summary = run_offline(OfflineOptions(model=str(tiny_model_dir), output=str(out), method="magnitude"))
    # hidden 64, but the key/value projections have 32 rows: auto falls back from 64 to 32
    assert summary["block_size"] == 32 and read_armor_config(out).block_size == 32


def test_auto_block_size_resumes_an_explicit_run_of_the_same_size(tiny_model_dir, tmp_path, monkeypatch):
    opts = dict(model=str(tiny_model_dir), output=str(tmp_path / "r"), method="wanda", **SMALL)
    real = pipeline._compress_layer

    def crash_on_second_layer(index, *args, **kwargs):
        if index == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_compress_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run_offline(OfflineOptions(block_size=32, **opts))
    monkeypatch.setattr(pipeline, "_compress_layer", real)
    summary = run_offline(OfflineOptions(block_size="auto", **opts))  # resolves to 32: same run, resumed
    assert summary["block_size"] == 32


@pytest.mark.parametrize("bad", [0, -32, "big", 32.0, True])
def test_bad_block_size_option_is_refused(tiny_model_dir, tmp_path, bad):
    with pytest.raises(ValueError, match="--block-size must be a positive integer or auto"):
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "b"), method="magnitude", block_size=bad)
        )


def test_cli_block_size_takes_auto_or_a_number(capsys):
    from armor_vllm.offline.__main__ import build_parser

    assert build_parser().parse_args(["--output", "o", "--block-size", "auto"]).block_size == "auto"
    assert build_parser().parse_args(["--output", "o", "--block-size", "16"]).block_size == 16
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--output", "o", "--block-size", "sixty"])
    assert "expected a positive integer or auto, got 'sixty'" in capsys.readouterr().err


def test_cli_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nblocksize: 32\n")
    assert offline_main(["--model", str(tiny_model_dir), "--output", str(tmp_path / "z"), "--recipe", str(recipe)]) == 2
    assert "unknown option(s) ['blocksize']" in capsys.readouterr().err

    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    assert (
        offline_main(
            [
                "--model",
                str(tiny_model_dir),
                "--output",
                str(tmp_path / "z"),
                "--method",
                "wanda",
                "--calib-data",
                str(bad),
            ]
        )
        == 2
    )
    assert f"{bad}:2: expected an object with a string field 'text'" in capsys.readouterr().err

    assert offline_main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "z")]) == 2
    assert "not a local Hugging Face directory" in capsys.readouterr().err


def test_recipe_files_in_offline_parse():
    from pathlib import Path

    from armor_vllm.offline.__main__ import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ holds the recipes"
    from armor_vllm.api import offline_options

    for recipe in recipes:
        assert load_recipe(str(recipe))["method"]
        pipeline._validate(offline_options(None, "out", recipe=recipe))  # every value is one the pass takes


def test_layer_stream_matches_the_full_model(tiny_model_dir):
    """Streaming one layer at a time computes what transformers computes with the whole model."""
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline.layer_walk import capture_layer_inputs, run_layer
    from armor_vllm.offline.streaming import LayerStream

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = full(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 0

    stream = LayerStream(tiny_model_dir)
    assert all(p.is_meta for p in stream.layers.parameters())  # nothing of the layers read yet
    inputs = capture_layer_inputs(stream.model, ids)
    layer = stream.load_layer(0)
    out = run_layer(layer, inputs)
    stream.release_layer(0)
    assert all(p.is_meta for p in stream.layers[0].parameters())
    torch.testing.assert_close(out.hidden[0], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_identical_bytes(default_model_dir, tmp_path):
    """A real kill: SIGKILL ``python -m armor_vllm.offline`` once layer 1 is saved, rerun the same
    command, and get the bytes of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from armor_vllm.core.checkpoint import copy_side_files

    model_dir = tmp_path / "tiny6"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    copy_side_files(default_model_dir, model_dir)
    args = dict(method="armor", block_size=32, method_options={"preset": "quick", "iterations": 1}, **SMALL)

    reference = tmp_path / "reference"
    run_offline(OfflineOptions(model=str(model_dir), output=str(reference), **args))

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "armor_vllm.offline",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--method",
        "armor",
        "--block-size",
        "32",
        "--preset",
        "quick",
        "--iterations",
        "1",
        "--calib-samples",
        str(SMALL["calib_samples"]),
        "--seq-len",
        str(SMALL["seq_len"]),
    ]
    work = tmp_path / "killed.partial" / ".armor_work"
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not (work / "layer-00001.safetensors").exists():
                assert proc.poll() is None, (
                    f"the run ended (exit {proc.returncode}) before layer 1 was saved:\n{log.read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, "layer 1 was not saved within 10 minutes"
                time.sleep(0.02)
            assert proc.poll() is None, "the run finished before it could be killed: make each layer slower"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must never leave a complete-looking OUTPUT"
    assert not (work / "layer-00005.safetensors").exists(), "the kill came after the last layer"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "resuming the unfinished run" in rerun.stdout
    assert not (tmp_path / "killed.partial").exists()
    assert sha(out / "model.safetensors") == sha(reference / "model.safetensors")


def _same(a, b, where="") -> None:
    """Exact equality of nested call arguments (tensors, tuples, dicts, plain values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_each_layer_gets_the_arguments_the_model_gives_it(arch, tmp_path, default_model_dir):
    """A model mixing sliding-window (window 8) and full attention: every decoder layer's calibration
    inputs (hidden states and keyword arguments: its own mask and rotary embeddings) equal what the
    full model's forward feeds that layer, and streaming layer by layer gives the model's outputs."""
    from tiny_archs import make_tiny
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline.layer_walk import capture_layer_inputs, run_layer
    from armor_vllm.offline.streaming import LayerStream

    model_dir = make_tiny(arch, tmp_path / arch, default_model_dir)
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))  # longer than the window
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = []

    def grab(module, args, kwargs):
        kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "hidden_states")}
        seen.append((args[0] if args else kwargs["hidden_states"], tuple(args[1:]), kept))

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in full.model.layers]
    with torch.no_grad():
        full(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        expect_out = full(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states

    stream = LayerStream(model_dir)
    inputs = capture_layer_inputs(stream.model, ids, batch=8)
    assert len(inputs.hidden) == 1 and len(inputs.calls) == 2
    run_layer_outputs = []
    masks = [seen[i][2]["attention_mask"] for i in range(2)]
    assert not (isinstance(masks[0], torch.Tensor) and isinstance(masks[1], torch.Tensor) and torch.equal(*masks)), (
        "the sliding and the full layer must get different masks for this test to mean anything"
    )
    for index in range(2):
        hidden, args, kwargs = seen[index]
        torch.testing.assert_close(inputs.hidden[0], hidden, rtol=1e-6, atol=1e-6)
        got_args, got_kwargs = inputs.arguments(0)
        _same(got_args, args, f"layer {index} args")
        _same(got_kwargs, kwargs, f"layer {index} kwargs")
        layer = stream.load_layer(index)
        inputs = run_layer(layer, inputs)
        stream.release_layer(index)
        run_layer_outputs.append(inputs.hidden[0])
    # hidden_states: the embeddings, then each layer's output (the last one after the final norm).
    torch.testing.assert_close(run_layer_outputs[0], expect_out[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        final = stream.model.model.norm(run_layer_outputs[1])
    torch.testing.assert_close(final, expect_out[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_layers_stream_as_transformers_loads_them(arch, tmp_path, default_model_dir):
    """The checkpoint stores each expert apart (and Mixtral names its block ``block_sparse_moe``);
    read through transformers' key conversion, a streamed layer holds exactly what
    ``from_pretrained`` builds, and computes the model's own layer output."""
    from tiny_archs import make_tiny
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline.layer_walk import capture_layer_inputs, run_layer
    from armor_vllm.offline.streaming import LayerStream

    model_dir = make_tiny(arch, tmp_path / arch, default_model_dir)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream = LayerStream(model_dir)
    layer = stream.load_layer(0)
    expect = dict(full.model.layers[0].named_parameters())
    got = dict(layer.named_parameters())
    assert sorted(got) == sorted(expect) and any(p.dim() == 3 for p in got.values())
    for name, p in got.items():
        assert torch.equal(p, expect[name]), name
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = full(input_ids=ids, output_hidden_states=True).hidden_states[1]
    out = run_layer(layer, capture_layer_inputs(stream.model, ids))
    torch.testing.assert_close(out.hidden[0], hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_inputs_are_the_routed_tokens(arch, tmp_path, default_model_dir):
    """What each expert's statistics are taken from: the tokens the router sent to it (gate/up) and
    their intermediate activations (down). Weighted by the router and summed over experts, they
    reproduce the output transformers' own experts module computes."""
    from tiny_archs import make_tiny
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline import experts as moe

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny(arch, tmp_path / arch, default_model_dir), dtype=torch.float32
    ).eval()
    module = model.model.layers[0].mlp.experts
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1)))
    handle.remove()
    (hidden, index, weights), output = calls[0]
    rebuilt = torch.zeros_like(output)
    seen_in = set()
    for e, part, x in moe.expert_inputs(module, (hidden, index, weights), {}):
        tokens = (index == e).any(-1).nonzero().flatten()
        if part == "in":
            torch.testing.assert_close(x, hidden[tokens])
            seen_in.add(e)
            continue
        w = (weights * (index == e)).sum(-1)[tokens]
        rebuilt.index_add_(0, tokens, w[:, None] * (x @ moe.expert_weight(module, e, "down").T))
    assert seen_in == set(index.unique().tolist())
    torch.testing.assert_close(rebuilt, output, rtol=1e-5, atol=1e-6)


def test_experts_with_too_few_tokens_follow_the_rule():
    from armor_vllm.offline import experts as moe
    from armor_vllm.offline.methods import InputStats

    def stats(n, value):
        return InputStats(sq=torch.full((4,), float(value), dtype=torch.float64), n_tokens=n)

    enough = moe.MIN_EXPERT_TOKENS
    own = {(0, "in"): stats(enough, 1), (0, "mid"): stats(enough, 2), (1, "in"): stats(3, 3), (1, "mid"): stats(3, 4)}
    block = stats(enough + 3, 5)
    chosen, tokens, fell_back = moe.resolve(3, own, block)  # expert 2 got no token at all
    assert tokens == [enough, 3, 0] and fell_back == [1, 2]
    assert chosen[(0, "in")] is own[(0, "in")] and chosen[(0, "mid")] is own[(0, "mid")]
    for e in (1, 2):
        assert chosen[(e, "in")] is block  # every token of the block
        pooled = chosen[(e, "mid")]  # the down inputs of all experts together
        assert pooled.n_tokens == enough + 3 and torch.equal(pooled.sq, torch.full((4,), 6.0, dtype=torch.float64))


def _no_output_left(tmp_path, name):
    return not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


def test_unsupported_architecture_fails_before_any_work(tmp_path, default_model_dir, capsys):
    """A model type the pass is not tested with (GPT-NeoX stores q/k/v fused and interleaved per
    head): a clear error naming it, and nothing written that looks resumable."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from armor_vllm.core.checkpoint import copy_side_files

    model_dir = tmp_path / "neox"
    config = GPTNeoXConfig(
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    copy_side_files(default_model_dir, model_dir)
    assert offline_main(["--model", str(model_dir), "--output", str(tmp_path / "out"), "--method", "wanda"]) == 2
    err = capsys.readouterr().err
    assert "model type 'gpt_neox'" in err and "supported:" in err and "Traceback" not in err
    assert _no_output_left(tmp_path, "out")


def test_ignore_is_honoured_by_the_walk(tiny_model_dir, tmp_path):
    """``--ignore``d linears are not compressed: the checkpoint keeps their dense source weight, the
    config lists them, and the next layers' statistics see them dense."""
    out = tmp_path / "ignored"
    summary = run_offline(
        OfflineOptions(
            model=str(tiny_model_dir),
            output=str(out),
            method="wanda",
            block_size=32,
            ignore=["re:.*down_proj"],
            **SMALL,
        )
    )
    assert summary["matrices"] == 12
    cfg = read_armor_config(out)
    stored = load_tensors(out)
    source = load_tensors(tiny_model_dir)
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        assert torch.equal(stored[f"{name}.weight"], source[f"{name}.weight"])
        assert f"{name}.compressed" not in stored and not cfg.is_compressed(name)
        assert f"model.layers.{i}.mlp.up_proj.compressed" in stored and cfg.is_compressed(
            f"model.layers.{i}.mlp.up_proj"
        )
    assert {d["name"]: d["reason"] for d in summary["dense"]}["model.layers.1.mlp.down_proj"] == "--ignore"


@pytest.mark.parametrize(
    "ignore, message",
    [
        (["re:.*q_proj"], "vLLM fuses"),  # q alone: vLLM runs q/k/v as one layer
        (["nothing_like_this"], "matches no compressible projection"),
    ],
)
def test_bad_ignore_fails_before_any_work(tiny_model_dir, tmp_path, ignore, message):
    with pytest.raises(ValueError, match=message):
        run_offline(
            OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "x"), method="wanda", ignore=ignore)
        )
    assert _no_output_left(tmp_path, "x")


def test_ignoring_some_experts_of_a_block_is_refused_and_all_of_them_works(tmp_path, default_model_dir):
    from tiny_archs import make_tiny

    model_dir = make_tiny("mixtral", tmp_path / "mixtral", default_model_dir)
    with pytest.raises(ValueError, match="vLLM runs all experts of a MoE block as one layer"):
        run_offline(
            OfflineOptions(
                model=str(model_dir), output=str(tmp_path / "x"), method="magnitude", ignore=["re:.*experts\\.0\\."]
            )
        )
    assert _no_output_left(tmp_path, "x")
    out = tmp_path / "attention-only"
    summary = run_offline(
        OfflineOptions(model=str(model_dir), output=str(out), method="magnitude", ignore=["re:.*experts"])
    )
    assert summary["matrices"] == 8 and summary["compressed_kinds"] == ["linear"]
    cfg = read_armor_config(out)
    assert not cfg.is_compressed("model.layers.0.block_sparse_moe.experts")
    assert "model.layers.1.block_sparse_moe.experts" in cfg.ignore
    assert torch.equal(
        load_tensors(out)["model.layers.0.block_sparse_moe.experts.3.w2.weight"],
        load_tensors(model_dir)["model.layers.0.block_sparse_moe.experts.3.w2.weight"],
    )
