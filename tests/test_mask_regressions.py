"""Stage-1 mask bugs a review found, each on the smallest tokenizer and template that shows it.

Every test checks the written rows against transformers itself: `input_ids` equal apply_chat_template(tokenize=True)
and the trained tokens decode to exactly the assistant text and its end-of-turn token, or the sample is dropped
(counted, with its reason) where no exact mask exists.
"""

import itertools

import orjson
import pytest
from tokenizers import AddedToken, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minitrain.prepare import chat_masks
from minitrain.prepare.encode import (
    DROP_MASK,
    Encoder,
    rust_copy,
    tokenization_mismatch,
)
from tests.chat_templates import CHATML, CHATML_TOKENS, PHI3, QWEN3, Family, train_vocab

CHATML_EOT = dict(special=CHATML_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")


def save(tmp_path, name, template, special, eos, bos=None, pad=None, add_bos=False, added=(), tweak=None, **kwargs):
    """A small byte-level BPE tokenizer with this template saved to tmp_path/name; `tweak` edits the Rust one."""
    rust = train_vocab(Family(template, tuple(special), bos=bos, eos=eos, pad=pad, add_bos=add_bos, added=tuple(added)))
    if tweak:
        tweak(rust)
    unk = "<unk>" if "<unk>" in special else None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, chat_template=template, **kwargs
    )
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name


def encode(path, samples):
    """(encoder, rows by sample number, drops by sample number) for these samples, numbered from 1."""
    encoder = Encoder(str(path), "in.jsonl", 100_000, "drop")
    chunk = encoder.encode_chunk([(n, orjson.dumps(s)) for n, s in enumerate(samples, 1)])
    assert chunk.error is None
    return encoder, {n: orjson.loads(line) for n, line in chunk.rows}, {n: (r, d) for n, r, d in chunk.drops}


def trained(tokenizer, row) -> list[str]:
    """The trained runs of tokens, decoded."""
    runs = itertools.groupby(zip(row["input_ids"], row["labels"]), key=lambda pair: pair[1] != -100)
    return [tokenizer.decode([i for i, _ in run]) for is_trained, run in runs if is_trained]


def reference_ids(tokenizer, sample) -> list[int]:
    extra = {k: v for k, v in sample.items() if k != "messages"}
    return list(tokenizer.apply_chat_template(sample["messages"], tokenize=True, return_dict=True, **extra)["input_ids"])


def conv(*turns, **extra):
    return {"messages": [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns], **extra}


LONG_ANSWER = "The capital of France is Paris, a city on the river Seine. " * 2
LONG = conv(("user", "What is the capital of France?"), ("assistant", LONG_ANSWER))
SHORT = conv(("user", "Hi"), ("assistant", "Hello"))


# ---- 1. truncation and padding saved in tokenizer.json; 7. split_special_tokens ----


def _truncate(rust):
    rust.enable_truncation(max_length=60)


def _pad(rust):
    rust.enable_padding(pad_id=rust.token_to_id("<|endoftext|>"), pad_token="<|endoftext|>")


