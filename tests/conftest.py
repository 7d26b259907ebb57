"""Shared fixtures: the embedded default model, a tiny random Llama (fast pipeline tests) and a
runner that executes vLLM in a child process (vLLM spawns workers; a child keeps pytest clean)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
VLLM_RUNNER = ROOT / "tests" / "vllm_runner.py"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from armor_vllm.models import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer Llama with random weights (hidden 64) and the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from armor_vllm.core.checkpoint import copy_side_files

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    copy_side_files(default_model_dir, out)
    return out


def random_armor_layer(rows: int, cols: int, bs: int, seed: int = 0, spread: float = 0.2, bias: bool = False):
    """A random format-v1 layer: a 2:4 core and wrappers ``I + spread * noise`` (every block differs)."""
    from armor_vllm.core.factorization import mask_from_scores
    from armor_vllm.core.format import ArmorLayer

    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(rows, cols, generator=gen) * mask_from_scores(torch.rand(rows, cols, generator=gen))
    a = torch.eye(bs).expand(rows // bs, bs, bs) + spread * torch.randn(rows // bs, bs, bs, generator=gen)
    b = torch.eye(bs).expand(cols // bs, bs, bs) + spread * torch.randn(cols // bs, bs, bs, generator=gen)
    return ArmorLayer(a, core, b, torch.randn(rows, generator=gen) if bias else None)


def run_vllm_jobs(jobs: list[dict], timeout: int = 1800) -> list[dict]:
    """Run vLLM jobs ``{"model", "request", "env", "standin"}`` one after the other in ONE child
    process (tests/vllm_runner.py: vLLM in-process, a fresh engine per job) and return each job's
    JSON answer. Batching saves a vLLM start-up (tens of seconds on 2 cores) per job."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vllm-jobs-"))
    jobs = [{**job, "model": str(job["model"]), "out": str(work / f"job-{i}.json")} for i, job in enumerate(jobs)]
    (work / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, str(VLLM_RUNNER), str(work / "jobs.json")], capture_output=True, text=True, timeout=timeout
    )
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "Attempted to load weight" not in line)
    results = []
    for job in jobs:
        out = Path(job["out"])
        if not out.is_file():
            raise RuntimeError(
                f"vLLM runner (exit {proc.returncode}) wrote no result for {job['model']}:\n{log[-6000:]}"
            )
        result = json.loads(out.read_text())
        if "error" in result:  # vLLM's root cause is in the child's log, not in the exception chain
            result["log_tail"] = log[-4000:]
        results.append(result)
    return results


@pytest.fixture(scope="session")
def armor_checkpoint(tmp_path_factory, default_model_dir):
    """The embedded model pruned with Wanda (small calibration), then given random non-identity
    wrappers: a valid checkpoint whose every part does real work."""
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    out = tmp_path_factory.mktemp("ckpt") / "wanda-wrapped"
    run_offline(
        OfflineOptions(model=str(default_model_dir), output=str(out), method="wanda", calib_samples=8, seq_len=128)
    )
    _perturb_wrappers(out, seed=0, scale=0.02)
    return out


def _perturb_wrappers(out: Path, seed: int = 0, scale: float = 0.02) -> None:
    """Give a checkpoint the wrappers ``A + scale·noise``, ``B + scale·noise`` (non-identity blocks)
    for every compressed layer: a plain 2:4 checkpoint (format v2, ``wrappers: false``) gets identity
    wrappers first and becomes ``wrappers: true``."""
    import json

    from safetensors.torch import save_file

    from armor_vllm.core.checkpoint import load_tensors, shard_files
    from armor_vllm.core.factorization import identity_blocks

    (path,) = shard_files(out)
    tensors = load_tensors(out)
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    for name in [n for n in tensors if n.endswith(".compressed")]:
        prefix, (rows, half) = name[: -len(".compressed")], tensors[name].shape
        tensors.setdefault(f"{prefix}.wrapper_out", identity_blocks(rows, qcfg["block_size"]))
        tensors.setdefault(f"{prefix}.wrapper_in", identity_blocks(2 * half, qcfg["block_size"]))
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        if name.endswith((".wrapper_out", ".wrapper_in")):
            t = tensors[name]
            tensors[name] = (t + scale * torch.randn(t.shape, generator=gen)).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    if qcfg["format_version"] >= 2:
        qcfg["wrappers"] = True
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="session")
def tp_dense_dir(tmp_path_factory, default_model_dir) -> Path:
    """A random dense 2-layer Llama whose heads split over 2 ranks (hidden 256, 4 heads, 2 kv heads,
    intermediate 512; the embedded model's 9 heads do not), with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from armor_vllm.core.checkpoint import copy_side_files

    dense = tmp_path_factory.mktemp("tp-llama") / "dense"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
        initializer_range=0.1,  # larger than the default 0.02: peaked logits, a stable greedy argmax
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(dense)
    copy_side_files(default_model_dir, dense)
    return dense


@pytest.fixture(scope="session")
def tp_plain_checkpoint(tp_dense_dir) -> Path:
    """``tp_dense_dir`` pruned with Wanda at block size 32: a plain 2:4 checkpoint (no wrappers)."""
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    out = tp_dense_dir.parent / "wanda-plain"
    run_offline(
        OfflineOptions(
            model=str(tp_dense_dir), output=str(out), method="wanda", block_size=32, calib_samples=4, seq_len=64
        )
    )
    return out


@pytest.fixture(scope="session")
def tp_checkpoint(tp_plain_checkpoint) -> Path:
    """``tp_plain_checkpoint`` given random non-identity wrappers. At TP=2 every per-rank partition
    (q 128, k/v 64, o_proj and down_proj inputs 128/256, gate/up 256) is a multiple of 32, and each
    rank's blocks differ."""
    import shutil

    out = tp_plain_checkpoint.parent / "wanda-wrapped"
    shutil.copytree(tp_plain_checkpoint, out)
    _perturb_wrappers(out, seed=1, scale=0.05)
    return out


@pytest.fixture(scope="session")
def bos_tokenizer(default_model_dir):
    """The embedded model's tokenizer made to add a beginning-of-sequence token, as Llama, Gemma and
    Mistral tokenizers do (the embedded SmolLM2 tokenizer adds none)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.bos_token = "<|endoftext|>"
    assert tok("hello")["input_ids"][0] == bos and tok("hello", add_special_tokens=False)["input_ids"][0] != bos
    return tok
