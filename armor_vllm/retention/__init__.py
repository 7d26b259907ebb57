"""Retention: does a compressed chat model still know what the dense one knows?

Perplexity moves little while a small 2:4 model loses its facts ("The capital of Japan is Japan."),
so this module measures knowledge the way a user meets it, on two question sets written for this
project (evaluation data only: never calibration or distillation input, see ``question_texts``):

* ``generation.jsonl``: short questions (geography, science, history, arithmetic, language,
  everyday knowledge), each with accepted answers. A question is asked as a user would ask it: one
  user message through the tokenizer's chat template, greedy decoding, ``max_new_tokens`` tokens.
  The reply is correct when it contains an accepted answer (case-insensitive, on word boundaries).
* ``multiple_choice.jsonl``: four-option questions of the same kinds, scored as
  lm-evaluation-harness scores multiple choice, so the result does not depend on the model's
  wording: the context is the chat-templated question, each choice is a continuation, its score the
  sum of the log-probabilities of its tokens; ``acc`` takes the best sum, ``acc_norm`` the best sum
  per byte of the choice's text.

``compare`` turns per-model results into retention figures against a reference (the dense model):
the share of the dense model's correct answers a compressed model keeps, agreement with the dense
model's reply, and multiple-choice accuracy kept above chance. ``benchmarks/retention.py`` is the CLI.
A base model (no chat tuning) is asked with ``prompt="plain"`` instead: "Question: ...\\nAnswer:"
for both sets, the reply cut at its first line break.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

DATA_DIR = Path(__file__).resolve().parent
GENERATION_FILE = DATA_DIR / "generation.jsonl"
MULTIPLE_CHOICE_FILE = DATA_DIR / "multiple_choice.jsonl"
KINDS = ("geography", "science", "history", "arithmetic", "language", "everyday")


# --------------------------------------------------------------------------------------------- sets
def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _spread(items: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` items taken round-robin over the kinds (every kind represented), in the
    file's order within a kind; all items when ``limit`` is None."""
    if limit is None or limit >= len(items):
        return list(items)
    rank: dict[str, int] = {}
    keyed = []
    for pos, item in enumerate(items):
        k = rank.get(item["kind"], 0)
        rank[item["kind"]] = k + 1
        kind_pos = KINDS.index(item["kind"]) if item["kind"] in KINDS else len(KINDS)
        keyed.append(((k, kind_pos, pos), item))
    chosen = sorted(keyed, key=lambda t: t[0])[:limit]
    return [item for _, item in sorted(chosen, key=lambda t: t[0][2])]


def load_generation(limit: int | None = None) -> list[dict]:
    """The generation questions ``{"id", "kind", "question", "answers"}`` (``limit``: a subset
    spread over the kinds)."""
    return _spread(_read_jsonl(GENERATION_FILE), limit)


def load_multiple_choice(limit: int | None = None) -> list[dict]:
    """The multiple-choice items ``{"id", "kind", "question", "choices", "answer"}`` (``answer`` is
    the index of the right choice)."""
    return _spread(_read_jsonl(MULTIPLE_CHOICE_FILE), limit)


def question_texts(questions_only: bool = False) -> list[str]:
    """Every evaluation string: the generation questions, the multiple-choice questions and their
    choices (``questions_only``: the questions alone), for checks that no evaluation text enters
    calibration or distillation data. The choices are short ("Four", "The Sun") and occur in any
    English text; a substring check should look for the questions."""
    texts = [item["question"] for item in load_generation()]
    for item in load_multiple_choice():
        texts.append(item["question"])
        if not questions_only:
            texts.extend(item["choices"])
    return texts


