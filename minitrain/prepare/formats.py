"""Stage 1 input: which format a file's rows have, and reading JSONL, CSV and Parquet files as JSON rows.

Formats, detected from the keys (JSONL) or columns (CSV header, Parquet schema) of a file's first row, or forced
with --input-format. When a row fits several, the first below wins (the detected format is printed):

    unpaired   {"prompt", "completion", "label"},            one completion, desirable (label true) or not (KTO;
               {"messages", "label"}                         see minitrain/prepare/unpaired.py)
    messages   {"messages": [...], ...}                      conversations through the chat template
    preference {"chosen", "rejected"}, {"prompt", "chosen",  a chosen and a rejected reply (DPO, SimPO; see
               "rejected"}                                   minitrain/prepare/preference.py)
    pairs      {"source", "target"}, {"text", "target"},     one prompt and its answer; the pair columns are tried
               {"prompt", "completion"}                      in this order, or named by --source/--target-column
    text       {"text"}                                      raw text, every token trained (--text-column)

Every row of a file must have the file's format: a row that is detected as another one stops the run naming its
line. Every reader yields chunks of (row number, the row as a JSON object in bytes), so CSV and Parquet rows pass
through exactly the code JSONL lines do and give byte-identical output. Row numbers are 1-based file lines for
JSONL and CSV (the line where a CSV record starts) and 1-based row indices for Parquet.
"""

import csv
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

KINDS = ("messages", "preference", "unpaired", "pairs", "text")
DEFAULT_PAIRS = (("source", "target"), ("text", "target"), ("prompt", "completion"))


class RunError(Exception):
    """Stops the run: printed as one line, exit code 2, no output file."""


@dataclass(frozen=True)
class Format:
    kind: str  # one of KINDS
    source: str = ""  # pairs: the prompt column
    target: str = ""  # pairs: the answer column
    text: str = ""  # text: the text column

    def describe(self) -> str:
        if self.kind == "pairs":
            return f"pairs ({self.source}/{self.target})"
        return f"text ({self.text})" if self.kind == "text" else self.kind


@dataclass(frozen=True)
class Columns:
    """Where to look for each format: the pair columns in order of preference, and the text column."""

    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    text: str = "text"


@dataclass(frozen=True)
class InputSpec:
    """How the rows of one file become samples: the file's format and how pairs are rendered."""

    fmt: Format = Format("messages")
    columns: Columns = Columns()
    forced: bool = False  # --input-format named the format: rows are not checked for other formats
    origin: str = ""  # where the format was detected, for the mixed-format error
    rendering: str = "chat"  # pairs: "chat" (one user and one assistant turn) or "raw"
    separator: str | None = None  # raw pairs: between source and target; None: the tokenizer's EOS
    train_source: bool = False  # pairs: train the source too
    chat_template: str | None = None  # --chat-template: the Jinja text that replaces the tokenizer's own
    chat_template_name: str | None = None  # --chat-template-name: which of the tokenizer's templates
    first_line: int = 0  # the first non-blank row's number (0: none)


def detect(keys: Iterable[str], columns: Columns) -> Format | None:
    """The format a row with these keys has, or None when it fits none."""
    keys = set(keys)
    if "label" in keys and ("messages" in keys or {"prompt", "completion"} <= keys):
        return Format("unpaired")
    if "messages" in keys:
        return Format("messages")
    if {"chosen", "rejected"} <= keys:
        return Format("preference")
    for source, target in columns.pairs:
        if source in keys and target in keys:
            return Format("pairs", source=source, target=target)
    if columns.text in keys:
        return Format("text", text=columns.text)
    return None


def forced(kind: str, keys: Iterable[str], columns: Columns) -> Format:
    """The format named by --input-format; for pairs, the first candidate columns the first row has."""
    if kind == "pairs":
        keys = set(keys)
        source, target = next(((s, t) for s, t in columns.pairs if s in keys and t in keys), columns.pairs[0])
        return Format("pairs", source=source, target=target)
    if kind in ("preference", "unpaired"):
        return Format(kind)
    return Format("text", text=columns.text) if kind == "text" else Format("messages")


def expected_keys(columns: Columns) -> str:
    pairs = ", ".join(f"{s}/{t}" for s, t in columns.pairs)
    return (f"`messages`, `chosen`/`rejected`, a `label` with `prompt`/`completion` or `messages`, a pair ({pairs}) "
            f"or `{columns.text}`")


# ---- one row (worker side) ----


_LONG_NUMBER = re.compile(rb"\d{19}")  # 19+ digits: a number orjson may not hold as an integer


def _refuse(constant: str):
    raise ValueError(constant)


def dump_row(value, sort_keys: bool = False) -> bytes:
    """orjson's JSON bytes of a row's value; one with a whole number beyond 64 bits (load_row keeps it exact, an id
    say, which orjson cannot write) through Python's json."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:
        return json.dumps(value, sort_keys=sort_keys, ensure_ascii=False).encode()


def load_row(raw: bytes, where: str) -> object | None:
    """The JSON value on this line, None for a blank line."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Excel, Notepad) is no part of the JSON
        raw = raw[3:]
    if not raw.strip():
        return None
    if _LONG_NUMBER.search(raw):  # orjson makes an integer beyond 64 bits a float; Python's json keeps it exact
        try:
            return not_null(json.loads(raw, parse_constant=_refuse), where)  # NaN, Infinity: not JSON (orjson's view)
        except (ValueError, RecursionError):
            pass  # orjson's own message below says what is wrong
    try:
        return not_null(orjson.loads(raw), where)  # orjson refuses invalid UTF-8 too: the decode below says where
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            raise RunError(f"{where}: invalid UTF-8 at byte {u.start}; re-encode the file as UTF-8") from None
        raise RunError(f"{where}: malformed JSON ({e}); each line must be one JSON object") from None


