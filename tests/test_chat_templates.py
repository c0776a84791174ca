"""The chat-template tokenizer fixtures behave like the real tokenizers they stand in for."""

import pytest
from transformers import AutoTokenizer

from tests.chat_templates import FAMILIES, VOCAB_SIZE

CONVERSATION = [
    {"role": "user", "content": "Hello! What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Größe 🙂 日本語?"},
    {"role": "assistant", "content": "Café, naïve 🚀."},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *CONVERSATION]


def load(tokenizer_dir, name):
    return AutoTokenizer.from_pretrained(tokenizer_dir(name))


def ids_of(encoded):
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def test_every_family_renders_every_turn_and_round_trips(tokenizer_dir, family):
    tok = load(tokenizer_dir, family)
    text = tok.apply_chat_template(WITH_SYSTEM, tokenize=False)
    for message in WITH_SYSTEM:
        assert message["content"] in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # transformers' own tokenize=True tokenizes the rendered text without adding special tokens
    assert ids_of(tok.apply_chat_template(WITH_SYSTEM, tokenize=True)) == ids


def test_vocab_is_small(tokenizer_dir):
    for name in FAMILIES:
        assert len(load(tokenizer_dir, name)) <= VOCAB_SIZE + 16


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma"])
def test_bos_families_double_the_bos_on_default_tokenization(tokenizer_dir, name):
    tok = load(tokenizer_dir, name)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith(tok.bos_token)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]
    assert tok(text, add_special_tokens=False)["input_ids"][:2] != [tok.bos_token_id, tok.bos_token_id]


@pytest.mark.parametrize("name", ["chatml", "chatml_gen", "phi3", "qwen3"])
def test_no_bos_families_add_nothing(tokenizer_dir, name):
    tok = load(tokenizer_dir, name)
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]


def test_only_chatml_gen_has_generation_tags(tokenizer_dir):
    tagged = [name for name in FAMILIES if "{% generation %}" in load(tokenizer_dir, name).chat_template]
    assert tagged == ["chatml_gen"]


def test_chatml_gen_assistant_mask_covers_assistant_content_and_end(tokenizer_dir):
    tok = load(tokenizer_dir, "chatml_gen")
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "The capital of France is Paris.<|im_end|>Café, naïve 🚀.<|im_end|>"


@pytest.mark.parametrize("name", ["chatml", "smollm2"])
def test_chatml_injects_a_default_system_prompt(tokenizer_dir, name):
    tok = load(tokenizer_dir, name)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    given = tok.apply_chat_template(WITH_SYSTEM, tokenize=False)
    assert given.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n") and "SmolLM" not in given


def test_mistral_moves_the_system_prompt_into_the_last_user_turn(tokenizer_dir):
    text = load(tokenizer_dir, "mistral").apply_chat_template(WITH_SYSTEM, tokenize=False)
    assert text == (
        "<s>[INST] Hello! What is the capital of France?[/INST] The capital of France is Paris.</s>"
        "[INST] You are terse.\n\nGröße 🙂 日本語?[/INST] Café, naïve 🚀.</s>"
    )


def test_gemma_prepends_the_system_prompt_to_the_first_user_turn_and_trims(tokenizer_dir):
    messages = [*WITH_SYSTEM[:-1], {"role": "assistant", "content": "  padded \n"}]
    text = load(tokenizer_dir, "gemma").apply_chat_template(messages, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nYou are terse.\n\nHello!")
    assert text.endswith("<start_of_turn>model\npadded<end_of_turn>\n")


def test_llama3_trims_content_and_renders_bos_once(tokenizer_dir):
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "\n yes \n"}]
    text = load(tokenizer_dir, "llama3").apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyes<|eot_id|>"
    )


def test_phi3_closes_the_conversation_with_eos(tokenizer_dir):
    tok = load(tokenizer_dir, "phi3")
    assert tok.apply_chat_template(CONVERSATION, tokenize=False).endswith("Café, naïve 🚀.<|end|>\n<|endoftext|>")
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")


def test_qwen3_reasoning_tools_and_think_blocks(tokenizer_dir):
    tok = load(tokenizer_dir, "qwen3")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Berlin?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}],
        },
        {"role": "tool", "content": "12 C"},
        {"role": "assistant", "content": "It is 12 C.", "reasoning_content": "The tool said 12."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert "I should call the tool." not in text and "The tool said 12." not in text  # before the last query
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\n12 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n")
    # after the last user query, reasoning is kept
    kept = tok.apply_chat_template(messages[:4], tools=tools, tokenize=False)
    assert "<think>\nI should call the tool.\n</think>\n\n<tool_call>" in kept
    assert kept.endswith("<think>\nThe tool said 12.\n</think>\n\nIt is 12 C.<|im_end|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
