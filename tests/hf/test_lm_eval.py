"""lm-evaluation-harness on an ARMOR checkpoint, offline, with the local perplexity task shipped in
eval/lm_eval_tasks/armor_text (its data file pointed at a text written here): ``--model hf``
(through ``python -m armor_vllm.lmeval``, which registers the transformers quantizer) and ``lm_eval
--model vllm ... quantization=armor``. Their token perplexity agrees with ``python -m
armor_vllm.eval`` on the same text within 1%.

The text is 8 x 256 - 1 tokens, so both tools score the same tokens in windows of 256: lm-eval's
rolling windows (vLLM's are ``max_length - 2`` long, hence ``max_model_len=258``) and armor_vllm.eval's
non-overlapping windows of the text followed by end-of-sequence."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, _perturb_wrappers

pytestmark = pytest.mark.slow

WINDOW, WINDOWS = 256, 8
TASK_DIR = ROOT / "eval" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_dir):
    """A Wanda checkpoint of the embedded model with small random wrappers (so both backends run
    them), the text, and the task pointed at it."""
    from transformers import AutoTokenizer

    import armor_vllm
    from armor_vllm.offline.calibration import default_texts

    root = tmp_path_factory.mktemp("lm-eval")
    ckpt = root / "wanda-wrapped"
    armor_vllm.compress(default_model_dir, ckpt, method="wanda", calib_samples=8, seq_len=128, calib_data=["pydoc"])
    _perturb_wrappers(ckpt, seed=0, scale=0.002)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("\n\n".join(default_texts("evaluation")), add_special_tokens=False).input_ids
    text = tok.decode(ids[: WINDOW * WINDOWS - 1])
    n_tokens = len(tok(text, add_special_tokens=False).input_ids)
    assert n_tokens == WINDOW * WINDOWS - 1
    (root / "text.txt").write_text(text)
    (root / "text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    task = yaml.safe_load((TASK_DIR / "armor_text" / "armor_text.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(root / "text.jsonl")
    (root / "tasks" / "armor_text").mkdir(parents=True)
    (root / "tasks" / "armor_text" / "armor_text.yaml").write_text(yaml.safe_dump(task))
    return {"root": root, "ckpt": ckpt, "tasks": root / "tasks", "tokens": n_tokens}


ENV = {"OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], root: Path) -> None:
    env = {**os.environ, **ENV, "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def armor_eval_perplexity(setup):
    out = setup["root"] / "armor-eval.json"
    run(
        [
            sys.executable,
            "-m",
            "armor_vllm.eval",
            "--model",
            str(setup["ckpt"]),
            "--backend",
            "hf",
            "--seq-len",
            str(WINDOW),
            "--max-windows",
            "1",
            "--data",
            str(setup["root"] / "text.txt"),
            "--data-windows",
            "100",
            "--out",
            str(out),
        ],
        setup["root"],
    )
    result = json.loads(out.read_text())["texts"]["text.txt"]
    assert result["windows"] == WINDOWS
    return result["hf"]["perplexity"]


def lm_eval_perplexity(setup, command: list[str], model: str, model_args: str, name: str) -> float:
    """Token perplexity of lm-eval's run: its summed log-likelihood of the document (log_samples)
    over the document's tokens."""
    out = setup["root"] / name
    run(
        [
            *command,
            "--model",
            model,
            "--model_args",
            model_args,
            "--tasks",
            "armor_text",
            "--include_path",
            str(setup["tasks"]),
            "--output_path",
            str(out),
            "--log_samples",
            "--batch_size",
            "1",
        ],
        setup["root"],
    )
    (samples,) = glob.glob(str(out / "*" / "samples_armor_text_*.jsonl"))
    (record,) = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    return math.exp(-float(record["filtered_resps"][0]) / setup["tokens"])


def test_lm_eval_hf_backend(setup, armor_eval_perplexity):
    ppl = lm_eval_perplexity(
        setup,
        [sys.executable, "-m", "armor_vllm.lmeval"],
        "hf",
        f"pretrained={setup['ckpt']},dtype=float32,max_length={WINDOW}",
        "hf",
    )
    print(f"lm-eval hf {ppl:.3f}, armor_vllm.eval {armor_eval_perplexity:.3f}")
    assert abs(ppl / armor_eval_perplexity - 1) < 0.01


def test_lm_eval_vllm_backend(setup, armor_eval_perplexity):
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    args = (
        f"pretrained={setup['ckpt']},quantization=armor,dtype=float32,max_model_len={WINDOW + 2},"
        "enforce_eager=True,gpu_memory_utilization=0.3,seed=0"
    )
    ppl = lm_eval_perplexity(setup, [lm_eval], "vllm", args, "vllm")
    print(f"lm-eval vllm {ppl:.3f}, armor_vllm.eval {armor_eval_perplexity:.3f}")
    assert abs(ppl / armor_eval_perplexity - 1) < 0.01
