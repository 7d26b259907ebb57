"""The CUDA serving path through vLLM, on CPU: the factored kernel with the cuSPARSELt backend — the
path every GPU user runs — served by vLLM end to end, with the raw sparse ops replaced by their CPU
stand-ins (``standin``, installed by ``tests/vllm_runner.py`` and, in
tensor-parallel worker processes, by ``tests/standin_site/sitecustomize.py``). Eager and vLLM's
default compiled mode, fused q/k/v and gate/up, tensor parallelism 2, an ARMOR checkpoint and a
plain 2:4 one.

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

import pytest
from conftest import run_vllm_jobs

pytestmark = pytest.mark.slow

# Logprob tolerance of runs whose floating-point order differs from the reference (compiled mode,
# TP=2, the other backend, folded layers): measured 2.9e-3 to 8.6e-3 in fp16 (the largest: TP=2
# auto, its q/k/v folded); 1.5e-2 leaves a margin (was 5e-2).
FP16_TOL = 1.5e-2
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "In Python, a list comprehension"]
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank on this single-NUMA machine
N_LINEARS = 2 * 4  # 2 decoder layers x (qkv, o, gate_up, down)
# name: (checkpoint fixture, kernel, eager, tensor-parallel size, stand-in, extra env)
RUNS = {
    "reference": ("tp_checkpoint", "factored", True, 1, False, {}),
    "cusparselt": ("tp_checkpoint", "cusparselt", True, 1, True, {}),
    "cusparselt-compiled": ("tp_checkpoint", "cusparselt", False, 1, True, {}),
    # ARMOR_VLLM_DENSE_BELOW=0 keeps the 2:4 path: on this CPU the dense matmul would win every measurement.
    "auto-tp2": ("tp_checkpoint", "auto", True, 2, True, {"ARMOR_VLLM_DENSE_BELOW": "0", **TP2_ENV}),
    # CUTLASS through vLLM, explicitly (the TP=2 auto run may pick either backend)
    "cutlass": ("tp_checkpoint", "cutlass", True, 1, True, {}),
    "cusparselt-tp2-compiled": ("tp_checkpoint", "cusparselt", False, 2, True, TP2_ENV),
    "plain-folded": ("tp_plain_checkpoint", "folded", True, 1, False, {}),
    "plain-cusparselt-compiled": ("tp_plain_checkpoint", "cusparselt", False, 1, True, {}),
}


@pytest.fixture(scope="module")
def runs(request, tp_checkpoint):
    """Every run of ``RUNS`` (fp16), in one runner process; each with the kernels that served it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tp_checkpoint)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    jobs, reports = [], {}
    for name, (fixture, kernel, eager, tp, standin, env) in RUNS.items():
        model_dir = request.getfixturevalue(fixture)
        reports[name] = model_dir.parent / f"kernels-{name}.jsonl"
        reports[name].unlink(missing_ok=True)
        jobs.append(
            {
                "model": model_dir,
                "standin": standin,
                "env": {"ARMOR_VLLM_KERNEL": kernel, "ARMOR_VLLM_KERNEL_REPORT": str(reports[name]), **env},
                "request": {
                    "prompt_ids": prompt_ids,
                    "max_tokens": 8,
                    "dtype": "float16",
                    "enforce_eager": eager,
                    "llm_kwargs": {"tensor_parallel_size": tp},
                },
            }
        )
    results = {}
    for name, result in zip(RUNS, run_vllm_jobs(jobs)):
        assert "error" not in result, (name, result.get("error"), result.get("log_tail"))
        result["kernels"] = [json.loads(line) for line in reports[name].read_text().splitlines()]
        results[name] = result
    return results


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


def test_cusparselt_path_equals_the_factored_kernel(runs):
    result, reference = runs["cusparselt"], runs["reference"]
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    assert max(logprob_diffs(result, reference)) <= 1e-3


def test_cusparselt_path_in_vllm_compiled_mode(runs):
    """vLLM's default mode (torch.compile, no --enforce-eager) with the custom op."""
    result, reference = runs["cusparselt-compiled"], runs["reference"]
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"compiled vs eager: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= FP16_TOL


def test_auto_plans_at_tensor_parallel_2(runs):
    """``auto`` measures in each rank's process; rank 0's plan is broadcast over vLLM's
    tensor-parallel group so that both ranks run the same plan for every layer. A layer whose 2:4
    form (core + wrappers) would take more bytes than its dense weight is served folded (issue 19
    item 3: ``auto`` never serves more weight memory than dense): here the fused q/k/v, whose three
    distinct ``B`` cost 3 x 256 x 32 per rank next to a 256 x 256 core."""
    result, reference = runs["auto-tp2"], runs["reference"]
    served = result["kernels"]
    assert len(served) == N_LINEARS * 2 and {e["rank"] for e in served} == {0, 1}
    by_layer = {}
    for entry in served:
        by_layer.setdefault(entry["layer"], []).append(entry)
        assert entry["weight_bytes"] <= entry["dense_bytes"], entry
        if entry["plan"]["backend"] == "folded":
            assert entry["weight_bytes"] == entry["dense_bytes"], entry
    assert all(len(es) == 2 and es[0]["plan"] == es[1]["plan"] for es in by_layer.values()), by_layer
    sparse = {layer for layer, es in by_layer.items() if es[0]["plan"]["backend"] in ("cusparselt", "cutlass")}
    assert {layer.rsplit(".", 1)[1] for layer in sparse} >= {"o_proj", "gate_up_proj", "down_proj"}, by_layer
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"TP=2 vs TP=1: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= FP16_TOL


