"""Stage 1 input formats: prompt/target pairs (chat and raw rendering), raw text rows, CSV and Parquet files.

Expected values are built here from the strings themselves: the ids of the rendered text from the tokenizer, the
trained text as target + EOS, and the other input files as the same rows written by the csv module and pyarrow.
"""

import csv
import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from minitrain.prepare import formats
from minitrain.prepare.encode import (
    DROP_CROSSING,
    DROP_EMPTY_TARGET,
    DROP_EMPTY_TEXT,
    Encoder,
    crossing_token,
)
from minitrain.prepare.formats import Columns, Format, InputSpec
from tests.test_process_data import (
    FORMS,
    QWEN3_EMPTY_THINK,
    encode,
    only_row,
    reference_ids,
    run_main,
    trained_runs,
    trained_text,
    write_lines,
)

PAIR = Format("pairs", source="source", target="target")


@pytest.fixture(scope="session")
def encoders(tokenizer_dir):
    built = {}

    def get(name: str, **spec) -> Encoder:
        key = (name, tuple(sorted(spec.items())))
        if key not in built:
            built[key] = Encoder(str(tokenizer_dir(name)), "in.jsonl", 100_000, "drop", InputSpec(**spec))
        return built[key]

    return get


# ---- raw rendering: source + separator + target + EOS ----

