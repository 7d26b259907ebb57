"""``python -m armor_vllm.lmeval ARGS``: lm-evaluation-harness's ``lm_eval ARGS`` with the ARMOR
quantizer registered in transformers, so that ``--model hf --model_args pretrained=ARMOR_DIR`` loads
the checkpoint (plain ``lm_eval --model hf`` does not import armor_vllm, and transformers then
refuses an ARMOR checkpoint). ``--model vllm`` needs no wrapper: vLLM loads the armor plugin itself.

    python -m armor_vllm.lmeval --model hf --model_args pretrained=out/smollm2-armor,dtype=float32 \\
        --tasks armor_text --include_path eval/lm_eval_tasks

Needs the optional extra: ``pip install 'armor-vllm[eval]'``.
"""

from __future__ import annotations

import sys


def main() -> None:
    import armor_vllm.hf.quantizer  # noqa: F401  (registers quant_method "armor" with transformers)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        sys.exit(f"lm-evaluation-harness is not installed ({exc}); pip install 'armor-vllm[eval]'")
    sys.argv[0] = "python -m armor_vllm.lmeval"
    cli_evaluate()


if __name__ == "__main__":
    main()