@pytest.mark.parametrize("tweak", [_truncate, _pad], ids=["truncation", "padding"])
def test_saved_truncation_and_padding_do_not_reach_the_rows(tmp_path, tweak):
    path = save(tmp_path, "tok", CHATML, tweak=tweak, **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for samples in ([LONG, SHORT], [SHORT, LONG]):  # padding pads a batch to its longest row
        _, rows, drops = encode(path, samples)
        assert not drops
        for n, sample in enumerate(samples, 1):
            assert rows[n]["input_ids"] == reference_ids(tokenizer, sample)
            assert trained(tokenizer, rows[n]) == [sample["messages"][1]["content"] + "<|im_end|>"]


def test_raw_pairs_ignore_saved_truncation(tmp_path):
    from minitrain.prepare.formats import Format, InputSpec

    path = save(tmp_path, "tok", CHATML, tweak=_truncate, **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = InputSpec(fmt=Format("pairs", source="source", target="target"), rendering="raw")
    encoder = Encoder(str(path), "in.jsonl", 100_000, "drop", spec)
    chunk = encoder.encode_chunk([(1, orjson.dumps({"source": "Question?", "target": LONG_ANSWER * 3}))])
    row = orjson.loads(chunk.rows[0][1])
    assert row["input_ids"] == tokenizer("Question?<|im_end|>" + LONG_ANSWER * 3 + "<|im_end|>")["input_ids"]
    assert trained(tokenizer, row) == [LONG_ANSWER * 3 + "<|im_end|>"]


def test_start_up_probe_reports_a_copy_that_tokenizes_differently(tmp_path):
    from tokenizers import Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(save(tmp_path, "tok", CHATML, tweak=_truncate, **CHATML_EOT))
    full, backend = rust_copy(Tokenizer, tokenizer), rust_copy(Tokenizer, tokenizer)
    backend.post_processor = None
    assert tokenization_mismatch(tokenizer, backend, full, chat=True) is None
    backend.enable_truncation(max_length=60)  # what the copy did before: the saved truncation
    assert "differently" in tokenization_mismatch(tokenizer, backend, full, chat=True)
    backend.no_truncation()
    backend.encode_special_tokens = True  # a split_special_tokens setting the copy does not share
    assert "differently" in tokenization_mismatch(tokenizer, backend, full, chat=False)


def test_split_special_tokens_is_carried_over(tmp_path):
    path = save(tmp_path, "tok", CHATML, split_special_tokens=True, **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.split_special_tokens
    sample = conv(("user", "hi <|im_end|> there"), ("assistant", "Hello"))
    _, rows, _ = encode(path, [sample])
    assert rows[1]["input_ids"] == reference_ids(tokenizer, sample)


# ---- 2. control text in dict keys ----


def _call(args):
    return [{"type": "function", "function": {"name": "get_weather", "arguments": args}}]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
BAD_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"<|im_start|>assistant\n": {"type": "string"}}}}}
]
QWEN3_SPEC = dict(special=CHATML_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"))


def test_control_text_in_a_dict_key_is_left_to_prefix_renders(tmp_path):
    # The sentinel render keeps keys and tool definitions literal, so control text there must not be read as
    # structure: it refuses (the reason is kept), and prefix renders derive the masks instead (issue 15: zero
    # drops on tool-calling conversations; before, these samples were dropped).
    path = save(tmp_path, "qwen3", QWEN3, **QWEN3_SPEC)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def sample(args, tools):
        return conv(("user", "Weather?"), {"role": "assistant", "content": "", "tool_calls": _call(args)}, ("tool", "sunny"), ("assistant", "Sunny."), tools=tools)

    samples = [sample({"<|im_end|>": "x", "city": "Berlin"}, TOOLS), sample({"city": "Berlin"}, BAD_TOOLS), sample({"city": "Berlin"}, TOOLS)]
    encoder, rows, drops = encode(path, samples)
    assert not drops
    for n, sample_ in enumerate(samples, 1):
        assert rows[n]["input_ids"] == reference_ids(tokenizer, sample_)
    think = "<think>\n\n</think>\n\n"  # the final turn's empty think block follows the generation prompt: trained
    assert trained(tokenizer, rows[1]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"<|im_end|>": "x", "city": "Berlin"}}\n</tool_call><|im_end|>',
        think + "Sunny.<|im_end|>",
    ]
    assert trained(tokenizer, rows[2]) == trained(tokenizer, rows[3]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>',
        think + "Sunny.<|im_end|>",
    ]
    with pytest.raises(chat_masks.MaskError, match="control text"):
        marked, _ = chat_masks.with_sentinels(samples[0]["messages"])
        chat_masks.check_literals(marked, {"tools": TOOLS}, encoder.markers)


# ---- 3. the end-of-turn search must not run into a following tool turn ----

# The shape of Llama-3.1's official template with builtin tools: a tool-call turn is closed by <|eom_id|>, not
# <|eot_id|>, and the tool result opens an ipython turn.
LLAMA31_BUILTIN = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>' + "
    "message.tool_calls[0].function.name + '.call()<|eom_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA31_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")


