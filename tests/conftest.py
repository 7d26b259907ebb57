"""Shared fixtures: the embedded default model, a tiny random Llama (fast pipeline tests) and a
runner that executes vLLM in a child process (vLLM spawns workers; a child keeps pytest clean)."""

from __future__ import annotations

import json
import os
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

    from armor_vllm.checkpoint import copy_side_files

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    copy_side_files(default_model_dir, out)
    return out


def random_armor_layer(rows: int, cols: int, bs: int, seed: int = 0, spread: float = 0.2, bias: bool = False):
    """A random format-v1 layer: a 2:4 core and wrappers ``I + spread * noise`` (every block differs)."""
    from armor_vllm.factorization import mask_from_scores
    from armor_vllm.format import ArmorLayer

    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(rows, cols, generator=gen) * mask_from_scores(torch.rand(rows, cols, generator=gen))
    a = torch.eye(bs).expand(rows // bs, bs, bs) + spread * torch.randn(rows // bs, bs, bs, generator=gen)
    b = torch.eye(bs).expand(cols // bs, bs, bs) + spread * torch.randn(cols // bs, bs, bs, generator=gen)
    return ArmorLayer(a, core, b, torch.randn(rows, generator=gen) if bias else None)


def run_vllm(model_dir: Path, request: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """Run tests/vllm_runner.py in a child process and return its JSON answer."""
    out = Path(request.setdefault("out", str(Path(model_dir).parent / f"vllm-{os.getpid()}-{id(request)}.json")))
    proc = subprocess.run(
        [sys.executable, str(VLLM_RUNNER), str(model_dir), json.dumps(request)],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise RuntimeError(f"vLLM runner failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def armor_checkpoint(tmp_path_factory, default_model_dir):
    """The embedded model pruned with Wanda (small calibration), its identity wrappers then replaced
    by random non-identity blocks: a valid checkpoint whose every part does real work."""
    from safetensors.torch import save_file

    from armor_vllm.checkpoint import load_tensors, shard_files
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    out = tmp_path_factory.mktemp("ckpt") / "wanda-wrapped"
    run_offline(OfflineOptions(model=str(default_model_dir), output=str(out), method="wanda",
                               calib_samples=8, seq_len=128))
    (path,) = shard_files(out)
    tensors = load_tensors(out)
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith((".wrapper_out", ".wrapper_in")):
            tensors[name] = (t + 0.02 * torch.randn(t.shape, generator=gen)).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


def _perturb_wrappers(out: Path, seed: int = 0, scale: float = 0.02) -> None:
    """Replace a checkpoint's wrappers ``A``/``B`` by ``A + scale·noise`` (non-identity blocks)."""
    from safetensors.torch import save_file

    from armor_vllm.checkpoint import load_tensors, shard_files

    (path,) = shard_files(out)
    tensors = load_tensors(out)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith((".wrapper_out", ".wrapper_in")):
            tensors[name] = (t + scale * torch.randn(t.shape, generator=gen)).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tp_checkpoint(tmp_path_factory, default_model_dir) -> Path:
    """A random 2-layer Llama whose heads split over 2 ranks (hidden 256, 4 heads, 2 kv heads,
    intermediate 512; the embedded model's 9 heads do not), pruned with Wanda at block size 32 and
    given random non-identity wrappers. At TP=2 every per-rank partition (q 128, k/v 64, o_proj and
    down_proj inputs 128/256, gate/up 256) is a multiple of 32, and each rank's blocks differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from armor_vllm.checkpoint import copy_side_files
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    dense = tmp_path_factory.mktemp("tp-llama") / "dense"
    config = LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
        initializer_range=0.1,  # larger than the default 0.02: peaked logits, a stable greedy argmax
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(dense)
    copy_side_files(default_model_dir, dense)
    out = dense.parent / "wanda-wrapped"
    run_offline(OfflineOptions(model=str(dense), output=str(out), method="wanda", block_size=32,
                               calib_samples=4, seq_len=64))
    _perturb_wrappers(out, seed=1, scale=0.05)
    return out
