"""End to end: ``vllm serve CKPT --quantization armor`` on a free loopback port, OpenAI client
requests (completion and chat), answers checked against transformers, server stopped."""

import pytest
import torch

from armor_vllm.hf.quantizer import load_model
from armor_vllm.serve import CPU_DEFAULT_ARGS, VllmServer

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_openai_completion_and_chat(armor_checkpoint, tmp_path):
    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(armor_checkpoint)
    model = load_model(armor_checkpoint, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expect = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :])

    log = tmp_path / "serve.log"
    with VllmServer(armor_checkpoint, extra_args=(*CPU_DEFAULT_ARGS, "--dtype", "float32"), log_path=log) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused", timeout=120)
        assert [m.id for m in client.models.list().data] == [server.served_name]

        completion = client.completions.create(model=server.served_name, prompt=PROMPT, max_tokens=6, temperature=0.0)
        assert completion.choices[0].text == expect
        assert completion.usage.completion_tokens == 6

        chat = client.chat.completions.create(
            model=server.served_name,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=12,
            temperature=0.0,
        )
        choice = chat.choices[0]
        assert choice.message.role == "assistant" and choice.message.content.strip()
        assert choice.finish_reason in ("stop", "length")
        assert 0 < chat.usage.completion_tokens <= 12
    assert server.proc.poll() is not None, "the server must be stopped"
    text = log.read_text()
    # the engine really ran the ARMOR method (the served model name alone would match "armor")
    assert "quantization=armor" in text, text[-3000:]
