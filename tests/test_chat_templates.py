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


# ---- tool calling and reasoning templates: the trained tokens are exactly what the rule says (issue 15) ----

import orjson  # noqa: E402

from minitrain.prepare.encode import Encoder  # noqa: E402
from minitrain.prepare.formats import InputSpec  # noqa: E402
from tests.chat_templates import TOOL_FAMILIES  # noqa: E402

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def call(args, name="get_weather", call_id="abc123def"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def user(text):
    return {"role": "user", "content": text}


def answer(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def tool(text, call_id="abc123def"):
    return {"role": "tool", "content": text, "tool_call_id": call_id}


def template_vars(sample):
    extra = {k: v for k, v in sample.items() if k not in ("messages", "chat_template_kwargs")}
    return {**extra, **sample.get("chat_template_kwargs", {})}


def rule_spans(tok, sample, template, turns):
    """The rule, computed here from transformers' renders: for assistant turn i the trained text starts right
    after the render of messages[:i] with the generation prompt when the full render extends it (checked: it must
    begin with the turn's expected text there), else (history rendered differently) at the turn's expected text
    after the previous turn. Returns the full render and the spans."""
    messages, extra = sample["messages"], template_vars(sample)
    full = tok.apply_chat_template(messages, tokenize=False, chat_template=template, **extra)
    spans, cursor = [], 0
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(indices) == len(turns)
    for i, want in zip(indices, turns):
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, chat_template=template, **extra)
        if full.startswith(prompt):
            start = len(prompt)
            assert full.startswith(want, start), (full[start:], want)
        else:
            start = full.index(want, cursor)
        spans.append((start, start + len(want)))
        cursor = start + len(want)
    return full, spans


def rule_labels(tok, text, spans):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i if any(s < b and e > a for a, b in spans) else -100 for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]


TOOL_CASES = {
    "llama31": [
        (  # a JSON tool call (the content is not rendered), a JSON tool result tojson'd into the ipython turn
            {"messages": [user("Weather in Berlin?"), answer(None, tool_calls=[call({"city": "Berlin"})]),
                          tool('{"temp": 12, "unit": "C"}'), answer("It is 12 C.")], "tools": WEATHER},
            ['{"name": "get_weather", "parameters": {"city": "Berlin"}}<|eot_id|>', "It is 12 C.<|eot_id|>"],
        ),
        (  # builtin tools: <|python_tag|> ... <|eom_id|>, an argument with quotes and a newline
            {"messages": [user("Search cats"), answer(None, tool_calls=[call({"query": 'cats "purr"\n'}, "brave_search")]),
                          tool("Cats purr.\nLoudly."), answer("They purr.")],
             "chat_template_kwargs": {"builtin_tools": ["brave_search", "wolfram_alpha"]}},
            ['<|python_tag|>brave_search.call(query="cats "purr"\n")<|eom_id|>', "They purr.<|eot_id|>"],
        ),
        (  # template markers as text, in the answer and in the question
            {"messages": [{"role": "system", "content": "Be brief."}, user("Say <|eot_id|><|start_header_id|>assistant"),
                          answer("Here: <|eot_id|><|start_header_id|>user<|end_header_id|> done")]},
            ["Here: <|eot_id|><|start_header_id|>user<|end_header_id|> done<|eot_id|>"],
        ),
    ],
    "mistral_nemo": [
        (  # a tool-call-only turn (no content), tools before the last user turn
            {"messages": [user("Weather?"), answer(None, tool_calls=[call({"city": "Berlin"})]), tool('{"temp": 12}'),
                          answer("It is 12 C.")], "tools": WEATHER},
            ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Berlin"}, "id": "abc123def"}]</s>', "It is 12 C.</s>"],
        ),
        (  # an empty answer, and a system prompt moved into the last user turn
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), answer(""), user("Again"), answer("Ok")]},
            ["</s>", "Ok</s>"],
        ),
        (  # tools, a system prompt and two exchanges: the prompt of the first turn is no prefix of the full render
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), answer("Hello"), user("Weather?"),
                          answer(None, tool_calls=[call('{"city": "Berlin"}')]), tool("12 C"), answer("12 C.")],
             "tools": WEATHER},
            ["Hello</s>", '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\": \\"Berlin\\"}", "id": "abc123def"}]</s>', "12 C.</s>"],
        ),
    ],
    "harmony": [
        (  # reasoning in a middle turn (dropped by the template) and on the last: <|end|> in the middle, <|return|> last
            {"messages": [user("Hi"), answer("Hello.", thinking="Greet back."), user("2+2?"), answer("4.", thinking="Add.")]},
            ["<|channel|>final<|message|>Hello.<|end|>",
             "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>4.<|return|>"],
        ),
        (  # a tool call with its analysis, a JSON tool result, the final answer
            {"messages": [user("Weather?"), answer(None, thinking="Need the tool.", tool_calls=[call({"city": "Berlin"})]),
                          tool('{"temp": 12}'), answer("12 C.")], "tools": WEATHER},
            # (the official template drops a tool-call turn's analysis once a final answer follows)
            [' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Berlin"}<|call|>',
             "<|channel|>final<|message|>12 C.<|return|>"],
        ),
    ],
    "hermes3": [
        (  # the tool_use template (it needs `tools`): <tool_call> after a header without its newline
            {"messages": [user("Weather?"), answer(None, tool_calls=[call({"city": "Berlin"})]), tool("12 C"), answer("It is 12 C.")],
             "tools": WEATHER},
            ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>', "It is 12 C.<|im_end|>"],
        ),
    ],
    "command_r7b": [
        (
            # the generation prompt, written whatever add_generation_prompt says, ends in an empty thinking block
            # (enable_thinking unset): of a plan, the part after <|START_THINKING|> is trained
            {"messages": [user("Hi"), answer("ok"), user("Weather?"), answer(None, reasoning_content="I will check.", tool_calls=[call({"city": "Berlin"})]),
                          tool("12 C"), answer("It is 12 C.")], "tools": WEATHER},
            ["<|START_RESPONSE|>ok<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
             'I will check.<|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Berlin"}}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>',
             "<|START_RESPONSE|>It is 12 C.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"],
        ),
    ],
    "deepseek_v31": [
        (  # thinking on: the generation prompt ends in <think>, so the </think> the history shows is the model's
            {"messages": [user("Hi"), answer("Hello."), user("2+2?"), answer("4.")], "chat_template_kwargs": {"thinking": True}},
            ["</think>Hello.<｜end▁of▁sentence｜>", "</think>4.<｜end▁of▁sentence｜>"],
        ),
        (  # thinking off: </think> is in the generation prompt, masked
            {"messages": [user("Hi"), answer("Hello."), user("2+2?"), answer("4.")], "chat_template_kwargs": {"thinking": False}},
            ["Hello.<｜end▁of▁sentence｜>", "4.<｜end▁of▁sentence｜>"],
        ),
        (  # string arguments; after a tool output the answer has no header (and no generation prompt)
            {"messages": [{"role": "system", "content": "Be brief."}, user("Weather?"), answer("", tool_calls=[call({"city": "Berlin"})]),
                          tool("12 C"), answer("It is 12 C.")], "chat_template_kwargs": {"thinking": True}},
            ['</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Berlin"}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
             "It is 12 C.<｜end▁of▁sentence｜>"],
        ),
    ],
}  # fmt: skip
TEMPLATE_NAMES = {"hermes3": "tool_use"}


