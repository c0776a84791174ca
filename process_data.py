"""Stage 1: turn conversations, prompt/target pairs or raw text into training rows with exact masks.

    python process_data.py --input-file data.jsonl --output-file rows.jsonl \\
        --model-name-or-path MODEL --max-sample-num-tokens 4096

Input: JSONL, CSV or Parquet (by the file's suffix); the row format is detected per file (see formats.py).
Messages rows: {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...], "tools": [...]?}.
Extra per-message keys (tool_calls, reasoning_content / thinking / reasoning, name, ...), per-sample keys (tools,
documents, ...) and the keys of a per-sample `chat_template_kwargs` object ({"enable_thinking": false}) are passed
to the chat template: the tokenizer's, --chat-template FILE's, or --chat-template-name NAME's. A sample whose only message has role "pretrain" is raw text: no template, every token trained,
EOS appended; so is a row of the `text` format.

Pairs rows ({"source", "target"}, {"text", "target"}, {"prompt", "completion"}) are rendered, by --pair-rendering,
either through the chat template as one user turn and one assistant turn (masks as for messages), or raw:
source + separator (default the EOS token's text) + target + EOS, tokenized as one text exactly as the tokenizer
does (with its BOS). Raw pairs train the tokens of target + EOS (and, with --train-source, of the source); a token
that crosses from untrained into trained text (a BPE merge across the separator) drops the sample, counted, so a
trained token never carries prompt text.

Preference rows ({"chosen", "rejected"} or {"prompt", "chosen", "rejected"}, for DPO/SimPO) become pair rows:
see preference.py.

Encoder-decoder models (T5, BART, ...: the config's is_encoder_decoder) take pair rows only and write seq2seq rows
(seq2seq_data.py): {"input_ids": tokenizer(--source-prefix + source) with its special tokens, "labels":
tokenizer(text_target=target) + EOS (every token trained), "len", "target_len", "num_loss_counted_tokens"}, limited
by --max-source-tokens / --max-target-tokens (default --max-sample-num-tokens, then optional), over-long ones
dropped, an error, or --on-too-long truncate (counted). Messages, text and preference rows, --pair-rendering,
--train-source, --separator and the chat-template flags are refused there; no chat template is saved.

Output lines, in input order: {"input_ids", "labels" (-100 where not trained), "len", "num_loss_counted_tokens"}.
`input_ids` equal `tokenizer.apply_chat_template(messages, tokenize=True)`. Trained, for assistant turn i: what the
full render has after the render of messages[:i] with the generation prompt, through the end-of-turn token(s)
closing the turn (the rule and how it is computed: chat_masks.py). The output file is written atomically: a failed
run leaves none behind; the chat template used is saved beside it as <output-file>.chat_template.jinja.

What stops the run (exit 2, one line `process_data.py: error: FILE:LINE: reason; fix`): a file that is not
what we expect (invalid UTF-8, malformed JSON or CSV, no `messages` list, wrong types, unknown roles, a row of
another format than the file's first row, an empty file), --output-file equal to the input file or a directory,
a model path without a fast tokenizer or, for chat samples, without a chat template, and with
--on-too-long error an over-long sample. What skips a sample (counted per reason, the first few printed with
their line numbers): the chat template rejects the conversation, its masks cannot be derived consistently,
it has no trained token, it is longer than --max-sample-num-tokens, an empty pair target or text, a raw pair
whose tokens cross the edge of its trained text.
"""

import argparse
import inspect
import itertools
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
import typing
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

import chat_masks
import formats
import mask_report
import preference
import seq2seq_data
from chat_masks import MaskError
from formats import Columns, InputSpec, RunError
from minitrain import IGNORE, atomic
from minitrain.config_file import ConfigFileError, config_path_from_argv, read_config_file

PROG = "process_data.py"
ROLES = ("system", "user", "assistant", "tool")
CHUNK_LINES = 256  # lines per task sent to a worker: big enough to batch-tokenize, small enough to stream
REPORTED_DROPS = 5  # dropped samples printed with their line number and reason
REPORT_SAMPLES = 20  # conversations shown in --report
REPORT_LINES = 20  # line numbers listed per drop reason in --report

DROP_TOO_LONG = "longer than --max-sample-num-tokens"
DROP_NO_TRAINED = "no trained token"
DROP_TEMPLATE = "chat template rejected the conversation"
DROP_MASK = "assistant masks could not be derived"
DROP_EMPTY_TARGET = "empty target"
DROP_EMPTY_TEXT = "empty text"
DROP_CROSSING = "a token crosses the edge of the trained text"