def test_end_of_turn_search_does_not_cross_into_a_tool_turn(tmp_path):
    path = save(tmp_path, "llama31", LLAMA31_BUILTIN, LLAMA31_SPECIAL, eos="<|eot_id|>", bos="<|begin_of_text|>", add_bos=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    call = {"role": "assistant", "content": None, "tool_calls": _call({"query": "cats"})}
    samples = [
        conv(("user", "Search for cats"), call, ("tool", ""), ("assistant", "Nothing found.")),  # empty result
        conv(("user", "Search for cats"), call, ("tool", "Cats purr."), ("assistant", "They purr.")),
        conv(("user", "Hi"), ("assistant", "Hello")),
    ]
    encoder, rows, drops = encode(path, samples)
    assert "<|start_header_id|>" in encoder.shape.openers  # opens the ipython turn as every other
    # issue 15: both are trained now (before: dropped, "crosses into another turn" and "no end-of-turn marker");
    # the turn ends at the last special token before the ipython turn's opener: <|eom_id|>, never past it
    assert not drops
    for n, sample in enumerate(samples, 1):
        assert rows[n]["input_ids"] == reference_ids(tokenizer, sample)
    assert trained(tokenizer, rows[1]) == ["<|python_tag|>get_weather.call()<|eom_id|>", "Nothing found.<|eot_id|>"]
    assert trained(tokenizer, rows[2]) == ["<|python_tag|>get_weather.call()<|eom_id|>", "They purr.<|eot_id|>"]
    assert trained(tokenizer, rows[3]) == ["Hello<|eot_id|>"]


# ---- 4. special tokens with rstrip swallow the content's leading whitespace ----

PHI3_SPECIAL = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _rstrip_specials(rust):
    # as in the real Phi-3 tokenizer.json
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=True) for t in PHI3_SPECIAL if t.startswith("<|")])


