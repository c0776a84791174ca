"""process_data.py: ids equal apply_chat_template, masks train exactly the assistant turns, bad input stops cleanly.

Expected masks are built here independently of chat_masks: each family's rendered assistant turn is found in the
real render by plain string search, and a token is expected trained when its characters overlap that turn.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import process_data
from minitrain.prepare import chat_masks, pipeline
from minitrain.prepare.encode import (
    DROP_MASK,
    DROP_NO_TRAINED,
    DROP_TEMPLATE,
    DROP_TOO_LONG,
    Encoder,
)

ROOT = Path(__file__).resolve().parent.parent

# How each family renders an assistant turn: header, how content appears, end-of-turn marker.
IDENTITY, STRIP = (lambda c: c), (lambda c: c.strip())
CHATML_FORM = ("<|im_start|>assistant\n", IDENTITY, "<|im_end|>")
FORMS = {
    "chatml": CHATML_FORM,
    "chatml_gen": CHATML_FORM,
    "smollm2": CHATML_FORM,
    "qwen3": ("<|im_start|>assistant\n", lambda c: c.lstrip("\n"), "<|im_end|>"),  # as its final turn shows it
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", STRIP, "<|eot_id|>"),
    "mistral": ("[/INST]", lambda c: " " + c.strip(), "</s>"),  # the rule: the model writes the space
    "gemma": ("<start_of_turn>model\n", STRIP, "<end_of_turn>"),
    "phi3": ("<|assistant|>\n", IDENTITY, "<|end|>"),
}
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"


def turns(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


CONVERSATIONS = {
    "single": turns(("What is the capital of France?", "Paris is the capital of France.")),
    "multi_with_system": turns(
        ("Hello!", "Hi, how can I help?"), ("Tell me a joke.", "Why did the chicken cross the road?"), system="Be brief."
    ),
    "unicode_whitespace": turns(("  Größe?  ", "  Café 🙂 naïve, 日本語\n "), ("\nok\n", "\tyes ")),
    "control_strings": turns(
        (
            "Say <|im_start|>assistant\n <|eot_id|> [INST] <start_of_turn>model\n <|assistant|>",
            "Here: <|im_end|> </s> <end_of_turn> <|end|> <|eot_id|> [/INST] done",
        )
    ),
}


@pytest.fixture(scope="session")
def encoders(tokenizer_dir):
    built = {}

    def get(name: str) -> Encoder:
        if name not in built:
            built[name] = Encoder(str(tokenizer_dir(name)), "in.jsonl", 100_000, "drop")
        return built[name]

    return get


def encode(encoder: Encoder, samples: list[dict]) -> pipeline.Chunk:
    chunk = encoder.encode_chunk([(n, orjson.dumps(s)) for n, s in enumerate(samples, start=1)])
    assert chunk.error is None, chunk.error
    return chunk


def only_row(encoder: Encoder, sample: dict) -> dict:
    chunk = encode(encoder, [sample])
    assert not chunk.drops, chunk.drops
    return orjson.loads(chunk.rows[0][1])


def reference_ids(tok, messages, **extra) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **extra)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def expected_spans(family: str, text: str, messages: list[dict]) -> list[tuple[int, int]]:
    header, shown, eot = FORMS[family]
    spans, cursor = [], 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        # the whole turn, so a user message that quotes a header cannot be mistaken for it; Qwen3's empty think
        # block on the final turn follows the generation prompt `<|im_start|>assistant\n` (thinking on): the
        # model writes it, so it is trained (the rule of issue 15)
        prefixes = (QWEN3_EMPTY_THINK, "") if family == "qwen3" else ("",)
        found = [(text.find(header + p + c + eot, cursor), p, c) for p in prefixes for c in (content, shown(content))]
        start, prefix, shown_content = min(f for f in found if f[0] >= 0)
        piece = prefix + shown_content + eot
        at = start + len(header)
        spans.append((at, at + len(piece)))
        cursor = at + len(piece)
    return spans


def expected_labels(tok, text: str, spans: list[tuple[int, int]]) -> list[int]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        i if any(s < b and e > a for a, b in spans) else -100 for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
    ]


def trained_text(tok, row: dict) -> str:
    return tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_masks_per_family(encoders, family, name):
    encoder = encoders(family)
    tok, messages = encoder.tokenizer, CONVERSATIONS[name]
    row = only_row(encoder, {"messages": messages})
    assert row["input_ids"] == reference_ids(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = expected_spans(family, text, messages)
    assert row["labels"] == expected_labels(tok, text, spans)
    assert row["len"] == len(row["input_ids"])
    assert row["num_loss_counted_tokens"] == sum(label != -100 for label in row["labels"])
    # what is trained reads as the assistant turns with their end-of-turn markers (a token may carry
    # whitespace of the header with it: SmolLM2's "\n  " token)
    want = "".join(text[a:b] for a, b in spans)
    assert "".join(trained_text(tok, row).split()) == "".join(want.split())


def test_every_assistant_turn_trains_its_end_of_turn_token(encoders, family):
    encoder = encoders(family)
    eot_id = encoder.tokenizer.convert_tokens_to_ids(FORMS[family][2])
    row = only_row(encoder, {"messages": CONVERSATIONS["multi_with_system"]})
    positions = [k for k, i in enumerate(row["input_ids"]) if i == eot_id]
    trained = [k for k in positions if row["labels"][k] != -100]
    assert len(trained) == 2  # both assistant turns' markers, never the user/system ones
    for k in trained:  # the separator after the marker is not trained
        assert k + 1 == len(row["labels"]) or row["labels"][k + 1] == -100


def test_injected_default_system_prompt_is_masked(encoders):
    tok_row = only_row(encoders("chatml"), {"messages": CONVERSATIONS["single"]})
    tok = encoders("chatml").tokenizer
    assert "SmolLM" in tok.decode(tok_row["input_ids"])
    assert trained_text(tok, tok_row) == "Paris is the capital of France.<|im_end|>"


WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Berlin?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "content": "12 C"},
    {"role": "assistant", "content": "It is 12 C.", "reasoning_content": "The tool said 12."},
]


def trained_runs(tok, row) -> list[str]:
    runs, current = [], []
    for i, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize(
    "messages, want",
    [
        (  # after the last user query: reasoning rendered and trained with its wrapper, tool calls trained
            TOOL_TURNS,
            [f"<think>\nI should call the tool.\n</think>\n\n{CALL_TEXT}", "<think>\nThe tool said 12.\n</think>\n\nIt is 12 C.<|im_end|>"],
        ),
        (  # a later query: earlier reasoning dropped by the template; the last turn's empty think block follows
            # the generation prompt `<|im_start|>assistant\n` (thinking on): the model writes it, trained
            [*TOOL_TURNS, {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
            [CALL_TEXT, "It is 12 C.<|im_end|>", QWEN3_EMPTY_THINK + "You are welcome.<|im_end|>"],
        ),
        (  # a final turn with tool calls only and no reasoning: the empty think block is trained too (the official
            # template reads `content`: a None one, dropped as transformers drops None keys, fails it)
            [TOOL_TURNS[0], {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]}],
            [QWEN3_EMPTY_THINK + CALL_TEXT],
        ),
    ],
)
def test_qwen3_reasoning_and_tool_calls(encoders, messages, want):
    encoder = encoders("qwen3")
    tok = encoder.tokenizer
    row = only_row(encoder, {"messages": messages, "tools": TOOLS})
    assert row["input_ids"] == reference_ids(tok, messages, tools=TOOLS)
    assert trained_runs(tok, row) == want


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_empty_think_block_follows_the_samples_enable_thinking(encoders, thinking):
    encoder = encoders("qwen3")
    tok = encoder.tokenizer
    messages = [*TOOL_TURNS, {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    kwargs = {"enable_thinking": thinking}
    row = only_row(encoder, {"messages": messages, "tools": TOOLS, "chat_template_kwargs": kwargs})
    assert row["input_ids"] == reference_ids(tok, messages, tools=TOOLS, **kwargs)
    # with thinking off the generation prompt already holds the empty think block: masked
    last = (QWEN3_EMPTY_THINK if thinking else "") + "You are welcome.<|im_end|>"
    assert trained_runs(tok, row) == [CALL_TEXT, "It is 12 C.<|im_end|>", last]


def test_generation_tag_template_uses_its_tags(encoders):
    encoder = encoders("chatml_gen")
    assert encoder.generation_tags and encoder.shape is None
    assert [encoders(f).generation_tags for f in ("chatml", "llama3", "qwen3")] == [False, False, False]


@pytest.mark.parametrize("name", ["chatml", "llama3", "smollm2"])
def test_pretrain_row_trains_every_token_and_ends_with_eos(encoders, name):
    encoder = encoders(name)
    tok = encoder.tokenizer
    text = "Raw text, no template: 🙂 <|im_end|> stays text?"
    row = only_row(encoder, {"messages": [{"role": "pretrain", "content": text}]})
    assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]  # BOS where the tokenizer adds one
    assert row["labels"] == [-100] + row["input_ids"][1:]  # the first token is never a prediction target
    assert row["num_loss_counted_tokens"] == row["len"] - 1


def test_special_token_offsets_cover_exactly_their_text(encoders, family):
    encoder = encoders(family)
    text = encoder.tokenizer.apply_chat_template(CONVERSATIONS["control_strings"], tokenize=False)
    encoding = encoder.backend.encode(text, add_special_tokens=False)
    specials = {t.content for t in encoder.tokenizer.added_tokens_decoder.values()}
    seen = 0
    for token_id, (s, e) in zip(encoding.ids, encoding.offsets):
        token = encoder.tokenizer.convert_ids_to_tokens(token_id)
        if token in specials:
            assert text[s:e] == token
            seen += 1
    assert seen >= 2
    starts = [s for s, _ in encoding.offsets]
    assert starts == sorted(starts) and encoding.offsets[-1][1] == len(text)


PARTS_FOR_RANGES = st.sampled_from([*"ab Z9\n\t 🙂é日<|>/", "  ", "\n\n", "<|im_end|>", "<|eot_id|>", "</s>",
                                     "<|end|>", "<end_of_turn>", "<|im_start|>assistant\n", "hello", " world"])


def test_token_mask_overlap_rule():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 10), (10, 10), (10, 12)]
    assert chat_masks.token_mask(offsets, [(5, 9)]) == [False, False, True, False, False, False]
    assert chat_masks.token_mask(offsets, [(3, 4), (9, 12)]) == [False, True, False, True, True, True]
    assert chat_masks.token_mask(offsets, []) == [False] * 6


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["chatml", "llama3", "mistral", "gemma", "phi3", "qwen3", "smollm2"]),
       st.lists(PARTS_FOR_RANGES, max_size=24).map("".join), st.lists(st.integers(0, 200), max_size=8))
def test_token_ranges_equal_token_mask(encoders, name, text, cuts):
    """The chat path's masks (token_ranges, reading the offsets of a few tokens) equal token_mask's on the whole
    offsets list: any text with special tokens, multi-byte characters and whitespace, spans ending anywhere."""
    encoder = encoders(name)
    encoding = encoder.backend.encode(text, add_special_tokens=False)
    edges = sorted({min(c, len(text)) for c in cuts})
    spans = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
    ids, offsets = encoding.ids, encoding.offsets
    for added in (encoder.added_ids, frozenset()):
        mask = [False] * len(ids)
        for i, j in chat_masks.token_ranges(encoding, spans, ids, added):
            mask[i:j] = [True] * (j - i)
        assert mask == chat_masks.token_mask(offsets, spans, ids, added)


def test_dropped_samples_are_counted_with_reasons(encoders):
    samples = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # gemma: must alternate
        {"messages": turns(("q", "x " * 300))},
        {"messages": turns(("q", "fine"))},
    ]
    encoder = Encoder(str(encoders("gemma").tokenizer.name_or_path), "in.jsonl", 100, "drop")
    chunk = encode(encoder, samples)
    assert [(n, reason) for n, reason, _ in chunk.drops] == [(1, DROP_NO_TRAINED), (2, DROP_TEMPLATE), (3, DROP_TOO_LONG)]
    assert [n for n, _ in chunk.rows] == [4]


@pytest.mark.parametrize(
    "messages, want",
    [
        # the template moves it into a think block: the sentinel render cannot align, prefix renders can (issue 15)
        (turns(("q", "<think>inline</think>answer")), ["<think>\ninline\n</think>\n\nanswer<|im_end|>"]),
        # our placeholder characters in the data: the sentinel render is not tried, prefix renders are
        (turns(("q", "uses \ue000 private use")), [QWEN3_EMPTY_THINK + "uses \ue000 private use<|im_end|>"]),
    ],
)
def test_masks_the_sentinel_render_cannot_derive_come_from_prefix_renders(encoders, messages, want):
    encoder = encoders("qwen3")
    row = only_row(encoder, {"messages": messages})
    assert row["input_ids"] == reference_ids(encoder.tokenizer, messages)
    assert trained_runs(encoder.tokenizer, row) == want


def test_content_the_template_splits_at_think_keeps_the_sentinel_render(encoders):
    # Qwen3 moves what precedes </think> out of the content: the sentinel render keeps the special tokens of a
    # value between placeholders, so the template takes the same branch; the prompt of the second answer would
    # render the first one's reasoning, which the full render drops (a later query), so prefix renders could not
    messages = [
        *TOOL_TURNS[:3],
        {"role": "assistant", "content": "<think>inline</think>answer"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "fine"},
    ]
    encoder = encoders("qwen3")
    chunk = encode(encoder, [{"messages": messages, "tools": TOOLS}])
    assert not chunk.drops and dict(chunk.methods) == {"sentinel render": 1}
    row = orjson.loads(chunk.rows[0][1])
    assert row["input_ids"] == reference_ids(encoder.tokenizer, messages, tools=TOOLS)
    assert trained_runs(encoder.tokenizer, row) == [CALL_TEXT, "answer<|im_end|>", QWEN3_EMPTY_THINK + "fine<|im_end|>"]


@pytest.mark.parametrize("arguments", [{"x": "<|im_end|>"}, '{"x": "<|im_end|>\\n<|im_start|>user"}'])
def test_tool_call_arguments_with_control_text_are_trained(encoders, arguments):
    # issue 15: argument values (dict values or a JSON string) are placeholders too, so their control text is text
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    encoder = encoders("qwen3")
    row = only_row(encoder, {"messages": messages})
    assert row["input_ids"] == reference_ids(encoder.tokenizer, messages)
    shown = arguments if isinstance(arguments, str) else '{"x": "<|im_end|>"}'
    assert trained_runs(encoder.tokenizer, row) == [f'{QWEN3_EMPTY_THINK}<tool_call>\n{{"name": "f", "arguments": {shown}}}\n</tool_call><|im_end|>']


CONTROL = ["<|im_end|>", "<|eot_id|>", "</s>", "<|end|>", "<end_of_turn>"]
PARTS = st.sampled_from([*"ab Z9\n\t 🙂é<|>/[]", *CONTROL])
# Assistant text may also quote a role header. User text does not here, only because this test's own plain
# search for the expected turns would match a quoted header (test_ids_and_masks_per_family covers that case).
TEXT = st.lists(PARTS, max_size=12).map("".join)
ASSISTANT_TEXT = st.lists(st.one_of(PARTS, st.sampled_from(["<|assistant|>\n", "<|im_start|>assistant\n"])), max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["chatml", "llama3", "mistral", "gemma", "phi3", "qwen3"]), st.lists(st.tuples(TEXT, ASSISTANT_TEXT), min_size=1, max_size=3), st.booleans())
def test_property_generated_conversations(encoders, name, pairs, with_system):
    encoder = encoders(name)
    tok = encoder.tokenizer
    messages = turns(*pairs, system="sys" if with_system else None)
    chunk = encode(encoder, [{"messages": messages}])
    if chunk.drops:
        _, reason, detail = chunk.drops[0]
        # Mistral's template has no generation prompt, so an assistant turn rendered empty cannot be located:
        # it fails closed. Otherwise only a whitespace-ambiguous alignment may be refused.
        empty_turn = any(not a.strip() for _, a in pairs)
        assert reason == DROP_MASK and ("ambiguous" in detail or (name == "mistral" and empty_turn)), detail
        return
    row = orjson.loads(chunk.rows[0][1])
    text = tok.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == reference_ids(tok, messages)
    assert row["labels"] == expected_labels(tok, text, expected_spans(name, text, messages))


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "gemma", "phi3", "qwen3"])
def test_generated_conversations_are_rarely_refused_and_every_kept_one_is_exact(encoders, name):
    """The property test above accepts a whitespace-ambiguous refusal of any one conversation; this bounds how often
    that happens (none of 300 today) on conversations generated from the same parts, and checks every kept row."""
    encoder = encoders(name)
    tok = encoder.tokenizer
    rng = random.Random(0)
    parts, assistant_parts = PARTS.elements, [*PARTS.elements, "<|assistant|>\n", "<|im_start|>assistant\n"]
    conversations = []
    for _ in range(300):
        pairs = [("".join(rng.choice(parts) for _ in range(rng.randint(0, 12))),
                  "".join(rng.choice(assistant_parts) for _ in range(rng.randint(0, 12))))
                 for _ in range(rng.randint(1, 3))]
        conversations.append((pairs, turns(*pairs, system="sys" if rng.random() < 0.5 else None)))
    chunk = encode(encoder, [{"messages": messages} for _, messages in conversations])
    dropped = {line: detail for line, _, detail in chunk.drops}
    ambiguous = [line for line, detail in dropped.items() if "ambiguous" in detail]
    assert len(ambiguous) <= 3, ambiguous  # at most 1%
    for line, detail in dropped.items():  # any other refusal: Mistral's empty assistant turn, and only that
        pairs = conversations[line - 1][0]
        assert line in ambiguous or (name == "mistral" and any(not a.strip() for _, a in pairs)), detail
    rows = [orjson.loads(row) for _, row in chunk.rows]
    kept = [messages for line, (_, messages) in enumerate(conversations, start=1) if line not in dropped]
    assert len(rows) == len(kept) >= 270
    for row, messages in zip(rows, kept, strict=True):
        text = tok.apply_chat_template(messages, tokenize=False)
        assert row["input_ids"] == reference_ids(tok, messages)
        assert row["labels"] == expected_labels(tok, text, expected_spans(name, text, messages))


# ---- the command line: streaming, order, atomic output, bad input ----


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return path


def cli(tmp_path, tokenizer: Path, input_file: Path, *flags: str) -> tuple[int, str, str, Path]:
    out = tmp_path / "out.jsonl"
    argv = ["--input-file", str(input_file), "--output-file", str(out), "--model-name-or-path", str(tokenizer)]
    argv += ["--max-sample-num-tokens", "4096", "--num-workers", "1", *flags]
    proc = subprocess.run([sys.executable, str(ROOT / "process_data.py"), *argv], capture_output=True, text=True, cwd=tmp_path)
    return proc.returncode, proc.stdout, proc.stderr, out


def run_main(capsys, tmp_path, tokenizer, input_file, *flags) -> tuple[int, str, str, Path]:
    """The same entry point in-process (no interpreter start-up): exit code, stdout, stderr, output path."""
    out = tmp_path / "out.jsonl"
    argv = ["--input-file", str(input_file), "--output-file", str(out), "--model-name-or-path", str(tokenizer)]
    argv += ["--max-sample-num-tokens", "4096", "--num-workers", "1", *flags]
    code = 0
    try:
        process_data.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def test_cli_end_to_end_prints_summary_and_masked_samples(tmp_path, tokenizer_dir):
    lines = [{"messages": CONVERSATIONS["single"]}, b"", {"messages": turns(("x", ""))}, {"messages": turns(("y", "z"))[:1]}]
    data = write_lines(tmp_path / "in.jsonl", lines)
    code, stdout, stderr, out = cli(tmp_path, tokenizer_dir("chatml"), data, "--mask-marker", "@@", "--num-printed-samples", "5")
    assert code == 0, stderr
    assert "@@Paris is the capital of France.<|im_end|>@@\n" in stdout
    # the whole conversation is shown, masked text included (issue 15)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n@@Paris" in stdout
    assert "@@<|im_end|>@@\n" in stdout  # an empty answer still trains its end-of-turn token
    assert f"dropped {data}:4: {DROP_NO_TRAINED}" in stdout
    assert "read 4 lines (1 blank), wrote 2 samples" in stdout and f"1  {DROP_NO_TRAINED}" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"input_ids", "labels", "len", "num_loss_counted_tokens"}


def test_more_workers_than_cores_run_on_the_cores_and_say_so(capsys, monkeypatch, tmp_path, tokenizer_dir):
    """--num-workers 64 on a 2-core machine started 64 interpreters (70 s for 4 rows): the workers are capped at the
    cores this process may use, in a line, and the rows are the same."""
    from minitrain.prepare import pipeline

    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    code, _, _, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    expected = out.read_bytes()
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 1)  # one worker: encoded in this process, no pool
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--num-workers", "4")
    assert code == 0, stderr
    assert "--num-workers 4: this process may run on 1 cores; using 1 workers" in stdout
    assert stdout.rstrip().endswith("1 workers") and out.read_bytes() == expected


def test_a_device_pipe_or_link_is_never_replaced_and_long_names_are_one_line(capsys, tmp_path, tokenizer_dir):
    """The rows, the report and the saved template are renamed into place: --output-file /dev/null (as root) replaced
    the device with a file, a FIFO or a symbolic link likewise. A name too long for the file system, given or made
    (the template's name beside the rows, the report's temporary file), was a traceback."""
    import os

    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    fifo, link = tmp_path / "fifo", tmp_path / "link.jsonl"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    for flags, message in ((["--output-file", str(fifo)], f"{fifo}: --output-file is not a regular file (a device, "
                                                          f"pipe or socket), which the written file would replace"),
                           (["--output-file", str(link)], f"{link}: --output-file is a symbolic link"),
                           (["--report", str(fifo)], f"{fifo}: --report is not a regular file"),
                           (["--output-file", str(tmp_path / ("r" * 250))], "File name too long; pass another path")):
        code, _, stderr, _ = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    code, _, stderr, _ = run_main(capsys, tmp_path, tokenizer_dir("chatml"), fifo)  # as <(cat data) gives
    assert code == 2 and f"{fifo}: --input-file is not a regular file (a pipe or device)" in stderr, stderr
    assert fifo.exists() and not fifo.is_file() and link.is_symlink()
    report = tmp_path / ("m" * 250 + ".html")  # a valid name; its temporary file's is not
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--report", str(report))
    assert code == 2 and stderr.count("\n") == 1 and f"{report}: --report cannot be written (File name too long)" \
        in stderr and out.exists(), stderr


def test_bad_json_is_one_line_error_without_traceback(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}, b'{"messages": ['])
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert stderr.startswith(f"process_data.py: error: {data}:2: malformed JSON")
    assert not out.exists() and list(tmp_path.iterdir()) == [data]  # no output, no temp file


def test_what_argparse_refuses_and_the_flag_checks_are_one_line(capsys, tmp_path, tokenizer_dir):
    """An unknown flag, a value not among the choices or of the wrong type, a required flag missing, and this stage's
    own checks of the flags (all of them together): one line and exit code 2, in this process, nothing written."""
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    cases = [
        (["--logging-level", "INFO"], "unrecognized arguments: --logging-level INFO; see process_data.py --help"),
        (["--on-too-long", "wrap"], "argument --on-too-long: invalid choice: 'wrap' (choose from"),
        (["--seed", "one"], "argument --seed: invalid int value: 'one'; see process_data.py --help"),
        (["--num-printed-samples", "-1", "--source-column", "q"],
         "--num-printed-samples must be 0 or more; --source-column and --target-column go together"),
        (["--mask-marker", " "], "--mask-marker must be visible text, e.g. '[[ ]]' or '@@'"),  # no trained part shown
    ]
    for flags, message in cases:
        code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("process_data.py: error: "), stderr
        assert message in stderr, stderr
    with pytest.raises(SystemExit) as e:
        process_data.main(["--input-file", str(data)])
    stderr = capsys.readouterr().err
    assert e.value.code == 2 and stderr.count("\n") == 1, stderr
    assert "the following arguments are required: --output-file, --model-name-or-path" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


BAD_LINES = {
    "not_json": (b"{messages: 1}", "malformed JSON"),
    "no_messages": ({"conversation": []}, "no non-empty `messages` list"),
    "messages_not_list": ({"messages": "hi"}, "no non-empty `messages` list"),
    "content_wrong_type": ({"messages": [{"role": "user", "content": 3}]}, "`content` must be a string"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid UTF-8"),
    "null": (b"null", "the row is null, not a JSON object"),  # it was counted as a blank line
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_input_stops_the_run_naming_file_and_line(capsys, tmp_path, tokenizer_dir, case):
    line, reason = BAD_LINES[case]
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}, line])
    (tmp_path / "out.jsonl").write_text("previous run\n")  # a failed run leaves an existing output alone
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 2
    assert stderr.startswith(f"process_data.py: error: {data}:2: ") and reason in stderr
    assert stderr.count("\n") == 1
    assert out.read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.parametrize("first, message", [
    (b"[1, 2]", "the row is a JSON array, not an object"), (b'"text"', "the row is a JSON string, not an object"),
    (b"null", "the row is null, not a JSON object"),
])
def test_a_first_row_that_is_not_an_object_is_named_as_what_it_is(capsys, tmp_path, tokenizer_dir, first, message):
    """The format is detected from the first row: one that is no object said "the first row has keys []"."""
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\n" + first + b"\n")
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 2 and stderr.startswith(f"process_data.py: error: {data}:2: {message}") and stderr.count("\n") == 1
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), tmp_path)
    assert code == 2 and stderr == f"process_data.py: error: {tmp_path}: --input-file is a directory; name the " \
                                   f"data file in it\n"


def test_empty_file_and_bad_model_paths(capsys, tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, _, stderr, _ = run_main(capsys, tmp_path, tokenizer_dir("chatml"), empty)
    assert code == 2 and f"{empty}:1: the file is empty" in stderr

    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    code, _, stderr, _ = run_main(capsys, tmp_path, no_tokenizer, data)
    assert code == 2 and "cannot load a tokenizer" in stderr and stderr.count("\n") == 1

    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    tok.chat_template = None
    no_template = tmp_path / "no_template"
    tok.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    code, _, stderr, out = run_main(capsys, tmp_path, no_template, data)
    assert code == 2 and f"{data}:1: the tokenizer has no chat template" in stderr and not out.exists()


def test_too_long_error_mode(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": turns(("q", "word " * 50))}])
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--max-sample-num-tokens", "20", "--on-too-long", "error")
    assert code == 2 and f"{data}:1: sample has" in stderr and "--on-too-long drop" in stderr and not out.exists()


def test_order_is_kept_with_several_workers_and_failure_midway_leaves_nothing(capsys, tmp_path, tokenizer_dir):
    samples = [{"messages": turns((f"question {n}", "answer " * (1 + n % 7) + str(n)))} for n in range(600)]
    samples[100] = {"messages": [{"role": "pretrain", "content": "raw text"}]}
    data = write_lines(tmp_path / "in.jsonl", samples)
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--num-workers", "2")
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [tok.decode(r["input_ids"]) for r in rows] == [
        tok.decode(reference_ids(tok, s["messages"])) if n != 100 else "raw text<|im_end|>" for n, s in enumerate(samples)
    ]
    # ids and labels, not only the decoded text: the template's own ids, and every field the one-worker path writes
    assert all(r["input_ids"] == reference_ids(tok, s["messages"]) for n, (r, s) in enumerate(zip(rows, samples))
               if n != 100)
    (tmp_path / "one").mkdir()
    code, _, stderr, one_out = run_main(capsys, tmp_path / "one", tokenizer_dir("chatml"), data, "--num-workers", "1")
    assert code == 0, stderr
    one = [json.loads(line) for line in one_out.read_text().splitlines()]
    assert len(one) == len(rows) == 600 and all(set(r) >= {"input_ids", "labels"} for r in rows)
    assert rows == one  # input_ids, labels and every other field, row by row
    assert sum(label != -100 for r in rows for label in r["labels"]) > 0
    shutil.rmtree(tmp_path / "one")
    out.unlink()
    pipeline.template_sidecar(out).unlink()  # the chat template saved with the rows goes with them
    # a malformed line in the third chunk, after earlier chunks were written: no output, no temp file
    data.write_bytes(data.read_bytes() + b"not json\n")
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--num-workers", "2")
    assert code == 2 and f"{data}:601: malformed JSON" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ---- issue 15: paths that would lose data, the chat template chosen and saved with the rows ----


def test_output_equal_to_input_is_refused_before_reading(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    before = data.read_bytes()
    link = tmp_path / "link.jsonl"
    os.link(data, link)  # the same file by inode under another name
    for out in (data, tmp_path / "." / "in.jsonl", link):
        argv = ["--input-file", str(data), "--output-file", str(out), "--model-name-or-path", str(tokenizer_dir("chatml"))]
        with pytest.raises(SystemExit) as e:
            process_data.main([*argv, "--max-sample-num-tokens", "4096", "--num-workers", "1"])
        stderr = capsys.readouterr().err
        assert e.value.code == 2 and stderr.count("\n") == 1
        assert stderr == f"process_data.py: error: {out}: --output-file is the input file, which would be overwritten; write the rows to another file\n"
        assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl"]


def test_no_file_of_the_model_folder_is_overwritten_by_the_rows_or_their_template(capsys, tmp_path, tokenizer_dir):
    """--output-file naming a file of the model's folder (its tokenizer.json, say) would break the model; a new file
    there is fine."""
    import shutil

    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir("chatml"), model)
    (model / "rows.jsonl.chat_template.jinja").write_text("kept")  # where rows.jsonl's template would be saved
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out, name in ((model / "tokenizer.json", "tokenizer.json"),
                      (model / "rows.jsonl", "rows.jsonl.chat_template.jinja")):
        argv = ["--input-file", str(data), "--output-file", str(out), "--model-name-or-path", str(model)]
        with pytest.raises(SystemExit) as e:
            process_data.main([*argv, "--max-sample-num-tokens", "4096", "--num-workers", "1"])
        stderr = capsys.readouterr().err
        assert e.value.code == 2 and stderr == (f"process_data.py: error: {out}: --output-file would overwrite {name} "
                                                f"in the model's folder (--model-name-or-path); write the rows to "
                                                f"another folder\n")
    with pytest.raises(SystemExit) as e:  # nor the mask report (it replaced a config.json with HTML)
        process_data.main(["--input-file", str(data), "--output-file", str(tmp_path / "rows.jsonl"),
                           "--model-name-or-path", str(model), "--max-sample-num-tokens", "4096",
                           "--num-workers", "1", "--report", str(model / "tokenizer_config.json")])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"process_data.py: error: {model / 'tokenizer_config.json'}: --report would overwrite tokenizer_config.json "
        f"in the model's folder (--model-name-or-path); write the report to another folder, e.g. masks.html\n")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    (model / "rows.jsonl.chat_template.jinja").unlink()
    process_data.main(["--input-file", str(data), "--output-file", str(model / "rows.jsonl"), "--model-name-or-path",
                       str(model), "--max-sample-num-tokens", "4096", "--num-workers", "1"])
    assert (model / "rows.jsonl").exists() and (model / "tokenizer.json").read_bytes() == before["tokenizer.json"]


def test_no_file_read_is_overwritten_by_the_rows_or_the_report(capsys, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    template = tmp_path / "t.jinja"
    template.write_text(AutoTokenizer.from_pretrained(tokenizer_dir("chatml")).chat_template)
    config = tmp_path / "c.yaml"
    config.write_text("num_workers: 1\n")
    before = {p: p.read_bytes() for p in (data, template, config)}
    out = tmp_path / "out.jsonl"
    cases = [
        (["--output-file", str(template), "--chat-template", str(template)],
         f"{template}: --output-file is the --chat-template file, which would be overwritten"),
        (["--output-file", str(config), "--config", str(config)],
         f"{config}: --output-file is the --config file, which would be overwritten"),
        (["--report", str(data)], f"{data}: --report is --input-file, which would be overwritten"),
        (["--report", str(out)], f"{out}: --report is --output-file, which would be overwritten"),
        (["--report", str(template), "--chat-template", str(template)],
         f"{template}: --report is --chat-template, which would be overwritten"),
        (["--report", str(tmp_path)], f"{tmp_path}: --report is a directory"),
        (["--report", str(tmp_path / "no" / "r.html")], f"{tmp_path / 'no'}: no such directory; create it or fix"),
    ]
    for flags, message in cases:
        argv = ["--input-file", str(data), "--output-file", str(out), "--model-name-or-path",
                str(tokenizer_dir("chatml")), "--max-sample-num-tokens", "4096", "--num-workers", "1", *flags]
        with pytest.raises(SystemExit) as e:
            process_data.main(argv)
        stderr = capsys.readouterr().err
        assert e.value.code == 2 and stderr.count("\n") == 1 and message in stderr, (flags, stderr)
        assert all(p.read_bytes() == b for p, b in before.items()) and not out.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_chat_template_that_does_not_compile_is_one_line_with_any_number_of_workers(capsys, tmp_path,
                                                                                       tokenizer_dir, workers):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--chat-template", str(bad),
                                    "--num-workers", workers)  # 2 workers: it hung, starting workers forever
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "--chat-template does not compile (unexpected '}' at template line 1)" in stderr
    assert not out.exists()


def test_a_csv_with_only_its_header_says_so(capsys, tmp_path, tokenizer_dir):
    data = tmp_path / "in.csv"
    data.write_text("prompt,completion\n")
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 2 and f"{data}: no sample can be written (no rows after the header)" in stderr, stderr
    assert not out.exists()


def test_a_config_value_that_starts_with_a_dash_stays_a_value(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('separator: "-->"\npair_rendering: raw\n')
    cfg = process_data.parse_args(["--config", str(config), "--input-file", "i", "--output-file", "o",
                                   "--model-name-or-path", "m"])
    assert cfg.separator == "-->" and cfg.config_file == config


def test_output_that_is_a_directory_is_a_one_line_error(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    (tmp_path / "out.jsonl").mkdir()
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"process_data.py: error: {out}: --output-file is a directory; name a file")
    assert out.is_dir() and not any(out.iterdir())


def test_the_chat_template_used_is_saved_beside_the_rows(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 0, stderr
    sidecar = tmp_path / "out.jsonl.chat_template.jinja"
    assert pipeline.template_sidecar(out) == sidecar
    assert sidecar.read_text() == tok.chat_template and f"chat template used saved to {sidecar}" in stdout


def test_chat_template_file_for_a_tokenizer_without_one(capsys, tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    template = tok.chat_template
    tok.chat_template = None
    base = tmp_path / "base"
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "t.jinja").write_text(template)
    messages = CONVERSATIONS["multi_with_system"]
    data = write_lines(tmp_path / "in.jsonl", [{"messages": messages}])
    code, _, stderr, out = run_main(capsys, tmp_path, base, data, "--chat-template", str(tmp_path / "t.jinja"))
    assert code == 0, stderr
    row = json.loads(out.read_text())
    want = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    assert row["input_ids"] == reference_ids(want, messages)
    assert trained_runs(want, row) == ["Hi, how can I help?<|im_end|>", "Why did the chicken cross the road?<|im_end|>"]
    assert pipeline.template_sidecar(out).read_text() == template
    # raw text needs no template: none is saved, and a stale one from an earlier run goes
    text = write_lines(tmp_path / "text.jsonl", [{"text": "Just text."}])
    code, _, stderr, out = run_main(capsys, tmp_path, base, text)
    assert code == 0, stderr
    assert not pipeline.template_sidecar(out).exists()
    code, _, stderr, _ = run_main(capsys, tmp_path, base, text, "--chat-template", str(tmp_path / "missing.jinja"))
    assert code == 2 and stderr.startswith(f"process_data.py: error: {tmp_path / 'missing.jinja'}: cannot read the chat template")


def test_a_template_with_generation_blocks_is_saved_and_masks_count_the_rows_written(capsys, tmp_path, tokenizer_dir):
    """The masks line counted a sample when its masks were made, before a row too long was dropped; a template that
    marks its replies with {% generation %} blocks counted none, nor did preference pairs, so no sidecar was saved:
    train.py exported the tokenizer's template, not the one the rows were rendered with (a --chat-template lost)."""
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Sure."}]
    data = write_lines(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS["single"]}, {"messages": long}])
    for name, method in (("chatml", "sentinel render"), ("chatml_gen", "template's {% generation %} blocks")):
        template = tmp_path / f"{name}.jinja"
        template.write_text(AutoTokenizer.from_pretrained(tokenizer_dir(name)).chat_template)
        code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--chat-template",
                                             str(template), "--max-sample-num-tokens", "100", "--on-too-long", "drop")
        assert code == 0, stderr
        assert "wrote 1 samples" in stdout and f"\nmasks: 1 from the {method}\n" in stdout, stdout
        assert pipeline.template_sidecar(out).read_text() == template.read_text(), name
    # preference pairs (and KTO's rows) counted none either: their template was never saved
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}]}
    kto = {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}
    for rows in ([pair], [kto, {**kto, "label": False}]):
        data = write_lines(tmp_path / "rows.jsonl", rows)
        code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--chat-template",
                                             str(template))
        assert code == 0 and f"\nmasks: {len(rows)} from the {method}\n" in stdout, stderr + stdout
        assert pipeline.template_sidecar(out).read_text() == template.read_text(), rows