@dataclass(frozen=True)
class Config:
    input_file: Path
    output_file: Path
    model_name_or_path: str
    max_sample_num_tokens: int | None = None  # required for causal LMs
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
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
    report: Path | None = None  # the HTML mask report (mask_report.py)
    config_file: Path | None = None  # --config, for check_paths (its values are in the other fields)
    max_source_tokens: int | None = None  # encoder-decoder models (seq2seq_data.py); default --max-sample-num-tokens
    max_target_tokens: int | None = None
    source_prefix: str = ""

    @property
    def kept_samples(self) -> int:
        """Samples kept for printing and for the report."""
        return max(self.num_printed_samples, REPORT_SAMPLES if self.report is not None else 0)

    def columns(self) -> Columns:
        pairs = ((self.source_column, self.target_column),) if self.source_column else formats.DEFAULT_PAIRS
        return Columns(pairs=pairs, text=self.text_column)


def parse_args(argv: list[str] | None = None) -> Config:
    """The flags, over the values of --config FILE (YAML or TOML, keys are the flag names; minitrain/config_file.py),
    over the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = config_path_from_argv(argv)
    if path is not None:
        try:
            argv = config_as_flags(read_config_file(path, config_types())) + argv  # later flags win
        except ConfigFileError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            sys.exit(2)
    defaults = Config(Path(), Path(), "")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a YAML or TOML file of these flags (keys are flag names); command-line flags win")
    p.add_argument("--report", type=Path, help="write an HTML mask report here: conversations with trained tokens "
                                               "highlighted, drop reasons, the length histogram")
    p.add_argument("--input-file", type=Path, required=True, help="JSONL, .csv or .parquet (messages, pairs or text rows)")
    p.add_argument("--output-file", type=Path, required=True, help="rows JSONL, written atomically")
    p.add_argument("--model-name-or-path", required=True, help="folder (or hub name) with the tokenizer and chat template")
    p.add_argument("--max-sample-num-tokens", type=int, help="longer samples are dropped (or an error); required for "
                                                            "causal LMs, the seq2seq limits' default")
    p.add_argument("--max-source-tokens", type=int, help="encoder-decoder: the longest source (encoder input)")
    p.add_argument("--max-target-tokens", type=int, help="encoder-decoder: the longest target (decoder labels)")
    p.add_argument("--source-prefix", default=defaults.source_prefix,
                   help="encoder-decoder: text put before every source, e.g. 'summarize: '")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers, help="processes (default: all cores)")
    p.add_argument("--num-printed-samples", type=int, default=defaults.num_printed_samples, help="random samples shown with their masks")
    p.add_argument("--mask-marker", default=defaults.mask_marker, help="printed samples without colour: 'OPEN CLOSE' around trained text, or one marker for both sides")
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file: for a base model without one, or to override the tokenizer's")
    p.add_argument("--chat-template-name", default=None, help="which of the tokenizer's chat templates (e.g. tool_use) when it carries several")
    p.add_argument("--on-too-long", choices=("drop", "error", "truncate"), default=defaults.on_too_long,
                   help="over-long samples: drop and count, stop, or (encoder-decoder only) cut to the limit and count")
    p.add_argument("--seed", type=int, default=defaults.seed, help="which samples are printed")
    p.add_argument("--input-format", choices=("auto", *formats.KINDS), default=defaults.input_format, help="row format (default: detected from the first row)")
    p.add_argument("--pair-rendering", choices=("chat", "raw"), default=defaults.pair_rendering,
                   help="pairs: through the chat template (default), or source+separator+target+EOS")
    p.add_argument("--separator", default=defaults.separator, help="raw pairs: text between source and target (default: the EOS token)")
    p.add_argument("--train-source", action="store_true", help="pairs: train the source as well as the target")
    p.add_argument("--source-column", default=defaults.source_column, help="pairs: the prompt column (with --target-column)")
    p.add_argument("--target-column", default=defaults.target_column, help="pairs: the answer column (with --source-column)")
    p.add_argument("--text-column", default=defaults.text_column, help="text rows: the text column")
    args = p.parse_args(argv)
    problems = []
    for flag in ("max_sample_num_tokens", "max_source_tokens", "max_target_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_workers < 1:
        problems.append("--num-workers must be at least 1")
    if args.num_printed_samples < 0:
        problems.append("--num-printed-samples must be 0 or more")
    if (args.source_column is None) != (args.target_column is None):
        problems.append("--source-column and --target-column go together")
    if args.source_column is not None and args.source_column == args.target_column:
        problems.append("--source-column and --target-column must differ")
    if args.chat_template is not None and args.chat_template_name is not None:
        problems.append("--chat-template and --chat-template-name exclude each other")
    if problems:
        p.error("; ".join(problems))
    values = vars(args)
    del values["config"]  # its values are in the others
    return Config(**values, config_file=None if path is None else Path(path))


def config_types() -> dict[str, type]:
    """Each flag's value type, as a config file gives it (paths as strings)."""
    hints = typing.get_type_hints(Config)
    types = {}
    for name, hint in hints.items():
        if name == "config_file":
            continue
        options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        types[name] = str if options[0] is Path else options[0]
    return types