def test_cutlass_path_through_vllm(runs):
    """Issue 19 item 8: ``ARMOR_VLLM_KERNEL=cutlass`` served by vLLM end to end (stand-in)."""
    result, reference = runs["cutlass"], runs["reference"]
    assert_sparse_everywhere(result, "cutlass")
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"CUTLASS stand-in vs factored: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= FP16_TOL


def test_cusparselt_path_compiled_at_tensor_parallel_2(runs):
    """Issue 19 item 8: compiled mode at TP=2 (it was tested at TP=1 only)."""
    result, reference = runs["cusparselt-tp2-compiled"], runs["reference"]
    assert_sparse_everywhere(result, "cusparselt", ranks=2)
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"TP=2 compiled vs TP=1 eager: max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= FP16_TOL


def test_plain_24_checkpoint_on_the_cusparselt_path_compiled(runs):
    result, reference = runs["plain-cusparselt-compiled"], runs["plain-folded"]
    assert_sparse_everywhere(result, "cusparselt")
    assert result["greedy_ids"] == reference["greedy_ids"]
    diffs = logprob_diffs(result, reference)
    print(f"plain 2:4 cuSPARSELt stand-in (compiled) vs folded (eager): max |dlogprob| {max(diffs):.2e}")
    assert max(diffs) <= FP16_TOL


# -- issue 19 item 1: a warm compile cache with another kernel choice --------------------------------

# One VLLM_CACHE_ROOT for all three, in this order: vLLM keys its saved compiled model on its own
# config and env only, so each later run loads the graph the first one compiled.
CACHE_RUNS = {
    "cache-folded": ("folded", False, {}),
    "cache-cusparselt": ("cusparselt", True, {}),
    "cache-cusparselt-dense4": ("cusparselt", True, {"ARMOR_VLLM_DENSE_BELOW": "4"}),
}


@pytest.fixture(scope="module")
def cache_runs(tp_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tp_checkpoint)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    cache_root = tmp_path_factory.mktemp("vllm-cache")
    work = tmp_path_factory.mktemp("cache-reports")
    jobs = []
    for name, (kernel, standin, env) in CACHE_RUNS.items():
        jobs.append(
            {
                "model": tp_checkpoint,
                "standin": standin,
                "env": {
                    "ARMOR_VLLM_KERNEL": kernel,
                    "ARMOR_VLLM_KERNEL_REPORT": str(work / f"{name}.jsonl"),
                    "VLLM_CACHE_ROOT": str(cache_root),
                    **env,
                },
                "request": {"prompt_ids": prompt_ids, "max_tokens": 8, "dtype": "float16", "enforce_eager": False},
            }
        )
    results = {}
    for name, result in zip(CACHE_RUNS, run_vllm_jobs(jobs)):
        assert "error" not in result, (name, result.get("error"), result.get("log_tail"))
        result["kernels"] = [json.loads(line) for line in (work / f"{name}.jsonl").read_text().splitlines()]
        results[name] = result
    results["cache_dirs"] = sorted(p.name for p in (cache_root / "torch_compile_cache").iterdir())
    return results


def test_warm_compile_cache_with_another_kernel_choice(cache_runs):
    """Issue 19 item 1: restarting with another ``ARMOR_VLLM_KERNEL`` or ``ARMOR_VLLM_DENSE_BELOW``
    reloaded a compiled graph that read ``layer.weight`` (absent on a factored layer) or took the
    wrong tensor as the dense copy. Every ARMOR layer now traces as the same op, so the one cached
    graph (one cache entry for all three runs) serves each choice correctly."""
    assert len(cache_runs["cache_dirs"]) == 1, cache_runs["cache_dirs"]  # the cache really was reused
    folded = cache_runs["cache-folded"]
    assert {e["plan"]["backend"] for e in folded["kernels"]} == {"folded"}
    for name in ("cache-cusparselt", "cache-cusparselt-dense4"):
        result = cache_runs[name]
        assert_sparse_everywhere(result, "cusparselt")
        expect_dense = 4 if name.endswith("dense4") else 0
        assert {e["plan"]["dense_below"] for e in result["kernels"]} == {expect_dense}
        assert result["greedy_ids"] == folded["greedy_ids"], name
        diffs = logprob_diffs(result, folded)
        print(f"{name} vs folded, one compiled graph: max |dlogprob| {max(diffs):.2e}")
        assert max(diffs) <= FP16_TOL, name