RAW_CASES = {
    "plain": ("What is the capital of France?", "Paris is the capital of France.", None),
    "empty_source": ("", "An answer without a question.", None),
    # the default separator (the EOS) and a named one quoted inside the source: the masks come from positions
    "eos_in_source": ("Quote <|im_end|> </s> <eos> <|eot_id|> <|endoftext|> here", "Fine.", None),
    "named_separator_in_source": ("left\n### Answer:\nright", "The end.", "\n### Answer:\n"),
    "spaces_at_the_edges": ("Question with trailing spaces?   ", "   answer with leading spaces ", None),
    "unicode": ("Größe 日本語 🙂", "naïve café 🚀", None),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_pair_ids_equal_the_tokenizer_and_train_exactly_target_and_eos(encoders, family, case):
    source, target, separator = RAW_CASES[case]
    encoder = encoders(family, fmt=PAIR, rendering="raw", separator=separator)
    tok = encoder.tokenizer
    row = only_row(encoder, {"source": source, "target": target})
    sep = tok.eos_token if separator is None else separator
    assert row["input_ids"] == tok(source + sep + target + tok.eos_token)["input_ids"]  # with BOS where it adds one
    trained = [k for k, label in enumerate(row["labels"]) if label != -100]
    assert trained == list(range(trained[0], row["len"]))  # one run, to the end
    assert tok.decode(row["input_ids"][trained[0] :]) == target + tok.eos_token
    assert row["labels"][trained[0] :] == row["input_ids"][trained[0] :]
    assert row["num_loss_counted_tokens"] == len(trained)


def test_raw_pair_with_bos_family_keeps_the_bos_masked(encoders):
    encoder = encoders("llama3", fmt=PAIR, rendering="raw")
    row = only_row(encoder, {"source": "q", "target": "a"})
    assert row["input_ids"][0] == encoder.tokenizer.bos_token_id and row["labels"][0] == -100
    assert row["input_ids"].count(encoder.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("name", ["chatml", "llama3", "smollm2"])
def test_raw_pair_train_source_trains_source_and_target_not_the_separator(encoders, name):
    encoder = encoders(name, fmt=PAIR, rendering="raw", train_source=True)
    tok = encoder.tokenizer
    source, target = "Tell me a joke.", "Why did the chicken cross the road?"
    row = only_row(encoder, {"source": source, "target": target})
    runs = trained_runs(tok, row)
    assert runs[1:] == [target + tok.eos_token]
    if name == "llama3":  # the BOS precedes the source, so all of it is a prediction target
        assert runs[0] == source
    else:  # nothing precedes the first token: it is never a prediction target
        first = tok.decode(row["input_ids"][:1])
        assert row["labels"][0] == -100 and first + runs[0] == source


def test_raw_pair_token_crossing_into_the_target_drops_the_sample(encoders):
    # "Answer: " + "Paris": the byte-level pre-tokenizer makes " Paris" one token, half separator, half target
    crossing = encoders("chatml", fmt=PAIR, rendering="raw", separator="Answer: ")
    chunk = encode(crossing, [{"source": "Capital of France?", "target": "Paris"}])
    assert not chunk.rows and [(n, reason) for n, reason, _ in chunk.drops] == [(1, DROP_CROSSING)]
    assert "' Paris'" in chunk.drops[0][2]
    # the same text with the space on the target's side: the token boundary is the edge, so it is written
    clean = encoders("chatml", fmt=PAIR, rendering="raw", separator="Answer:")
    row = only_row(clean, {"source": "Capital of France?", "target": " Paris"})
    assert trained_text(clean.tokenizer, row) == " Paris<|im_end|>"


def test_raw_pair_empty_separator_merging_source_and_target(encoders):
    row = {"source": "The c", "target": "apital"}  # " capital" is one token: no token boundary between them
    chunk = encode(encoders("chatml", fmt=PAIR, rendering="raw", separator=""), [row])
    assert [reason for _, reason, _ in chunk.drops] == [DROP_CROSSING]
    # trained on both sides there is no edge between them: written, everything after the first token trained
    both = encoders("chatml", fmt=PAIR, rendering="raw", separator="", train_source=True)
    written = only_row(both, row)
    assert written["labels"] == [-100] + written["input_ids"][1:]


def test_raw_pair_crossing_at_the_end_of_a_trained_source(encoders):
    # " c" + "apital" merge at the end of the source, which --train-source trains while the separator is masked
    encoder = encoders("chatml", fmt=PAIR, rendering="raw", separator="apital", train_source=True)
    chunk = encode(encoder, [{"source": "The c", "target": "\nx"}])
    assert [reason for _, reason, _ in chunk.drops] == [DROP_CROSSING]


def test_crossing_token_rule():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert crossing_token(offsets, [(5, 12)]) is None
    assert crossing_token(offsets, [(4, 12)]) == (3, 5, 4)
    assert crossing_token(offsets, [(0, 4), (7, 12)]) == (3, 5, 4)
    assert crossing_token(offsets, [(0, 4), (4, 12)]) is None  # adjacent spans: one trained region


SOURCE_PARTS = st.sampled_from([*"ab Z9\n\t 🙂é:#", "<|im_end|>", "<sep>", "  ", "Answer:"])
TEXT = st.lists(SOURCE_PARTS, max_size=8).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["chatml", "llama3", "gemma"]), TEXT, TEXT.filter(bool), st.sampled_from([None, "", " ", "<sep>", "\n", ": "]))
def test_property_raw_pairs(encoders, name, source, target, separator):
    encoder = encoders(name, fmt=PAIR, rendering="raw", separator=separator)
    tok = encoder.tokenizer
    sep = tok.eos_token if separator is None else separator
    chunk = encode(encoder, [{"source": source, "target": target}])
    prompt, answer = source + sep, target + tok.eos_token

    def plain(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    if chunk.drops:
        # dropped only when the tokenizer really merges across the edge: the pieces tokenized apart differ
        assert [reason for _, reason, _ in chunk.drops] == [DROP_CROSSING]
        assert plain(prompt) + plain(answer) != plain(prompt + answer)
        return
    row = orjson.loads(chunk.rows[0][1])
    assert row["input_ids"] == tok(prompt + answer)["input_ids"]
    start = row["labels"].index(next(label for label in row["labels"] if label != -100))
    # With nothing before the target (empty prompt, no BOS), its first token predicts nothing and stays masked.
    untrainable = 0 if tok(prompt)["input_ids"] else 1
    assert tok.decode(row["input_ids"][start - untrainable:]) == answer and -100 not in row["labels"][start:]
    assert all(label == -100 for label in row["labels"][:start])


# ---- chat rendering: one user turn, one assistant turn ----


@pytest.mark.parametrize("source", ["What is the capital of France?", "", "  spaced  \n"])
def test_chat_pair_equals_the_messages_sample(encoders, family, source):
    target = "Paris is the capital of France."
    pair = only_row(encoders(family, fmt=PAIR), {"source": source, "target": target, "id": 7})
    messages = [{"role": "user", "content": source}, {"role": "assistant", "content": target}]
    assert pair == only_row(encoders(family), {"messages": messages})
    tok = encoders(family).tokenizer
    assert pair["input_ids"] == reference_ids(tok, messages)
    _, shown, eot = FORMS[family]
    think = QWEN3_EMPTY_THINK if family == "qwen3" else ""  # after the generation prompt: trained (issue 15)
    assert "".join(trained_text(tok, pair).split()) == "".join((think + shown(target) + eot).split())


@pytest.mark.parametrize("name, want", [
    ("chatml", ["Tell me a joke.", "Why not?<|im_end|>"]),
    ("chatml_gen", ["Tell me a joke.", "Why not?<|im_end|>"]),  # generation tags mark only the answer
    ("llama3", ["Tell me a joke.", "Why not?<|eot_id|>"]),
])
def test_chat_pair_train_source_trains_the_user_content(encoders, name, want):
    encoder = encoders(name, fmt=PAIR, train_source=True)
    row = only_row(encoder, {"source": "Tell me a joke.", "target": "Why not?"})
    assert row["input_ids"] == reference_ids(encoder.tokenizer, [
        {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why not?"}
    ])
    assert trained_runs(encoder.tokenizer, row) == want


def test_empty_target_is_a_counted_drop_in_both_renderings(encoders):
    for rendering in ("chat", "raw"):
        chunk = encode(encoders("chatml", fmt=PAIR, rendering=rendering), [{"source": "q", "target": ""}, {"source": "q", "target": "a"}])
        assert [(n, reason) for n, reason, _ in chunk.drops] == [(1, DROP_EMPTY_TARGET)] and [n for n, _ in chunk.rows] == [2]


# ---- raw text rows ----


def test_text_row_is_a_pretrain_row(encoders):
    text = "Raw text, no template: 🙂 stays text."
    row = only_row(encoders("llama3", fmt=Format("text", text="text")), {"text": text})
    pretrain = only_row(encoders("llama3"), {"messages": [{"role": "pretrain", "content": text}]})
    assert row == pretrain
    tok = encoders("llama3").tokenizer
    assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
    chunk = encode(encoders("llama3", fmt=Format("text", text="text")), [{"text": ""}])
    assert [reason for _, reason, _ in chunk.drops] == [DROP_EMPTY_TEXT]


# ---- detection ----


@pytest.mark.parametrize("keys, want", [
    (["messages", "prompt"], Format("messages")),  # ultrachat-style rows carry a prompt beside the messages
    (["source", "target", "id"], Format("pairs", source="source", target="target")),
    (["text", "target"], Format("pairs", source="text", target="target")),
    (["prompt", "completion"], Format("pairs", source="prompt", target="completion")),
    (["text", "meta"], Format("text", text="text")),
    (["prompt"], None),
])
def test_detect(keys, want):
    assert formats.detect(keys, Columns()) == want


def test_detect_with_named_columns():
    columns = Columns(pairs=(("question", "answer"),), text="body")
    assert formats.detect(["question", "answer"], columns) == Format("pairs", source="question", target="answer")
    assert formats.detect(["source", "target", "body"], columns) == Format("text", text="body")


# ---- files: CSV and Parquet equal JSONL, errors name file and row ----

PAIR_ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Quote \"this\", please,\nover two lines", "completion": "  \"this\", done\n"},
    {"prompt": "", "completion": "An answer to nothing."},
    {"prompt": "No answer", "completion": ""},
    {"prompt": "Größe 🙂", "completion": "日本語"},
]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with the byte-order mark spreadsheets write
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups: batched reading
    return path


