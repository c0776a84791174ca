"""Tiny random Hugging Face causal LMs (Llama like SmolLM2 with tied embeddings, and Qwen2) for offline tests.

    build_tiny_model("llama", tmp_dir, tokenizer_dir)  # -> tmp_dir / "llama", loadable with from_pretrained

Weights are a seeded random init from the config, so the same call always gives the same model.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, Qwen2Config

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DEFAULT_VOCAB = 256  # when no tokenizer is given


def tiny_config(arch: str, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None):
    common = dict(SHAPE, vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=bos_id, eos_token_id=eos_id)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)  # SmolLM2 ties the LM head to the embeddings
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model arch {arch!r}; use 'llama' or 'qwen2'")


def build_tiny_model(arch: str, out_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """Save a seeded random `arch` model (vocab = the tokenizer's, tokenizer included) to out_dir/arch."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
    vocab_size = len(tokenizer) if tokenizer is not None else DEFAULT_VOCAB
    bos_id = tokenizer.bos_token_id if tokenizer is not None else None
    eos_id = tokenizer.eos_token_id if tokenizer is not None else None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, bos_id, eos_id), dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    path = Path(out_dir) / arch
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
