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
from conftest import run_vllm

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]


@pytest.fixture(scope="module")
def hf_reference(armor_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armor_vllm.hf_quantizer import ArmorLinear

    tok = AutoTokenizer.from_pretrained(armor_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(armor_checkpoint, dtype=torch.float32)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 210
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    greedy, logprobs = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
            greedy.append(out[0, len(ids):].tolist())
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logprobs.append(lp.tolist())
    return {"prompt_ids": prompt_ids, "greedy": greedy, "logprobs": logprobs}


@pytest.mark.parametrize("kernel", ["folded", "factored"])
def test_vllm_matches_transformers(armor_checkpoint, hf_reference, kernel):
    result = run_vllm(armor_checkpoint, {"prompt_ids": hf_reference["prompt_ids"], "max_tokens": 8,
                                         "dtype": "float32"}, env={"ARMOR_VLLM_KERNEL": kernel})
    assert "error" not in result, result
    assert result["greedy_ids"] == hf_reference["greedy"]
    for got, expect in zip(result["prompt_logprobs"], hf_reference["logprobs"]):
        assert got[0] is None
        assert len(got) - 1 == len(expect)
        for g, e in zip(got[1:], expect):
            assert math.isclose(g, e, abs_tol=2e-3), (kernel, g, e)


def test_vllm_refuses_unknown_format_version(armor_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "future"
    shutil.copytree(armor_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    result = run_vllm(bad, {})
    assert "error" in result
    assert any("format_version: 99 is not supported" in line for line in result["chain"]), result


def test_vllm_names_a_truncated_shard(tp_checkpoint, tmp_path):
    """Before: safetensors' "incomplete metadata, file not fully covered", no file named."""
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(tp_checkpoint, bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    result = run_vllm(bad, {})
    assert "error" in result
    assert any("model.safetensors" in line and "truncated" in line for line in result["chain"]), result


def test_vllm_names_a_stray_tensor(tp_checkpoint, tmp_path):
    """Before: "'MergedColumnParallelLinear' object has no attribute 'data'"."""
    import shutil

    from safetensors.torch import save_file

    from armor_vllm.checkpoint import load_tensors

    bad = tmp_path / "stray"
    shutil.copytree(tp_checkpoint, bad)
    tensors = load_tensors(bad)
    tensors["model.layers.0.mlp.up_proj.bogus"] = torch.zeros(4)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    result = run_vllm(bad, {})
    assert "error" in result
    assert any("model.layers.0.mlp.up_proj.bogus" in line for line in result["chain"]), result