@pytest.mark.parametrize("flags", [(), ("--pair-rendering", "raw")])
def test_csv_and_parquet_give_byte_identical_output_to_jsonl(capsys, tmp_path, tokenizer_dir, flags):
    outputs = {}
    for name, writer in [("in.jsonl", write_lines), ("in.csv", write_csv), ("in.parquet", write_parquet)]:
        data = writer(tmp_path / name, PAIR_ROWS)
        code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("llama3"), data, *flags)
        assert code == 0, stderr
        assert f"1  {DROP_EMPTY_TARGET}" in stdout and "wrote 4 samples" in stdout
        assert "pairs (prompt/completion) (detected from line 1)" in stdout
        outputs[name] = out.read_bytes()
    assert outputs["in.csv"] == outputs["in.jsonl"] and outputs["in.parquet"] == outputs["in.jsonl"]


def test_text_csv_and_parquet_equal_jsonl_and_print_masks(capsys, tmp_path, tokenizer_dir):
    rows = [{"text": "First document."}, {"text": ""}, {"text": "Second, with a comma."}]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    outputs = {}
    for name, writer in [("t.jsonl", write_lines), ("t.csv", write_csv), ("t.parquet", write_parquet)]:
        data = writer(tmp_path / name, rows)
        code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--num-printed-samples", "5", "--mask-marker", "@@")
        assert code == 0, stderr
        first = tok("First document.")["input_ids"]
        # the whole text is shown, the trained run between the markers: the first token is masked, the rest trained
        assert f"\n{tok.decode(first[:1])}@@{tok.decode(first[1:])}<|im_end|>@@\n" in stdout
        assert f"1  {DROP_EMPTY_TEXT}" in stdout
        outputs[name] = out.read_bytes()
    assert outputs["t.csv"] == outputs["t.jsonl"] == outputs["t.parquet"]