# ---------------------------------------------------------------------------------------- scoring
def normalise(reply: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: two replies agree when these match."""
    return " ".join(re.sub(r"[\W_]+", " ", reply.lower()).split())


def matches(reply: str, answers: Iterable[str]) -> bool:
    """Whether ``reply`` contains one of ``answers``, case-insensitively, as whole words (``8``
    counts in "It has 8 legs." but not in "18"; ``Rome`` not in "Romeo")."""
    text = " ".join(reply.split())
    for answer in answers:
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in answer.split()) + r"(?!\w)"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def score_generation(items: Sequence[dict], replies: Sequence[str]) -> list[dict]:
    """Per question: the item, the model's reply and whether it is correct."""
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} questions but {len(replies)} replies")
    return [
        {
            "id": item["id"],
            "kind": item["kind"],
            "question": item["question"],
            "answers": item["answers"],
            "reply": reply,
            "correct": matches(reply, item["answers"]),
        }
        for item, reply in zip(items, replies)
    ]


# ------------------------------------------------------------------------------------------ model
PROMPTS = ("chat", "plain")


def check_prompt(prompt: str) -> str:
    """``prompt``: how a question is put to the model (``PROMPTS``)."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt {prompt!r} is not one of {list(PROMPTS)}")
    return prompt


def _templated(tokenizer, prompt: str) -> bool:
    return check_prompt(prompt) == "chat" and bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, question: str, prompt: str = "chat") -> str:
    """``question`` as one user message through the tokenizer's chat template, ready for the
    assistant's reply; a plain "Question: ...\\nAnswer:" with ``prompt="plain"`` (for a base model,
    which was never tuned to a template) or for a tokenizer without a template."""
    if _templated(tokenizer, prompt):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:"


def _encode(tokenizer, text: str, prompt: str = "chat") -> list[int]:
    # the chat template writes every special token itself (a BOS included, where a model uses one);
    # a plain prompt starts the sequence as the tokenizer always does
    return list(tokenizer(text, add_special_tokens=not _templated(tokenizer, prompt))["input_ids"])


def _first_line(reply: str) -> str:
    """A plain prompt's reply ends at its first line break (a base model goes on with the next
    "Question:"; lm-evaluation-harness's short-answer tasks stop there too)."""
    return reply.strip().split("\n", 1)[0].strip()


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_ids[0] if eos_ids else 0


def _device(model):
    return next(model.parameters()).device


