"""Tiny random Hugging Face causal LMs for offline tests: the two the trainer tests use (Llama like SmolLM2 with
tied embeddings, and Qwen2) and a zoo of the families users bring (tests/test_families.py).

    build_tiny_model("llama", tmp_dir, tokenizer_dir)             # -> tmp_dir / "llama", loadable with from_pretrained
    build_tiny_model("gemma2", tmp_dir, trained_logits=True)      # the zoo: logits of a trained model's size

Weights are a seeded random init from the config, so the same call always gives the same model. A random init has
logits of std ~0.2, where softcapping and logit scaling hide (tanh(x) ~ x); with `trained_logits` the LM head is
rescaled so that the model's own logits have a std of about TRAINED_LOGIT_STD, as a trained model's do. Dropout is
off everywhere, so train-mode forwards are deterministic.
"""

from pathlib import Path

import torch
import transformers as T
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DEFAULT_VOCAB = 256  # when no tokenizer is given
TRAINED_LOGIT_STD = 6.0
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)


def zoo_configs(vocab: int) -> dict:
    """family -> config: what each family's real checkpoints set where it changes the loss (Granite's multipliers
    and logits_scaling, Cohere's logit_scale, Gemma-2's softcaps), tiny everywhere else."""
    s = dict(SHAPE, vocab_size=vocab, max_position_embeddings=512)
    gpt = dict(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4)
    configs = {
        "llama": T.LlamaConfig(**s, tie_word_embeddings=True),
        "qwen2": T.Qwen2Config(**s),
        "qwen3": T.Qwen3Config(**s, head_dim=16),
        "mistral": T.MistralConfig(**s),
        "phi3": T.Phi3Config(**s, pad_token_id=0),
        "gemma": T.GemmaConfig(**s, head_dim=16),
        "gemma2": T.Gemma2Config(**s, head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        "gemma3": T.Gemma3TextConfig(**s, head_dim=16, final_logit_softcapping=30.0),
        "granite": T.GraniteConfig(**s, logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                                   attention_multiplier=0.0625),
        "cohere": T.CohereConfig(**s, logit_scale=0.0625),
        "olmo2": T.Olmo2Config(**s, pad_token_id=0),
        "starcoder2": T.Starcoder2Config(**s, residual_dropout=0.0, embedding_dropout=0.0),
        "gpt2": T.GPT2Config(**gpt, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": T.GPTNeoXConfig(**s, hidden_dropout=0.0, attention_dropout=0.0),
        "falcon": T.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        "mixtral": T.MixtralConfig(**s, num_local_experts=4, **MOE),
        "qwen2_moe": T.Qwen2MoeConfig(**s, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                      **MOE),
        "olmoe": T.OlmoeConfig(**s, num_experts=4, pad_token_id=0, **MOE),
        # Refused by the start-up probe: neither isolates packed samples through position_ids (OPT builds its mask
        # without them, BLOOM's ALiBi ignores them).
        "opt": T.OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                           word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0, pad_token_id=0),
        "bloom": T.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4),
    }
    assert tuple(configs) == ZOO, "tests/tiny_models.py: ZOO must name zoo_configs' families, in its order"
    return configs


# zoo_configs' families, named here so that collecting the tests builds no config (building them all costs ~1 CPU-s
# in every test process); zoo_configs checks that the two agree
ZOO = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3", "granite", "cohere", "olmo2",
       "starcoder2", "gpt2", "gpt_neox", "falcon", "mixtral", "qwen2_moe", "olmoe", "opt", "bloom")
REFUSED = ("opt", "bloom")


