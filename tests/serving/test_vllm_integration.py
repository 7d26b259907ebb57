"""vLLM with the plugin computes what the checkpoint means: greedy tokens and prompt logprobs from
vLLM (both CPU kernels) equal those of transformers loading the checkpoint through armor_vllm's
quantizer (``AutoModelForCausalLM.from_pretrained``: ARMOR layers computing ``A (S (B x))``).

The checkpoint (conftest's ``armor_checkpoint``) has random non-identity wrappers, so the wrappers,
the fused q/k/v and gate/up shards and the 2:4 cores are all exercised."""

import json
import math

import pytest
import torch

import armor_vllm  # noqa: F401  (registers the transformers quantizer)

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]


@pytest.fixture(scope="module")
def hf_reference(armor_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armor_vllm.hf.quantizer import ArmorLinear

    tok = AutoTokenizer.from_pretrained(armor_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(armor_checkpoint, dtype=torch.float32)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 210
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    greedy, logprobs = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
            greedy.append(out[0, len(ids) :].tolist())
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logprobs.append(lp.tolist())
    return {"prompt_ids": prompt_ids, "greedy": greedy, "logprobs": logprobs}


def _broken_copies(armor_checkpoint, tp_checkpoint, base) -> dict:
    """Checkpoints vLLM must refuse with a clear message: an unknown format version, a truncated
    shard (before: safetensors' "incomplete metadata, file not fully covered", no file named) and a
    stray tensor next to a compressed layer (before: "'MergedColumnParallelLinear' object has no
    attribute 'data'")."""
    import shutil

    from safetensors.torch import save_file

    from armor_vllm.core.checkpoint import load_tensors

    future = base / "future"
    shutil.copytree(armor_checkpoint, future)
    config = json.loads((future / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (future / "config.json").write_text(json.dumps(config))

    truncated = base / "truncated"
    shutil.copytree(tp_checkpoint, truncated)
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])

    stray = base / "stray"
    shutil.copytree(tp_checkpoint, stray)
    tensors = load_tensors(stray)
    tensors["model.layers.0.mlp.up_proj.bogus"] = torch.zeros(4)
    save_file(tensors, str(stray / "model.safetensors"), metadata={"format": "pt"})
    return {"future": future, "truncated": truncated, "stray": stray}


@pytest.fixture(scope="module")
def runs(armor_checkpoint, tp_checkpoint, hf_reference, tmp_path_factory):
    """vLLM with each CPU kernel on the checkpoint, and on the broken copies, in one runner process."""
    from conftest import run_vllm_jobs

    request = {"prompt_ids": hf_reference["prompt_ids"], "max_tokens": 8, "dtype": "float32"}
    jobs = {
        kernel: {"model": armor_checkpoint, "request": request, "env": {"ARMOR_VLLM_KERNEL": kernel}}
        for kernel in ("folded", "factored", "cpu24")
    }
    # our CPU 2:4 kernel in vLLM's default compiled mode too (one custom op in the graph)
    jobs["cpu24-compiled"] = {
        "model": armor_checkpoint,
        "request": {**request, "enforce_eager": False},
        "env": {"ARMOR_VLLM_KERNEL": "cpu24"},
    }
    reports = tmp_path_factory.mktemp("reports")
    for name in ("cpu24", "cpu24-compiled"):  # which kernel really served every layer
        jobs[name]["env"]["ARMOR_VLLM_KERNEL_REPORT"] = str(reports / f"{name}.jsonl")
    broken = _broken_copies(armor_checkpoint, tp_checkpoint, tmp_path_factory.mktemp("broken"))
    jobs.update({name: {"model": path, "request": {}} for name, path in broken.items()})
    results = dict(zip(jobs, run_vllm_jobs(list(jobs.values()))))
    for name in ("cpu24", "cpu24-compiled"):
        path = reports / f"{name}.jsonl"
        results[name]["kernels"] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return results


@pytest.mark.parametrize("name", ["cpu24", "cpu24-compiled"])
def test_the_cpu_2_4_kernel_serves_every_layer(runs, name):
    """ARMOR_VLLM_KERNEL=cpu24: every compressed linear runs the C++ kernel on the compressed form."""
    kernels = runs[name]["kernels"]
    assert len(kernels) == 4 * 30, len(kernels)  # vLLM's qkv_proj, o_proj, gate_up_proj, down_proj per layer
    assert all(k["plan"]["backend"] == "cpu24" for k in kernels), {k["plan"]["backend"] for k in kernels}


@pytest.mark.parametrize("kernel", ["folded", "factored", "cpu24", "cpu24-compiled"])
def test_vllm_matches_transformers(runs, hf_reference, kernel):
    result = runs[kernel]
    assert "error" not in result, (result.get("error"), result.get("log_tail"))
    assert result["greedy_ids"] == hf_reference["greedy"]
    for got, expect in zip(result["prompt_logprobs"], hf_reference["logprobs"]):
        assert got[0] is None
        assert len(got) - 1 == len(expect)
        for g, e in zip(got[1:], expect):
            assert math.isclose(g, e, abs_tol=2e-3), (kernel, g, e)


@pytest.mark.parametrize(
    "case,message",
    [
        ("future", "format_version: 99 is not supported"),
        ("truncated", "model.safetensors"),
        ("stray", "model.layers.0.mlp.up_proj.bogus"),
    ],
)
def test_vllm_refuses_a_bad_checkpoint_naming_the_fault(runs, case, message):
    result = runs[case]
    assert "error" in result, result
    assert any(message in line for line in result["chain"]), result["chain"]
    if case == "truncated":
        assert any("truncated" in line for line in result["chain"]), result["chain"]
