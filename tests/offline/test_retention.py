"""The retention benchmark's mechanics (armor_vllm.retention, benchmarks/retention.py) on a tiny
random Llama with the embedded model's tokenizer: the question sets, the scoring rules, multiple-choice
log-likelihoods against a hand computation, batched against unbatched greedy generation, the
retention arithmetic of ``compare`` and the CLI end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from armor_vllm import retention as R

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """A 2-layer random Llama (hidden 64) over the embedded tokenizer's vocabulary, float32;
    initializer_range 0.1 gives peaked logits, hence a stable greedy argmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


# ------------------------------------------------------------------------------------------- sets
def test_sets_sizes_kinds_ids():
    gen, mc = R.load_generation(), R.load_multiple_choice()
    assert len(gen) >= 160 and len(mc) >= 160
    for items in (gen, mc):
        kinds = [item["kind"] for item in items]
        assert set(kinds) == set(R.KINDS)
        assert all(kinds.count(k) >= 20 for k in R.KINDS)
    ids = [item["id"] for item in gen + mc]
    assert len(ids) == len(set(ids))
    for item in gen:
        assert set(item) == {"id", "kind", "question", "answers"}
        assert item["answers"] and all(a.strip() for a in item["answers"])
        # echoing the question never counts as a right answer
        assert not R.matches(item["question"], item["answers"]), item
    for item in mc:
        assert set(item) == {"id", "kind", "question", "choices", "answer"}
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4, item
        assert 0 <= item["answer"] < 4


def test_no_question_twice():
    questions = [R.normalise(item["question"]) for item in R.load_generation() + R.load_multiple_choice()]
    assert len(questions) == len(set(questions))
    raw = [item["question"] for item in R.load_generation() + R.load_multiple_choice()]
    assert R.question_texts(questions_only=True) == raw
    texts = R.question_texts()
    assert set(raw) <= set(texts) and "Warsaw" in texts and "What is the capital of France?" in texts
    assert len(texts) == len(raw) + sum(len(item["choices"]) for item in R.load_multiple_choice())


def test_limit_spreads_over_kinds():
    subset = R.load_generation(12)
    assert len(subset) == 12 and sorted(item["kind"] for item in subset) == sorted(R.KINDS * 2)
    full = R.load_generation()
    assert [item["id"] for item in subset] == [item["id"] for item in full if item in subset]  # file order
    assert R.load_multiple_choice(None) == R.load_multiple_choice()


# ---------------------------------------------------------------------------------------- scoring
def test_matches_word_boundaries_and_case():
    assert R.matches("A spider has 8 legs.", ["8", "eight"])
    assert R.matches("It has EIGHT legs", ["8", "eight"])
    assert not R.matches("It has 18 legs", ["8", "eight"])
    assert not R.matches("It has eighteen legs", ["8", "eight"])
    assert R.matches("The capital of France is paris.", ["Paris"])
    assert not R.matches("Romeo and Juliet", ["Rome"])
    assert not R.matches("The capital of Japan is Japan.", ["Tokyo"])
    assert R.matches("Brazil is in South\n America.", ["South America"])  # whitespace in an answer
    assert R.matches("Water is H2O.", ["H2O"]) and R.matches("(CO2)", ["CO2"])
    assert R.matches("a spider is eight-legged", ["eight"])
    assert not R.matches("", ["Paris"])


def test_score_generation_and_normalise():
    items = [
        {"id": "a", "kind": "geography", "question": "Q1?", "answers": ["Paris"]},
        {"id": "b", "kind": "arithmetic", "question": "Q2?", "answers": ["4", "four"]},
    ]
    scored = R.score_generation(items, ["It is Paris.", "It is 14."])
    assert [s["correct"] for s in scored] == [True, False]
    assert scored[0]["reply"] == "It is Paris." and scored[1]["id"] == "b"
    with pytest.raises(ValueError):
        R.score_generation(items, ["one reply"])
    assert R.normalise("The capital is  PARIS!") == R.normalise("the capital is paris") == "the capital is paris"


def test_chat_prompt(tokenizer):
    prompt = R.chat_prompt(tokenizer, "What is 2 + 2?")
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "What is 2 + 2?" in prompt and prompt.rstrip().endswith("assistant")

    class Plain:
        chat_template = None

    assert R.chat_prompt(Plain(), "Why?") == "Question: Why?\nAnswer:"


# ---------------------------------------------------------------------------------- model passes
def _hand_loglik(model, tokenizer, question: str, choice: str, prompt: str = "chat") -> float:
    context = R.chat_prompt(tokenizer, question, prompt)
    special = prompt == "plain"  # a plain prompt starts as the tokenizer starts a sequence (its BOS)
    ctx = tokenizer(context, add_special_tokens=special)["input_ids"]
    whole = tokenizer(context + choice, add_special_tokens=special)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))