def not_null(row: object, where: str) -> object:
    """A row that is JSON's null is no blank line (None means one): it stops the run as other non-objects do."""
    if row is None:
        raise RunError(f"{where}: the row is null, not a JSON object; each line must be one JSON object (or blank)")
    return row


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    kinds = ((bool, "true/false"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def check_format(row: object, where: str, spec: "InputSpec") -> None:
    """Stop on a row detected as another format than the file's.

    A row that fits no format at all passes: the format's own checks then name what it lacks.
    """
    if spec.forced or not isinstance(row, dict):
        return
    found = detect(row, spec.columns)
    if spec.fmt.kind == "unpaired" and "label" not in row:
        return  # the labelled rows' own check says that the label is missing (unpaired.row_label)
    if found is not None and found != spec.fmt:
        raise RunError(
            f"{where}: the row is {found.describe()} but the file is {spec.fmt.describe()} (from {spec.origin}); "
            "one format per file: split the file, or force one with --input-format"
        )


def string_field(row: object, key: str, where: str, fmt: Format) -> str:
    if not isinstance(row, dict) or key not in row:
        raise RunError(f"{where}: no `{key}` field; every row of this file must be {fmt.describe()}")
    value = row[key]
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise RunError(f"{where}: `{key}` must be a string, got {got}; fix or remove the row")
    return value


# ---- reading files (main process): chunks of (row number, JSON bytes) ----


def input_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


def chunked(rows: Iterator[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def jsonl_rows(path: Path, progress) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            progress.update(len(raw))
            yield lineno, raw


def first_keys(path: Path, kind: str) -> tuple[int, list[str]] | None:
    """(row number, keys) of the first non-blank row, which the format is detected from; None if there is none."""
    if kind == "parquet":
        parquet = _parquet_file(path)
        return (1, parquet.schema_arrow.names) if parquet.metadata.num_rows else None
    if kind == "csv":
        return next(((n, r) for n, r in _csv_records(path, _NoProgress()) if r), None)
    for lineno, raw in jsonl_rows(path, _NoProgress()):
        row = load_row(raw, f"{path}:{lineno}")
        if row is not None and not isinstance(row, dict):
            raise RunError(f"{path}:{lineno}: the row is a JSON {json_kind(row)}, not an object; each line must be "
                           f"one JSON object")
        if row is not None:
            return lineno, list(row)
    return None


class _NoProgress:
    def update(self, n: float) -> None:
        pass


def _decoded_lines(path: Path, progress, line_number: list[int]) -> Iterator[str]:
    """The file's lines as text for the csv module; line_number[0] is the line last read."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line_number[0] = lineno
            progress.update(len(raw))
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # the byte-order mark spreadsheet programs write
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RunError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line; re-encode the file as UTF-8") from None


def _csv_records(path: Path, progress) -> Iterator[tuple[int, list[str]]]:
    """CSV records, each with the line where it starts (a quoted field may span lines); [] for a blank line."""
    csv.field_size_limit(sys.maxsize)  # the default 128 KiB per field would reject long documents
    line_number = [0]
    reader = csv.reader(_decoded_lines(path, progress, line_number), strict=True)
    while True:
        start = line_number[0] + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise RunError(f"{path}:{start}: malformed CSV ({e}); quote fields that hold commas, quotes or newlines") from None
        yield start, record


def csv_rows(path: Path, progress) -> Iterator[tuple[int, bytes]]:
    """CSV records as JSON objects keyed by the header (every value a string: CSV has no other type)."""
    header: list[str] | None = None
    header_line = 0
    for lineno, record in _csv_records(path, progress):
        if header is None:
            if record:
                header, header_line = record, lineno
                if len(set(header)) != len(header):
                    raise RunError(f"{path}:{lineno}: the header names a column twice; give every column its own name")
            continue
        if not record:
            yield lineno, b""  # a blank line, counted as blank
            continue
        if len(record) != len(header):
            raise RunError(
                f"{path}:{lineno}: {len(record)} fields but the header (line {header_line}) has {len(header)}; "
                "quote fields that hold commas"
            )
        yield lineno, orjson.dumps(dict(zip(header, record)))


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RunError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise RunError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def parquet_rows(path: Path, progress, columns: list[str] | None, batch_rows: int) -> Iterator[tuple[int, bytes]]:
    """Parquet rows as JSON objects, read in batches of rows so memory stays flat, numbered from 1."""
    parquet = _parquet_file(path)
    bytes_per_row = path.stat().st_size / max(parquet.metadata.num_rows, 1)  # progress is shown in file bytes
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        progress.update(batch.num_rows * bytes_per_row)
        for row in batch.to_pylist():
            number += 1
            for key, value in row.items():  # JSON has no NaN or infinity (orjson writes null: a margin was lost);
                if isinstance(value, float) and not math.isfinite(value):  # as text, a field that needs a number
                    row[key] = str(value)  # says so, as the same value in JSONL or CSV does
            try:
                yield number, orjson.dumps(row)
            except orjson.JSONEncodeError as e:
                raise RunError(f"{path}:{number}: a value has no JSON form ({e}); convert that column to text or numbers") from None


def rows_of(lines, input_name: str, spec, chunk):
    """(line number, raw bytes, "FILE:LINE", row) of each non-blank line of a worker's chunk, its format checked; blank lines
    are counted in `chunk.blank`."""
    for lineno, raw in lines:
        where = f"{input_name}:{lineno}"
        row = load_row(raw, where)
        if row is None:
            chunk.blank += 1
            continue
        check_format(row, where, spec)
        yield lineno, raw, where, row
