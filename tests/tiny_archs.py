"""Tiny random models of each supported architecture (2 decoder layers, hidden 128, 4 heads of 32:
vLLM's CPU attention has no kernel for smaller heads), saved by
transformers as bf16 safetensors with the embedded model's tokenizer: what a user's checkpoint of
that architecture looks like on disk, small enough for CI."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=49152,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    dtype="bfloat16",
    initializer_range=0.1,  # peaked logits: a greedy argmax that float32 rounding does not flip
)


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=256, tie_word_embeddings=True, **COMMON)
    if arch == "qwen2":  # q/k/v with bias
        return tf.Qwen2Config(intermediate_size=256, tie_word_embeddings=True, **COMMON)
    if arch == "qwen3":  # q/k norms
        return tf.Qwen3Config(intermediate_size=256, head_dim=32, tie_word_embeddings=True, **COMMON)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=256, tie_word_embeddings=False, **COMMON)
    if arch == "gemma3":  # one sliding-window layer (window 8) and one full-attention layer
        return tf.Gemma3TextConfig(
            intermediate_size=256,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        )
    if arch == "gemma2":
        return tf.Gemma2Config(
            intermediate_size=256,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        )
    if arch == "phi3":  # checkpoint stores qkv_proj and gate_up_proj fused
        return tf.Phi3Config(intermediate_size=256, tie_word_embeddings=False, pad_token_id=0, **COMMON)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=256,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            tie_word_embeddings=True,
            **COMMON,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            **COMMON,
        )
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=49152,
            hidden_size=128,
            word_embed_proj_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=256,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dtype="bfloat16",
            init_std=0.1,
        )
    if arch == "gpt2":  # Conv1D projections, fused c_attn
        return tf.GPT2Config(
            vocab_size=49152,
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
            dtype="bfloat16",
            initializer_range=0.1,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}")


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_moe", "mixtral")


def make_tiny(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model to ``out`` (bf16 safetensors + tokenizer files)."""
    from transformers import AutoModelForCausalLM

    from armor_vllm.core.checkpoint import copy_side_files

    config = _config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    copy_side_files(tokenizer_dir, out)
    return Path(out)