def test_multiple_choice_equals_hand_computation(tiny_model, tokenizer):
    items = R.load_multiple_choice()[:3] + [
        {
            "id": "x",
            "kind": "language",
            "question": "Pick one.",
            "choices": ["a", "a much longer choice text", "é", "bb"],
            "answer": 2,
        }
    ]
    # batch size 5 mixes items and lengths in a batch (right padding)
    scores = R.multiple_choice_scores(tiny_model, tokenizer, items, batch_size=5)
    for item, score in zip(items, scores):
        hand = [_hand_loglik(tiny_model, tokenizer, item["question"], c) for c in item["choices"]]
        assert score["loglik"] == pytest.approx(hand, abs=2e-3)
        assert score["pred"] == max(range(4), key=lambda i: score["loglik"][i])
        per_byte = [v / len(c.encode("utf-8")) for v, c in zip(score["loglik"], item["choices"])]
        assert score["pred_norm"] == max(range(4), key=lambda i: per_byte[i])
        assert score["correct"] == (score["pred"] == item["answer"])
        assert score["correct_norm"] == (score["pred_norm"] == item["answer"])
    assert len("é".encode("utf-8")) == 2  # acc_norm divides by bytes, not characters


def test_batched_generation_equals_unbatched(tiny_model, tokenizer):
    questions = [item["question"] for item in R.load_generation(6)] + ["Hi?"]
    assert len({len(tokenizer(R.chat_prompt(tokenizer, q))["input_ids"]) for q in questions}) > 2  # padding happens
    batched = R.generate_answers(tiny_model, tokenizer, questions, max_new_tokens=8, batch_size=4)
    single = R.generate_answers(tiny_model, tokenizer, questions, max_new_tokens=8, batch_size=1)
    assert batched == single
    assert any(reply for reply in single)
    # the unbatched reply is plain greedy decoding of the chat prompt
    ids = tokenizer(R.chat_prompt(tokenizer, questions[0]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            nxt = tiny_model(ids).logits[0, -1].argmax()
            if int(nxt) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    prompt_len = len(tokenizer(R.chat_prompt(tokenizer, questions[0]), add_special_tokens=False)["input_ids"])
    assert single[0] == tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()


def test_plain_prompt_for_base_models(tiny_model, bos_tokenizer):
    """``prompt="plain"`` (a base model): "Question: ...\nAnswer:" even where the tokenizer has a chat
    template, started with the tokenizer's BOS, the reply cut at its first line break."""
    tok = bos_tokenizer
    assert R.chat_prompt(tok, "Why?", "plain") == "Question: Why?\nAnswer:" != R.chat_prompt(tok, "Why?")
    with pytest.raises(ValueError, match="prompt 'raw' is not one of"):
        R.evaluate(tiny_model, tok, limit=1, prompt="raw")
    assert R._first_line(" \n Paris.\nQuestion: And Spain?") == "Paris."

    questions = [item["question"] for item in R.load_generation(4)]
    replies = R.generate_answers(tiny_model, tok, questions, max_new_tokens=12, batch_size=4, prompt="plain")
    eos = R._eos_ids(tiny_model, tok)
    for question, reply in zip(questions, replies):
        ids = tok(f"Question: {question}\nAnswer:", return_tensors="pt")["input_ids"]
        assert int(ids[0, 0]) == tok.bos_token_id
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(12):
                nxt = tiny_model(ids).logits[0, -1].argmax()
                if int(nxt) in eos:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        text = tok.decode(ids[0, start:], skip_special_tokens=True)
        assert reply == text.strip().split("\n")[0].strip() and "\n" not in reply

    items = R.load_multiple_choice()[:2]
    for item, score in zip(items, R.multiple_choice_scores(tiny_model, tok, items, batch_size=3, prompt="plain")):
        hand = [_hand_loglik(tiny_model, tok, item["question"], c, prompt="plain") for c in item["choices"]]
        assert score["loglik"] == pytest.approx(hand, abs=2e-3)


def test_evaluate_structure(tiny_model, tokenizer):
    result = R.evaluate(tiny_model, tokenizer, limit=6, max_new_tokens=4, batch_size=8)
    assert len(result["generation"]) == 6 and len(result["multiple_choice"]) == 6
    assert {"reply", "correct", "answers"} <= set(result["generation"][0])
    s = result["summary"]
    assert s["gen_total"] == 6 and s["mc_total"] == 6 and s["chance"] == pytest.approx(0.25)
    assert s["gen_correct"] == sum(r["correct"] for r in result["generation"])
    assert s["mc_acc"] == pytest.approx(sum(r["correct"] for r in result["multiple_choice"]) / 6)
    assert set(s["by_kind"]) == set(R.KINDS)
    assert not tiny_model.training


# ---------------------------------------------------------------------------------------- compare
def _result(gen: list[tuple[str, bool]], mc: list[bool], mc_norm: list[bool] | None = None) -> dict:
    mc_norm = mc if mc_norm is None else mc_norm
    return {
        "generation": [
            {"id": f"g{i}", "kind": "science", "question": "?", "answers": ["x"], "reply": reply, "correct": ok}
            for i, (reply, ok) in enumerate(gen)
        ],
        "multiple_choice": [
            {
                "id": f"m{i}",
                "kind": "science",
                "choices": ["a", "b", "c", "d"],
                "answer": 0,
                "correct": ok,
                "correct_norm": okn,
            }
            for i, (ok, okn) in enumerate(zip(mc, mc_norm))
        ],
    }


def test_compare_arithmetic():
    dense = _result(
        [("Paris.", True), ("Tokyo", True), ("eight", True), ("It is 4", True), ("no idea", False)],
        [True, True, True, False],
        [True, True, False, False],
    )
    sparse = _result(
        [("paris", True), ("Japan", False), ("8", False), ("it is 4!", True), ("Berlin", True)],
        [True, True, False, False],
        [True, False, False, False],
    )
    table = R.compare({"dense": dense, "sparse": sparse}, reference="dense")
    d, s = table["dense"], table["sparse"]
    assert (d["gen_correct"], d["kept"], d["agreement"]) == (4, 1.0, 1.0)
    assert d["mc_kept_above_chance"] == 1.0 and d["mc_norm_kept_above_chance"] == 1.0
    assert (s["gen_correct"], s["gen_total"]) == (3, 5)
    assert s["kept"] == pytest.approx(2 / 4) and (s["kept_count"], s["reference_correct"]) == (2, 4)
    assert s["agreement"] == pytest.approx(2 / 5)  # "Paris." ~ "paris", "It is 4" ~ "it is 4!"
    assert (s["mc_acc"], s["mc_acc_norm"], s["chance"]) == (0.5, 0.25, 0.25)
    assert s["mc_kept_above_chance"] == pytest.approx((0.5 - 0.25) / (0.75 - 0.25))
    assert s["mc_norm_kept_above_chance"] == pytest.approx(0.0)
    # no reference: retention figures are None, the rest is reported
    alone = R.compare({"sparse": sparse}, reference="dense")["sparse"]
    assert alone["kept"] is None and alone["agreement"] is None and alone["mc_kept_above_chance"] is None
    assert alone["gen_correct"] == 3
    # a reference at chance: nothing to keep above chance
    flat = _result([("a", False)], [True, False, False, False])
    assert R.compare({"dense": flat, "s": flat})["s"]["mc_kept_above_chance"] is None
    assert R.compare({"dense": flat, "s": flat})["s"]["kept"] is None  # the reference got nothing right
    text = R.markdown_table(table)
    assert "| sparse | 3/5 (60.0%) | 50.0% (2/4) | 40.0% |" in text


# -------------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end(tiny_model, tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    spec = importlib.util.spec_from_file_location("retention_cli", ROOT / "benchmarks" / "retention.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "retention.json"
    args = [
        "--model",
        f"dense={model_dir}",
        "--model",
        f"copy={model_dir}",
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"dense", "copy"} and report["reference"] == "dense"
    assert {"machine", "date", "command", "comparison", "settings"} <= set(report)
    copy = report["comparison"]["copy"]
    assert copy["agreement"] == 1.0 and copy["gen_total"] == 3  # the same weights answer the same
    assert out.with_suffix(".png").is_file()
    # a second run with the same settings reuses stored models
    first = report["models"]["dense"]["eval_s"]
    assert cli.main(["--model", f"dense={model_dir}", "--limit", "3", "--max-new-tokens", "3", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["models"]["dense"]["eval_s"] == first and set(again["models"]) == {"dense", "copy"}
    assert not math.isnan(again["total_s"])
    # --prompt plain is a setting of its own: chat results are not reused for it
    plain = tmp_path / "plain.json"
    assert (
        cli.main(
            [
                "--model",
                f"dense={model_dir}",
                "--limit",
                "3",
                "--max-new-tokens",
                "3",
                "--out",
                str(plain),
                "--prompt",
                "plain",
            ]
        )
        == 0
    )
    report = json.loads(plain.read_text())
    assert report["settings"]["prompt"] == "plain" and "prompt" not in again["settings"]
    assert report["models"]["dense"]["settings"]["prompt"] == "plain"