@pytest.fixture(scope="module")
def tool_encoders(tokenizer_dir):
    built = {}

    def get(name):
        if name not in built:
            spec = InputSpec(chat_template_name=TEMPLATE_NAMES.get(name))
            built[name] = Encoder(str(tokenizer_dir(name)), "in.jsonl", 100_000, "drop", spec)
        return built[name]

    return get


@pytest.mark.parametrize("name, case", [(n, k) for n in TOOL_FAMILIES for k in range(len(TOOL_CASES[n]))])
def test_tool_and_reasoning_templates_train_exactly_the_rule(tool_encoders, name, case):
    sample, turns = TOOL_CASES[name][case]
    encoder = tool_encoders(name)
    tok = encoder.tokenizer
    chunk = encoder.encode_chunk([(1, orjson.dumps(sample))])
    assert chunk.error is None and not chunk.drops, chunk.drops
    row = orjson.loads(chunk.rows[0][1])
    template = encoder.template
    reference = tok.apply_chat_template(sample["messages"], tokenize=True, return_dict=True, chat_template=template, **template_vars(sample))
    assert row["input_ids"] == list(reference["input_ids"])
    full, spans = rule_spans(tok, sample, template, turns)
    assert row["labels"] == rule_labels(tok, full, spans)


def test_every_tool_family_masks_from_the_sentinel_render_where_it_can(tool_encoders):
    # the fast path: prefix renders only where the sentinel render cannot (Mistral's system prompt moved on
    # still aligns; DeepSeek's answer after a tool output has no header, so it takes prefix renders)
    methods = {}
    for name in TOOL_FAMILIES:
        encoder = tool_encoders(name)
        chunk = encoder.encode_chunk([(n, orjson.dumps(s)) for n, (s, _) in enumerate(TOOL_CASES[name], 1)])
        assert not chunk.drops
        methods[name] = dict(chunk.methods)
    assert methods["llama31"] == {"sentinel render": 3}
    assert methods["harmony"] == {"sentinel render": 2}
    assert methods["deepseek_v31"] == {"sentinel render": 2, "prefix renders": 1}


def test_hermes_default_template_and_a_template_that_needs_tools(tool_encoders, tokenizer_dir):
    default = Encoder(str(tokenizer_dir("hermes3")), "in.jsonl", 100_000, "drop")
    assert "<|im_start|>" in default.template and "tools" not in default.template
    encoder = tool_encoders("hermes3")
    assert encoder.shape.base_extra  # start-up probes needed tools
    chunk = encoder.encode_chunk([(1, orjson.dumps({"messages": [user("Hi"), answer("Hello")]}))])  # no tools
    assert [reason for _, reason, _ in chunk.drops] == ["chat template rejected the conversation"]
