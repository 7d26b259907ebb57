"""Self-generated calibration (``self-chat``, ``self-free``): deterministic under a seed, laid out as
the model reads it in use (chat template, sequence start), cached for a resumed run, and never
holding an evaluation question."""

from __future__ import annotations

import pytest
import torch

from armor_vllm.offline import self_calibration as sc


@pytest.fixture(autouse=True)
def short_turns(monkeypatch):
    """Short instructions and answers: a random model never stops on its own."""
    monkeypatch.setattr(sc, "INSTRUCTION_TOKENS", 6)
    monkeypatch.setattr(sc, "ANSWER_TOKENS", 18)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def test_windows_are_deterministic_under_a_seed(tiny):
    model, tok = tiny
    a, _ = sc.self_chat_windows(model, tok, 2, 64, seed=3)
    b, _ = sc.self_chat_windows(model, tok, 2, 64, seed=3)
    c, _ = sc.self_chat_windows(model, tok, 2, 64, seed=4)
    assert a.shape == (2, 64) and torch.equal(a, b) and not torch.equal(a, c)
    f1 = sc.self_free_windows(model, tok, 2, 24, seed=3)
    f2 = sc.self_free_windows(model, tok, 2, 24, seed=3)
    assert f1.shape == (2, 24) and torch.equal(f1, f2)


def test_chat_windows_start_with_a_conversation_through_the_template(tiny):
    model, tok = tiny
    windows, _ = sc.self_chat_windows(model, tok, 2, 64, seed=0)
    prefix = tok(sc.user_turn_prefix(tok), add_special_tokens=False)["input_ids"]
    for w in windows.tolist():
        assert w[: len(prefix)] == prefix  # the system prompt and user turn the template writes
    free = sc.self_free_windows(model, tok, 1, 16, seed=0)
    assert int(free[0, 0]) == tok.eos_token_id  # no BOS in this tokenizer: generation starts after end-of-text


def test_an_instruction_that_resembles_an_evaluation_question_is_dropped(tiny, monkeypatch):
    model, tok = tiny
    question = "What is the capital of France?"
    words = tok(question, add_special_tokens=False)["input_ids"]
    real = sc.sample
    calls = []

    def fake(model, tokenizer, prompts, max_new_tokens, seed, **kw):
        calls.append(seed)
        if seed % 2 == 0 and len(calls) == 1:  # the first batch of instructions: one is an eval question
            return [words, tok("Write a poem about rivers.", add_special_tokens=False)["input_ids"]]
        return real(model, tokenizer, prompts, max_new_tokens, seed, **kw)

    monkeypatch.setattr(sc, "sample", fake)
    convs, dropped = sc.conversations(model, tok, 1, seed=0, batch=2, exclude=[question])
    assert dropped == 1
    assert "capital of France" not in tok.decode(convs[0]) and "rivers" in tok.decode(convs[0])
    assert sc.resembles("tell me: what is the capital of france", [question])
    assert not sc.resembles("Paris is lovely", ["Paris"])  # one-word choices match nothing


def test_evaluation_questions_never_enter_the_generated_calibration(tiny, monkeypatch):
    """The filter runs on every generated instruction against the shipped retention sets."""
    questions = sc.evaluation_questions()
    if not questions:
        pytest.skip("no retention sets in this checkout")
    model, tok = tiny
    windows, _ = sc.self_chat_windows(model, tok, 2, 64, seed=1, exclude=questions)
    text = sc.normalise(" ".join(tok.decode(w) for w in windows.tolist()))
    assert not any(sc.normalise(q) in text for q in questions if len(q.split()) >= 4)


def test_the_pass_mixes_generated_and_text_sources_and_caches_them(tiny_model_dir, tmp_path, monkeypatch):
    from armor_vllm.offline import pipeline
    from armor_vllm.offline.pipeline import OfflineOptions, run_offline

    made = []
    real = sc.generated_windows

    def counting(name, *a, **k):
        made.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(sc, "generated_windows", counting)
    opts = dict(
        model=str(tiny_model_dir),
        method="wanda",
        block_size=32,
        calib_samples=4,
        seq_len=64,
        calib_data=["pydoc", "self-chat", "self-free", "jargon"],
    )
    # interrupt after layer 0, then resume: the generated windows are read back, not written again
    real_step = pipeline._layer_step

    def boom(run, index, *a, **k):
        if index == 1:
            raise KeyboardInterrupt
        return real_step(run, index, *a, **k)

    monkeypatch.setattr(pipeline, "_layer_step", boom)
    with pytest.raises(KeyboardInterrupt):
        run_offline(OfflineOptions(output=str(tmp_path / "x"), **opts))
    assert sorted(made) == ["self-chat", "self-free"]
    assert (tmp_path / "x.partial" / ".armor_work" / "calibration.safetensors").is_file()
    monkeypatch.setattr(pipeline, "_layer_step", real_step)
    run_offline(OfflineOptions(output=str(tmp_path / "x"), **opts))
    assert sorted(made) == ["self-chat", "self-free"], "a resumed run reuses the cached samples"
    assert (tmp_path / "x" / "config.json").is_file()