def test_an_rstrip_header_token_is_never_trained(tmp_path):
    path = save(tmp_path, "phi3", PHI3, PHI3_SPECIAL, eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", tweak=_rstrip_specials)
    tokenizer = AutoTokenizer.from_pretrained(path)
    header_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    samples = [conv(("user", "Hi"), ("assistant", "  Hello there")), conv(("user", "Hi"), ("assistant", "\nHello"))]
    _, rows, _ = encode(path, samples)
    for n, sample in enumerate(samples, 1):
        row = rows[n]
        assert row["input_ids"] == reference_ids(tokenizer, sample)
        assert header_id in row["input_ids"] and header_id not in row["labels"]
    # the whitespace went into the header token, as it does when the model generates after <|assistant|>
    assert trained(tokenizer, rows[1]) == ["Hello there<|end|>"]
    assert trained(tokenizer, rows[2]) == ["Hello<|end|>"]


def test_token_mask_leaves_an_added_token_straddling_a_span_start_untrained():
    offsets = [(0, 3), (3, 8), (8, 12), (12, 14)]  # token 1 covers "<|a|>" plus the span's first character
    assert chat_masks.token_mask(offsets, [(7, 14)], [10, 20, 30, 40], frozenset({20})) == [False, False, True, True]
    # an ordinary token across the start carries content: trained
    assert chat_masks.token_mask(offsets, [(7, 14)], [10, 20, 30, 40], frozenset()) == [False, True, True, True]


# ---- 5. {% generation %} templates under trim_offsets post-processors ----

GEN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _trim_offsets(rust):
    rust.post_processor = processors.ByteLevel(trim_offsets=True)


def test_generation_tags_train_every_turn_under_trimmed_offsets(tmp_path):
    path = save(tmp_path, "gen", GEN, tweak=_trim_offsets, **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = [
        conv(("user", "Hi"), ("assistant", " Hello"), ("user", "More"), ("assistant", "Sure")),
        conv(("user", "Hi"), ("assistant", "Hello"), ("user", "More"), ("assistant", " Sure"), ("user", "Again"), ("assistant", "Fine")),
    ]
    _, rows, drops = encode(path, samples)
    assert not drops
    for n, sample in enumerate(samples, 1):
        assert rows[n]["input_ids"] == reference_ids(tokenizer, sample)
        answers = [m["content"] + "<|im_end|>\n" for m in sample["messages"] if m["role"] == "assistant"]
        assert trained(tokenizer, rows[n]) == answers


def test_generation_marks_keep_the_render_and_reject_unbalanced_blocks():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    template = "A\n  {% generation %}\nB{% endgeneration %}\n C{%- generation -%}  D  {%- endgeneration -%} E"
    plain = env.from_string(template.replace("generation", "if true").replace("endif true", "endif")).render()
    text, spans = chat_masks.generation_spans(env.from_string(chat_masks.marking_template(template)).render())
    assert text == plain == "A\nB CDE"
    assert [text[a:b] for a, b in spans] == ["B", "D"]
    with pytest.raises(chat_masks.MaskError):
        chat_masks.generation_spans(f"{chat_masks.GEN_OPEN}a{chat_masks.GEN_OPEN}b")
    assert not chat_masks.covers_every_span([(0, 2), (4, 6)], [(2, 4)])
    assert chat_masks.covers_every_span([(0, 2), (4, 6)], [(1, 5), (3, 3)])


# ---- 6. the end-of-turn marker stops at the first special token closing the turn ----

APPENDS_A_BLOCK = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nEnd of conversation.<|im_end|>\\n' }}{% endif %}"
)


def test_end_of_turn_marker_does_not_take_the_next_turns_opener(tmp_path):
    path = save(tmp_path, "block", APPENDS_A_BLOCK, **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder, rows, _ = encode(path, [conv(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye!"))])
    assert encoder.shape.openers == ("<|im_start|>",)  # what ends a turn's search; the appended block is `end`
    assert trained(tokenizer, rows[1]) == ["Hello<|im_end|>", "Bye!<|im_end|>"]


# ---- 8. reasoning under `thinking` or `reasoning` ----


def _thinking_template(key):
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        f"{{% if m.{key} %}}{{{{ '<think>\\n' + m.{key} + '\\n</think>\\n\\n' }}}}{{% endif %}}{{{{ m['content'] + '<|im_end|>\\n' }}}}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


@pytest.mark.parametrize("key", ["thinking", "reasoning"])
def test_reasoning_under_other_keys_is_trained(tmp_path, key):
    path = save(tmp_path, key, _thinking_template(key), added=("<think>", "</think>"), **CHATML_EOT)
    tokenizer = AutoTokenizer.from_pretrained(path)
    sample = conv(("user", "Hi"), {"role": "assistant", "content": "Hello", key: "User greets me."})
    _, rows, _ = encode(path, [sample])
    assert rows[1]["input_ids"] == reference_ids(tokenizer, sample)
    assert trained(tokenizer, rows[1]) == ["<think>\nUser greets me.\n</think>\n\nHello<|im_end|>"]


# ---- 9. a sample no method can derive is dropped, counted, with each method's reason ----

# Branches on content text that is no special token (the sentinel render takes the other branch), and numbers
# the turns from the end (no prompt is a prefix of the full render).
COUNTDOWN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + (loop.length - loop.index)|string + '\\n' }}"
    "{% if '!' in m['content'] %}{{ m['content']|upper }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant 0\\n' }}{% endif %}"
)


def test_a_sample_no_method_can_derive_is_dropped_with_both_reasons(tmp_path):
    path = save(tmp_path, "countdown", COUNTDOWN, **CHATML_EOT)
    _, rows, drops = encode(path, [conv(("user", "Hi!"), ("assistant", "Hello!")), conv(("user", "Hi"), ("assistant", "Hello"))])
    reason, detail = drops[1]
    assert reason == DROP_MASK and detail.startswith("sentinel render: ") and "; prefix renders: " in detail
    assert 2 in rows  # without the branch, the sentinel render derives it
