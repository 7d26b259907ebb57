"""The package's import structure: every module imports on its own (an import cycle fails here in
whichever order it bites), and the core (``armor_vllm.core``) needs only torch, safetensors and
compressed-tensors: never vLLM or transformers (docs/ARCHITECTURE.md says who may import what)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "armor_vllm"


def modules(under: Path = PACKAGE) -> list[str]:
    names = []
    for path in sorted(under.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# Each module is imported in a fresh child forked from one parent that has paid for torch once (and,
# for the second phase, for vLLM and transformers), so the check costs seconds, not minutes.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, safetensors  # noqa: F401
    core, everything = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    FORBIDDEN = ("vllm", "transformers")

    def child(name, check_core):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                __import__(name)
                if check_core:
                    bad = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
                    if bad:
                        print(f"{name} imports {bad[:3]}", flush=True)
                        code = 3
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
                code = 4
            os._exit(code)
        return os.waitpid(pid, 0)[1] == 0

    failed = [n for n in core if not child(n, True)]
    import vllm, transformers  # noqa: F401,E401  (paid once for the rest)
    failed += [n for n in everything if not child(n, False)]
    print("FAILED", json.dumps(failed))
""")


def test_every_module_imports_alone_and_the_core_needs_neither_vllm_nor_transformers():
    import json

    core = modules(PACKAGE / "core")
    assert "armor_vllm.core.format" in core and "armor_vllm.core.factorization" in core
    everything = [m for m in modules() if m not in core]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(core), json.dumps(everything)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "FAILED []", proc.stdout[-3000:]
