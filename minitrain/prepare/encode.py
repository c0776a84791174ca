"""The row encoder for messages, pair and raw-text rows of a causal LM: one chunk of input lines -> rows with exact
masks (the chat-mask rule itself is minitrain/prepare/chat_masks.py). Used by the pipeline's workers (pipeline.py), and once per side
by minitrain/prepare/preference.py. Every drop reason a sample can get is named here.
"""

import inspect
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field, replace

import orjson

from minitrain import IGNORE
from minitrain.prepare import chat_masks, formats
from minitrain.prepare.chat_masks import MaskError
from minitrain.prepare.formats import InputSpec, RunError

ROLES = ("system", "user", "assistant", "tool")

DROP_TOO_LONG = "longer than --max-sample-num-tokens"
DROP_NO_TRAINED = "no trained token"
DROP_TEMPLATE = "chat template rejected the conversation"
GENERATION_BLOCKS = "template's {% generation %} blocks"  # the masking method of a template that marks its replies
DROP_MASK = "assistant masks could not be derived"
DROP_EMPTY_TARGET = "empty target"
DROP_EMPTY_TEXT = "empty text"
DROP_CROSSING = "a token crosses the edge of the trained text"



MESSAGES_FIX = 'each line must be {"messages": [{"role": ..., "content": ...}, ...]}'


def check_messages(sample: object, where: str, fix: str = MESSAGES_FIX) -> dict:
    """The messages sample on this line. Raises RunError for a row that is not a valid messages sample, naming `fix`
    (a preference pair's side or an unpaired row say how their rows are written)."""
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise RunError(f"{where}: {'no non-empty `messages` list' if fix is MESSAGES_FIX else 'no messages'}; {fix}")
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
    masked_by: dict[int, str] = field(default_factory=dict)  # line number -> the masking method of its row written
    drops: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, reason, detail)
    blank: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: Counter = field(default_factory=Counter)  # seq2seq: "sources" and "targets" cut to their limit
    error: str | None = None  # a RunError message: the run stops

    @property
    def methods(self) -> Counter:
        """The chat samples written, per masking method."""
        return Counter(self.masked_by.values())


