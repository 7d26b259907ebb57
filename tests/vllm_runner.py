"""Child process for the vLLM tests: run a list of jobs, each loading a model directory in vLLM (the
offline ``LLM``) and writing its greedy outputs and prompt logprobs as JSON.

Usage: ``python vllm_runner.py JOBS_FILE`` where the JSON file holds a list of jobs
``{"model": DIR, "request": {...}, "env": {...}, "standin": bool, "out": PATH}``.

Starting vLLM is what costs time in these tests (imports, an engine process, a worker process), so
the jobs share one process and, at tensor-parallel size 1, vLLM runs in it (no engine or worker
process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor). Between jobs the engine is
shut down, vLLM's distributed state and torch.compile's caches are cleared, and the environment
(``ARMOR_VLLM_KERNEL`` and friends are read when vLLM builds the config) is set per job. Jobs with
``"standin": true`` run with the CPU stand-ins of the 2:4 ops (``standin``),
installed here and, for tensor-parallel worker processes, through ``tests/standin_site``.
"""

import gc
import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
TESTS = str(Path(__file__).resolve().parent)
STANDIN_SITE = str(Path(TESTS) / "standin_site")


def run_job(job: dict) -> dict:
    from vllm import SamplingParams, TokensPrompt

    from armor_vllm.eval import make_llm

    request = job.get("request", {})
    kwargs = {
        # 512-token contexts need little KV cache. An explicit size, not vLLM's CPU default (a share of
        # RAM minus this process's RSS), which shrinks as jobs run in one process and fails the later ones.
        "kv_cache_memory_bytes": 256 * 2**20,
        "distributed_executor_backend": "uni"
        if request.get("llm_kwargs", {}).get("tensor_parallel_size", 1) == 1
        else "mp",
        **request.get("llm_kwargs", {}),
    }
    try:
        llm = make_llm(
            job["model"],
            dtype=request.get("dtype", "float32"),
            max_model_len=512,
            enforce_eager=request.get("enforce_eager", True),
            **kwargs,
        )
    except Exception as exc:  # reported to the test, which checks the message
        return {"error": f"{type(exc).__name__}: {exc}", "chain": _chain(exc)}
    result = {}
    try:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request.get("prompt_ids", [])]
        if prompts:
            greedy = llm.generate(
                prompts, SamplingParams(max_tokens=request.get("max_tokens", 8), temperature=0.0), use_tqdm=False
            )
            result["greedy_ids"] = [list(o.outputs[0].token_ids) for o in greedy]
            scored = llm.generate(
                prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False
            )
            result["prompt_logprobs"] = [
                [None if e is None else e[ids[i]].logprob for i, e in enumerate(o.prompt_logprobs)]
                for o, ids in zip(scored, request["prompt_ids"])
            ]
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
    return result


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    import standin
    import torch
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    base_env = dict(os.environ)
    for job in jobs:
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(job.get("env", {}))
        if job.get("standin"):
            standin.install()
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (STANDIN_SITE, TESTS, base_env.get("PYTHONPATH")) if p
            )
        else:
            standin.uninstall()
        try:
            result = run_job(job)
        except Exception as exc:  # this job fails its test; the jobs after it still run
            result = {"error": f"{type(exc).__name__}: {exc}", "chain": _chain(exc)}
        finally:
            gc.collect()
            cleanup_dist_env_and_memory()
            torch._dynamo.reset()  # no compiled graph may outlive its model (guards are dropped)
        Path(job["out"]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: vLLM's CPU backend sometimes aborts (SIGABRT) while tearing
    # down at exit, after all the work is done.
    os._exit(0)


def _chain(exc: BaseException) -> list[str]:
    out = []
    while exc is not None:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return out


if __name__ == "__main__":
    main()
