"""Calibration and evaluation text, and how it becomes token samples.

Every text comes from a package installed on the machine (nothing is downloaded at run time). The
known sources, by name (``SOURCES``):

* ``pydoc``: Python's documentation (``pydoc_data.topics``, ~465k characters, shipped with every
  CPython), split by topic into two disjoint parts with a fixed rule: topics are sorted by name and
  every fifth one (index 0, 5, 10, ...) is evaluation text (the *built-in evaluation split*), the
  rest calibration text, less any text that is also an evaluation topic (one 600-character text
  appears under two topic names).
* ``jargon``: the Jargon File, an informal lexicon of hacker culture (Debian ``dict-jargon``).
* ``opticks``: Isaac Newton's *Opticks* (1704), long-form scientific prose (a test file of the PyPI
  package ``apache-tvm-ffi``, which vLLM installs).
* ``licenses``: the common free-software licenses, legal English (Debian ``base-files``).
* ``fortunes``: the English fortune-cookie files (quotations, jokes, poems; Debian ``fortunes``).
* ``devil``: Ambrose Bierce's *The Devil's Dictionary* (1911), satirical prose and verse (Debian
  ``dict-devil``).

The default calibration set (``CALIBRATION_MIX``) mixes four kinds of English: documentation
(``pydoc``, calibration split), informal lexicon (``jargon``), narrative scientific prose
(``opticks``) and legal text (``licenses``), in equal shares of samples. ``HELD_OUT`` (``fortunes``,
``devil``) are evaluation texts only: they are never in the default calibration set, and neither is
the evaluation split of ``pydoc``. A source of the mix that is not installed is left out with a
warning naming the install command (the report records which sources were used).

Users can pass their own ``.txt`` files (one document each) or ``.jsonl`` files (one JSON object per
line with a ``"text"`` field), or source names, to ``--calib-data`` and to ``armor_vllm.eval --data``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

EVAL_EVERY = 5  # every fifth pydoc topic goes to evaluation
DICTD = Path("/usr/share/dictd")
FORTUNES = Path("/usr/share/games/fortunes")
LICENSES = Path("/usr/share/common-licenses")


class MissingSource(FileNotFoundError):
    """A named text source whose package is not installed."""


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def default_texts(split: str) -> list[str]:
    """The built-in pydoc text: ``split`` is ``"calibration"`` or ``"evaluation"`` (disjoint by topic)."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    topics = _pydoc_topics()
    evaluation = [text for i, (_, text) in enumerate(topics) if i % EVAL_EVERY == 0]
    if split == "evaluation":
        return evaluation
    # Some topics share one text under two names: those stay evaluation text only.
    held = set(evaluation)
    return [text for i, (_, text) in enumerate(topics) if i % EVAL_EVERY and text not in held]


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(code: str) -> int:
    value = 0
    for ch in code:
        value = value * 64 + _B64.index(ch)
    return value


def dictd_entries(name: str, root: Path = DICTD) -> list[str]:
    """The entries of a dictd database (``NAME.index`` + gzip-compatible ``NAME.dict.dz``), in file
    order, without the ``00database*`` header entries."""
    index, data = root / f"{name}.index", root / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise MissingSource(f"{data} is missing")
    body = gzip.decompress(data.read_bytes())
    spans = set()
    for lineno, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{index}:{lineno}: expected 'word<TAB>offset<TAB>length'")
        if parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    return [body[o : o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans)]


