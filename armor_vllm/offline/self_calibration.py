"""Calibration that looks like use: samples the dense model writes itself, at compression time.

A chat model is asked questions through its chat template, yet the packaged calibration texts
(``calibration.SOURCES``) are plain prose: the statistics a layer is compressed against then come
from inputs unlike the ones users send. Two generated sources fill that gap (Williams et al., NAACL
2025: self-generated calibration data keeps downstream accuracy better than real text; Magpie, Xu et
al. 2024: an aligned model given only its template's user-turn prefix writes user instructions):

* ``self-chat``: the dense model, given its chat template's user-turn prefix and nothing else, writes
  an instruction; then answers it. Each conversation is rendered by the tokenizer's own chat template,
  exactly as a served request and its answer look to the model; windows are packed with whole
  conversations, each window starting at a conversation's start.
* ``self-free``: the dense model's free generation from the sequence start (its BOS, or its
  end-of-text token where the tokenizer adds none), as in the self-calibration paper.

Deterministic under a seed on one machine (sampling with a seeded generator; every batch has its own
seed). Nothing here is written or chosen to resemble the evaluation questions
(``armor_vllm.retention``): the instructions are the model's own, and any that happens to match an
evaluation question is dropped (``exclude``), so evaluation data never enters calibration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

SELF_SOURCES = ("self-chat", "self-free")
# how long an instruction and an answer may grow (tokens); a conversation is about 200 tokens
INSTRUCTION_TOKENS = 64
ANSWER_TOKENS = 256
MARKER = "\x00ARMOR-USER-TURN\x00"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn_prefix(tokenizer) -> str:
    """The text the chat template puts before a user's message (system prompt included, where the
    template adds a default one)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False)
    if MARKER not in rendered:
        raise ValueError("the chat template does not render the user's message")
    return rendered.split(MARKER)[0]


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (the template writes its
    own special tokens, so none are added on top)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def resembles(text: str, questions: Iterable[str]) -> bool:
    """Whether ``text`` holds one of ``questions`` (normalised; questions of 4 words or more, so a
    one-word answer choice does not match every sentence that uses the word), or is held in one."""
    t = normalise(text)
    qs = [q for q in (normalise(q) for q in questions) if len(q.split()) >= 4]
    return bool(t) and any(q in t or t in q for q in qs)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 0.95,
    stop: list[int] | None = None,
) -> list[list[int]]:
    """Sampled continuations (new token ids only, up to the first stop token) of ``prompts``, batched
    with left padding; deterministic for a given ``seed``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    stop = list(stop or [tokenizer.eos_token_id])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop,
        )
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        results.append(row[:cut])
    return results


def conversations(
    model,
    tokenizer,
    n: int,
    seed: int,
    batch: int = 16,
    exclude: Iterable[str] = (),
    instruction_tokens: int = 64,
    answer_tokens: int = 256,
) -> tuple[list[list[int]], int]:
    """``n`` conversations (token ids through the chat template: the model's own instruction and its
    own answer) and how many instructions were dropped for resembling an evaluation question."""
    instruction_tokens, answer_tokens = INSTRUCTION_TOKENS, ANSWER_TOKENS
    prefix = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    exclude = list(exclude)
    out: list[list[int]] = []
    dropped, round_ = 0, 0
    while len(out) < n:
        want = min(batch, n - len(out))
        instructions = sample(model, tokenizer, [prefix] * want, instruction_tokens, seed * 1000 + 2 * round_)
        texts = [tokenizer.decode(i, skip_special_tokens=True).strip() for i in instructions]
        kept = []
        for text in texts:
            if not text:
                continue
            if resembles(text, exclude):
                dropped += 1
                continue
            kept.append(text)
        prompts = [chat_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True) for t in kept]
        answers = (
            sample(model, tokenizer, prompts, answer_tokens, seed * 1000 + 2 * round_ + 1, temperature=0.7, top_p=0.9)
            if prompts
            else []
        )
        for text, answer in zip(kept, answers):
            reply = tokenizer.decode(answer, skip_special_tokens=True).strip()
            chat = [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            out.append(chat_ids(tokenizer, chat))
        round_ += 1
        if round_ > 4 * (n // max(batch, 1) + 1) + 8:
            raise RuntimeError(f"self-chat calibration: the model wrote only {len(out)} usable conversations")
    return out[:n], dropped


def pack(pieces: list[list[int]], n_windows: int, seq_len: int) -> torch.Tensor | None:
    """``(n_windows, seq_len)`` windows of whole pieces laid end to end, each window starting at a
    piece's start (the last piece of a window is cut); None when the pieces do not fill them."""
    windows, current = [], []
    for piece in pieces:
        current.extend(piece)
        if len(current) >= seq_len:
            windows.append(current[:seq_len])
            current = []
            if len(windows) == n_windows:
                return torch.tensor(windows, dtype=torch.long)
    return None


def self_chat_windows(model, tokenizer, n_windows: int, seq_len: int, seed: int, exclude: Iterable[str] = ()):
    """Windows of the model's own conversations (``self-chat``); returns them and the drop count."""
    if not has_chat_template(tokenizer):
        raise ValueError("calibration source 'self-chat' needs a model with a chat template")
    exclude = list(exclude)
    pieces: list[list[int]] = []
    dropped, attempt = 0, 0
    while True:
        # about 200 tokens a conversation; ask for a margin, and more when they come out short
        need = max(4, int(n_windows * seq_len / 160) + 2 - len(pieces))
        more, d = conversations(model, tokenizer, need, seed + 7919 * attempt, exclude=exclude)
        pieces += more
        dropped += d
        windows = pack(pieces, n_windows, seq_len)
        if windows is not None:
            return windows, dropped
        attempt += 1


def self_free_windows(model, tokenizer, n_windows: int, seq_len: int, seed: int, batch: int = 8) -> torch.Tensor:
    """Windows of the model's free generation from the sequence start (``self-free``)."""
    from armor_vllm.offline.calibration import sequence_start

    start = sequence_start(tokenizer) or [tokenizer.eos_token_id]
    rows: list[list[int]] = []
    round_ = 0
    while len(rows) < n_windows:
        want = min(batch, n_windows - len(rows))
        texts = sample(model, tokenizer, [start] * want, seq_len - len(start), seed * 1000 + round_, stop=[-1])
        rows += [start + t for t in texts if len(t) == seq_len - len(start)]
        round_ += 1
    return torch.tensor(rows[:n_windows], dtype=torch.long)


def generated_windows(name: str, model_dir, n_windows: int, seq_len: int, seed: int, model=None, tokenizer=None):
    """The windows of one generated source, by name; loads the dense model unless given one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if name == "self-chat":
        return self_chat_windows(model, tokenizer, n_windows, seq_len, seed, exclude=evaluation_questions())[0]
    if name == "self-free":
        return self_free_windows(model, tokenizer, n_windows, seq_len, seed)
    raise ValueError(f"unknown generated calibration source {name!r}; known: {list(SELF_SOURCES)}")


def evaluation_questions() -> list[str]:
    """Every evaluation question this project ships (the retention sets), to keep them out."""
    try:
        from armor_vllm.retention import question_texts
    except ImportError:  # pragma: no cover - the retention sets ship with the package
        return []
    return list(question_texts(questions_only=True))