def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    prompt: str = "chat",
) -> list[str]:
    """Greedy replies to ``questions``, each asked as one user message through the chat template
    (``prompt="plain"``: as "Question: ...\\nAnswer:", the reply cut at its first line break).

    Prompts are batched by length with left padding (the attention mask gives each row its own
    positions, so a batched reply equals the unbatched one). A reply ends at the first
    end-of-sequence token; it is decoded without special tokens and stripped."""
    import torch
    from tqdm.auto import tqdm

    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    device = _device(model)
    encoded = [_encode(tokenizer, chat_prompt(tokenizer, q, prompt), prompt) for q in questions]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    replies: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(encoded), desc="generation", unit="q", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos or None,
                pad_token_id=pad,
            )
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            for k, tok in enumerate(new):
                if tok in eos:
                    new = new[:k]
                    break
            replies[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            if not _templated(tokenizer, prompt):
                replies[i] = _first_line(replies[i])
        bar.update(len(batch))
    bar.close()
    return replies


def _continuation(tokenizer, context: str, context_ids: list[int], choice: str, prompt: str = "chat") -> list[int]:
    """The tokens of ``choice`` following ``context`` (lm-evaluation-harness: encode the whole and
    cut the context's tokens off, so the choice is tokenized as it would be in running text; when the
    whole does not start with the context's tokens, the choice encoded alone)."""
    whole = _encode(tokenizer, context + choice, prompt)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return whole[len(context_ids) :]
    return list(tokenizer(choice, add_special_tokens=False)["input_ids"])


def multiple_choice_scores(
    model, tokenizer, items: Sequence[dict], batch_size: int = 16, progress: bool = False, prompt: str = "chat"
) -> list[dict]:
    """Log-likelihood scoring of each item's choices as continuations of its chat-templated question
    (``prompt="plain"``: of "Question: ...\\nAnswer:").

    Per item: ``loglik`` (sum of the log-probabilities of each choice's tokens), ``pred`` (argmax of
    ``loglik``), ``pred_norm`` (argmax of ``loglik`` / the choice's length in UTF-8 bytes), and
    ``correct`` / ``correct_norm`` against ``answer``. Ties go to the first choice."""
    import torch
    from tqdm.auto import tqdm

    device = _device(model)
    pad = _pad_id(tokenizer, _eos_ids(model, tokenizer))
    requests = []  # (item index, choice index, context ids, continuation ids)
    for n, item in enumerate(items):
        context = chat_prompt(tokenizer, item["question"], prompt)
        ctx = _encode(tokenizer, context, prompt)
        for c, choice in enumerate(item["choices"]):
            requests.append((n, c, ctx, _continuation(tokenizer, context, ctx, choice, prompt)))
    logliks = [[0.0] * len(item["choices"]) for item in items]
    order = sorted(range(len(requests)), key=lambda r: (-(len(requests[r][2]) + len(requests[r][3])), r))
    bar = tqdm(total=len(requests), desc="multiple choice", unit="choice", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[start : start + batch_size]]
        seqs = [ctx + cont for _, _, ctx, cont in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: positions of the real tokens are unchanged
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (n, c, ctx, cont) in enumerate(batch):
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logprobs.device)
            targets = torch.tensor(cont, device=logprobs.device)
            logliks[n][c] = float(logprobs[row, positions, targets].sum())
        bar.update(len(batch))
    bar.close()
    results = []
    for item, ll in zip(items, logliks):
        norm = [v / max(1, len(choice.encode("utf-8"))) for v, choice in zip(ll, item["choices"])]
        pred = max(range(len(ll)), key=lambda i: (ll[i], -i))
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        results.append(
            {
                "id": item["id"],
                "kind": item["kind"],
                "question": item["question"],
                "choices": item["choices"],
                "answer": item["answer"],
                "loglik": ll,
                "pred": pred,
                "pred_norm": pred_norm,
                "correct": pred == item["answer"],
                "correct_norm": pred_norm == item["answer"],
            }
        )
    return results


def summarise(result: dict) -> dict:
    """Headline figures of one model's ``evaluate`` result (overall and by kind)."""
    gen, mc = result["generation"], result["multiple_choice"]

    def figures(g: list[dict], m: list[dict]) -> dict:
        return {
            "gen_correct": sum(r["correct"] for r in g),
            "gen_total": len(g),
            "gen_accuracy": sum(r["correct"] for r in g) / len(g) if g else None,
            "mc_acc": sum(r["correct"] for r in m) / len(m) if m else None,
            "mc_acc_norm": sum(r["correct_norm"] for r in m) / len(m) if m else None,
            "mc_total": len(m),
            "chance": sum(1 / len(r["choices"]) for r in m) / len(m) if m else None,
        }

    out = figures(gen, mc)
    kinds = [k for k in KINDS if any(r["kind"] == k for r in gen + mc)]
    kinds += sorted({r["kind"] for r in gen + mc} - set(kinds))
    out["by_kind"] = {k: figures([r for r in gen if r["kind"] == k], [r for r in mc if r["kind"] == k]) for k in kinds}
    return out


def evaluate(
    model,
    tokenizer,
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
    generation: Sequence[dict] | None = None,
    multiple_choice: Sequence[dict] | None = None,
    prompt: str = "chat",
) -> dict:
    """Both sets on one model: ``{"generation": [...], "multiple_choice": [...], "summary": {...}}``
    with every question's reply or choice scores (the shipped sets unless ``generation`` /
    ``multiple_choice`` are given; ``limit`` takes a subset of each, spread over the kinds;
    ``prompt``: ``chat`` or ``plain``, see ``chat_prompt``)."""
    check_prompt(prompt)
    gen_items = list(generation) if generation is not None else load_generation(limit)
    mc_items = list(multiple_choice) if multiple_choice is not None else load_multiple_choice(limit)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        replies = generate_answers(
            model,
            tokenizer,
            [q["question"] for q in gen_items],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            prompt=prompt,
        )
        mc = multiple_choice_scores(model, tokenizer, mc_items, batch_size=batch_size, progress=progress, prompt=prompt)
    finally:
        model.train(was_training)
    result = {
        "generation": score_generation(gen_items, replies),
        "multiple_choice": mc,
        "settings": {"max_new_tokens": max_new_tokens, "limit": limit, "prompt": prompt},
    }
    result["summary"] = summarise(result)
    return result


# -------------------------------------------------------------------------------------- comparing
def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def compare(results_by_model: dict[str, dict], reference: str = "dense") -> dict[str, dict]:
    """Retention of every model against ``reference`` (its ``evaluate`` result among the inputs).

    Per model: ``gen_correct`` / ``gen_total``; ``kept`` = |correct ∩ reference correct| /
    |reference correct| (the share of the reference's correct answers kept); ``agreement`` = share of
    questions whose normalised reply equals the reference's; ``mc_acc``, ``mc_acc_norm``, ``chance``;
    ``mc_kept_above_chance`` = (acc - chance) / (reference acc - chance) (and ``mc_norm_kept_above_chance``
    for acc_norm). Questions are matched by id; a figure that needs a missing reference, or a
    reference with no correct answer / no accuracy above chance, is None."""
    ref = results_by_model.get(reference)
    ref_gen = {r["id"]: r for r in ref["generation"]} if ref else {}
    ref_sum = summarise(ref) if ref else None
    table: dict[str, dict] = {}
    for name, result in results_by_model.items():
        s = summarise(result)
        row = {
            k: s[k] for k in ("gen_correct", "gen_total", "gen_accuracy", "mc_acc", "mc_acc_norm", "mc_total", "chance")
        }
        row.update(
            kept=None,
            kept_count=None,
            reference_correct=None,
            agreement=None,
            mc_kept_above_chance=None,
            mc_norm_kept_above_chance=None,
        )
        if ref is not None:
            shared = [r for r in result["generation"] if r["id"] in ref_gen]
            ref_correct = [r for r in shared if ref_gen[r["id"]]["correct"]]
            row["reference_correct"] = len(ref_correct)
            row["kept_count"] = sum(r["correct"] for r in ref_correct)
            row["kept"] = _ratio(row["kept_count"], len(ref_correct))
            row["agreement"] = _ratio(
                sum(normalise(r["reply"]) == normalise(ref_gen[r["id"]]["reply"]) for r in shared), len(shared)
            )
            chance = s["chance"]
            if chance is not None and ref_sum["mc_acc"] is not None:
                if ref_sum["mc_acc"] > chance:
                    row["mc_kept_above_chance"] = (s["mc_acc"] - chance) / (ref_sum["mc_acc"] - chance)
                if ref_sum["mc_acc_norm"] > chance:
                    row["mc_norm_kept_above_chance"] = (s["mc_acc_norm"] - chance) / (ref_sum["mc_acc_norm"] - chance)
        row["by_kind"] = {
            k: {"gen_correct": v["gen_correct"], "gen_total": v["gen_total"], "mc_acc": v["mc_acc"]}
            for k, v in s["by_kind"].items()
        }
        table[name] = row
    return table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(comparison: dict[str, dict], reference: str = "dense") -> str:
    """The comparison as a markdown table (one row per model)."""
    lines = [
        f"| model | gen correct | kept of {reference} | agreement with {reference} | MC acc | MC acc_norm "
        f"| MC kept above chance (acc / acc_norm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in comparison.items():
        kept = "-" if r["kept"] is None else f"{_pct(r['kept'])} ({r['kept_count']}/{r['reference_correct']})"
        lines.append(
            f"| {name} | {r['gen_correct']}/{r['gen_total']} ({_pct(r['gen_accuracy'])}) | {kept} "
            f"| {_pct(r['agreement'])} | {_pct(r['mc_acc'])} | {_pct(r['mc_acc_norm'])} "
            f"| {_pct(r['mc_kept_above_chance'])} / {_pct(r['mc_norm_kept_above_chance'])} |"
        )
    if comparison:
        chance = next(iter(comparison.values()))["chance"]
        lines.append(f"\nMC chance level: {_pct(chance)}.")
    return "\n".join(lines)
