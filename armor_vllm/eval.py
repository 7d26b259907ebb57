"""``python -m armor_vllm.eval``: held-out perplexity of a model directory (dense or ARMOR), through
transformers (``from_pretrained`` with armor_vllm's quantizer: ``A (S (B x))``) and/or vLLM with the
plugin (prompt logprobs), plus a short greedy generation so a person can see the text is still sane.

The built-in evaluation text is the evaluation split of ``pydoc_data.topics`` (disjoint from the
calibration split, see ``armor_vllm.offline.calibration``), cut into non-overlapping windows of ``--seq-len``
tokens. ``--data`` adds more texts, each reported on its own: ``.txt``/``.jsonl`` files or the names
of packaged texts (``fortunes``, ``devil``: held-out English that the default calibration never
sees); their windows are spread evenly over the text, at most ``--data-windows`` of them.

    python -m armor_vllm.eval --model out/smollm2-armor --data fortunes devil --backend hf
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


DATA_WINDOWS = 32  # windows per --data text by default


def data_windows(model_dir: Path, data: str, seq_len: int, max_windows: int = DATA_WINDOWS) -> torch.Tensor:
    """Windows of one ``--data`` text (a file or a source name), spread evenly over it; a text
    shorter than ``max_windows`` windows gives as many as it holds. Each window begins as the
    tokenizer begins a sequence (its BOS, where it adds one)."""
    from transformers import AutoTokenizer

    from armor_vllm.offline.calibration import load_texts, sequence_start, spread_windows, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = sequence_start(tokenizer)
    stream = token_stream(tokenizer, load_texts([data]))
    n = min(max_windows, stream.numel() // (seq_len - len(start)))
    if n == 0:
        raise ValueError(f"--data {data}: shorter ({stream.numel()} tokens) than one window of --seq-len {seq_len}")
    return spread_windows(stream, n, seq_len, f"--data {data}", start)


def data_name(data: str) -> str:
    """The key of a ``--data`` text in the results: the source name or the file name."""
    return Path(data).name if Path(data).is_file() else data


def eval_windows(model_dir: Path, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive windows of the built-in evaluation split, each beginning as the tokenizer begins a
    sequence."""
    from transformers import AutoTokenizer

    from armor_vllm.offline.calibration import default_texts, first_windows, sequence_start, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream(tokenizer, default_texts("evaluation"))
    windows = first_windows(stream, max_windows or None, seq_len, sequence_start(tokenizer))
    if windows.shape[0] == 0:
        raise ValueError(f"--seq-len {seq_len} is longer than the evaluation text ({stream.numel()} tokens)")
    return windows


@torch.no_grad()
def hf_nll(model_dir: Path, windows: torch.Tensor, model=None) -> tuple[float, int]:
    """Summed negative log-likelihood (and token count) of every window but its first token
    (``model``: ``model_dir`` already loaded in transformers)."""
    from armor_vllm.hf.quantizer import load_model

    if model is None:
        model = load_model(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for window in windows:
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        total += float(nll)
        count += window.numel() - 1
    return total, count


def make_llm(model_dir: Path, dtype: str = "bfloat16", max_model_len: int = 1024, enforce_eager: bool = True, **kwargs):
    """A vLLM engine for ``model_dir`` sized for this 2-core CPU machine (the plugin is picked up
    from the checkpoint's ``quant_method: armor``). ``enforce_eager=False`` is vLLM's default
    compiled mode (``torch.compile``; on CPU it adds a compile at start-up, see BENCHMARKS.md)."""
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
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


def evaluate(
    model_dir: Path,
    backends: list[str],
    seq_len: int,
    max_windows: int | None,
    dtype: str,
    data: list[str] = (),
    data_max_windows: int = DATA_WINDOWS,
) -> dict:
    """Perplexity on the built-in split (top-level ``hf``/``vllm``, as before) and on every
    ``data`` text; ``texts`` holds all of them by name (``builtin`` first)."""
    texts = {"builtin": eval_windows(model_dir, seq_len, max_windows)}
    for item in data:
        texts[data_name(item)] = data_windows(model_dir, item, seq_len, data_max_windows)
    result: dict = {
        "model": str(model_dir),
        "seq_len": seq_len,
        "windows": int(texts["builtin"].shape[0]),
        "texts": {name: {"windows": int(w.shape[0])} for name, w in texts.items()},
    }
    if "hf" in backends:
        from armor_vllm.hf.quantizer import load_model

        model = load_model(model_dir, dtype=torch.float32)
        for name, windows in texts.items():
            t = time.perf_counter()
            nll, n = hf_nll(model_dir, windows, model)
            result["texts"][name]["hf"] = {
                "perplexity": math.exp(nll / n),
                "tokens": n,
                "seconds": time.perf_counter() - t,
            }
        del model
    if "vllm" in backends:
        llm = make_llm(model_dir, dtype=dtype, max_model_len=max(seq_len + 8, 256))
        for name, windows in texts.items():
            t = time.perf_counter()
            nll, n = vllm_nll(llm, windows)
            result["texts"][name]["vllm"] = {
                "perplexity": math.exp(nll / n),
                "tokens": n,
                "dtype": dtype,
                "seconds": time.perf_counter() - t,
            }
        result["texts"]["builtin"]["vllm"]["samples"] = vllm_samples(llm)
    for entry in result["texts"].values():
        if "hf" in entry and "vllm" in entry:
            entry["relative_difference"] = abs(entry["vllm"]["perplexity"] / entry["hf"]["perplexity"] - 1)
    builtin = result["texts"]["builtin"]
    result.update({k: builtin[k] for k in ("hf", "vllm", "relative_difference") if k in builtin})
    return result


def main(argv: list[str] | None = None) -> int:
    from armor_vllm.models import resolve_model

    p = argparse.ArgumentParser(
        prog="python -m armor_vllm.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="model directory (default: the embedded dense model)")
    p.add_argument("--backend", choices=["hf", "vllm", "both"], default="both")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype (transformers runs float32)")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE|NAME",
        help="more texts beside the built-in split: .txt/.jsonl files or packaged texts "
        "(fortunes, devil; see armor_vllm.offline.calibration)",
    )
    p.add_argument("--data-windows", type=int, default=DATA_WINDOWS, help="windows per --data text")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    backends = ["hf", "vllm"] if args.backend == "both" else [args.backend]
    try:
        result = evaluate(
            resolve_model(args.model),
            backends,
            args.seq_len,
            args.max_windows,
            args.dtype,
            args.data,
            args.data_windows,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
