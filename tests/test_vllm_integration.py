"""vLLM with the plugin computes what the checkpoint means: greedy tokens and prompt logprobs from
vLLM (both CPU kernels) equal those of transformers running the dense reconstruction ``A·S·B``.

The checkpoint (conftest's ``armor_checkpoint``) has random non-identity wrappers, so the wrappers,
the fused q/k/v and gate/up shards and the 2:4 cores are all exercised."""

import json
import math

import pytest
import torch

from armor_vllm.checkpoint import load_dense_hf_model
from conftest import run_vllm

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]


@pytest.fixture(scope="module")
def hf_reference(armor_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(armor_checkpoint)
    model = load_dense_hf_model(armor_checkpoint, dtype=torch.float32)
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
