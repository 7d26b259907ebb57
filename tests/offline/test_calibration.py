"""Calibration and evaluation text: the packaged sources, the default mix (interleaved, disjoint
from every evaluation text), dictd parsing, and ``armor_vllm.eval --data``."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from armor_vllm.offline import calibration
from armor_vllm.offline.calibration import (
    CALIBRATION_MIX,
    HELD_OUT,
    MissingSource,
    dictd_entries,
    load_texts,
    mixed_samples,
    spread_windows,
)


class CharTokenizer:
    """One token per character: enough to check which text a window came from."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 5000 + 1 for c in text]}


def fake_sources(monkeypatch, names=("pydoc", "jargon", "opticks", "licenses")):
    letters = dict(zip(names, "abcdefgh"))
    for name, letter in letters.items():
        monkeypatch.setitem(
            calibration.SOURCES,
            name,
            calibration.TextSource(name, f"apt-get install {name}", lambda l=letter: [l * 4000]),
        )
    return {name: ord(letter) % 5000 + 1 for name, letter in letters.items()}


def test_the_mix_interleaves_its_sources_and_never_holds_evaluation_text(monkeypatch):
    token = fake_sources(monkeypatch)
    samples, used = mixed_samples(CharTokenizer(), 10, 64)
    assert used == list(CALIBRATION_MIX) and samples.shape == (10, 64)
    for i, row in enumerate(samples):  # round robin: sample i comes from source i % 4, whole window
        assert bool((row == token[CALIBRATION_MIX[i % 4]]).all())
    assert not set(HELD_OUT) & set(CALIBRATION_MIX)
    assert "pydoc-eval" not in CALIBRATION_MIX


def test_a_missing_source_is_left_out_with_a_warning_naming_the_install(monkeypatch):
    fake_sources(monkeypatch)

    def missing():
        raise MissingSource("/usr/share/dictd/jargon.dict.dz is missing")

    monkeypatch.setitem(
        calibration.SOURCES, "jargon", calibration.TextSource("j", "apt-get install dict-jargon", missing)
    )
    with pytest.warns(UserWarning, match="apt-get install dict-jargon"):
        samples, used = mixed_samples(CharTokenizer(), 6, 32)
    assert used == ["pydoc", "opticks", "licenses"] and samples.shape == (6, 32)
    with pytest.raises(MissingSource, match="apt-get install dict-jargon"):
        calibration.source_texts("jargon")


def test_builtin_splits_are_disjoint():
    calib, evaluation = calibration.default_texts("calibration"), calibration.default_texts("evaluation")
    assert calib and evaluation and not set(calib) & set(evaluation)


def test_dictd_entries_skip_the_header_and_decode_offsets(tmp_path):
    body = b"header text\nALPHA, n.  The first.\nBETA, n.  The second.\n"
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(body))
    b64 = calibration._B64

    def enc(n):
        return b64[n // 64] + b64[n % 64] if n >= 64 else b64[n]

    start_a, start_b = body.index(b"ALPHA"), body.index(b"BETA")
    (tmp_path / "x.index").write_text(
        f"00databaseinfo\t{enc(0)}\t{enc(11)}\nalpha\t{enc(start_a)}\t{enc(start_b - start_a)}\n"
        f"beta\t{enc(start_b)}\t{enc(len(body) - start_b)}\n"
    )
    assert dictd_entries("x", tmp_path) == ["ALPHA, n.  The first.", "BETA, n.  The second."]
    (tmp_path / "x.index").write_text("broken line\n")
    with pytest.raises(ValueError, match="x.index:1"):
        dictd_entries("x", tmp_path)


def test_spread_windows_cover_the_text():
    stream = torch.arange(1000)
    windows = spread_windows(stream, 4, 100)
    assert windows[:, 0].tolist() == [0, 200, 500, 700]
    with pytest.raises(ValueError, match="enough for 10 windows"):
        spread_windows(stream, 11, 100)


def test_load_texts_takes_files_and_source_names(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "world"}) + "\n")
    assert load_texts([txt, jsonl]) == ["hello", "world"]
    assert load_texts(["pydoc"]) == calibration.default_texts("calibration")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_texts([tmp_path / "nowhere.txt"])


def test_eval_data_reports_each_text(default_model_dir, tmp_path, capsys):
    from armor_vllm.eval import main

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a small cat who lived by the sea. " * 60)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "--model",
                str(default_model_dir),
                "--backend",
                "hf",
                "--seq-len",
                "64",
                "--max-windows",
                "1",
                "--data",
                str(text),
                "--data-windows",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["texts"]) == {"builtin", "story.txt"}
    story = result["texts"]["story.txt"]
    assert story["windows"] == 2 and story["hf"]["tokens"] == 2 * 63
    assert story["hf"]["perplexity"] < result["texts"]["builtin"]["hf"]["perplexity"]  # repetitive text is easy
    assert main(["--model", str(default_model_dir), "--backend", "hf", "--data", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


# -- every window starts as the tokenizer starts a sequence (its BOS, where it adds one) ------------


def test_sequence_start_is_the_bos_of_tokenizers_that_add_one(bos_tokenizer, default_model_dir):
    from transformers import AutoTokenizer

    assert calibration.sequence_start(bos_tokenizer) == [bos_tokenizer.bos_token_id]
    assert calibration.sequence_start(AutoTokenizer.from_pretrained(default_model_dir)) == []


def test_calibration_windows_start_with_bos(bos_tokenizer, monkeypatch):
    fake_sources(monkeypatch)
    bos = bos_tokenizer.bos_token_id
    samples, _ = mixed_samples(bos_tokenizer, 8, 32)
    assert samples.shape == (8, 32) and (samples[:, 0] == bos).all()
    assert not (samples[:, 1:] == bos).all(dim=1).any()  # the text follows, not more BOS
    texts = ["one two three four five six seven eight nine ten " * 40]
    windows = calibration.token_samples(bos_tokenizer, texts, 4, 16)
    assert windows.shape == (4, 16) and (windows[:, 0] == bos).all()
    # consecutive windows continue the text where the previous one stopped (15 text tokens each)
    stream = calibration.token_stream(bos_tokenizer, texts)
    assert torch.equal(windows[:, 1:].reshape(-1), stream[: 4 * 15])


def test_evaluation_windows_start_with_bos(bos_tokenizer, tmp_path, monkeypatch):
    from armor_vllm import eval as ev

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: bos_tokenizer)
    builtin = ev.eval_windows(tmp_path, 64, 3)
    text = tmp_path / "t.txt"
    text.write_text("Some held-out English prose, repeated. " * 200)
    data = ev.data_windows(tmp_path, str(text), 64, 5)
    bos = bos_tokenizer.bos_token_id
    for windows, n in ((builtin, 3), (data, 5)):
        assert windows.shape == (n, 64) and (windows[:, 0] == bos).all()
