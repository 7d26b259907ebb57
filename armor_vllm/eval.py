"""``python -m armor_vllm.eval``: held-out perplexity of a model directory (dense or ARMOR), through
transformers (the dense reconstruction ``A·S·B``) and/or vLLM with the plugin (prompt logprobs),
plus a short greedy generation so a person can see the text is still sane.

The evaluation text is the evaluation split of ``pydoc_data.topics`` (disjoint from the calibration
split, see ``armor_vllm.calibration``), cut into non-overlapping windows of ``--seq-len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

SAMPLE_PROMPTS = ("The capital of France is", "def fibonacci(n):")


def eval_windows(model_dir: Path, seq_len: int, max_windows: int | None) -> torch.Tensor:
    from transformers import AutoTokenizer

    from armor_vllm.calibration import default_texts, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream(tokenizer, default_texts("evaluation"))
    n = stream.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"--seq-len {seq_len} is longer than the evaluation text ({stream.numel()} tokens)")
    return stream[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def hf_nll(model_dir: Path, windows: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (and token count) of every window but its first token."""
    from armor_vllm.checkpoint import load_dense_hf_model

    model = load_dense_hf_model(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for window in windows:
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        total += float(nll)
        count += window.numel() - 1
    return total, count


def make_llm(model_dir: Path, dtype: str = "bfloat16", max_model_len: int = 1024, **kwargs):
    """A vLLM engine for ``model_dir`` sized for this 2-core CPU machine (the plugin is picked up
    from the checkpoint's ``quant_method: armor``)."""
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=True,
        gpu_memory_utilization=kwargs.pop("gpu_memory_utilization", 0.3),
        seed=0,
        **kwargs,
    )


def vllm_nll(llm, windows: torch.Tensor) -> tuple[float, int]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    total, count = 0.0, 0
    for window, out in zip(windows, llm.generate(prompts, params, use_tqdm=False)):
        for position, entry in enumerate(out.prompt_logprobs):
            if position == 0 or entry is None:
                continue
            total -= entry[int(window[position])].logprob
            count += 1
    return total, count


def vllm_samples(llm, max_tokens: int = 24) -> dict[str, str]:
    from vllm import SamplingParams

    outs = llm.generate(list(SAMPLE_PROMPTS), SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(SAMPLE_PROMPTS, outs)}


def evaluate(model_dir: Path, backends: list[str], seq_len: int, max_windows: int | None, dtype: str) -> dict:
    windows = eval_windows(model_dir, seq_len, max_windows)
    result: dict = {"model": str(model_dir), "seq_len": seq_len, "windows": int(windows.shape[0])}
    if "hf" in backends:
        t = time.perf_counter()
        nll, n = hf_nll(model_dir, windows)
        result["hf"] = {"perplexity": math.exp(nll / n), "tokens": n, "seconds": time.perf_counter() - t}
    if "vllm" in backends:
        t = time.perf_counter()
        llm = make_llm(model_dir, dtype=dtype, max_model_len=max(seq_len + 8, 256))
        nll, n = vllm_nll(llm, windows)
        result["vllm"] = {"perplexity": math.exp(nll / n), "tokens": n, "dtype": dtype,
                          "seconds": time.perf_counter() - t, "samples": vllm_samples(llm)}
    if "hf" in result and "vllm" in result:
        result["relative_difference"] = abs(result["vllm"]["perplexity"] / result["hf"]["perplexity"] - 1)
    return result


def main(argv: list[str] | None = None) -> int:
    from armor_vllm.models import resolve_model

    p = argparse.ArgumentParser(prog="python -m armor_vllm.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded dense model)")
    p.add_argument("--backend", choices=["hf", "vllm", "both"], default="both")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype (transformers runs float32)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    backends = ["hf", "vllm"] if args.backend == "both" else [args.backend]
    result = evaluate(resolve_model(args.model), backends, args.seq_len, args.max_windows, args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