def config_as_flags(values: dict) -> list[str]:
    """A config file's values as the command-line flags they stand for."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags.append(f"{flag}={value}")  # one word: a value that starts with "-" (e.g. a separator) stays a value
    return flags


# ---- reading and validating one line (worker side) ----


def check_messages(sample: object, where: str) -> dict:
    """The messages sample on this line. Raises RunError for a row that is not a valid messages sample."""
    fix = 'each line must be {"messages": [{"role": ..., "content": ...}, ...]}'
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise RunError(f"{where}: no non-empty `messages` list; {fix}")
    messages = sample["messages"]
    for n, message in enumerate(messages):
        at = f"{where}: messages[{n}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RunError(f"{at} is not an object with a string `role`; {fix}")
        role, content = message["role"], message.get("content")
        if role == "pretrain":
            if len(messages) != 1:
                raise RunError(f"{at} has role `pretrain`, which must be the only message; put raw text on its own line")
            if not isinstance(content, str) or not content:
                raise RunError(f"{at} `pretrain` needs a non-empty string `content`")
        elif role not in ROLES:
            raise RunError(f"{at} has unknown role {role!r}; use one of {', '.join(ROLES)} (or a lone `pretrain`)")
        elif not isinstance(content, str) and not (role == "assistant" and content is None and message.get("tool_calls")):
            raise RunError(f"{at} `content` must be a string (null only for an assistant turn with tool_calls)")
        if len(message) > 2:  # two keys that passed the checks above are `role` and `content` (or `tool_calls`)
            for key in chat_masks.REASONING_KEYS:
                if message.get(key) is not None and not isinstance(message[key], str):
                    raise RunError(f"{at} `{key}` must be a string (reasoning is trained as text)")
    if "tools" in sample and sample["tools"] is not None and not isinstance(sample["tools"], list):
        raise RunError(f"{where}: `tools` must be a list of tool definitions")
    return sample


# ---- encoding (one per worker process) ----


def source_span(real: str, marked: str, pieces: list[chat_masks.Piece]) -> tuple[int, int]:
    """Where a pair's source (the user turn's content, piece 0) lies in the chat render."""
    spans = chat_masks.content_char_spans(real, marked, pieces)
    if 0 not in spans:
        raise MaskError("the chat template does not render the source")
    return spans[0]


def crossing_token(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[int, int, int] | None:
    """(start, end, edge) of the first token that runs across an edge of the trained spans, None if none does."""
    merged: list[list[int]] = []  # adjacent spans are one trained region: no edge between them
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for edge in (p for span in merged for p in span):
        i = bisect_left(offsets, (edge, -1))  # the first token starting at or after the edge
        if i > 0 and offsets[i - 1][1] > edge:  # the token before it runs past the edge
            return *offsets[i - 1], edge
    return None


def rust_copy(tokenizer_class, tokenizer):
    """A copy of the tokenizer's Rust tokenizer that encodes exactly as tokenizer(text) does.

    The copy keeps the truncation and padding saved in tokenizer.json, which transformers switches off on every
    call: off here too, or rows would be cut short or padded. transformers' split_special_tokens (special-token
    text encoded as plain text) is not saved in tokenizer.json: carried over here.
    """
    copy = tokenizer_class.from_str(tokenizer.backend_tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return copy


# Probes of tokenization at start-up: plain text and special-token text, two lengths (padding would show)
PROBE_TEXTS = ("Probe: 2 + 2 = 4, <b>café</b> 🙂\n\n  indented\tand tabbed. <|im_end|> </s> <|eot_id|> " * 4, "x")
PROBE_CHAT = [
    {"role": "user", "content": "  What is 2 + 2? <|im_end|> </s> <|eot_id|>"},
    {"role": "assistant", "content": " It is 4.\n\n🙂 " * 8},
]


def tokenization_mismatch(tokenizer, backend, full, chat) -> str | None:
    """How our copies render or tokenize differently from transformers on the probes, None when they agree exactly.

    Checks what production computes: our render of a chat (`chat`: a chat_masks.Renderer, True for the
    tokenizer's own template, falsy for none) and its backend ids against apply_chat_template(tokenize=False / True),
    and full.post_process(backend encoding) against tokenizer(text) for raw text.
    """
    encodings = backend.encode_batch(list(PROBE_TEXTS), add_special_tokens=False)
    for text, encoding in zip(PROBE_TEXTS, encodings):
        if full.post_process(encoding).ids != tokenizer(text)["input_ids"]:
            return f"our copy of the tokenizer encodes the text {text[:20]!r}... differently from transformers"
    if chat:
        renderer = chat if isinstance(chat, chat_masks.Renderer) else chat_masks.Renderer(tokenizer, tokenizer.chat_template)
        template = renderer.template
        try:
            want_text = tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, chat_template=template)
            want = list(tokenizer.apply_chat_template(PROBE_CHAT, tokenize=True, return_dict=True, chat_template=template)["input_ids"])
        except Exception:  # the template rejects the probe: nothing to compare, samples report their own errors
            return None
        real = renderer(PROBE_CHAT, {})
        if real != want_text:
            return "our render of a chat differs from apply_chat_template(tokenize=False)"
        got = [e.ids for e in backend.encode_batch([real, PROBE_TEXTS[1]], add_special_tokens=False)][0]
        if got != want:
            return "our copy of the tokenizer encodes a chat render differently from apply_chat_template(tokenize=True)"
    return None


def choose_template(tokenizer, spec: InputSpec) -> tuple[str | None, str | None]:
    """The chat template to use and, when there is none, why: --chat-template's text, else the tokenizer's own
    (by --chat-template-name when it carries several)."""
    if spec.chat_template is not None:
        return spec.chat_template, None
    own = tokenizer.chat_template
    if isinstance(own, dict):
        names = ", ".join(sorted(own))
        name = spec.chat_template_name or ("default" if "default" in own else None)
        if name is None:
            return None, f"the tokenizer has several chat templates ({names}) and none is `default`; pass --chat-template-name"
        if name not in own:
            return None, f"the tokenizer has no chat template named {name!r} (it has {names}); pass one of them to --chat-template-name"
        return own[name], None
    if spec.chat_template_name is not None:
        return None, f"--chat-template-name {spec.chat_template_name} but the tokenizer has a single chat template (or none); drop the flag"
    if isinstance(own, str) and own:
        return own, None
    return None, "the tokenizer has no chat template"


@dataclass
class Chunk:
    rows: list[tuple[int, bytes]] = field(default_factory=list)  # (line number, output line)
    methods: Counter = field(default_factory=Counter)  # chat samples per masking method
    drops: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, reason, detail)
    blank: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: Counter = field(default_factory=Counter)  # seq2seq: "sources" and "targets" cut to their limit
    error: str | None = None  # a RunError message: the run stops


class Encoder:
    """Turns samples into rows for one tokenizer. Built once per worker process."""

    def __init__(self, model: str, input_name: str, max_tokens: int, on_too_long: str, spec: InputSpec = InputSpec()):
        import jinja2
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.input_name, self.max_tokens, self.on_too_long, self.spec = input_name, max_tokens, on_too_long, spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as e:  # transformers raises OSError, ValueError, ... for a folder without a tokenizer
            raise RunError(f"{model}: cannot load a tokenizer ({str(e).splitlines()[0]}); pass a folder with tokenizer files") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise RunError(f"{model}: the tokenizer is not a fast (Rust) tokenizer; masks need its character offsets")
        # Our own copies of the Rust tokenizer. `full` adds the special tokens as tokenizer(text) does (raw pairs);
        # `backend` has no post-processor: it only adds special tokens (we add none) and, for GPT-2 style
        # tokenizers, trims whitespace from offsets, which would leave whitespace tokens outside every span.
        self.full = rust_copy(Tokenizer, self.tokenizer)
        self.backend = rust_copy(Tokenizer, self.tokenizer)
        self.backend.post_processor = None
        self.added_ids = frozenset(self.tokenizer.get_added_vocab().values())
        self.eos_id = self.tokenizer.eos_token_id
        # per-sample keys reach the template as variables, except names that would change apply_chat_template
        self.reserved = set(inspect.signature(self.tokenizer.apply_chat_template).parameters) - {"tools", "documents"}
        self.template, self.template_problem = choose_template(self.tokenizer, spec)
        template = self.template
        try:
            self.renderer = chat_masks.Renderer(self.tokenizer, template) if template else None
        except jinja2.TemplateError as e:  # a syntax error: one line here, not a traceback (nor a worker respawning)
            where = "--chat-template" if spec.chat_template is not None else f"{model}: its tokenizer's chat template"
            line = f" at template line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise RunError(f"{where} does not compile ({e.message}{line}); fix it, or pass a working one with "
                           f"--chat-template") from None
        self.specials = chat_masks.Specials([*self.tokenizer.all_special_tokens, *self.tokenizer.get_added_vocab()])
        self.generation_tags = bool(template) and chat_masks.has_generation_tags(template)
        self.marking = chat_masks.Renderer(self.tokenizer, chat_masks.marking_template(template)) if self.generation_tags else None
        if self.generation_tags and self.template_problem is None:
            try:
                marked = self.marking(PROBE_CHAT, {})
                if chat_masks.generation_spans(marked)[0] != self.renderer(PROBE_CHAT, {}):
                    self.template_problem = "marking the template's {% generation %} blocks changes its render"
            except MaskError as e:
                self.template_problem = str(e)
            except Exception:  # the template rejects the probe: samples report their own errors
                pass
        self.shape = None
        if self.template_problem is None and not self.generation_tags:
            try:
                self.shape = chat_masks.learn_shape(self.tokenizer, self.renderer, self.specials)
            except MaskError as e:
                self.template_problem = str(e)
        self.headers: dict[bytes, str] = {}  # the generation prompt's header per distinct tools and kwargs
        self.plans: dict[bytes, object] = {}  # sentinel plans (or their MaskError) per sample skeleton
        shape_markers = {self.shape.header, *self.shape.openers} if self.shape else set()
        self.markers = chat_masks.markers_pattern([m for m in set(self.specials.tokens) | shape_markers if m])
        self.methods: Counter = Counter()  # which method derived each chat sample's masks
        chat = self.template_problem is None
        if problem := tokenization_mismatch(self.tokenizer, self.backend, self.full, self.renderer if chat else None):
            raise RunError(f"{model}: {problem}; the tokenizer has a setting we do not reproduce; please report it")
        if spec.fmt.kind == "pairs" and spec.rendering == "raw":
            eos = self.tokenizer.eos_token
            if eos is None or self.backend.encode(eos, add_special_tokens=False).ids != [self.eos_id]:
                raise RunError(f"{model}: the tokenizer has no EOS token that encodes as one token; raw pairs end with it; use --pair-rendering chat")
            self.eos_text = eos
            self.separator = eos if spec.separator is None else spec.separator

    def template_vars(self, sample: dict, where: str) -> dict:
        """What reaches the template besides the messages: the sample's other keys (`tools`, `documents`, ...)
        and the keys of its `chat_template_kwargs` (e.g. {"enable_thinking": false})."""
        extra = {k: v for k, v in sample.items() if k not in ("messages", "chat_template_kwargs") and k not in self.reserved}
        kwargs = sample.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise RunError(f'{where}: `chat_template_kwargs` must be an object; write e.g. {{"enable_thinking": false}}')
            extra.update((k, v) for k, v in kwargs.items() if k not in self.reserved)
        return extra

    def header(self, extra: dict) -> str:
        """The generation prompt's header with this sample's tools and kwargs (Qwen3 with enable_thinking false:
        the empty think block is part of it), from a probe render, cached."""
        key = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS)
        if key not in self.headers:
            if len(self.headers) >= 1024:
                self.headers.clear()
            try:
                header = chat_masks.generation_header(self.renderer, self.specials, extra)
            except Exception:  # the probe misses something the template needs (tools): add what start-up needed
                try:
                    header = chat_masks.generation_header(self.renderer, self.specials, {**dict(self.shape.base_extra), **extra})
                except Exception:
                    header = None
            self.headers[key] = header
        if self.headers[key] is None:
            raise MaskError("the chat template fails on a probe conversation with this sample's tools and kwargs")
        return self.headers[key]

    def sentinel_plan(self, marked_messages: list[dict], pieces: list, extra: dict, header: str) -> chat_masks.SentinelPlan:
        """The sentinel render's plan for this skeleton (the sentinel-replaced sample), cached: samples that differ
        only in their contents share one sentinel render. A plan that failed fails again, with its reason."""
        key = orjson.dumps([marked_messages, extra], option=orjson.OPT_SORT_KEYS)
        plan = self.plans.get(key)
        if plan is None:
            try:
                chat_masks.check_literals(marked_messages, extra, self.markers)
                try:
                    marked = self.renderer(marked_messages, extra)
                except Exception as e:  # the template rejects a placeholder (a length check, ...)
                    raise MaskError(f"the chat template rejects placeholders ({type(e).__name__})") from None
                plan = chat_masks.sentinel_plan(self.shape, header, self.specials, marked, marked_messages, pieces)
            except MaskError as e:
                plan = e
            if len(self.plans) >= 4096:
                self.plans.clear()
            self.plans[key] = plan
        if isinstance(plan, MaskError):
            raise plan
        return plan

    def assistant_spans(self, raw: bytes, messages: list[dict], real: str, extra: dict) -> list[tuple[int, int]]:
        """Trained character spans of `real` by the rule (chat_masks): from the sentinel render, else from prefix
        renders; each checked against the real render. MaskError with both reasons when neither can."""
        header = self.header(extra)
        reasons = []
        try:
            chat_masks.check_placeholders(raw)
            marked_messages, pieces = chat_masks.with_sentinels(messages, self.specials.split_re)
            plan = self.sentinel_plan(marked_messages, pieces, extra, header)
            spans = chat_masks.apply_plan(plan, real, pieces)
            chat_masks.check_spans(real, spans, self.specials)
            self.methods["sentinel render"] += 1
            return spans
        except MaskError as e:
            reasons.append(f"sentinel render: {e}")
        try:
            spans = chat_masks.prefix_spans(self.renderer, self.shape, header, self.specials, real, messages, extra)
            chat_masks.check_spans(real, spans, self.specials)
            self.methods["prefix renders"] += 1
            return spans
        except MaskError as e:
            reasons.append(f"prefix renders: {e}")
        except Exception as e:  # the template rejects a prefix of the conversation (it must end on a user turn, ...)
            reasons.append(f"prefix renders: the chat template rejects a prefix of the conversation ({type(e).__name__}: {e})")
        raise MaskError("; ".join(reasons))

    def encode_chunk(self, lines: list[tuple[int, bytes]]) -> Chunk:
        chunk = Chunk()
        self.methods = chunk.methods
        try:
            self._encode(lines, chunk)
        except RunError as e:
            chunk.error = str(e)
        return chunk

    def _encode(self, lines: list[tuple[int, bytes]], chunk: Chunk) -> None:
        texts, pending = [], []  # chat renders to batch-tokenize, and what to do with each
        raw_pairs = []  # (line number, raw pair text, its trained character spans)
        fmt = self.spec.fmt
        for lineno, raw, where, row in formats.rows_of(lines, self.input_name, self.spec, chunk):
            if fmt.kind == "text":
                text = formats.string_field(row, fmt.text, where, fmt)
                if text:
                    self._pretrain(lineno, text, chunk)
                else:
                    chunk.drops.append((lineno, DROP_EMPTY_TEXT, f"`{fmt.text}` is empty"))
                continue
            train_source = False
            if fmt.kind == "pairs":
                source = formats.string_field(row, fmt.source, where, fmt)
                target = formats.string_field(row, fmt.target, where, fmt)
                if not target:
                    chunk.drops.append((lineno, DROP_EMPTY_TARGET, f"`{fmt.target}` is empty"))
                    continue
                if self.spec.rendering == "raw":
                    raw_pairs.append((lineno, *self._raw_render(source, target)))
                    continue
                sample = {"messages": [{"role": "user", "content": source}, {"role": "assistant", "content": target}]}
                train_source = self.spec.train_source and bool(source)
            else:
                sample = check_messages(row, where)
            messages = sample["messages"]
            if messages[0]["role"] == "pretrain":
                self._pretrain(lineno, messages[0]["content"], chunk)
                continue
            if self.template_problem:
                fix = "--pair-rendering raw" if fmt.kind == "pairs" else "`pretrain` rows"
                raise RunError(f"{where}: {self.template_problem}; use a chat model's tokenizer, or {fix}")
            extra = self.template_vars(sample, where)
            try:
                generated = []  # with {% generation %} tags: the tagged spans, each must hold a token
                if self.generation_tags:
                    chat_masks.check_placeholders(raw)
                    real, generated = chat_masks.generation_spans(self.marking(messages, extra))
                    spans = list(generated)
                else:
                    real = self.renderer(messages, extra)
                    spans = self.assistant_spans(raw, messages, real, extra)
                if train_source:
                    chat_masks.check_placeholders(raw)
                    marked_messages, pieces = chat_masks.with_sentinels(messages)
                    spans.append(source_span(real, self.renderer(marked_messages, extra), pieces))
            except MaskError as e:
                chunk.drops.append((lineno, DROP_MASK, str(e)))
                continue
            except Exception as e:  # jinja2 TemplateError from raise_exception, or a TypeError inside the template
                chunk.drops.append((lineno, DROP_TEMPLATE, f"{type(e).__name__}: {e}"))
                continue
            texts.append(real)
            pending.append((lineno, spans, generated))
        # The Rust tokenizer's batch encode is much faster than one call per row; one call for the chunk's chat
        # renders and raw pairs (a file holds one format, so one of the two is empty).
        batch = texts + [text for _, text, _ in raw_pairs]
        encodings = self.backend.encode_batch(batch, add_special_tokens=False) if batch else []
        for (lineno, spans, generated), encoding in zip(pending, encodings):
            if generated and not chat_masks.covers_every_span(encoding.offsets, generated):
                chunk.drops.append((lineno, DROP_MASK, "a {% generation %} block covers no token"))
                continue
            ids = encoding.ids
            if len(ids) > self.max_tokens:  # dropped (or an error) before its masks are computed: _finish says so
                self._finish(lineno, ids, (), chunk)
                continue
            labels = [IGNORE] * len(ids)
            for i, j in chat_masks.token_ranges(encoding, spans, ids, self.added_ids):
                labels[i:j] = ids[i:j]
            self._finish(lineno, ids, None, chunk, labels)
        for (lineno, text, spans), encoding in zip(raw_pairs, encodings[len(texts):]):
            self._finish_raw_pair(lineno, text, spans, encoding, chunk)
        chunk.rows.sort()  # pretrain rows were finished before the batch: restore the input order
        chunk.drops.sort()

    def _pretrain(self, lineno: int, text: str, chunk: Chunk) -> None:
        ids = self.tokenizer(text)["input_ids"]
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        # the first token is never a prediction target (nothing precedes it), so it counts as masked
        self._finish(lineno, ids, [False] + [True] * (len(ids) - 1), chunk)

    def _raw_render(self, source: str, target: str) -> tuple[str, list[tuple[int, int]]]:
        """source + separator + target + EOS, and its trained character spans: target + EOS (and the source)."""
        text = source + self.separator + target + self.eos_text
        spans = [(len(source) + len(self.separator), len(text))]
        if self.spec.train_source and source:
            spans.insert(0, (0, len(source)))
        return text, spans

    def _finish_raw_pair(self, lineno: int, text: str, spans: list[tuple[int, int]], encoding, chunk: Chunk) -> None:
        crossing = crossing_token(encoding.offsets, spans)
        if crossing is not None:
            start, end, edge = crossing
            detail = (
                f"token {text[start:end]!r} runs across {text[max(start, edge - 12):edge]!r}|{text[edge:min(end, edge + 12)]!r}; "
                "end the separator with a special token (the default EOS) or move the whitespace into the target"
            )
            chunk.drops.append((lineno, DROP_CROSSING, detail))
            return
        body_mask = iter(chat_masks.token_mask(encoding.offsets, spans, encoding.ids, self.added_ids))
        # The post-processor adds the tokenizer's special tokens (Llama-3's BOS) around the text, as tokenizer(text)
        # does; sequence_ids tells its added tokens (None) from the text's (0).
        full = self.full.post_process(encoding)
        mask = [next(body_mask) if sequence == 0 else False for sequence in full.sequence_ids]
        mask[0] = False  # the first token is never a prediction target (nothing precedes it)
        self._finish(lineno, full.ids, mask, chunk)

    def _finish(self, lineno: int, ids: list[int], mask, chunk: Chunk, labels: list[int] | None = None) -> None:
        """Write the row, from the mask of trained tokens or from its labels already made; or drop it."""
        if len(ids) > self.max_tokens:
            if self.on_too_long == "error":
                raise RunError(
                    f"{self.input_name}:{lineno}: sample has {len(ids)} tokens > --max-sample-num-tokens "
                    f"{self.max_tokens}; raise the limit, or pass --on-too-long drop"
                )
            chunk.drops.append((lineno, DROP_TOO_LONG, f"{len(ids)} > {self.max_tokens} tokens"))
            return
        if labels is None:
            labels = [i if m else IGNORE for i, m in zip(ids, mask)]
        trained = len(ids) - labels.count(IGNORE)
        if trained == 0:
            chunk.drops.append((lineno, DROP_NO_TRAINED, "no assistant turn (or only empty ones)"))
            return
        row = {"input_ids": ids, "labels": labels, "len": len(ids), "num_loss_counted_tokens": trained}
        chunk.rows.append((lineno, orjson.dumps(row) + b"\n"))
        chunk.tokens += len(ids)
        chunk.trained += trained


def make_encoder(model: str, input_name: str, max_tokens: int | None, on_too_long: str, spec: InputSpec,
                 seq2seq: seq2seq_data.Settings = seq2seq_data.Settings()):
    """The file's encoder: an encoder-decoder model's (seq2seq_data.py); for causal LMs, preference rows have
    their own (preference.py), which runs an Encoder per side."""
    if model_type := seq2seq_data.encoder_decoder_type(model):
        return seq2seq_data.Seq2SeqEncoder(model, model_type, input_name, on_too_long, spec, seq2seq)
    kind = preference.PreferenceEncoder if spec.fmt.kind == "preference" else Encoder
    return kind(model, input_name, max_tokens, on_too_long, spec)


_ENCODER: Encoder | None = None  # the worker process's encoder, built by init_worker
_INIT_ERROR: str | None = None  # or why it could not be built (a raising initializer makes Pool respawn forever)


_WITHOUT_TORCH = False  # the worker process loaded transformers with torch hidden
_MAY_NEED_TORCH = False  # its encoder failed, with torch hidden, naming torch


def init_worker(model: str, input_name: str, max_tokens: int | None, on_too_long: str, spec: InputSpec,
                seq2seq: seq2seq_data.Settings, without_torch: bool = False) -> None:
    global _ENCODER, _INIT_ERROR, _WITHOUT_TORCH, _MAY_NEED_TORCH
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
    if cfg.input_file.stat().st_size == 0:
        raise RunError(f"{cfg.input_file}:1: the file is empty; pass a file with at least one row")


def run(cfg: Config) -> Summary:
    from tqdm import tqdm

    check_paths(cfg)
    kind = formats.input_type(cfg.input_file)
    spec = input_spec(cfg, kind)
    init_args = (cfg.model_name_or_path, str(cfg.input_file), cfg.max_sample_num_tokens, cfg.on_too_long, spec,
                 seq2seq_data.limits(cfg))
    # With workers, the main process loads no tokenizer (that would be one more start-up on the same cores): a
    # worker says what it needs (whether the model is encoder-decoder too), and a bad model path or flags that do
    # not fit the model fail there, before anything is read or written.
    pool, encoder = None, None
    if cfg.num_workers > 1:
        pool = mp.get_context("spawn").Pool(cfg.num_workers, init_worker, (*init_args, True))
        info = pool.apply(encoder_info)
        if info.retry_with_torch:  # the tokenizer's code may need torch: again with it
            pool.terminate()
            pool = mp.get_context("spawn").Pool(cfg.num_workers, init_worker, init_args)
            info = pool.apply(encoder_info)
    else:
        encoder = make_encoder(*init_args)
        info = encoder_info(encoder)
    if problem := info.error or seq2seq_data.flag_problem(cfg, spec, info.model_type):
        if pool is not None:
            pool.terminate()
        raise RunError(problem)

    summary = Summary(format=describe_input(kind, spec, info, cfg.source_prefix),
                      tokenizer=encoder.tokenizer if encoder else None)
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
                tmp.write(line)
                summary.written += 1
                if cfg.report is not None:
                    summary.lengths.append(orjson.loads(line)["len"])
                # reservoir sampling: every written row is equally likely to be shown
                if len(summary.shown) < cfg.kept_samples:
                    summary.shown.append((lineno, line))
                elif (j := rng.randrange(summary.written)) < cfg.kept_samples:
                    summary.shown[j] = (lineno, line)
        if summary.written == 0:
            first = summary.first_drops[0] if summary.first_drops else None
            why = f"e.g. line {first[0]}: {first[1]}: {first[2]}" if first else "only blank lines" if summary.blank \
                else "no rows after the header" if formats.input_type(cfg.input_file) == "csv" else "no rows"
            raise RunError(f"{cfg.input_file}: no sample can be written ({why}); fix the data or the model path")
        tmp.flush()
        os.fsync(tmp.fileno())  # on disk before the rename, so a power cut leaves the old file or the whole new one
        tmp.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)  # as any file the user writes (NamedTemporaryFile makes it private)
        # the template used goes beside the rows first, so rows never exist without the template they were made with
        sidecar = template_sidecar(cfg.output_file)
        if info.template:
            atomic.write_text(sidecar, info.template)
        elif sidecar.exists():  # no template used: a stale one from an earlier run must not be taken for this one's
            sidecar.unlink()
        os.replace(tmp.name, cfg.output_file)
        atomic.fsync_dir(cfg.output_file.parent)
        _PLACED.append(cfg.output_file)  # an interrupt from here on leaves the rows complete (main says so)
        summary.template_file = sidecar if info.template else None
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
    return f"{row['len']} tokens, {row['num_loss_counted_tokens']} trained"


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
    """--report: the HTML page of mask_report.py, written atomically (the token texts come from a worker's
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
                              roles, seq2seq_data.truncation_line(cfg, summary.truncated))
    atomic.write_text(cfg.report, page)
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
    if truncated := seq2seq_data.truncation_line(cfg, summary.truncated):
        print(truncated)
    if summary.methods:
        print("masks: " + ", ".join(f"{n} from the {m}" for m, n in summary.methods.most_common()))
    if summary.template_file:
        print(f"chat template used saved to {summary.template_file}")
    share = summary.trained / summary.tokens if summary.tokens else 0.0
    print(f"tokens {summary.tokens}, trained {summary.trained} ({share:.1%})")
    rate = summary.read / seconds if seconds > 0 else 0.0
    print(f"time {seconds:.1f} s, {rate:,.0f} samples/s, {summary.tokens / max(seconds, 1e-9):,.0f} tokens/s, {cfg.num_workers} workers")


_PLACED: list[Path] = []  # the output files run() has moved into place


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = run(cfg)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if _PLACED:
            print(f"{PROG}: interrupted after {_PLACED[-1]} was written whole (the summary, samples and --report "
                  f"may be missing)", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted, no output written", file=sys.stderr)
        sys.exit(130)
    report(cfg, summary, time.perf_counter() - start)


if __name__ == "__main__":
    main()
