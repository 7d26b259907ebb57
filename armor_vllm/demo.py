"""``python -m armor_vllm.demo`` (``make demo``): the main job end to end on the embedded model.

1. compress SmolLM2-135M-Instruct with ARMOR (``python -m armor_vllm.offline``);
2. serve it with ``vllm serve DIR --quantization armor`` on a loopback port;
3. send an OpenAI chat request and print the answer; stop the server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from armor_vllm.serve import VllmServer

QUESTION = "What is the capital of France?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m armor_vllm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", default="out/smollm2-armor", help="where the compressed checkpoint goes")
    p.add_argument("--preset", default="default", help="ARMOR preset (quick, default, long, paper)")
    p.add_argument("--method", default="armor")
    p.add_argument(
        "--block-size",
        default="auto",
        help="ARMOR wrapper block size (default auto: 64 on this model, the best measured quality; BENCHMARKS.md, section 1)",  # noqa: E501
    )
    args = p.parse_args(argv)

    out = Path(args.output)
    if (out / "config.json").is_file():
        print(f"[1/3] {out} already holds a compressed checkpoint; reusing it (delete it to compress again)")
    else:
        cmd = [sys.executable, "-m", "armor_vllm.offline", "--output", str(out), "--method", args.method]
        if args.method == "armor":
            cmd += ["--preset", args.preset]
            if args.block_size != "auto":
                cmd += ["--block-size", str(args.block_size)]
        print("[1/3] $ python", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)

    log = out.with_name(out.name + ".serve.log")
    server = VllmServer(out, log_path=log)
    print(f"[2/3] $ {' '.join(server.command)}   (log: {log})", flush=True)
    t0 = time.monotonic()
    with server:
        print(f"      healthy after {time.monotonic() - t0:.0f} s on {server.base_url}", flush=True)
        from openai import OpenAI

        client = OpenAI(base_url=server.base_url, api_key="unused")
        reply = client.chat.completions.create(
            model=server.served_name,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=48,
            temperature=0.0,
        )
        print(f"[3/3] chat request: {QUESTION!r}\n      answer: {reply.choices[0].message.content!r}")
        print(f"      usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
