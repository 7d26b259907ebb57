"""The CUDA serving path through vLLM, on CPU: the factored kernel with the cuSPARSELt backend — the
path every GPU user runs — served by vLLM end to end, with the raw sparse ops replaced by their CPU
stand-ins (``armor_vllm.kernels.standin``, installed in every vLLM process by
``tests/standin_site/sitecustomize.py``). Eager and vLLM's default compiled mode, fused q/k/v and
gate/up, tensor parallelism 2, an ARMOR checkpoint and a plain 2:4 one.

All runs are fp16 (the sparse backends take only fp16/bf16). References:

- the CPU ``factored`` kernel computes the same ``A (S (B x))`` with the core as a dense matmul, so
  the stand-in path must give the *same* greedy tokens and prompt logprobs in eager mode;
- compiled mode and TP=2 change the order of floating-point work elsewhere in the model, so they are
  compared with the eager reference within a small tolerance, greedy tokens equal;
- for the plain 2:4 checkpoint (identity wrappers) the folded weight is the core itself, so the
  ``folded`` kernel is the reference.

Each run writes ``$ARMOR_VLLM_KERNEL_REPORT`` and the test checks that every compressed layer of
every rank was really served by the sparse path (no silent fallback to a dense weight)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_vllm

pytestmark = pytest.mark.slow

STANDIN_SITE = Path(__file__).resolve().parent / "standin_site"
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank on this single-NUMA machine
N_LINEARS = 2 * 4  # 2 decoder layers x (qkv, o, gate_up, down)


def serve(model_dir: Path, kernel: str, *, eager: bool = True, tp: int = 1, standin: bool = True, tag: str = "",
          env: dict | None = None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    name = f"{kernel}-{'eager' if eager else 'compiled'}-tp{tp}{tag}"
    report = model_dir.parent / f"kernels-{name}.jsonl"
    report.unlink(missing_ok=True)
    env = {"ARMOR_VLLM_KERNEL": kernel, "ARMOR_VLLM_KERNEL_REPORT": str(report), **(TP2_ENV if tp == 2 else {}),
           **(env or {})}
    if standin:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STANDIN_SITE), os.environ.get("PYTHONPATH")) if p)
    request = {"prompt_ids": [tok(p)["input_ids"] for p in PROMPTS], "max_tokens": 8, "dtype": "float16",
               "enforce_eager": eager, "llm_kwargs": {"tensor_parallel_size": tp},
               "out": str(model_dir.parent / f"vllm-{name}.json")}
    result = run_vllm(model_dir, request, env=env)
    assert "error" not in result, (name, result.get("error"), result.get("log_tail"))
    result["kernels"] = [json.loads(line) for line in report.read_text().splitlines()]
    return result


def assert_sparse_everywhere(result: dict, backend: str | set, ranks: int = 1) -> None:
    served = result["kernels"]
    assert len(served) == N_LINEARS * ranks, served
    backends = {entry["plan"]["backend"] for entry in served}
    assert backends == {backend} if isinstance(backend, str) else backends <= backend, served
    assert {entry["rank"] for entry in served} == set(range(ranks))


def logprob_diffs(a: dict, b: dict) -> list[float]:
    diffs = []
    for got, expect in zip(a["prompt_logprobs"], b["prompt_logprobs"], strict=True):
        assert got[0] is None and expect[0] is None and len(got) == len(expect)
        diffs += [abs(g - e) for g, e in zip(got[1:], expect[1:])]
    return diffs


@pytest.fixture(scope="module")
def reference(tp_checkpoint):
    """The CPU factored kernel, eager, fp16: same maths, the core as a dense matmul."""
    return serve(tp_checkpoint, "factored", standin=False)


def test_cusparselt_path_equals_the_factored_kernel(tp_checkpoint, reference):
    result = serve(tp_checkpoint, "cusparselt")
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    assert max(logprob_diffs(result, reference)) <= 1e-3


def test_cusparselt_path_in_vllm_compiled_mode(tp_checkpoint, reference):
    """vLLM's default mode (torch.compile, no --enforce-eager) with the custom op."""
    result = serve(tp_checkpoint, "cusparselt", eager=False)
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"compiled vs eager: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= 5e-2


def test_auto_plans_at_tensor_parallel_2(tp_checkpoint, reference):
    """``auto`` measures in each rank's process; rank 0's plan is broadcast over vLLM's
    tensor-parallel group so that both ranks run the same plan for every layer. (``ARMOR_DENSE_BELOW=0``
    keeps the 2:4 path: on this CPU the dense matmul would win every measurement.)"""
    result = serve(tp_checkpoint, "auto", tp=2, env={"ARMOR_DENSE_BELOW": "0"})
    assert_sparse_everywhere(result, {"cusparselt", "cutlass"}, ranks=2)
    by_layer = {}
    for entry in result["kernels"]:
        by_layer.setdefault(entry["layer"], []).append(entry["plan"])
    assert all(len(plans) == 2 and plans[0] == plans[1] for plans in by_layer.values()), by_layer
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"TP=2 vs TP=1: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= 5e-2


def test_plain_24_checkpoint_on_the_cusparselt_path_compiled(tp_plain_checkpoint):
    reference = serve(tp_plain_checkpoint, "folded", standin=False, tag="-plain")
    result = serve(tp_plain_checkpoint, "cusparselt", eager=False, tag="-plain")
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"plain 2:4 cuSPARSELt stand-in (compiled) vs folded (eager): max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= 5e-2