def _package_file(module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource(f"the Python package providing '{module}' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingSource(f"{path} is missing")
    return path


def _fortunes() -> list[str]:
    if not FORTUNES.is_dir():
        raise MissingSource(f"{FORTUNES} is missing")
    cookies: list[str] = []
    for path in sorted(FORTUNES.iterdir()):  # the top level holds the English files only
        if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        cookies.extend(c.strip() for c in text.split("\n%\n") if c.strip())
    if not cookies:
        raise MissingSource(f"{FORTUNES} holds no fortune files")
    return ["\n\n".join(cookies)]


def _licenses() -> list[str]:
    if not LICENSES.is_dir():
        raise MissingSource(f"{LICENSES} is missing")
    # The full texts only (GPL is a link to GPL-3 and so on): one document each.
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@dataclass(frozen=True)
class TextSource:
    """A named text that ships in a package: what it is, how to install it, how to read it."""

    description: str
    install: str
    load: Callable[[], list[str]]


SOURCES: dict[str, TextSource] = {
    "pydoc": TextSource(
        "Python documentation, calibration split (stdlib pydoc_data)",
        "(part of CPython)",
        lambda: default_texts("calibration"),
    ),
    "pydoc-eval": TextSource(
        "Python documentation, evaluation split (stdlib pydoc_data)",
        "(part of CPython)",
        lambda: default_texts("evaluation"),
    ),
    "jargon": TextSource(
        "the Jargon File (Debian dict-jargon)",
        "apt-get install dict-jargon",
        lambda: ["\n\n".join(dictd_entries("jargon"))],
    ),
    "opticks": TextSource(
        "Newton's Opticks (PyPI apache-tvm-ffi)",
        "pip install apache-tvm-ffi",
        lambda: [
            _package_file("tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt").read_text(
                encoding="utf-8", errors="replace"
            )
        ],
    ),
    "licenses": TextSource(
        "common free-software licenses (Debian base-files)", "apt-get install base-files", _licenses
    ),
    "fortunes": TextSource("English fortune cookies (Debian fortunes)", "apt-get install fortunes", _fortunes),
    "devil": TextSource(
        "The Devil's Dictionary (Debian dict-devil)",
        "apt-get install dict-devil",
        lambda: ["\n\n".join(dictd_entries("devil"))],
    ),
}
CALIBRATION_MIX = ("pydoc", "jargon", "opticks", "licenses")
HELD_OUT = ("fortunes", "devil")


def source_texts(name: str) -> list[str]:
    """The documents of the named source; a missing package is an error naming the install line."""
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    try:
        return source.load()
    except MissingSource as exc:
        raise MissingSource(
            f"text source {name!r} ({source.description}) is not available: {exc}; install it with '{source.install}'"
        ) from None


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix != ".jsonl":
        raise ValueError(f"text file {path}: expected a .txt or .jsonl file (or a source name: {sorted(SOURCES)})")
    texts = []
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
    return texts


def load_texts(paths: list[str | Path]) -> list[str]:
    """Documents from ``.txt`` files (one document a file), ``.jsonl`` files (``{"text": ...}`` a
    line) and source names (``SOURCES``). Errors name the file and line at fault."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            texts.extend(_read_file(path))
        elif str(raw) in SOURCES:
            texts.extend(source_texts(str(raw)))
        else:
            raise FileNotFoundError(f"text file {path} does not exist (and is not a source name: {sorted(SOURCES)})")
    if not any(t.strip() for t in texts):
        raise ValueError(f"text files {[str(p) for p in paths]} hold no text")
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined with the end-of-sequence token, as one 1-D tensor (no
    special tokens inside: windows cut from it get the tokenizer's sequence start, ``cut_windows``)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def sequence_start(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it starts a sequence: its beginning-of-sequence
    token for Llama, Gemma, Mistral, ... (models use it as their attention sink), nothing for
    tokenizers that add none (SmolLM2, Qwen). Every window this project builds starts with them, so
    calibration statistics and perplexities come from inputs shaped as the model sees them in use."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def cut_windows(stream: torch.Tensor, offsets: list[int], seq_len: int, start: list[int] = ()) -> torch.Tensor:
    """``(len(offsets), seq_len)`` windows: ``start`` (the sequence start) then ``seq_len - len(start)``
    tokens of ``stream`` from each offset."""
    body = seq_len - len(start)
    prefix = torch.tensor(list(start), dtype=torch.long)
    return torch.stack([torch.cat([prefix, stream[o : o + body]]) for o in offsets])


def _body(seq_len: int, start: list[int]) -> int:
    body = seq_len - len(start)
    if body <= 0:
        raise ValueError(f"a window of {seq_len} tokens leaves no room after the {len(start)}-token sequence start")
    return body


def spread_windows(
    stream: torch.Tensor, n_windows: int, seq_len: int, what: str = "the text", start: list[int] = ()
) -> torch.Tensor:
    """``(n_windows, seq_len)`` non-overlapping windows spread evenly over ``stream`` (from its start
    when they fill it), so a long text is sampled throughout rather than only at its beginning; each
    begins with ``start`` (``sequence_start`` of the tokenizer)."""
    if n_windows <= 0 or seq_len <= 0:
        raise ValueError(f"the number of windows ({n_windows}) and their length ({seq_len}) must be positive")
    body = _body(seq_len, start)
    available = stream.numel() // body
    if available < n_windows:
        raise ValueError(
            f"{what} holds {stream.numel()} tokens: enough for {available} windows of {seq_len} "
            f"tokens, not {n_windows}; lower one of them or add text"
        )
    return cut_windows(stream, [(i * available // n_windows) * body for i in range(n_windows)], seq_len, start)


def first_windows(stream: torch.Tensor, n_windows: int | None, seq_len: int, start: list[int] = ()) -> torch.Tensor:
    """Consecutive windows from the beginning of ``stream`` (as many as it holds, at most
    ``n_windows``), each beginning with ``start``."""
    body = _body(seq_len, start)
    n = stream.numel() // body if n_windows is None else min(n_windows, stream.numel() // body)
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    return cut_windows(stream, [i * body for i in range(n)], seq_len, start)


def token_samples(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """``(n_samples, seq_len)`` non-overlapping windows taken from the start of the token stream,
    each beginning as the tokenizer begins a sequence."""
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"--calib-samples ({n_samples}) and --seq-len ({seq_len}) must be positive")
    stream = token_stream(tokenizer, texts)
    start = sequence_start(tokenizer)
    available = stream.numel() // _body(seq_len, start)
    if available < n_samples:
        raise ValueError(
            f"the calibration text holds {stream.numel()} tokens: enough for {available} samples of "
            f"{seq_len} tokens, not --calib-samples {n_samples}; lower one of them or add text"
        )
    return first_windows(stream, n_samples, seq_len, start)


def mixed_samples(
    tokenizer,
    n_samples: int,
    seq_len: int,
    sources: tuple[str, ...] = CALIBRATION_MIX,
    generate: Callable[[str, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """A calibration set mixing ``sources``: ``n_samples`` windows shared equally (round robin) among
    them, each text source's windows spread over its whole text. Generated sources (``self-chat``,
    ``self-free``: ``self_calibration``) come from ``generate(name, n_windows)``. Returns the samples
    and the names of the sources used; a missing text source is left out with a warning."""
    from armor_vllm.offline.self_calibration import SELF_SOURCES

    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"--calib-samples ({n_samples}) and --seq-len ({seq_len}) must be positive")
    streams = {}
    for name in sources:
        if name in SELF_SOURCES:
            if generate is None:
                raise ValueError(f"calibration source {name!r} is generated by the model: no generator was given")
            streams[name] = None
            continue
        try:
            streams[name] = token_stream(tokenizer, source_texts(name))
        except MissingSource as exc:
            warnings.warn(f"calibration set: {exc}; calibrating without it", stacklevel=2)
    if not streams:
        raise MissingSource(f"none of the calibration sources {list(sources)} is installed")
    names = list(streams)
    counts = {name: len(range(i, n_samples, len(names))) for i, name in enumerate(names)}
    start = sequence_start(tokenizer)
    windows = {
        name: generate(name, counts[name])
        if streams[name] is None
        else spread_windows(streams[name], counts[name], seq_len, f"calibration source {name!r}", start)
        for name in names
        if counts[name]
    }
    taken = {name: 0 for name in names}
    rows = []
    for i in range(n_samples):  # interleaved, so any prefix of the samples is a mix too
        name = names[i % len(names)]
        rows.append(windows[name][taken[name]])
        taken[name] += 1
    return torch.stack(rows), [n for n in names if counts[n]]