def test_a_run_without_a_chat_template_removes_an_earlier_runs_template_beside_the_rows(capsys, tmp_path,
                                                                                       tokenizer_dir):
    """docs/data.md: the chat template a run used is saved beside its rows for train.py to put into every export; a
    later run to the same output that uses none (text rows or raw pairs, whatever the tokenizer; a tokenizer without
    a template: a base model's) removes it, so the old template never goes with rows made without it."""
    from minitrain.prepare.pipeline import template_sidecar

    chats = write_lines(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello."}]}])
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), chats)
    assert code == 0 and template_sidecar(out).is_file(), stderr
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "base-model")
    assert AutoTokenizer.from_pretrained(tmp_path / "base-model").chat_template is None
    text = write_lines(tmp_path / "text.jsonl", [{"text": "Just a document."}])
    code, _, stderr, out = run_main(capsys, tmp_path, tmp_path / "base-model", text)
    assert code == 0 and not template_sidecar(out).exists(), stderr
    assert "labels" in orjson.loads(out.read_bytes().splitlines()[0])  # the text run's rows are there
    # Rows tokenized as plain text use no template even where the tokenizer has one: text rows and raw pairs save
    # none (their exports keep the model's own), pairs through the chat template save it.
    pairs = write_lines(tmp_path / "pairs.jsonl", [{"source": "Hi", "target": "Hello."}])
    pretrain = write_lines(tmp_path / "pretrain.jsonl", [{"messages": [{"role": "pretrain", "content": "A page."}]}])
    for data, flags, saved in ((chats, (), True), (text, (), False), (pairs, ("--pair-rendering", "raw"), False),
                               (pairs, (), True), (pretrain, (), False)):  # a messages file of pretrain rows only
        code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
        assert code == 0 and template_sidecar(out).exists() == saved, (data, flags, stderr)


def test_printed_raw_pair_shows_its_mask(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"source": "Capital of France?", "target": "Paris."}])
    code, stdout, stderr, _ = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--pair-rendering", "raw", "--mask-marker", "@@")
    assert code == 0, stderr
    assert "\nCapital of France?<|im_end|>@@Paris.<|im_end|>@@\n" in stdout  # the whole text, trained between markers
    assert "raw: source + '<|im_end|>' + target + '<|im_end|>', target trained" in stdout


def error_of(capsys, tmp_path, tokenizer_dir, data, *flags) -> str:
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    return stderr


