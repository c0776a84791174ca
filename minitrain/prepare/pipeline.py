"""Stage 1's pipeline (process_data.py is its command line): read the input in chunks, encode them in a pool of
workers (the encoder fits the file: encode.py's for causal LMs, minitrain/prepare/preference.py's for pairs, minitrain/prepare/seq2seq_rows.py's for
encoder-decoders), write the rows atomically in input order, count every drop, and print or report masked samples.
"""

import itertools
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from minitrain import IGNORE, atomic
from minitrain.prepare import formats, mask_report, preference, seq2seq_rows, unpaired
from minitrain.prepare.encode import Chunk, Encoder
from minitrain.prepare.formats import Columns, InputSpec, RunError

CHUNK_LINES = 256  # lines per task sent to a worker: big enough to batch-tokenize, small enough to stream
REPORTED_DROPS = 5  # dropped samples printed with their line number and reason
REPORT_SAMPLES = 20  # conversations shown in --report
REPORT_LINES = 20  # line numbers listed per drop reason in --report




def usable_cores() -> int:
    """The cores this process may run on (a job's CPU set, where the scheduler gives it one), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    input_file: Path
    output_file: Path
    model_name_or_path: str
    max_sample_num_tokens: int | None = None  # required for causal LMs
    num_workers: int = field(default_factory=usable_cores)
    num_printed_samples: int = 3
    mask_marker: str = "[[ ]]"
    chat_template: Path | None = None
    chat_template_name: str | None = None
    on_too_long: str = "drop"
    seed: int = 42
    input_format: str = "auto"
    pair_rendering: str | None = None  # None: chat (a given value is refused for encoder-decoder models)
    separator: str | None = None
    train_source: bool = False
    source_column: str | None = None
    target_column: str | None = None
    text_column: str = "text"
    report: Path | None = None  # the HTML mask report (minitrain/prepare/mask_report.py)
    config_file: Path | None = None  # --config, for check_paths (its values are in the other fields)
    max_source_tokens: int | None = None  # encoder-decoder models (minitrain/prepare/seq2seq_rows.py); default --max-sample-num-tokens
    max_target_tokens: int | None = None
    source_prefix: str = ""

    @property
    def kept_samples(self) -> int:
        """Samples kept for printing and for the report."""
        return max(self.num_printed_samples, REPORT_SAMPLES if self.report is not None else 0)

    def columns(self) -> Columns:
        pairs = ((self.source_column, self.target_column),) if self.source_column else formats.DEFAULT_PAIRS
        return Columns(pairs=pairs, text=self.text_column)

def make_encoder(model: str, input_name: str, max_tokens: int | None, on_too_long: str, spec: InputSpec,
                 seq2seq: seq2seq_rows.Settings = seq2seq_rows.Settings()):
    """The file's encoder: an encoder-decoder model's (minitrain/prepare/seq2seq_rows.py); for causal LMs, preference rows have
    their own (minitrain/prepare/preference.py), which runs an Encoder per side, and labelled KTO rows theirs
    (minitrain/prepare/unpaired.py)."""
    if model_type := seq2seq_rows.encoder_decoder_type(model):
        return seq2seq_rows.Seq2SeqEncoder(model, model_type, input_name, on_too_long, spec, seq2seq)
    kind = {"preference": preference.PreferenceEncoder, "unpaired": unpaired.UnpairedEncoder}.get(spec.fmt.kind,
                                                                                                  Encoder)
    return kind(model, input_name, max_tokens, on_too_long, spec)


_ENCODER: Encoder | None = None  # the worker process's encoder, built by init_worker
_INIT_ERROR: str | None = None  # or why it could not be built (a raising initializer makes Pool respawn forever)


_WITHOUT_TORCH = False  # the worker process loaded transformers with torch hidden
_MAY_NEED_TORCH = False  # its encoder failed, with torch hidden, naming torch


def init_worker(model: str, input_name: str, max_tokens: int | None, on_too_long: str, spec: InputSpec,
                seq2seq: seq2seq_rows.Settings, without_torch: bool = False) -> None:
    global _ENCODER, _INIT_ERROR, _MAY_NEED_TORCH
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    if without_torch and "torch" not in sys.modules:
        hide_torch()
    try:
        _ENCODER = make_encoder(model, input_name, max_tokens, on_too_long, spec, seq2seq)
    except RunError as e:
        _INIT_ERROR = str(e)
    except Exception as e:  # never raised: a raising initializer makes Pool start workers again forever
        message = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        _INIT_ERROR = f"{model}: cannot build the encoder ({message})"
        # without torch, a tokenizer's own code may need it: the pool is started again with it (EncoderInfo)
        _MAY_NEED_TORCH = _WITHOUT_TORCH and "torch" in message.lower()


def hide_torch() -> None:
    """Loads transformers in this worker as if torch were not installed: tokenizers and chat templates need no
    torch, and importing it (transformers' AutoTokenizer pulls it in through the model config) is about half of a
    worker's start-up, ~2.4 CPU-s with torch 2.13, on the cores that encode. A worker that fails and names torch
    says so (EncoderInfo.retry_with_torch) and run() starts the pool again with torch."""
    global _WITHOUT_TORCH
    sys.modules["torch"] = None  # importlib.util.find_spec("torch") is None, so transformers takes it as absent
    _WITHOUT_TORCH = True
    advice = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # its "PyTorch was not found" advice, only at import
    try:
        import transformers  # noqa: F401
    except Exception:  # the encoder's own import reports it
        pass
    finally:
        if advice is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advice


def encode_in_worker(lines: list[tuple[int, bytes]]) -> Chunk:
    return _ENCODER.encode_chunk(lines) if _ENCODER is not None else Chunk(error=_INIT_ERROR)


@dataclass(frozen=True)
class EncoderInfo:
    """What the main process needs of an encoder: with workers it loads no tokenizer of its own (start-up)."""

    error: str | None = None  # why the encoder could not be built
    template: str | None = None  # the chat template used, saved beside the rows
    separator: str | None = None  # raw pairs
    eos_text: str | None = None
    model_type: str | None = None  # an encoder-decoder model's (T5, BART, ...); None for a causal LM
    retry_with_torch: bool = False  # failed with torch hidden (hide_torch), in a way that may need torch


def encoder_info(encoder: Encoder | None = None) -> EncoderInfo:
    encoder = encoder if encoder is not None else _ENCODER
    if encoder is None:
        return EncoderInfo(error=_INIT_ERROR, retry_with_torch=_MAY_NEED_TORCH)
    return EncoderInfo(None, encoder.template, getattr(encoder, "separator", None), getattr(encoder, "eos_text", None),
                       getattr(encoder, "model_type", None))


def view_in_worker(args: tuple[list[int], list[int], str, bool]) -> str:
    return masked_view(_ENCODER.tokenizer, *args)


def report_spans_in_worker(args: tuple[list[int], list[int]]) -> str:
    return mask_report.token_spans(_ENCODER.tokenizer, *args)


# ---- the run (main process) ----


def input_spec(cfg: Config, kind: str) -> InputSpec:
    """The file's format, detected from its first row or forced by --input-format, with the pair and template options."""
    columns = cfg.columns()
    template = read_template(cfg.chat_template) if cfg.chat_template is not None else None
    first = formats.first_keys(cfg.input_file, kind)
    if first is None:  # only blank lines: nothing to detect, and nothing will be written
        return InputSpec(columns=columns, chat_template=template, chat_template_name=cfg.chat_template_name)
    lineno, keys = first
    if cfg.input_format != "auto":
        fmt, origin = formats.forced(cfg.input_format, keys, columns), "--input-format"
    else:
        fmt, origin = formats.detect(keys, columns), f"line {lineno}"
        if fmt is None:
            raise RunError(
                f"{cfg.input_file}:{lineno}: the first row has keys {keys}, which fit no format; give it "
                f"{formats.expected_keys(columns)}, or name the columns with --source-column/--target-column or --text-column"
            )
        if "label" in keys and fmt.kind in ("pairs", "text"):  # else every row trains, its undesirable replies too
            raise RunError(
                f"{cfg.input_file}:{lineno}: a `label` beside {fmt.describe()}: labelled (KTO) rows are "
                f"`prompt`/`completion` or `messages` with a `label`; rename the columns to those, or drop `label` to "
                f"train every row as a pair or text"
            )
    if kind == "csv" and fmt.kind == "messages":
        raise RunError(f"{cfg.input_file}:{lineno}: a CSV cell cannot hold a messages list; convert the file to JSONL or Parquet")
    return InputSpec(
        fmt=fmt,
        columns=columns,
        forced=cfg.input_format != "auto",
        origin=origin,
        rendering=cfg.pair_rendering or "chat",
        separator=cfg.separator,
        train_source=cfg.train_source,
        chat_template=template,
        chat_template_name=cfg.chat_template_name,
        first_line=lineno,
    )


def describe_input(kind: str, spec: InputSpec, encoder, source_prefix: str = "") -> str:
    """One line saying how rows are read, so a detected format is never a silent choice."""
    where = "forced by --input-format" if spec.forced else f"detected from {spec.origin}" if spec.origin else "no rows"
    out = f"{kind}, {spec.fmt.describe()} ({where})"
    if encoder.model_type:
        return out + (f", encoder-decoder ({encoder.model_type}): encoder input {source_prefix!r} + source, "
                      "decoder labels target + EOS, every target token trained")
    if spec.fmt.kind == "pairs":
        trained = "source and target trained" if spec.train_source else "target trained"
        if spec.rendering == "raw":
            out += f", raw: source + {encoder.separator!r} + target + {encoder.eos_text!r}, {trained}"
        else:
            out += f", chat template: one user and one assistant turn, {trained}"
    return out


def read_chunks(path: Path, kind: str, spec: InputSpec, progress) -> Iterator[list[tuple[int, bytes]]]:
    """The file's rows as (row number, JSON bytes), lazily in chunks."""
    if kind == "csv":
        rows = formats.csv_rows(path, progress)
    elif kind == "parquet":
        needed = {"pairs": [spec.fmt.source, spec.fmt.target], "text": [spec.fmt.text]}.get(spec.fmt.kind)
        rows = formats.parquet_rows(path, progress, needed, CHUNK_LINES)
    else:
        rows = formats.jsonl_rows(path, progress)
    return formats.chunked(rows, CHUNK_LINES)


@dataclass
class Summary:
    format: str = ""  # the file's format and where it came from, as printed
    read: int = 0
    blank: int = 0
    written: int = 0
    tokens: int = 0
    trained: int = 0
    drops: Counter = field(default_factory=Counter)
    first_drops: list[tuple[int, str, str]] = field(default_factory=list)
    shown: list[tuple[int, bytes]] = field(default_factory=list)  # reservoir of rows printed at the end
    tokenizer: object = None  # the main process's (single process only)
    views: list[tuple[str, str]] = field(default_factory=list)  # the printed samples: heading, whole text marked
    methods: Counter = field(default_factory=Counter)  # chat samples per masking method
    workers: int = 1  # the encoding processes the run used
    template_file: Path | None = None  # where the chat template used was saved
    drop_lines: dict[str, list[int]] = field(default_factory=dict)  # the first lines dropped for each reason
    lengths: list[int] = field(default_factory=list)  # every written sample's length (with --report only)
    report_file: Path | None = None
    truncated: Counter = field(default_factory=Counter)  # seq2seq: sources and targets cut to their limit


def read_template(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read the chat template ({type(e).__name__}: {e}); pass a UTF-8 Jinja file to --chat-template") from None
    if not text.strip():
        raise RunError(f"{path}:1: the chat template file is empty; pass a Jinja chat template")
    return text


def template_sidecar(output_file: Path) -> Path:
    """Where the chat template used is saved beside the output, for train.py to put into every export."""
    return output_file.with_name(output_file.name + ".chat_template.jinja")


def same_file(a: Path, b: Path) -> bool:
    """Whether writing `a` would overwrite `b`: the same path, or a link to the same file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(cfg: Config) -> None:
    """Refuse, before reading anything, paths that would lose data or fail late."""
    try:
        check_path_kinds(cfg)
    except OSError as e:  # a name too long for the file system, say
        raise RunError(f"{e.filename}: {e.strerror}; pass another path") from None


def check_path_kinds(cfg: Config) -> None:
    if cfg.input_file.is_dir():
        raise RunError(f"{cfg.input_file}: --input-file is a directory; name the data file in it")
    if cfg.input_file.exists() and not cfg.input_file.is_file():  # <(cat f), say: read more than once here
        raise RunError(f"{cfg.input_file}: --input-file is not a regular file (a pipe or device); write the data to "
                       f"a file and pass that")
    if not cfg.input_file.is_file():
        raise RunError(f"{cfg.input_file}: no such file; check --input-file")
    out = cfg.output_file
    if same_file(out, cfg.input_file):
        raise RunError(f"{out}: --output-file is the input file, which would be overwritten; write the rows to another file")
    read = {"--chat-template": cfg.chat_template, "--config": cfg.config_file}
    for flag, path in read.items():
        if path is not None and same_file(out, path):
            raise RunError(f"{out}: --output-file is the {flag} file, which would be overwritten; write the rows to "
                           f"another file")
    model = Path(cfg.model_name_or_path)
    # the rows, the chat template saved beside them and the report: none may replace a file of the model's folder
    for flag, given, written in (("--output-file", out, out), ("--output-file", out, template_sidecar(out)),
                                 ("--report", cfg.report, cfg.report)):
        if written is not None and model.is_dir() and written.exists() and same_file(written.parent, model):
            what = "rows" if flag == "--output-file" else "report"
            raise RunError(f"{given}: {flag} would overwrite {written.name} in the model's folder "
                           f"(--model-name-or-path); write the {what} to another folder"
                           + (", e.g. masks.html" if flag == "--report" else ""))
    if cfg.report is not None:
        written = {"--input-file": cfg.input_file, "--output-file": out, **read, "the saved chat template":
                   template_sidecar(out)}
        for flag, path in written.items():
            if path is not None and same_file(cfg.report, path):
                raise RunError(f"{cfg.report}: --report is {flag}, which would be overwritten; write the report to "
                               f"another file, e.g. masks.html")
        if cfg.report.is_dir():
            raise RunError(f"{cfg.report}: --report is a directory; name a file, e.g. {cfg.report / 'masks.html'}")
        if not cfg.report.parent.is_dir():
            raise RunError(f"{cfg.report.parent}: no such directory; create it or fix --report")
    if out.is_dir():
        raise RunError(f"{out}: --output-file is a directory; name a file, e.g. {out / 'rows.jsonl'}")
    if not out.parent.is_dir():
        raise RunError(f"{out.parent}: no such directory; create it or fix --output-file")
    sidecar = template_sidecar(out)
    if sidecar.is_dir():
        raise RunError(f"{sidecar}: a directory where the chat template is saved; remove it or choose another --output-file")
    # Each is written to a temporary file renamed into place: a device, pipe or link there would be replaced by a
    # file (--output-file /dev/null, run as root, replaced the device)
    for flag, path in (("--output-file", out), ("--report", cfg.report), ("the saved chat template", sidecar)):
        if path is not None and (path.is_symlink() or (path.exists() and not path.is_file())):
            kind = "a symbolic link" if path.is_symlink() else "not a regular file (a device, pipe or socket)"
            raise RunError(f"{path}: {flag} is {kind}, which the written file would replace; name a regular file")
    if cfg.input_file.stat().st_size == 0:
        raise RunError(f"{cfg.input_file}:1: the file is empty; pass a file with at least one row")


def run(cfg: Config) -> Summary:
    from tqdm import tqdm

    check_paths(cfg)
    if cfg.num_workers > (cores := usable_cores()):  # each worker is a process start-up; more than the cores is waste
        print(f"--num-workers {cfg.num_workers}: this process may run on {cores} cores; using {cores} workers")
        cfg = replace(cfg, num_workers=cores)
    kind = formats.input_type(cfg.input_file)
    spec = input_spec(cfg, kind)
    init_args = (cfg.model_name_or_path, str(cfg.input_file), cfg.max_sample_num_tokens, cfg.on_too_long, spec,
                 seq2seq_rows.limits(cfg))
    pool, encoder, info = start_encoders(cfg.num_workers, init_args)
    if problem := info.error or seq2seq_rows.flag_problem(cfg, spec, info.model_type):
        if pool is not None:
            pool.terminate()
        raise RunError(problem)

    summary = Summary(format=describe_input(kind, spec, info, cfg.source_prefix),
                      tokenizer=encoder.tokenizer if encoder else None, workers=cfg.num_workers)
    rng = random.Random(cfg.seed)
    progress = tqdm(total=cfg.input_file.stat().st_size, unit="B", unit_scale=True, disable=None, desc="encoding")
    tmp = tempfile.NamedTemporaryFile(dir=cfg.output_file.parent, prefix=f".{cfg.output_file.name}.", suffix=".tmp", delete=False)
    try:
        chunks = read_chunks(cfg.input_file, kind, spec, progress)
        if pool is None:
            results = map(encoder.encode_chunk, chunks)
        else:
            # Bound the chunks in flight: Pool.imap's feeder thread would otherwise read the whole file ahead.
            in_flight = threading.BoundedSemaphore(4 * cfg.num_workers)

            def bounded():
                for chunk in chunks:
                    in_flight.acquire()
                    yield chunk

            results = pool.imap(encode_in_worker, bounded())  # imap keeps the input order
        for chunk in results:
            if pool is not None:
                in_flight.release()
            if chunk.error:
                raise RunError(chunk.error)
            add_chunk(summary, chunk, tmp, cfg, rng)
        if summary.written == 0:
            first = summary.first_drops[0] if summary.first_drops else None
            why = f"e.g. line {first[0]}: {first[1]}: {first[2]}" if first else "only blank lines" if summary.blank \
                else "no rows after the header" if formats.input_type(cfg.input_file) == "csv" else "no rows"
            raise RunError(f"{cfg.input_file}: no sample can be written ({why}); fix the data or the model path")
        # text rows and raw pairs are tokenized as plain text: no template was used, so none is saved (docs/data.md)
        renders = spec.fmt.kind != "text" and not (spec.fmt.kind == "pairs" and spec.rendering == "raw")
        renders = renders and bool(summary.methods)  # a messages file of pretrain rows renders none
        place_rows(tmp, cfg, info.template if renders else None, summary)
        parts = show_samples(cfg, summary, pool, encoder)
        if cfg.report is not None:
            write_report(cfg, summary, parts, pool, encoder, kind, spec)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
        tmp.close()
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return summary


def start_encoders(num_workers: int, init_args: tuple):
    """(pool, encoder, what the encoder needs). With workers, the main process loads no tokenizer (that would be one
    more start-up on the same cores): a worker says what it needs (whether the model is encoder-decoder too), and a
    bad model path or flags that do not fit the model fail there, before anything is read or written."""
    if num_workers <= 1:
        encoder = make_encoder(*init_args)
        return None, encoder, encoder_info(encoder)
    pool = mp.get_context("spawn").Pool(num_workers, init_worker, (*init_args, True))
    info = pool.apply(encoder_info)
    if info.retry_with_torch:  # the tokenizer's code may need torch: again with it
        pool.terminate()
        pool = mp.get_context("spawn").Pool(num_workers, init_worker, init_args)
        info = pool.apply(encoder_info)
    return pool, None, info


def add_chunk(summary: Summary, chunk: Chunk, out, cfg: Config, rng: random.Random) -> None:
    """Count an encoded chunk's rows and drops, write its rows to `out`, and keep a fair sample of them to show."""
    summary.read += chunk.blank + len(chunk.rows) + len(chunk.drops)
    summary.blank += chunk.blank
    summary.tokens += chunk.tokens
    summary.trained += chunk.trained
    summary.methods.update(chunk.methods)
    summary.truncated.update(chunk.truncated)
    for drop in chunk.drops:
        summary.drops[drop[1]] += 1
        if len(summary.first_drops) < REPORTED_DROPS:
            summary.first_drops.append(drop)
        lines = summary.drop_lines.setdefault(drop[1], [])
        if len(lines) < REPORT_LINES:
            lines.append(drop[0])
    for lineno, line in chunk.rows:
        out.write(line)
        summary.written += 1
        if cfg.report is not None:
            summary.lengths.append(orjson.loads(line)["len"])
        # reservoir sampling: every written row is equally likely to be shown
        if len(summary.shown) < cfg.kept_samples:
            summary.shown.append((lineno, line))
        elif (j := rng.randrange(summary.written)) < cfg.kept_samples:
            summary.shown[j] = (lineno, line)


def place_rows(tmp, cfg: Config, template: str | None, summary: Summary) -> None:
    """The written rows from their temporary file to --output-file, durably, with the chat template beside them."""
    tmp.flush()
    os.fsync(tmp.fileno())  # on disk before the rename, so a power cut leaves the old file or the whole new one
    tmp.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # as any file the user writes (NamedTemporaryFile makes it private)
    # the template used goes beside the rows first, so rows never exist without the template they were made with
    sidecar = template_sidecar(cfg.output_file)
    if template:
        atomic.write_text(sidecar, template)
    elif sidecar.exists():  # no template used: a stale one from an earlier run must not be taken for this one's
        sidecar.unlink()
    os.replace(tmp.name, cfg.output_file)
    atomic.fsync_dir(cfg.output_file.parent)
    PLACED.append(cfg.output_file)  # an interrupt from here on leaves the rows complete (main says so)
    summary.template_file = sidecar if template else None


def show_samples(cfg: Config, summary: Summary, pool, encoder) -> list:
    """The kept samples' masked views (summary.views), decoded by the workers; returns each one's parts."""
    summary.shown.sort()
    colour = sys.stdout.isatty()
    shown = [orjson.loads(line) for _, line in summary.shown]
    parts = [row_parts(row) for row in shown]
    args = [(ids, labels, cfg.mask_marker, colour) for pieces in parts for _, ids, labels in pieces]
    views = iter(pool.map(view_in_worker, args) if pool is not None
                 else [masked_view(encoder.tokenizer, *a) for a in args])
    summary.views = [
        (f"--- {cfg.input_file}:{lineno} ({row_counts(row)})",
         "\n".join(f"{name}: " * bool(name) + next(views) for name, _, _ in pieces))
        for (lineno, _), row, pieces in zip(summary.shown, shown, parts)
    ]
    return parts


def row_parts(row: dict) -> list[tuple[str, list[int], list[int]]]:
    """What a printed or reported sample shows, as (name, ids, labels) per part: a preference pair's two sides, a
    seq2seq row's source (the encoder input, not trained) and target (the decoder labels, all trained), else the row."""
    if "chosen_input_ids" in row:
        return [(side, row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in preference.SIDES]
    if "target_len" in row:
        return [("source", row["input_ids"], [IGNORE] * row["len"]), ("target", row["labels"], row["labels"])]
    return [("", row["input_ids"], row["labels"])]


def row_counts(row: dict) -> str:
    if "target_len" in row:
        return f"{row['len']} source tokens, {row['target_len']} target tokens trained"
    label = "" if "label" not in row else ", desirable" if row["label"] else ", undesirable"  # KTO's rows
    return f"{row['len']} tokens, {row['num_loss_counted_tokens']} trained{label}"


class _NoProgress:
    def update(self, n) -> None:
        pass


def shown_messages(cfg: Config, summary: Summary, kind: str, spec: InputSpec) -> list[list[tuple[str, str]]]:
    """(role, content) of every message of the shown samples' input rows (one more pass over the input, for the
    report only); pairs and raw text have no roles."""
    wanted, found = {lineno for lineno, _ in summary.shown}, {}
    for chunk in read_chunks(cfg.input_file, kind, spec, _NoProgress()):
        for lineno, raw in chunk:
            if lineno in wanted:
                found[lineno] = raw
    messages = []
    for lineno, _ in summary.shown:
        row = orjson.loads(found[lineno]) if lineno in found else None
        turns = row.get("messages") or row.get("chosen") if isinstance(row, dict) else None
        turns = turns if isinstance(turns, list) else []
        messages.append([(str(m.get("role")), m["content"] if isinstance(m.get("content"), str) else "")
                         for m in turns if isinstance(m, dict)])
    return messages


def role_tokens_in_worker(messages: list[tuple[str, str]]) -> Counter:
    return role_tokens(_ENCODER.tokenizer, messages)


def role_tokens(tokenizer, messages: list[tuple[str, str]]) -> Counter:
    """Tokens of each role's message contents (as tokenized alone)."""
    counts = Counter()
    for role, content in messages:
        counts[role] += len(tokenizer(content, add_special_tokens=False)["input_ids"]) if content else 0
    return counts


def write_report(cfg: Config, summary: Summary, parts: list[list[tuple]], pool, encoder, kind: str,
                 spec: InputSpec) -> None:
    """--report: the HTML page of minitrain/prepare/mask_report.py, written atomically (the token texts come from a worker's
    tokenizer when the main process has none)."""
    conversations = shown_messages(cfg, summary, kind, spec)
    per_sample = (pool.map(role_tokens_in_worker, conversations) if pool is not None
                  else [role_tokens(encoder.tokenizer, m) for m in conversations])
    roles = sum(per_sample, Counter())
    args = [(ids, labels) for pieces in parts for _, ids, labels in pieces]
    spans = iter(pool.map(report_spans_in_worker, args) if pool is not None
                 else [mask_report.token_spans(encoder.tokenizer, *a) for a in args])
    samples = [(f"{cfg.input_file}:{lineno}" + (f" {name}" if name else ""), ids, labels, next(spans))
               for (lineno, _), pieces in zip(summary.shown, parts) for name, ids, labels in pieces]
    page = mask_report.render(str(cfg.input_file), samples, summary.tokens, summary.trained, summary.drops,
                              summary.drop_lines, summary.lengths, summary.written, summary.read, summary.format,
                              roles, seq2seq_rows.truncation_line(cfg, summary.truncated))
    try:
        atomic.write_text(cfg.report, page)
    except OSError as e:
        raise RunError(f"{cfg.report}: --report cannot be written ({e.strerror}); the rows were written to "
                       f"{cfg.output_file}, and a --report path you can write gives the page") from None
    summary.report_file = cfg.report


# ---- printing ----


def masked_view(tokenizer, ids: list[int], labels: list[int], marker: str, colour: bool) -> str:
    """The whole sample as text with its trained runs marked: green on a terminal, else between the marker's
    two halves ("[[ ]]": [[trained]]; a marker without a space goes on both sides). Masked text is shown too
    (dim on a terminal), so a person can check by eye where each trained span starts and ends."""
    opening, _, closing = marker.partition(" ")
    closing = closing or opening
    green, dim, reset = ("\033[32m", "\033[2m", "\033[0m") if colour else ("", "", "")
    if colour:
        opening = closing = ""
    out, start = [], 0
    for trained, run in itertools.groupby(labels, key=lambda label: label != IGNORE):
        end = start + len(list(run))
        text = mask_report.piece_text(tokenizer, ids, start, end)
        out.append(green + opening + text + closing + reset if trained else dim + text + reset)
        start = end
    return "".join(out)


def report(cfg: Config, summary: Summary, seconds: float, drop_lines: bool = True) -> None:
    if summary.views and cfg.num_printed_samples:
        for head, view in summary.views[: cfg.num_printed_samples]:
            print(head)
            print(view)
        print("---")
    if summary.report_file is not None:
        print(f"mask report: {summary.report_file}")
    if drop_lines:
        for lineno, reason, detail in summary.first_drops:
            print(f"dropped {cfg.input_file}:{lineno}: {reason}: {detail}")
    dropped = sum(summary.drops.values())
    print(f"input: {summary.format}")
    unit = "lines" if formats.input_type(cfg.input_file) == "jsonl" else "rows"
    print(f"read {summary.read} {unit} ({summary.blank} blank), wrote {summary.written} samples to {cfg.output_file}")
    print(f"dropped {dropped} samples" + "".join(f"\n  {n:>8}  {reason}" for reason, n in summary.drops.most_common()))
    if truncated := seq2seq_rows.truncation_line(cfg, summary.truncated):
        print(truncated)
    if summary.methods:
        print("masks: " + ", ".join(f"{n} from the {m}" for m, n in summary.methods.most_common()))
    if summary.template_file:
        print(f"chat template used saved to {summary.template_file}")
    share = summary.trained / summary.tokens if summary.tokens else 0.0
    print(f"tokens {summary.tokens}, trained {summary.trained} ({share:.1%})")
    rate = summary.read / seconds if seconds > 0 else 0.0
    print(f"time {seconds:.1f} s, {rate:,.0f} samples/s, {summary.tokens / max(seconds, 1e-9):,.0f} tokens/s, {summary.workers} workers")


PLACED: list[Path] = []  # the output files run() has moved into place