def tiny_config(arch: str, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None):
    common = dict(SHAPE, vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=bos_id, eos_token_id=eos_id)
    if arch == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=True)  # SmolLM2 ties the LM head to the embeddings
    if arch == "qwen2":
        return T.Qwen2Config(**common, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model arch {arch!r}; use 'llama' or 'qwen2'")


@torch.no_grad()
def scale_to_trained_logits(model) -> float:
    """Rescale the LM head so the model's own logits on random tokens have a std of TRAINED_LOGIT_STD."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=g)
    head = model.get_output_embeddings()
    for _ in range(3):  # softcapping makes the std sub-linear in the scale: a few fixed-point steps
        std = model(input_ids=ids, use_cache=False).logits.float().std().item()
        head.weight.mul_(TRAINED_LOGIT_STD / std)
        if head.bias is not None:
            head.bias.mul_(TRAINED_LOGIT_STD / std)
    return model(input_ids=ids, use_cache=False).logits.float().std().item()


def build_tiny_model(arch: str, out_dir: Path, tokenizer_dir: Path | None = None, trained_logits: bool = False) -> Path:
    """Save a seeded random `arch` model (vocab = the tokenizer's, tokenizer included) to out_dir/arch.

    Without `trained_logits` only 'llama' and 'qwen2' (the trainer tests' models, unchanged); with it, any ZOO family.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
    vocab_size = len(tokenizer) if tokenizer is not None else DEFAULT_VOCAB
    bos_id = tokenizer.bos_token_id if tokenizer is not None else None
    eos_id = tokenizer.eos_token_id if tokenizer is not None else None
    torch.manual_seed(0)
    if trained_logits:
        config = zoo_configs(vocab_size)[arch]
        config.bos_token_id, config.eos_token_id = bos_id, eos_id
    else:
        config = tiny_config(arch, vocab_size, bos_id, eos_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if trained_logits:
        scale_to_trained_logits(model)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    path = Path(out_dir) / arch
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Encoder-decoder models (no seq2seq weights ship anywhere here: seeded random ones from a config)

SEQ2SEQ = ("t5", "bart")


def seq2seq_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None = None):
    """A tiny T5 (relative position bias, tied head scaled by d_model^-0.5) or BART (learned positions,
    final_logits_bias), dropout off. Decoding starts from the pad token (T5) or EOS (BART), as their checkpoints do."""
    if arch == "t5":
        return T.T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0, pad_token_id=pad_id, eos_token_id=eos_id,
                          decoder_start_token_id=pad_id, tie_word_embeddings=True)
    if arch == "bart":
        return T.BartConfig(vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                            decoder_ffn_dim=128, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, pad_token_id=pad_id, eos_token_id=eos_id,
                            bos_token_id=eos_id if bos_id is None else bos_id, decoder_start_token_id=eos_id,
                            forced_eos_token_id=eos_id)
    raise ValueError(f"unknown tiny seq2seq arch {arch!r}; use one of {SEQ2SEQ}")


def build_tiny_seq2seq(arch: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Save a seeded random encoder-decoder `arch` (vocab = the tokenizer's, tokenizer included) to out_dir/arch.
    BART's final_logits_bias is made non-zero, so a loss that forgets it is caught."""
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(0)
    config = seq2seq_config(arch, len(tokenizer), pad, eos, tokenizer.bos_token_id)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    if arch == "bart":
        with torch.no_grad():
            model.final_logits_bias.normal_(0.0, 1.0)
    path = Path(out_dir) / arch
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def seq2seq_zoo(vocab: int) -> dict:
    """Encoder-decoder families users bring, tiny, dropout off: what their checkpoints set where the loss depends on
    it (T5 v1.0 ties and scales its head, T5 v1.1 / FLAN-T5 / mT5 do not; mBART starts decoding from the target's last
    token)."""
    t5 = dict(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    bart = dict(vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0, pad_token_id=0,
                eos_token_id=2, decoder_start_token_id=2, max_position_embeddings=128)
    return {
        "t5": T.T5Config(**t5, tie_word_embeddings=True),
        "flan-t5": T.T5Config(**t5, tie_word_embeddings=False, feed_forward_proj="gated-gelu"),
        "mt5": T.MT5Config(**t5, feed_forward_proj="gated-gelu"),
        "umt5": T.UMT5Config(**t5),
        "longt5": T.LongT5Config(**t5),
        "bart": T.BartConfig(**bart),
        "mbart": T.MBartConfig(**bart),
        "pegasus": T.PegasusConfig(**bart),
        "marian": T.MarianConfig(**{**bart, "decoder_start_token_id": 0}),
    }
