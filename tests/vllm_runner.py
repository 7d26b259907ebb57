"""Child process for the vLLM tests: load MODEL_DIR in vLLM (offline ``LLM``) and write greedy
outputs and prompt logprobs as JSON. Usage: python vllm_runner.py MODEL_DIR REQUEST_JSON"""

import gc
import json
import os
import sys


def main() -> None:
    model_dir, request = sys.argv[1], json.loads(sys.argv[2])
    from vllm import SamplingParams, TokensPrompt

    from armor_vllm.eval import make_llm

    try:
        # 512-token contexts need little KV cache: reserve 8% of RAM (per rank), not vLLM's CPU 30%,
        # so that a tensor-parallel run fits beside other processes.
        kwargs = {"gpu_memory_utilization": 0.08, **request.get("llm_kwargs", {})}
        llm = make_llm(model_dir, dtype=request.get("dtype", "float32"), max_model_len=512,
                       enforce_eager=request.get("enforce_eager", True), **kwargs)
    except Exception as exc:  # reported to the test, which checks the message
        with open(request["out"], "w") as f:
            json.dump({"error": f"{type(exc).__name__}: {exc}", "chain": _chain(exc)}, f)
        return
    result = {}
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request.get("prompt_ids", [])]
    if prompts:
        greedy = llm.generate(prompts, SamplingParams(max_tokens=request.get("max_tokens", 8), temperature=0.0),
                              use_tqdm=False)
        result["greedy_ids"] = [list(o.outputs[0].token_ids) for o in greedy]
        scored = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                              use_tqdm=False)
        result["prompt_logprobs"] = [
            [None if e is None else e[ids[i]].logprob for i, e in enumerate(o.prompt_logprobs)]
            for o, ids in zip(scored, request["prompt_ids"])
        ]
    with open(request["out"], "w") as f:
        json.dump(result, f)
    # Stop the engine now, then leave without the interpreter's teardown: vLLM's CPU backend
    # sometimes aborts (SIGABRT) while tearing down at exit, after all the work is done.
    del llm
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _chain(exc: BaseException) -> list[str]:
    out = []
    while exc is not None:
        out.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return out


if __name__ == "__main__":
    main()
