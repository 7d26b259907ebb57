"""The offline pass on a tiny random Llama: format, report, resume after an interruption, and
clear errors for bad options and files."""

import hashlib
import json

import pytest
import torch

from armor_vllm.checkpoint import dense_state_dict, load_tensors, read_armor_config
from armor_vllm.factorization import is_24_sparse
from armor_vllm.offline import pipeline
from armor_vllm.offline.__main__ import main as offline_main
from armor_vllm.offline.pipeline import OfflineOptions, run_offline

SMALL = dict(calib_samples=4, seq_len=64)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wanda_writes_a_valid_checkpoint_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "wanda"
    summary = run_offline(OfflineOptions(model=str(tiny_model_dir), output=str(out), method="wanda", block_size=32, **SMALL))
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


@pytest.mark.parametrize("order", ["sequential", "dense"])
def test_interrupted_run_resumes_to_identical_bytes(tiny_model_dir, tmp_path, monkeypatch, order):
    opts = dict(model=str(tiny_model_dir), method="wanda", block_size=32, order=order, **SMALL)
    reference = tmp_path / "reference"
    run_offline(OfflineOptions(output=str(reference), **opts))

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

    monkeypatch.setattr(pipeline, "_compress_layer", lambda index, *a, **k: (calls.append(index), real(index, *a, **k))[1])
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
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: block size 48 does not divide the output dimension 64"):
        run_offline(OfflineOptions(model=str(tiny_model_dir), output=str(tmp_path / "y"), method="magnitude", block_size=48))


def test_cli_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nblocksize: 32\n")
    assert offline_main(["--model", str(tiny_model_dir), "--output", str(tmp_path / "z"), "--recipe", str(recipe)]) == 2
    assert "unknown option(s) ['blocksize']" in capsys.readouterr().err

    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    assert offline_main(["--model", str(tiny_model_dir), "--output", str(tmp_path / "z"), "--method", "wanda",
                         "--calib-data", str(bad)]) == 2
    assert f"{bad}:2: expected an object with a string field 'text'" in capsys.readouterr().err

    assert offline_main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "z")]) == 2
    assert "not a local Hugging Face directory" in capsys.readouterr().err


def test_recipe_files_in_offline_parse():
    from pathlib import Path

    from armor_vllm.offline.__main__ import load_recipe

    recipes = sorted((Path(__file__).resolve().parent.parent / "offline").glob("*.yaml"))
    assert recipes, "offline/ holds the recipes"
    for recipe in recipes:
        assert load_recipe(str(recipe))["method"]


def test_layer_stream_matches_the_full_model(tiny_model_dir):
    """Streaming one layer at a time computes what transformers computes with the whole model."""
    from transformers import AutoModelForCausalLM

    from armor_vllm.offline.layer_walk import capture_first_layer_inputs, run_layer
    from armor_vllm.offline.streaming import LayerStream

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = full(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 0

    stream = LayerStream(tiny_model_dir)
    assert all(p.is_meta for p in stream.layers.parameters())  # nothing of the layers read yet
    inputs = capture_first_layer_inputs(stream.model, ids)
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

    from armor_vllm.checkpoint import copy_side_files

    model_dir = tmp_path / "tiny6"
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    copy_side_files(default_model_dir, model_dir)
    args = dict(method="armor", block_size=32, method_options={"preset": "quick", "iterations": 1}, **SMALL)

    reference = tmp_path / "reference"
    run_offline(OfflineOptions(model=str(model_dir), output=str(reference), **args))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "armor_vllm.offline", "--model", str(model_dir), "--output", str(out),
           "--method", "armor", "--block-size", "32", "--preset", "quick", "--iterations", "1",
           "--calib-samples", str(SMALL["calib_samples"]), "--seq-len", str(SMALL["seq_len"])]
    work = tmp_path / "killed.partial" / ".armor_work"
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not (work / "layer-00001.safetensors").exists():
                assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before layer 1 was saved:\n{log.read_text()[-3000:]}"
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
