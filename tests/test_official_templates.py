"""Every official chat template (tests/templates/) trains exactly what the rule says, on conversations of many shapes.

The oracle here is the rule itself, written from transformers' renders and the tokenizer, not from chat_masks: for
assistant turn i, the trained text starts where the render of messages[:i] with add_generation_prompt=True ends in
the full render, and runs to the end of the turn's end-of-turn token. Where the full render shows the history
differently from that prompt (Qwen3 drops earlier reasoning), the turn starts after the longest part of the
generation prompt's header, cut at its token boundaries, that the full render has after the history before the turn.
A token is trained when its characters overlap the trained text, except a special or added token that begins before
it (template structure that swallowed an answer's leading whitespace); an ordinary token that runs across the start
(OLMo 2's `|>\\n\\n`) is trained: see README, "What is trained".
"""

import re

import orjson
import pytest

from minitrain.prepare.formats import InputSpec
from minitrain.prepare.encode import Encoder
from tests.official_templates import OFFICIAL

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


def user(text):
    return {"role": "user", "content": text}


def answer(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def tool_call(string_arguments: bool):
    args = '{"city": "Berlin"}' if string_arguments else {"city": "Berlin"}
    return {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": args}}


def shapes(string_arguments: bool) -> dict[str, dict]:
    """Conversations of several shapes: {"messages": ..., "tools": ...}."""
    system = {"role": "system", "content": "Be brief."}
    return {
        "single": {"messages": [user("Hi"), answer("Hello there.")]},
        "multi_turn": {"messages": [user("Hi"), answer("Hello."), user("What is 2+2?"), answer("It is 4.")]},
        "system": {"messages": [system, user("Hi"), answer("Hello."), user("And?"), answer("Done.")]},
        "tools": {
            "messages": [user("Weather in Berlin?"), answer("", tool_calls=[tool_call(string_arguments)]),
                         {"role": "tool", "content": "12 C", "tool_call_id": "abc123def", "name": "get_weather"},
                         answer("It is 12 C.")],
            "tools": WEATHER,
        },  # fmt: skip
        "reasoning": {
            "messages": [user("What is 2+2?"), answer("4.", reasoning_content="Add them."), user("And 3+3?"),
                         answer("6.", reasoning_content="Add again.")],
        },  # fmt: skip
        "reasoning_empty": {"messages": [user("Hi"), answer("Hello.", thinking=""), user("Bye"), answer("Bye.", thinking="")]},
        "empty_answer": {"messages": [user("Hi"), answer(""), user("Still there?"), answer("Yes.")]},
        "whitespace": {"messages": [user("  Hi \n"), answer("\n  Hello.  \n"), user(" ok"), answer(" Sure.\n")]},
    }


SHAPES = tuple(shapes(False))

# (template, shape) pairs the template itself refuses (it raises), so there is nothing to mask
CANNOT_RENDER = {
    ("gemma2", "system"): "System role not supported",
    ("gemma2", "tools"): "roles must alternate user/assistant (no tool role)",
    ("gemma3", "tools"): "roles must alternate user/assistant (no tool role)",
    ("command_r", "tools"): "roles must alternate user/assistant (no tool role)",
}
# templates that iterate `tools` unconditionally: every shape gets them
NEEDS_TOOLS = {"command_r_plus", "hermes3"}
# (template, shape) pairs whose full render moves history (Mistral puts the system prompt into the last user turn),
# so no prompt render is a prefix of it; the rule's oracle here cannot place those turns. The masks of such
# conversations are checked against hand-written expectations in tests/test_chat_templates.py (TOOL_CASES).
HISTORY_MOVED = {
    ("mistral_nemo", "system"): "system prompt moved into the last user turn",
    ("hermes3", "tools"): "a last tool turn closes `</tool_response><|im_end|>`, an earlier one `</tool_response>\\n<|im_end|>`",
}
# (template, shape) pairs the masker drops (counted, with its reason) though the rule defines their masks: a gap, never
# a wrong mask (the test checks that they are dropped)
DROPPED = {("seed_oss", "empty_answer"): "an empty answer's turn has no header in the sentinel render's literal text"}
# templates left out: the command-r-plus tool_use template wants Cohere's own tool format (name, description,
# parameter_definitions at the top level), not the OpenAI one every shape here uses
LEFT_OUT = {"command_r_plus": "wants Cohere's tool format"}
# templates the masker cannot follow: every sample is refused (dropped and counted, or the run stops), never written
UNFOLLOWABLE = {
    "glm4": "assistant turns have no end-of-turn token (the next turn's <|user|> ends them)",
    "glm46": "assistant turns have no end-of-turn token (the next turn's <|user|>/<|observation|> ends them)",
}


def render(tok, template, messages, extra, add_generation_prompt=False):
    return tok.apply_chat_template(
        messages, tokenize=False, chat_template=template, add_generation_prompt=add_generation_prompt, **extra
    )


def special_spans(text: str, tokens) -> list[tuple[int, int]]:
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    return [m.span() for m in pattern.finditer(text)]


def rule_spans(tok, template, messages, extra, end_of_turn) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the trained character spans, by the rule."""
    full = render(tok, template, messages, extra)
    specials = [*tok.all_special_tokens, *tok.get_added_vocab()]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tok, template, messages[:i], extra, True)
        if full.startswith(prompt):
            start = len(prompt)
        else:  # the full render shows the prompt's end differently: the longest part of it the full render has,
            # cut before or after a special or added token
            same = next((k for k, (a, b) in enumerate(zip(full, prompt)) if a != b), len(prompt))
            cuts = [k for span in special_spans(prompt, specials) for k in span if k <= same]
            start = max(cuts)
            assert start > (spans[-1][1] if spans else 0), "the prompt's cut reaches back into the history"
        # the turn ends at the last end-of-turn token that starts where the render up to this turn and the full
        # render still agree (at a token boundary): gpt-oss closes a last turn with <|return|>, else <|end|>. Where
        # they part inside the turn (the full render shows it as history, Qwen3 without its reasoning), at the first
        # end-of-turn token from there.
        upto = render(tok, template, messages[: i + 1], extra)
        n = next((k for k, (a, b) in enumerate(zip(full, upto)) if a != b), min(len(full), len(upto)))
        n = next((a for a, b in special_spans(full, specials) if a < n < b), n)
        eots = special_spans(full, end_of_turn)
        ends = [b for a, b in eots if start <= a <= n] or [b for a, b in eots if a >= n][:1]
        assert ends, "no end-of-turn token closes an assistant turn"
        spans.append((start, max(ends)))
    return full, spans


def rule_labels(tok, text: str, spans) -> list[int]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    structure = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    labels = []
    for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        trained = any(s < b and e > a and not (i in structure and s < a) for a, b in spans)
        labels.append(i if trained else -100)
    return labels


@pytest.fixture(scope="session")
def official_encoder(tokenizer_dir):
    built = {}

    def get(name: str) -> Encoder:
        if name not in built:
            family = OFFICIAL[name].family
            spec = InputSpec(chat_template_name="tool_use" if family == "hermes3" else None)
            built[name] = Encoder(str(tokenizer_dir(family)), "in.jsonl", 100_000, "drop", spec)
        return built[name]

    return get


def sample_of(name: str, shape: str) -> dict:
    official = OFFICIAL[name]
    sample = shapes(official.string_arguments)[shape]
    if name in NEEDS_TOOLS:
        sample = {**sample, "tools": WEATHER}
    if official.kwargs:
        sample = {**sample, "chat_template_kwargs": dict(official.kwargs)}
    return sample


@pytest.mark.parametrize("name", [n for n in OFFICIAL if n not in UNFOLLOWABLE and n not in LEFT_OUT])
def test_every_official_template_trains_exactly_the_rule(official_encoder, name):
    official, encoder = OFFICIAL[name], official_encoder(name)
    tok, template = encoder.tokenizer, encoder.template
    samples = {shape: sample_of(name, shape) for shape in SHAPES if (name, shape) not in {**CANNOT_RENDER, **HISTORY_MOVED}}
    chunk = encoder.encode_chunk([(n, orjson.dumps(s)) for n, s in enumerate(samples.values(), 1)])
    assert chunk.error is None
    rows = {n: orjson.loads(line) for n, line in chunk.rows}
    drops = {n: detail for n, _, detail in chunk.drops}
    failures = []
    for n, (shape, sample) in enumerate(samples.items(), 1):
        extra = {k: v for k, v in sample.items() if k not in ("messages", "chat_template_kwargs")}
        extra.update(sample.get("chat_template_kwargs", {}))
        full, spans = rule_spans(tok, template, sample["messages"], extra, official.end_of_turn)
        if (n in drops) != ((name, shape) in DROPPED):
            failures.append(f"{shape}: dropped ({drops[n]})" if n in drops else f"{shape}: listed in DROPPED but written")
        if n in drops:
            continue
        reference = tok.apply_chat_template(sample["messages"], tokenize=True, return_dict=True, chat_template=template, **extra)
        if rows[n]["input_ids"] != list(reference["input_ids"]):
            failures.append(f"{shape}: input_ids differ from apply_chat_template")
        elif rows[n]["labels"] != rule_labels(tok, full, spans):
            want = [full[a:b] for a, b in spans]
            got = [tok.decode([i for i in rows[n]["labels"] if i != -100])]
            failures.append(f"{shape}: labels differ; rule trains {want}, rows train {got}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name, shape", sorted(CANNOT_RENDER))
def test_the_listed_shapes_are_those_the_template_refuses(official_encoder, name, shape):
    encoder = official_encoder(name)
    sample = sample_of(name, shape)
    extra = {k: v for k, v in sample.items() if k != "messages"}
    with pytest.raises(Exception, match="(?i)role"):
        render(encoder.tokenizer, encoder.template, sample["messages"], extra)
    chunk = encoder.encode_chunk([(1, orjson.dumps(sample))])
    assert not chunk.rows and [reason for _, reason, _ in chunk.drops] == ["chat template rejected the conversation"]


@pytest.mark.parametrize("name", sorted(UNFOLLOWABLE))
def test_a_template_the_masker_cannot_follow_writes_no_row(official_encoder, name):
    encoder = official_encoder(name)
    samples = [sample_of(name, shape) for shape in SHAPES]
    chunk = encoder.encode_chunk([(n, orjson.dumps(s)) for n, s in enumerate(samples, 1)])
    assert not chunk.rows
    assert chunk.error is not None or len(chunk.drops) == len(samples)


def test_olmo2_a_token_across_the_generation_prompt_and_the_answer_is_trained(official_encoder):
    # `<|assistant|>\n` is plain text and the answer starts with "\n": one token `|>\n\n` holds the prompt's last
    # characters and the answer's first. Decision (README, "What is trained"): it is trained, since it carries
    # answer text; input_ids stay exactly apply_chat_template's.
    encoder = official_encoder("olmo2")
    tok = encoder.tokenizer
    sample = {"messages": [user("Hi"), answer("\nHello.")]}
    row = orjson.loads(encoder.encode_chunk([(1, orjson.dumps(sample))]).rows[0][1])
    full = render(tok, encoder.template, sample["messages"], {})
    prompt = render(tok, encoder.template, sample["messages"][:1], {}, True)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    straddling = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if s < len(prompt) < e]
    assert straddling and row["input_ids"] == enc["input_ids"]
    assert row["labels"][straddling[0]] == row["input_ids"][straddling[0]]
    assert row["labels"][: straddling[0]] == [-100] * straddling[0]
