"""process_data.py with encoder-decoder models (minitrain/prepare/seq2seq_rows.py): pair rows become seq2seq rows whose ids are the
tokenizer's own encodings, over-long sides are dropped, an error or truncated (counted), and what needs a causal LM
is refused in one line.

The tiny T5 and BART carry the offline chatml tokenizer, which adds no special tokens; the `specials` variant gives it
the post-processor of the real ones (T5: text </s>, BART: <s> text </s>, with chatml's BOS and EOS), so both the
appended EOS and the tokenizer's own are tested.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import process_data
from minitrain.prepare import pipeline, seq2seq_rows
from minitrain.prepare.encode import DROP_EMPTY_TARGET
from minitrain.prepare.seq2seq_rows import (
    DROP_EMPTY_SOURCE,
    DROP_SOURCE_TOO_LONG,
    DROP_TARGET_TOO_LONG,
)
from tests.test_process_data import CONVERSATIONS, write_lines
from tests.tiny_models import build_tiny_seq2seq

SCHEMA = {"input_ids", "labels", "len", "target_len", "num_loss_counted_tokens"}
VARIANTS = [("t5", False), ("bart", False), ("t5", True), ("bart", True)]
PAIRS = [
    {"source": "The cat sat on the mat all day long.", "target": "A cat sat."},
    {"source": "  Größe? Café 🙂 naïve, 日本語\n ", "target": " ok\n"},
    {"source": "", "target": "Nothing to read."},
]


@pytest.fixture(scope="session")
def seq2seq_dir(tmp_path_factory, tokenizer_dir):
    """Factory: seq2seq_dir("t5" | "bart", specials) -> a tiny encoder-decoder model folder (built once)."""
    root = tmp_path_factory.mktemp("seq2seq")
    built: dict[tuple[str, bool], Path] = {}

    def get(arch: str, specials: bool = False) -> Path:
        if (arch, specials) not in built:
            if not specials:
                built[arch, specials] = build_tiny_seq2seq(arch, root / "plain", tokenizer_dir("chatml"))
            else:
                path = root / "specials" / arch
                shutil.copytree(get(arch), path)
                tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
                bos, eos = "<|im_start|>", "<|im_end|>"
                single = f"{bos} $A {eos}" if arch == "bart" else f"$A {eos}"
                used = [(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t in single]
                tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=used)
                tokenizer.save(str(path / "tokenizer.json"))
                built[arch, specials] = path
        return built[arch, specials]

    return get


def run(capsys, tmp_path, model, input_file, *flags) -> tuple[int, str, str, Path]:
    """process_data.main in-process, without --max-sample-num-tokens unless given: exit code, stdout, stderr, output."""
    out = tmp_path / "out.jsonl"
    argv = ["--input-file", str(input_file), "--output-file", str(out), "--model-name-or-path", str(model),
            "--num-workers", "1", "--mask-marker", "[[ ]]", *flags]
    code = 0
    try:
        process_data.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def want_target(tok, target: str) -> list[int]:
    ids = tok(text_target=target)["input_ids"]
    return ids if ids[-1:] == [tok.eos_token_id] else [*ids, tok.eos_token_id]


def one_line_error(code: int, stderr: str) -> str:
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("process_data.py: error: ")
    return stderr


@pytest.mark.parametrize("arch,specials", VARIANTS)
def test_rows_are_the_tokenizers_own_encodings(capsys, tmp_path, seq2seq_dir, arch, specials):
    model = seq2seq_dir(arch, specials)
    data = write_lines(tmp_path / "in.jsonl", PAIRS)
    prefix = "summarize: "
    code, stdout, stderr, out = run(capsys, tmp_path, model, data, "--max-sample-num-tokens", "512",
                                    "--source-prefix", prefix, "--num-printed-samples", "3")
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(model)
    assert (tok("x")["input_ids"][-1] == tok.eos_token_id) == specials  # the variant does what it says
    written = rows(out)
    assert len(written) == len(PAIRS)
    for row, pair in zip(written, PAIRS):
        assert set(row) == SCHEMA
        assert row["input_ids"] == tok(prefix + pair["source"])["input_ids"]
        assert row["labels"] == want_target(tok, pair["target"])
        assert row["labels"][-1] == tok.eos_token_id and row["labels"].count(tok.eos_token_id) == 1
        assert row["len"] == len(row["input_ids"]) and row["target_len"] == len(row["labels"])
        assert row["num_loss_counted_tokens"] == row["target_len"]
    # every printed sample shows its source plain and its whole target marked trained
    target = tok.decode(written[0]["labels"])
    assert f"source: {tok.decode(written[0]['input_ids'])}\ntarget: [[{target}]]\n" in stdout
    assert f"({written[0]['len']} source tokens, {written[0]['target_len']} target tokens trained)" in stdout
    assert f"encoder-decoder ({arch})" in stdout
    assert not pipeline.template_sidecar(out).exists()  # no chat template: no sidecar
    # the model's own forward takes a written row (its ids are in the vocabulary)
    net = AutoModelForSeq2SeqLM.from_pretrained(model)
    loss = net(input_ids=torch.tensor([written[0]["input_ids"]]), labels=torch.tensor([written[0]["labels"]])).loss
    assert torch.isfinite(loss)


def test_encoder_decoder_detection(seq2seq_dir, tokenizer_dir, tiny_model_dir):
    assert seq2seq_rows.encoder_decoder_type(str(seq2seq_dir("t5"))) == "t5"
    assert seq2seq_rows.encoder_decoder_type(str(seq2seq_dir("bart"))) == "bart"
    assert seq2seq_rows.encoder_decoder_type(str(tokenizer_dir("chatml"))) is None  # no config.json
    assert seq2seq_rows.encoder_decoder_type(str(tiny_model_dir("llama"))) is None  # a causal LM


LONG = [
    {"source": "short", "target": "fine"},
    {"source": "word " * 40, "target": "fine"},
    {"source": "short", "target": "word " * 40},
    {"source": "word " * 40, "target": "word " * 40},
]


@pytest.mark.parametrize("arch,specials", [("t5", False), ("bart", True)])
def test_too_long_drop_counts_each_side(capsys, tmp_path, seq2seq_dir, arch, specials):
    data = write_lines(tmp_path / "in.jsonl", LONG)
    code, stdout, stderr, out = run(capsys, tmp_path, seq2seq_dir(arch, specials), data,
                                    "--max-source-tokens", "8", "--max-target-tokens", "6")
    assert code == 0, stderr
    assert len(rows(out)) == 1
    assert f"dropped {data}:2: {DROP_SOURCE_TOO_LONG}: " in stdout and " > 8 tokens" in stdout
    assert f"dropped {data}:3: {DROP_TARGET_TOO_LONG}: " in stdout and " > 6 tokens" in stdout
    assert f"dropped {data}:4: {DROP_SOURCE_TOO_LONG}: " in stdout
    assert f"2  {DROP_SOURCE_TOO_LONG}" in stdout and f"1  {DROP_TARGET_TOO_LONG}" in stdout
    assert "truncated:" not in stdout


def test_too_long_error_stops_at_the_line(capsys, tmp_path, seq2seq_dir):
    data = write_lines(tmp_path / "in.jsonl", LONG[:1] + LONG[2:3])
    code, _, stderr, out = run(capsys, tmp_path, seq2seq_dir("t5"), data, "--max-sample-num-tokens", "6",
                               "--on-too-long", "error")
    stderr = one_line_error(code, stderr)
    assert f"{data}:2: the target has " in stderr and "> --max-target-tokens 6" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temp file


@pytest.mark.parametrize("arch,specials", VARIANTS)
def test_too_long_truncate_cuts_to_the_limits_and_counts(capsys, tmp_path, seq2seq_dir, arch, specials):
    model = seq2seq_dir(arch, specials)
    data = write_lines(tmp_path / "in.jsonl", LONG)
    report = tmp_path / "masks.html"
    code, stdout, stderr, out = run(capsys, tmp_path, model, data, "--max-source-tokens", "8",
                                    "--max-target-tokens", "6", "--on-too-long", "truncate", "--report", str(report))
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(model)
    written = rows(out)
    assert [r["len"] for r in written] == [len(tok("short")["input_ids"]), 8, len(tok("short")["input_ids"]), 8]
    assert [r["target_len"] for r in written] == [len(want_target(tok, "fine")), len(want_target(tok, "fine")), 6, 6]
    for row, pair in zip(written, LONG):
        assert row["labels"][-1] == tok.eos_token_id and row["labels"].count(tok.eos_token_id) == 1
        if row["len"] == 8:  # cut as the tokenizer's own truncation cuts (its final special token kept)
            assert row["input_ids"] == tok(pair["source"], truncation=True, max_length=8)["input_ids"]
        if row["target_len"] == 6:
            assert row["labels"][:-1] == want_target(tok, pair["target"])[:5]
    line = "truncated: 2 sources to --max-source-tokens 8, 2 targets to --max-target-tokens 6"
    assert line in stdout and "dropped 0 samples" in stdout
    page = report.read_text()
    assert "Truncated samples" in page and line in page
    assert f"{data}:1 source" in page and f"{data}:1 target" in page


def test_limits_default_to_max_sample_num_tokens_and_are_required(capsys, tmp_path, seq2seq_dir):
    data = write_lines(tmp_path / "in.jsonl", LONG[:3])
    code, stdout, stderr, out = run(capsys, tmp_path, seq2seq_dir("t5"), data, "--max-sample-num-tokens", "8",
                                    "--max-target-tokens", "1000")
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(seq2seq_dir("t5"))
    want = [len(want_target(tok, LONG[n]["target"])) for n in (0, 2)]
    assert [r["target_len"] for r in rows(out)] == want and want[1] > 8  # the target limit given, the source's 8
    assert f"1  {DROP_SOURCE_TOO_LONG}" in stdout
    for flags in ((), ("--max-source-tokens", "8")):
        code, _, stderr, _ = run(capsys, tmp_path, seq2seq_dir("t5"), data, *flags)
        stderr = one_line_error(code, stderr)
        assert "needs --max-source-tokens and --max-target-tokens (or --max-sample-num-tokens" in stderr


REFUSED_ROWS = {
    "messages": {"messages": CONVERSATIONS["single"]},
    "text": {"text": "Just text."},
    "preference": {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
}


@pytest.mark.parametrize("kind", list(REFUSED_ROWS))
def test_rows_that_need_a_causal_lm_are_refused(capsys, tmp_path, seq2seq_dir, kind):
    data = write_lines(tmp_path / "in.jsonl", [b"", REFUSED_ROWS[kind]])
    code, _, stderr, out = run(capsys, tmp_path, seq2seq_dir("t5"), data, "--max-sample-num-tokens", "64")
    stderr = one_line_error(code, stderr)
    assert f"{data}:2: {kind} rows need a causal LM; an encoder-decoder model (t5) trains on source/target" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_empty_target_and_empty_encoder_input_are_counted_drops(capsys, tmp_path, seq2seq_dir):
    lines = [{"source": "a", "target": ""}, {"source": "b", "target": "c"}, {"source": "", "target": "d"}]
    data = write_lines(tmp_path / "in.jsonl", lines)
    code, stdout, stderr, out = run(capsys, tmp_path, seq2seq_dir("bart"), data, "--max-sample-num-tokens", "64")
    assert code == 0, stderr
    assert f"dropped {data}:1: {DROP_EMPTY_TARGET}" in stdout and len(rows(out)) == 1
    # the plain tokenizer adds no special token: an empty source is no encoder input at all
    assert f"dropped {data}:3: {DROP_EMPTY_SOURCE}" in stdout


@pytest.mark.parametrize("flags", [("--pair-rendering", "raw"), ("--pair-rendering", "chat"), ("--train-source",),
                                   ("--separator", "###"), ("--chat-template", "t.jinja"),
                                   ("--chat-template-name", "default")])
def test_causal_only_flags_are_refused_for_encoder_decoder_models(capsys, tmp_path, seq2seq_dir, flags):
    data = write_lines(tmp_path / "in.jsonl", PAIRS)
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    flags = tuple(str(tmp_path / f) if f.endswith(".jinja") else f for f in flags)
    code, _, stderr, out = run(capsys, tmp_path, seq2seq_dir("t5"), data, "--max-sample-num-tokens", "64", *flags)
    assert f"{flags[0]} means nothing for an encoder-decoder model (t5)" in one_line_error(code, stderr)
    assert not out.exists()


@pytest.mark.parametrize("flags,want", [
    (("--max-sample-num-tokens", "64", "--on-too-long", "truncate"), "--on-too-long truncate is for encoder-decoder"),
    (("--max-source-tokens", "64"), "--max-source-tokens is for encoder-decoder models"),
    (("--max-sample-num-tokens", "64", "--source-prefix", "x: "), "--source-prefix is for encoder-decoder models"),
    ((), "a causal LM needs --max-sample-num-tokens"),
])
def test_seq2seq_flags_are_refused_for_causal_models(capsys, tmp_path, tokenizer_dir, flags, want):
    data = write_lines(tmp_path / "in.jsonl", PAIRS)
    code, _, stderr, out = run(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
    assert want in one_line_error(code, stderr) and not out.exists()


def test_workers_give_the_same_rows_in_order(capsys, tmp_path, seq2seq_dir):
    model = seq2seq_dir("bart", True)
    pairs = [{"source": f"question {n} " + "x" * (n % 9), "target": f"answer {n}"} for n in range(300)]
    data = write_lines(tmp_path / "in.jsonl", pairs)
    code, _, stderr, out = run(capsys, tmp_path, model, data, "--max-sample-num-tokens", "64")
    assert code == 0, stderr
    one = out.read_bytes()
    code, stdout, stderr, out = run(capsys, tmp_path, model, data, "--max-sample-num-tokens", "64",
                                    "--num-workers", "2")
    assert code == 0, stderr
    assert out.read_bytes() == one and "encoder-decoder (bart)" in stdout
    code, _, stderr, _ = run(capsys, tmp_path, model, data, "--max-sample-num-tokens", "64", "--num-workers", "2",
                             "--train-source")
    assert "--train-source means nothing" in one_line_error(code, stderr)