@pytest.mark.parametrize("rows, line, found", [
    ([{"prompt": "q", "completion": "a"}, b"", {"messages": [{"role": "user", "content": "x"}]}], 3, "messages"),
    ([{"text": "doc"}, {"text": "q", "target": "a"}], 2, "pairs (text/target)"),
    ([{"messages": [{"role": "user", "content": "x"}]}, {"source": "q", "target": "a"}], 2, "pairs (source/target)"),
])
def test_mixed_formats_stop_at_the_first_offending_line(capsys, tmp_path, tokenizer_dir, rows, line, found):
    data = write_lines(tmp_path / "in.jsonl", rows)
    stderr = error_of(capsys, tmp_path, tokenizer_dir, data)
    assert stderr.startswith(f"process_data.py: error: {data}:{line}: the row is {found} but the file is ")
    assert "(from line 1)" in stderr and "one format per file" in stderr


def test_forced_format(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"text": "Just the text.", "target": "ignored"}])
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, "--input-format", "text")
    assert code == 0, stderr
    assert "text (text) (forced by --input-format)" in stdout
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    assert json.loads(out.read_text())["input_ids"] == tok("Just the text.")["input_ids"] + [tok.eos_token_id]
    # forced, a row without the format's column is an error naming it, not a different format
    data = write_lines(tmp_path / "in.jsonl", [{"text": "a"}, {"body": "b"}])
    out.unlink()
    stderr = error_of(capsys, tmp_path, tokenizer_dir, data, "--input-format", "text")
    assert f"{data}:2: no `text` field" in stderr


def test_pair_flags_on_rows_that_are_not_pairs_are_one_line(capsys, tmp_path, tokenizer_dir):
    """--train-source, --pair-rendering and --separator change pair rows only: on messages or text rows they would
    write the same rows as without them, so they are refused, as is --separator without raw rendering; so are the
    column flags on rows they do not name, and the chat-template flags where no template renders."""
    messages = write_lines(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a"}]}])
    text = write_lines(tmp_path / "t.jsonl", [{"text": "Just the text."}])
    pairs = write_lines(tmp_path / "p.jsonl", [{"source": "q", "target": "a"}])
    for data, flags, message in (
        (messages, ("--train-source", "--pair-rendering", "raw", "--separator", "ZZ"),
         f"{messages}:1: --pair-rendering, --separator, --train-source apply to pair rows and this file's rows are "
         f"messages; drop them"),
        (text, ("--train-source",), f"{text}:1: --train-source applies to pair rows and this file's rows are text; "
                                    f"drop it"),
        (pairs, ("--separator", "ZZ"), "--separator goes between source and target of raw pairs; add "
                                       "--pair-rendering raw or drop --separator"),
        # the column flags name columns of pair and text rows; a chat template renders neither text nor raw pairs
        (messages, ("--source-column", "q", "--target-column", "a"), f"{messages}:1: --source-column, "
         f"--target-column apply to pair rows and this file's rows are messages; drop them"),
        (messages, ("--text-column", "body"), f"{messages}:1: --text-column applies to text rows and this file's "
                                              f"rows are messages; drop it"),
        (text, ("--chat-template-name", "tool_use"), f"{text}:1: --chat-template-name applies to chat-rendered rows "
                                                     f"and this file's rows are text; drop it"),
        (pairs, ("--pair-rendering", "raw", "--chat-template-name", "x"), f"{pairs}:1: --chat-template-name applies "
         f"to chat-rendered rows and this file's rows are pairs, rendered raw; drop it"),
    ):
        stderr = error_of(capsys, tmp_path, tokenizer_dir, data, *flags)
        assert stderr == f"process_data.py: error: {message}\n", stderr
    code, _, stderr, _ = run_main(capsys, tmp_path, tokenizer_dir("chatml"), pairs, "--pair-rendering", "raw",
                                  "--separator", "ZZ", "--train-source")
    assert code == 0, stderr


def test_named_columns(capsys, tmp_path, tokenizer_dir):
    data = write_lines(tmp_path / "in.jsonl", [{"question": "Capital of France?", "answer": "Paris.", "text": "x"}])
    flags = ("--source-column", "question", "--target-column", "answer", "--pair-rendering", "raw")
    code, stdout, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
    assert code == 0, stderr
    assert "pairs (question/answer)" in stdout
    tok = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    assert json.loads(out.read_text())["input_ids"] == tok("Capital of France?<|im_end|>Paris.<|im_end|>")["input_ids"]


@pytest.mark.parametrize("name, content, line, reason", [
    ("a.jsonl", b'{"id": 1}\n', 1, "which fit no format"),
    ("b.jsonl", b'{"source": "q", "target": "a"}\n{"source": "q", "target": 3}\n', 2, "`target` must be a string, got int"),
    ("c.csv", b'prompt,completion\n"two\nlines",a\nq,a,extra\n', 4, "3 fields but the header (line 1) has 2"),
    ("d.csv", b'prompt,completion\nq,a\n"unterminated,a\n', 3, "malformed CSV"),
    ("e.csv", b'prompt,completion\nq,\xff\n', 2, "invalid UTF-8"),
    ("f.csv", b'messages\n"[]"\n', 1, "a CSV cell cannot hold a messages list"),
])
def test_bad_files_name_file_and_line(capsys, tmp_path, tokenizer_dir, name, content, line, reason):
    data = tmp_path / name
    data.write_bytes(content)
    stderr = error_of(capsys, tmp_path, tokenizer_dir, data)
    assert stderr.startswith(f"process_data.py: error: {data}:{line}: ") and reason in stderr


def test_parquet_null_names_its_row_and_missing_pyarrow_is_one_line(capsys, tmp_path, tokenizer_dir, monkeypatch):
    data = write_parquet(tmp_path / "in.parquet", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": None}])
    stderr = error_of(capsys, tmp_path, tokenizer_dir, data)
    assert f"{data}:2: `completion` must be a string, got null" in stderr
    # A NaN or infinite margin (JSON has no form for it) was written as no margin; in JSONL or CSV it stops the run
    for bad in (float("nan"), float("inf")):
        pairs = write_parquet(tmp_path / "pairs.parquet", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                             "margin": bad}])
        stderr = error_of(capsys, tmp_path, tokenizer_dir, pairs)
        assert f"{pairs}:1: `margin` must be a finite number, got '{bad}'" in stderr, stderr
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    stderr = error_of(capsys, tmp_path, tokenizer_dir, data)
    assert f"{data}: reading Parquet needs pyarrow; pip install pyarrow" in stderr


