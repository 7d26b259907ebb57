"""Calibration and evaluation text, and how it becomes token samples.

The default text is Python's own documentation (``pydoc_data.topics``, ~465k characters of English
shipped with every CPython), split by topic into two disjoint parts with a fixed rule: topics are
sorted by name and every fifth one (index 0, 5, 10, ...) is evaluation text, the rest calibration
text. Users can pass their own ``.txt`` files (one document each) or ``.jsonl`` files (one JSON
object per line with a ``"text"`` field).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EVAL_EVERY = 5  # every fifth topic goes to evaluation


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def default_texts(split: str) -> list[str]:
    """The built-in text: ``split`` is ``"calibration"`` or ``"evaluation"`` (disjoint by topic)."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    want_eval = split == "evaluation"
    return [text for i, (_, text) in enumerate(_pydoc_topics()) if (i % EVAL_EVERY == 0) == want_eval]


def load_texts(paths: list[str | Path]) -> list[str]:
    """Documents from ``.txt`` files (one document a file) and ``.jsonl`` files (``{"text": ...}``
    a line). Errors name the file and line at fault."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        if path.suffix == ".txt":
            texts.append(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
                texts.append(record["text"])
        else:
            raise ValueError(f"calibration file {path}: expected a .txt or .jsonl file")
    if not any(t.strip() for t in texts):
        raise ValueError(f"calibration files {[str(p) for p in paths]} hold no text")
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined with the end-of-sequence token, as one 1-D tensor."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_samples(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """``(n_samples, seq_len)`` non-overlapping windows taken from the start of the token stream."""
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"--calib-samples ({n_samples}) and --seq-len ({seq_len}) must be positive")
    stream = token_stream(tokenizer, texts)
    available = stream.numel() // seq_len
    if available < n_samples:
        raise ValueError(
            f"the calibration text holds {stream.numel()} tokens: enough for {available} samples of "
            f"{seq_len} tokens, not --calib-samples {n_samples}; lower one of them or add text"
        )
    return stream[: n_samples * seq_len].reshape(n_samples, seq_len)
