"""The ARMOR MoE method through vLLM beyond eager TP=1 (issue 19 item 8): the tiny Qwen3-MoE ARMOR
checkpoint of the architecture matrix (``test_architectures.compressed``) in vLLM's default compiled
mode and at tensor-parallel size 2, both against the eager TP=1 run (float32: greedy tokens equal,
prompt logprobs within 1e-3), and a checkpoint with one expert's tensor missing, which must fail
naming that tensor."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_vllm_jobs
from test_architectures import PROMPTS, compressed  # noqa: F401 - the session fixture

pytestmark = pytest.mark.slow

BROKEN = "model.layers.1.mlp.experts.5.down_proj.wrapper_in"


@pytest.fixture(scope="module")
def moe_runs(compressed, tmp_path_factory):  # noqa: F811 - the imported fixture
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from armor_vllm.core.checkpoint import load_tensors, shard_files

    out = compressed("qwen3_moe", "armor")[1]
    broken = tmp_path_factory.mktemp("moe-broken") / "ckpt"
    shutil.copytree(out, broken)
    (path,) = shard_files(broken)
    tensors = load_tensors(broken)
    assert BROKEN in tensors
    del tensors[BROKEN]
    save_file(tensors, str(path), metadata={"format": "pt"})
    index = broken / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"].pop(BROKEN, None)
        index.write_text(json.dumps(data))

    tok = AutoTokenizer.from_pretrained(out)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]

    def job(model, eager=True, tp=1, env=None):
        return {
            "model": model,
            "env": env or {},
            "request": {
                "prompt_ids": prompt_ids,
                "max_tokens": 8,
                "dtype": "float32",
                "enforce_eager": eager,
                "llm_kwargs": {"tensor_parallel_size": tp},
            },
        }

    jobs = {
        "eager": job(out),
        "compiled": job(out, eager=False),
        "tp2": job(out, tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
        "broken": job(broken),
    }
    return dict(zip(jobs, run_vllm_jobs(list(jobs.values()))))


def _close(result, reference, tol=1e-3):
    assert "error" not in result, (result.get("error"), result.get("log_tail"))
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = [
        abs(g - e)
        for got, expect in zip(result["prompt_logprobs"], reference["prompt_logprobs"], strict=True)
        for g, e in zip(got[1:], expect[1:], strict=True)
    ]
    return max(diffs)


def test_moe_compiled(moe_runs):
    diff = _close(moe_runs["compiled"], moe_runs["eager"])
    print(f"MoE compiled vs eager: max |dlogprob| {diff:.2e}")
    assert diff <= 1e-3


def test_moe_tensor_parallel_2(moe_runs):
    diff = _close(moe_runs["tp2"], moe_runs["eager"])
    print(f"MoE TP=2 vs TP=1: max |dlogprob| {diff:.2e}")
    assert diff <= 1e-3


def test_moe_broken_expert_is_named(moe_runs):
    result = moe_runs["broken"]
    assert "error" in result, "a checkpoint missing an expert tensor was served"
    message = " | ".join(result["chain"]) + result.get("log_tail", "")
    assert ("experts.5.down_proj" in message or "expert 5" in message) and "wrapper_in" in message, message[-3000:]
