"""ARMOR checkpoints in transformers (armor_vllm.hf.quantizer): AutoModelForCausalLM.from_pretrained
after ``import armor_vllm`` gives ARMOR layers computing what the checkpoint means (format v1, v2
with and without wrappers), folds them on request, saves the checkpoint back byte for byte, refuses
broken checkpoints by name; and plain transformers refuses an ARMOR checkpoint loudly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from armor_checkpoints import KINDS, edit_tensors, write_armor_checkpoint
from conftest import ROOT
from torch import nn

import armor_vllm  # noqa: F401  (registers the quantizer)
from armor_vllm.core.format import TRANSFORMERS_GUARD, ArmorFormatError
from armor_vllm.core.reader import dense_state_dict
from armor_vllm.hf.quantizer import ArmorHfConfig, ArmorLinear

PROJECTIONS = 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers of the tiny model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("hf-armor")
    return {kind: write_armor_checkpoint(tiny_model_dir, root / kind, kind) for kind in KINDS}


def dense_reference(ckpt):
    """An ordinary LlamaForCausalLM holding the dense reconstruction ``A·S·B`` of the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in dense_state_dict(ckpt, torch.float32).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    model.tie_weights()
    return model.eval()


def load(ckpt, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)


PROMPT = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1030, 28]])


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_holds_armor_layers_that_compute_the_checkpoint(checkpoints, kind):
    model = load(checkpoints[kind], dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, ArmorLinear)]
    assert len(layers) == PROJECTIONS
    assert all((m.wrapper_out is not None) == (kind != "v2-plain") for m in layers)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if ".layers." in n)
    ref = dense_reference(checkpoints[kind])
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, ref(PROMPT).logits, atol=2e-4, rtol=1e-4)
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        expect = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expect.tolist()


def test_dequantize_folds_into_plain_linears(checkpoints):
    ckpt = checkpoints["v2-wrappers"]
    dense = dense_state_dict(ckpt, torch.float32)
    by_option = load(ckpt, dtype=torch.float32, quantization_config=ArmorHfConfig(dequantize=True))
    by_method = load(ckpt, dtype=torch.float32)
    by_method.dequantize()
    for model in (by_option, by_method):
        assert not any(isinstance(m, ArmorLinear) for m in model.modules())
        assert getattr(model.config, "quantization_config", None) is None
        up = model.model.layers[1].mlp.up_proj
        assert type(up) is nn.Linear and torch.equal(up.weight, dense["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_writes_the_checkpoint_back_unchanged(checkpoints, kind, tmp_path):
    ckpt = checkpoints[kind]
    load(ckpt).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    before, after = (json.loads((d / "config.json").read_text()) for d in (ckpt, tmp_path))
    assert after["quantization_config"] == before["quantization_config"]
    assert after["transformers_weights"] == TRANSFORMERS_GUARD  # kept (v1: added) so plain transformers refuses it
    # and what was saved loads again
    assert sum(isinstance(m, ArmorLinear) for m in load(tmp_path).modules()) == PROJECTIONS


def test_loader_names_the_tensor_at_fault(checkpoints, tmp_path):
    ckpt = checkpoints["v2-wrappers"]
    prefix = "model.layers.0.mlp.up_proj"

    def stray(t):
        t[f"{prefix}.bogus"] = torch.zeros(3)

    with pytest.raises(ArmorFormatError, match=rf"model.safetensors: tensor {prefix}.bogus: not a tensor format v2"):
        load(edit_tensors(ckpt, tmp_path / "stray", stray))

    def not_24(t):  # headers are fine; only the values break the format
        t[f"{prefix}.bitmask"][0, 0] = 0b00000111

    with pytest.raises(ArmorFormatError, match=rf"{prefix}.bitmask: not a 2:4 mask \(row 0"):
        load(edit_tensors(ckpt, tmp_path / "not24", not_24))

    def wrong_shape(t):  # stored 1536x576 but the model's up_proj is 128x64: a shape tensor that lies
        t[f"{prefix}.shape"] = torch.tensor([128, 32])

    with pytest.raises(ArmorFormatError, match=rf"{prefix}.compressed: shape"):
        load(edit_tensors(ckpt, tmp_path / "shape", wrong_shape))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_plain_transformers_refuses_an_armor_checkpoint(checkpoints):
    """Without armor_vllm, transformers must fail, not load random decoder weights."""
    proc = run_python(
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"try:\n    AutoModelForCausalLM.from_pretrained({str(checkpoints['v2-plain'])!r})\n"
        "except Exception as exc:\n    print('REFUSED', type(exc).__name__, exc)\n"
        "else:\n    print('LOADED')\n"
        "print('armor_vllm imported:', 'armor_vllm' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "armor_vllm imported: False" in proc.stdout
    assert "REFUSED" in proc.stdout and TRANSFORMERS_GUARD in proc.stdout, proc.stdout


def test_registration_survives_any_import_order(checkpoints):
    """armor_vllm registers when transformers' loading code is imported, however the imports go
    (here compressed-tensors pulls transformers in while armor_vllm.core.format is being used)."""
    proc = run_python(
        "import torch\n"
        "from armor_vllm.core.format import compress_core\n"
        "compress_core(torch.zeros(4, 8))\n"
        "from transformers import AutoModelForCausalLM\n"
        "from armor_vllm.hf.quantizer import ArmorLinear\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(checkpoints['v1'])!r})\n"
        "print('ARMOR layers', sum(isinstance(x, ArmorLinear) for x in m.modules()))\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ARMOR layers {PROJECTIONS}" in proc.stdout
    assert "could not register" not in proc.stderr


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_conv1d_and_checkpoint_fused_layers(arch, tmp_path, default_model_dir):
    """GPT-2 (Conv1D layers, fused c_attn) and Phi-3 (fused qkv_proj, gate_up_proj) load as ARMOR
    layers equal to the dense reconstruction, fold, and save back unchanged."""
    from tiny_archs import make_tiny
    from transformers import GPT2Config, GPT2LMHeadModel

    from armor_vllm.core.checkpoint import copy_side_files
    from armor_vllm.hf.dense import load_dense_hf_model

    dense = tmp_path / "dense"
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
        torch.manual_seed(0)
        GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(dense)
        copy_side_files(default_model_dir, dense)
    else:
        make_tiny(arch, dense, default_model_dir)
    ckpt = tmp_path / "ckpt"
    armor_vllm.compress(dense, ckpt, method="magnitude")
    model = load(ckpt, dtype=torch.float32)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 8  # 4 per layer, fused ones counted once
    folded = load(ckpt, dtype=torch.float32, quantization_config=ArmorHfConfig(dequantize=True))
    ref = load_dense_hf_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        expect = ref(PROMPT).logits
        torch.testing.assert_close(model(PROMPT).logits, expect, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(folded(PROMPT).logits, expect, atol=2e-4, rtol=1e-4)
    load(ckpt).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