def test_parquet_with_two_workers_keeps_order(capsys, tmp_path, tokenizer_dir):
    rows = [{"prompt": f"question {n}", "completion": f"answer {n}"} for n in range(700)]
    parquet = write_parquet(tmp_path / "in.parquet", rows)
    jsonl = write_lines(tmp_path / "in.jsonl", rows)
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), parquet, "--num-workers", "2", "--pair-rendering", "raw")
    assert code == 0, stderr
    parallel = out.read_bytes()
    code, _, stderr, out = run_main(capsys, tmp_path, tokenizer_dir("chatml"), jsonl, "--pair-rendering", "raw")
    assert code == 0, stderr
    assert parallel == out.read_bytes()


def test_integers_beyond_64_bits_stay_exact_as_the_chat_template_sees_them():
    """orjson reads an integer beyond 64 bits as a float: a tool call's argument would render 1.2345678901234568e+29
    where apply_chat_template on json.loads renders the integer."""
    import json

    raw = b'{"a": 123456789012345678901234567890, "b": -9223372036854775809, "c": 18446744073709551616, "d": 0.5}'
    assert formats.load_row(raw, "f:1") == json.loads(raw)
    assert isinstance(formats.load_row(raw, "f:1")["a"], int)
    with pytest.raises(formats.RunError, match="f:2: malformed JSON"):
        formats.load_row(b'{"a": 12345678901234567890123, "b": NaN}', "f:2")  # not JSON, as orjson says


def test_a_byte_order_mark_is_no_part_of_the_json():
    raw = b'{"messages": [{"role": "user", "content": "hi"}]}'
    assert formats.load_row(b"\xef\xbb\xbf" + raw, "f:1") == formats.load_row(raw, "f:1")