def encode_lines(encode, lines: list[tuple[int, bytes]]) -> Chunk:
    """Every stage-1 encoder's encode_chunk: a Chunk that `encode(lines, chunk)` fills; a RunError (a problem of the
    whole run, not of one row) becomes the chunk's error, which the parent prints in one line and stops on."""
    chunk = Chunk()
    try:
        encode(lines, chunk)
    except RunError as e:
        chunk.error = str(e)
    return chunk


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
        self.headers: dict[bytes, tuple | None] = {}  # turn_shape's answer per distinct tools and kwargs
        self.plans: dict[bytes, object] = {}  # sentinel plans (or their MaskError) per sample skeleton
        shape_markers = {self.shape.header, *self.shape.openers} if self.shape else set()
        self.markers = chat_masks.markers_pattern([m for m in set(self.specials.tokens) | shape_markers if m])
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

    def turn_shape(self, extra: dict) -> tuple[chat_masks.TemplateShape, str]:
        """The template's shape and the generation prompt's header with this sample's tools and kwargs, from probe
        renders, cached: the header (Qwen3 with enable_thinking false: the empty think block is part of it) and
        what the template writes after the last turn (Command-R7B: its opener, with `<|START_THINKING|>
        <|END_THINKING|>` unless enable_thinking is true) depend on them."""
        key = formats.dump_row(extra, sort_keys=True)
        if key not in self.headers:
            if len(self.headers) >= 1024:
                self.headers.clear()
            found = None
            # the probe may miss something the template needs (tools): then add what start-up needed
            for probe_extra in (extra, {**dict(self.shape.base_extra), **extra}):
                try:
                    header = chat_masks.generation_header(self.renderer, self.specials, probe_extra)
                except Exception:
                    continue
                try:
                    end = chat_masks.trailing_end(self.renderer, self.specials, probe_extra, header)
                except Exception:  # the probe exchange is refused: what start-up learned
                    end = self.shape.end
                found = (self.shape if end == self.shape.end else replace(self.shape, end=end), header)
                break
            self.headers[key] = found
        if self.headers[key] is None:
            raise MaskError("the chat template fails on a probe conversation with this sample's tools and kwargs")
        return self.headers[key]

    def sentinel_plan(
        self, marked_messages: list[dict], pieces: list, extra: dict, shape: chat_masks.TemplateShape, header: str
    ) -> chat_masks.SentinelPlan:
        """The sentinel render's plan for this skeleton (the sentinel-replaced sample), cached: samples that differ
        only in their contents share one sentinel render. A plan that failed fails again, with its reason."""
        key = formats.dump_row([marked_messages, extra], sort_keys=True)
        plan = self.plans.get(key)
        if plan is None:
            try:
                chat_masks.check_literals(marked_messages, extra, self.markers)
                try:
                    marked = self.renderer(marked_messages, extra)
                except Exception as e:  # the template rejects a placeholder (a length check, ...)
                    raise MaskError(f"the chat template rejects placeholders ({type(e).__name__})") from None
                plan = chat_masks.sentinel_plan(shape, header, self.specials, marked, marked_messages, pieces)
            except MaskError as e:
                plan = e
            if len(self.plans) >= 4096:
                self.plans.clear()
            self.plans[key] = plan
        if isinstance(plan, MaskError):
            raise plan
        return plan

    def assistant_spans(self, raw: bytes, messages: list[dict], real: str,
                        extra: dict) -> tuple[list[tuple[int, int]], str]:
        """Trained character spans of `real` by the rule (chat_masks): from the sentinel render, else from prefix
        renders; each checked against the real render. (spans, the method that gave them); MaskError with both
        reasons when neither can."""
        shape, header = self.turn_shape(extra)
        reasons = []
        try:
            chat_masks.check_placeholders(raw)
            marked_messages, pieces = chat_masks.with_sentinels(messages, self.specials.split_re)
            plan = self.sentinel_plan(marked_messages, pieces, extra, shape, header)
            spans = chat_masks.apply_plan(plan, real, pieces)
            chat_masks.check_spans(real, spans, self.specials)
            return spans, "sentinel render"
        except MaskError as e:
            reasons.append(f"sentinel render: {e}")
        try:
            spans = chat_masks.prefix_spans(self.renderer, shape, header, self.specials, real, messages, extra)
            chat_masks.check_spans(real, spans, self.specials)
            return spans, "prefix renders"
        except MaskError as e:
            reasons.append(f"prefix renders: {e}")
        except Exception as e:  # the template rejects a prefix of the conversation (it must end on a user turn, ...)
            reasons.append(f"prefix renders: the chat template rejects a prefix of the conversation ({type(e).__name__}: {e})")
        raise MaskError("; ".join(reasons))

    def encode_chunk(self, lines: list[tuple[int, bytes]]) -> Chunk:
        return encode_lines(self._encode, lines)

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
                    spans, method = list(generated), GENERATION_BLOCKS
                else:
                    real = self.renderer(messages, extra)
                    spans, method = self.assistant_spans(raw, messages, real, extra)
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
            pending.append((lineno, spans, generated, method))
        # The Rust tokenizer's batch encode is much faster than one call per row; one call for the chunk's chat
        # renders and raw pairs (a file holds one format, so one of the two is empty).
        batch = texts + [text for _, text, _ in raw_pairs]
        encodings = self.backend.encode_batch(batch, add_special_tokens=False) if batch else []
        for (lineno, spans, generated, method), encoding in zip(pending, encodings):
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
            if self._finish(lineno, ids, None, chunk, labels):
                chunk.masked_by[lineno] = method
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

    def _finish(self, lineno: int, ids: list[int], mask, chunk: Chunk, labels: list[int] | None = None) -> bool:
        """Write the row, from the mask of trained tokens or from its labels already made (True); or drop it."""
        if len(ids) > self.max_tokens:
            if self.on_too_long == "error":
                raise RunError(
                    f"{self.input_name}:{lineno}: sample has {len(ids)} tokens > --max-sample-num-tokens "
                    f"{self.max_tokens}; raise the limit, or pass --on-too-long drop"
                )
            chunk.drops.append((lineno, DROP_TOO_LONG, f"{len(ids)} > {self.max_tokens} tokens"))
            return False
        if labels is None:
            labels = [i if m else IGNORE for i, m in zip(ids, mask)]
        trained = len(ids) - labels.count(IGNORE)
        if trained == 0:
            chunk.drops.append((lineno, DROP_NO_TRAINED, "no assistant turn (or only empty ones)"))
            return False
        row = {"input_ids": ids, "labels": labels, "len": len(ids), "num_loss_counted_tokens": trained}
        chunk.rows.append((lineno, orjson.dumps(row) + b"\n"))
        chunk.tokens += len(ids)
        chunk.trained += trained
        return True