def test_chat_template_name_picks_one_of_several(capsys, tmp_path, tokenizer_dir):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}]
    sample = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}], "tools": tools}
    data = write_lines(tmp_path / "in.jsonl", [sample])
    hermes = tokenizer_dir("hermes3")
    code, _, stderr, out = run_main(capsys, tmp_path, hermes, data, "--chat-template-name", "tool_use")
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(hermes)
    assert pipeline.template_sidecar(out).read_text() == tok.chat_template["tool_use"]
    row = json.loads(out.read_text())
    assert row["input_ids"] == reference_ids(tok, sample["messages"], tools=tools, chat_template="tool_use")
    code, _, stderr, _ = run_main(capsys, tmp_path, hermes, data, "--chat-template-name", "nope")
    assert code == 2 and "no chat template named 'nope' (it has default, tool_use); pass one of them to --chat-template-name" in stderr


def test_printed_view_marks_trained_runs_in_colour_or_brackets(encoders):
    tok = encoders("chatml").tokenizer
    ids = tok("ab<|im_end|>cd", add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    k = ids.index(tok.convert_tokens_to_ids("<|im_end|>"))
    labels[k] = ids[k]
    assert pipeline.masked_view(tok, ids, labels, "[[ ]]", colour=False) == "ab[[<|im_end|>]]cd"
    assert pipeline.masked_view(tok, ids, labels, "[[ ]]", colour=True) == "\033[2mab\033[0m\033[32m<|im_end|>\033[0m\033[2mcd\033[0m"
