"""Which characters of a rendered conversation the model is trained on, for any chat template.

The rule. For assistant turn i, the prompt is the render of messages[:i] with add_generation_prompt=True (same
tools, same per-sample chat_template_kwargs). What is trained is what the full render has after that prompt, up
to and including the end-of-turn token(s) closing the turn: reasoning, content, tool calls, and any block the
template writes there itself. Everything else is masked. So Qwen3's empty think block is trained with thinking on
(its generation prompt is `<|im_start|>assistant\\n`: the model writes the block) and masked with
`enable_thinking: false` (the prompt already holds it); DeepSeek-V3.1 with `thinking: true` trains the `</think>`
after `<｜Assistant｜>`; Command-R7B trains `<|START_RESPONSE|>...<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`; gpt-oss
trains `<|end|>` on earlier turns and `<|return|>` on the last, as rendered. Where the template renders history
differently from a prefix of it (Qwen3 drops earlier reasoning), the full render decides what exists and the
rule decides what of it is trained: the turn starts after the longest part of the generation prompt's header
that the full render has there, cut at a token boundary.

Two methods compute the rule; each one's result is checked against the real render, and a sample is dropped
(MaskError, counted with its reason) only when neither can:

1. Sentinel render (one extra render per sample, the fast path). Every content, reasoning, tool-call argument
   string and tool result is replaced by a unique sentinel of private-use characters:

       real:      <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
       sentinel:  <|im_start|>user\\n\\ue0000\\ue001<|im_end|>\\n<|im_start|>assistant\\n\\ue0001\\ue001<|im_end|>\\n

   The sentinel render is literal pieces L0 S1 L1 S2 ... and the real render must be exactly L0 X1 L1 X2 ...,
   each Xk the value as is, whitespace-stripped (`|trim`) or JSON-escaped (`|tojson`); else the method fails.
   The literal pieces hold only template structure (names, keys and tool definitions are checked to hold no
   control text), so the header, the end-of-turn tokens and the next turn's opener found in them are real
   structure even when a message quotes `<|im_end|>`. A turn starts after its header (learned from the
   generation prompt of a probe conversation with the sample's tools and kwargs), and ends at the last run of
   special tokens before the token that opens the next turn (learned by probing each role).
2. Prefix renders (two renders per assistant turn: the rule itself, for samples the sentinel render cannot
   align, e.g. a template that branches on content or tojson-escapes a nested value). The prompt render must be
   a prefix of the full render (up to the header, as above). The turn ends at the last special-token run before
   the next turn's opener in the render of messages[:i+1] followed by a placeholder user turn (whose opener is
   the last one before the placeholder: template structure, whatever the contents hold), and the full render
   must have that text; the last turn ends at the last special-token run of the full render (less `end`, what the
   template writes after the last message with the sample's kwargs: trailing_end).

Templates with `{% generation %}` tags mark their trained characters themselves (see marking_template).
"""

import json
import re
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

OPEN, CLOSE = "\ue000", "\ue001"
SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")
MAX_ALIGNMENTS = 2  # we only need to know whether the alignment is unique
# where templates read an assistant turn's reasoning: Qwen3/DeepSeek-R1, gpt-oss, others
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# a tool call for probing templates that need one (Mistral wants 9-character ids, Llama-3.1 one call per turn)
PROBE_ID = "probe0001"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe",
            "description": "probe",
            "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "q"}}, "required": ["q"]},
        },
    }
]


class MaskError(ValueError):
    """The trained spans of this sample cannot be derived consistently: skip the sample, report why."""


def sentinel(k: int) -> str:
    return f"{OPEN}{k}{CLOSE}"


def _cached_safety(compiled, template: str):
    """transformers' compiled template, compiled again in an overlay of its environment (the same options,
    filters, globals and extensions) whose sandbox caches its attribute-safety decisions.

    The sandbox checks every attribute a template reads (`loop.first`, `message.content`, ...) with
    ImmutableSandboxedEnvironment.is_safe_attribute, about a third of a render; its answer depends only on the
    object's type and the attribute's name (no underscore, not an internal attribute of functions, frames, ...,
    not a method that modifies a list, dict, set or deque), so it is computed once per type and name. Every
    other check (str.format, callables, ...) is the sandbox's own. transformers' environment itself, which
    apply_chat_template uses, is left as it is; another environment class keeps transformers' template.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = compiled.environment
    if type(env) is not ImmutableSandboxedEnvironment or env.is_async:
        return compiled
    overlay = env.overlay()
    decide, decisions = overlay.is_safe_attribute, {}

    def is_safe_attribute(obj, attr: str, value) -> bool:
        cls = type(obj)
        if obj.__class__ is not cls:  # isinstance also looks at __class__: such objects are decided each time
            return decide(obj, attr, value)
        key = (cls, attr)
        safe = decisions.get(key)
        if safe is None:
            safe = decisions[key] = decide(obj, attr, value)
        return safe

    overlay.is_safe_attribute = is_safe_attribute
    return overlay.from_string(template)


_RENDER_ARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class Renderer:
    """Renders conversations as tokenizer.apply_chat_template(tokenize=False) does, without its per-call overhead.

    Our samples are parsed JSON, for which transformers' conversions of message objects, tools and kwargs to plain
    data are the identity, so we do what is left of apply_chat_template, in its order: drop None-valued message
    keys, alias the reasoning fields, the special tokens as template variables (kwargs win), and transformers'
    own compiled template (compiled again with cached sandbox decisions: _cached_safety; rendered as
    Template.render does, with its globals merged once). Checked against apply_chat_template at start-up
    (process_data.tokenization_mismatch) and by the tests; with another transformers whose internals differ,
    its public entry point is used.
    """

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.special = dict(tokenizer.special_tokens_map)
        try:
            from transformers.utils.chat_template_utils import (
                _REASONING_FIELDS,
                _alias_reasoning_fields,
                _compile_jinja_template,
            )

            self._compiled = _cached_safety(_compile_jinja_template(template), template)
            self._alias = _alias_reasoning_fields
            # Template.render merges the template's globals into a new dict on every call (through a ChainMap, in
            # Python): merged once here; they are set when transformers compiles the template, before we see it
            self._globals = dict(self._compiled.globals)
            self._aliased = frozenset(_REASONING_FIELDS)  # the keys _alias_reasoning_fields reads
        except (ImportError, AttributeError):
            self._compiled = None

    def __call__(self, messages: list[dict], extra: dict, add_generation_prompt: bool = False) -> str:
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, chat_template=self.template, add_generation_prompt=add_generation_prompt, **extra
            )
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        tools, documents = extra.get("tools"), extra.get("documents")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("Tools should either be a JSON schema, or a callable function with type hints")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        if all(None not in m.values() and self._aliased.isdisjoint(m) for m in messages):
            chat = messages  # what the copies below would be: no None value to drop, no reasoning field to alias
        else:
            chat = self._alias([{k: v for k, v in m.items() if v is not None} for m in messages])
        kwargs = {**self.special, **{k: v for k, v in extra.items() if k not in ("tools", "documents")}}
        if self._compiled.environment.is_async or not _RENDER_ARGS.isdisjoint(kwargs):  # render() refuses these twice
            return self._compiled.render(
                messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **kwargs
            )
        # what Template.render does: a context of the globals and our variables (later ones win), then its root
        context = self._compiled.new_context(
            {**self._globals, "messages": chat, "tools": tools, "documents": documents,
             "add_generation_prompt": add_generation_prompt, **kwargs},
            shared=True,  # take this dict as it is: it holds the globals already
        )
        environment = self._compiled.environment
        try:
            return environment.concat(self._compiled.root_render_func(context))
        except Exception:
            environment.handle_exception()


# ---- special tokens in text ----


class Specials:
    """Where the tokenizer's special and added tokens lie in a text (leftmost-longest, as the tokenizer splits)."""

    def __init__(self, tokens):
        self.tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
        self.re = re.compile("|".join(re.escape(t) for t in self.tokens)) if self.tokens else None
        self.split_re = re.compile("(" + self.re.pattern + ")") if self.tokens else None

    def spans(self, text: str, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        if self.re is None:
            return []
        return [m.span() for m in self.re.finditer(text, lo, len(text) if hi is None else hi)]

    def runs(self, text: str, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Maximal runs of adjacent special tokens in text[lo:hi]."""
        out: list[list[int]] = []
        for a, b in self.spans(text, lo, hi):
            if out and out[-1][1] == a:
                out[-1][1] = b
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    def token_at(self, text: str, pos: int) -> str | None:
        m = self.re.match(text, pos) if self.re is not None else None
        return m.group() if m else None

    def cut_back(self, text: str, cut: int) -> int:
        """`cut`, moved back to the start of a special token it falls inside."""
        for a, b in self.spans(text):
            if a < cut < b:
                return a
        return cut


def _common_prefix_len(a: str, b: str) -> int:
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return n


def _after(text: str, k: int, until: int | None = None) -> str:
    """The literal text after sentinel k, up to sentinel `until` (or the end)."""
    start = text.index(sentinel(k)) + len(sentinel(k))
    return text[start : text.index(sentinel(until)) if until is not None else len(text)]


# ---- what the template looks like: learned once per tokenizer (and per sample kwargs) from probe renders ----


@dataclass(frozen=True)
class TemplateShape:
    header: str  # what add_generation_prompt appends after a user turn, with default kwargs ("" if nothing)
    end: str  # what the template appends after the last message's turn (Phi-3's EOS), "" mostly: with default
    # kwargs here; samples use trailing_end's with their own (Encoder.turn_shape)
    openers: tuple[str, ...]  # special tokens that open a turn other than the assistant's (and the header's first)
    closers: tuple[tuple[str, str], ...]  # (role, the special token closing that role's turn): headerless templates
    base_extra: tuple[tuple[str, object], ...] = ()  # what the probes needed to render (tools, for Hermes)

    def closer(self, role: str) -> str | None:
        return dict(self.closers).get(role)


def generation_header(render, specials: Specials, extra: dict) -> str:
    """What the generation prompt appends after a user turn, with these tools and kwargs."""
    user = [{"role": "user", "content": sentinel(0)}]
    with_prompt = _after(render(user, extra, True), 0)
    without = _after(render(user, extra, False), 0)
    if with_prompt == without:
        # add_generation_prompt changes nothing. Either there is no generation prompt (Mistral: `[/INST]` closes the
        # user turn and nothing follows), or the template writes it after the last message whatever the flag says
        # (Command-R7B: `<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`): then it is what follows
        # the user turn's closing token, the prompt of every assistant turn.
        spans = specials.spans(with_prompt)
        if len(spans) >= 2 and spans[0][0] == 0 and spans[1][0] == spans[0][1]:
            return with_prompt[spans[1][0] :]
        return ""
    # A common prefix can end inside a special token (Phi-3: "<|end|>\n<|endoftext|>" vs "<|end|>\n<|assistant|>\n")
    return with_prompt[specials.cut_back(with_prompt, _common_prefix_len(with_prompt, without)) :]


def header_candidates(header: str, specials: Specials) -> list[str]:
    """The header, then its cuts before and after each special or added token after its first (longest first): what
    the full render may have of it on a turn rendered as history (Qwen3 without the empty think block, or with
    reasoning where the prompt has an empty think block: the prompt's `<think>` is the prompt's)."""
    spans = specials.spans(header)
    cuts = sorted({k for span in spans[1:] for k in span if 0 < k < len(header)}, reverse=True)
    floor = spans[0][1] if spans else 1  # never shorter than the header's first token
    return [header] + [header[:a] for a in cuts if a >= floor]


def _tool_probe(q: str) -> dict:
    call = {"id": PROBE_ID, "type": "function", "function": {"name": "probe", "arguments": {"q": q}}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def trailing_end(render, specials: Specials, extra: dict, header: str) -> str:
    """What the template writes after the last message's turn whatever that message is (Phi-3's EOS; Command-R7B's
    generation prompt, written whatever add_generation_prompt says), with these tools and kwargs (`header` is
    generation_header's with them): never part of the turn. It can depend on the kwargs: Command-R7B writes
    `<|START_THINKING|><|END_THINKING|>` after its opener unless enable_thinking is true. "" mostly."""
    user = {"role": "user", "content": sentinel(0)}
    pair = render([user, {"role": "assistant", "content": sentinel(1)}], extra)
    final_user, final, middle_user = _after(render([user], extra), 0), _after(pair, 1), _after(pair, 0, 1)
    # what follows the last message's turn whatever it is: where a user turn's closing as last and as middle part
    cut = specials.cut_back(final_user, _common_prefix_len(final_user, middle_user))
    end = final_user[cut:] if final.endswith(final_user[cut:]) else ""
    if header and final.endswith(header) and final_user.endswith(header):
        end = header  # written after the last message whatever add_generation_prompt says (Command-R7B)
    return end


def learn_shape(tokenizer, render, specials: Specials) -> TemplateShape:
    """Probe the template with sentinel conversations. Raises MaskError when it cannot render a plain exchange."""
    base: dict = {}
    try:
        header = generation_header(render, specials, base)
    except Exception:  # Hermes-3's tool_use template iterates `tools` unconditionally
        base = {"tools": PROBE_TOOLS}
        try:
            header = generation_header(render, specials, base)
        except Exception as e:
            raise MaskError(f"the chat template fails on a plain user/assistant conversation ({e})") from None
    user = {"role": "user", "content": sentinel(0)}
    end = trailing_end(render, specials, base, header)
    final = _after(render([user, {"role": "assistant", "content": sentinel(1)}], base), 1)
    eots = {final[a:b] for a, b in specials.spans(final[: len(final) - len(end)])[:1]}
    head = specials.spans(header)[:1]
    head_token = header[head[0][0] : head[0][1]] if head else None
    openers = {head_token} if head_token else set()
    closers = []

    def note_opener(between: str) -> None:
        """The token opening the next turn in `between` (the text from an assistant turn's body to the next
        message's): the header's first token if there, else the special token after the first end-of-turn."""
        if head_token and head_token in between:
            return
        for a, b in specials.spans(between):
            if between[a:b] in eots:
                nxt = specials.spans(between, b)
                if nxt:
                    openers.add(between[nxt[0][0] : nxt[0][1]])
                return

    probes = [
        [user, {"role": "assistant", "content": sentinel(1)}, {"role": "user", "content": sentinel(2)}],
        [user, {"role": "assistant", "content": sentinel(1)}, {"role": "system", "content": sentinel(2)}],
        [user, _tool_probe(sentinel(1)), {"role": "tool", "content": sentinel(2), "tool_call_id": PROBE_ID}],
    ]
    for extra in (base, {**base, "tools": PROBE_TOOLS}):
        for probe in probes:
            try:
                text = render(probe, extra)
                note_opener(_after(text, 1, 2))
                if probe[2]["role"] != "system":  # how that role's turn closes before an assistant turn
                    text = render([*probe, {"role": "assistant", "content": sentinel(3)}], extra)
                    closing = _after(text, 2, 3)
                    spans = specials.spans(closing)
                    if spans and probe[2]["role"] not in dict(closers):
                        closers.append((probe[2]["role"], closing[spans[0][0] : spans[0][1]]))
            except Exception:  # the template rejects this order or role: samples with it report their own
                continue
    return TemplateShape(
        header=header, end=end, openers=tuple(sorted(openers)), closers=tuple(closers), base_extra=tuple(base.items())
    )


# ---- method 1: the sentinel render ----


class Piece(NamedTuple):  # a NamedTuple, not a frozen dataclass: one is made per content of every sample
    message: int  # index into messages
    key: str  # "content", one of REASONING_KEYS, or "tool_calls" (an argument string)
    value: str  # the original string


def _placeholders(value: str, message: int, key: str, pieces: list[Piece], split: re.Pattern | None) -> str:
    """value with its text replaced by sentinels. Special tokens in it stay as they are, between sentinels (one
    before the first and one after the last, maybe for ""), so a template that branches on them (Qwen3 and
    DeepSeek split content at `</think>`) takes the same branch, and the value's extent is still known."""
    parts = split.split(value) if split is not None else [value]
    if len(parts) == 1:
        pieces.append(Piece(message, key, value))
        return sentinel(len(pieces) - 1)
    out = []
    for n, part in enumerate(parts):
        if n % 2:  # a special token
            out.append(part)
        else:
            pieces.append(Piece(message, key, part))
            out.append(sentinel(len(pieces) - 1))
    return "".join(out)


def _sentinel_values(value, message: int, pieces: list[Piece], split: re.Pattern | None):
    """A copy of a tool call's arguments with every string value replaced by sentinels."""
    if isinstance(value, str):
        return _placeholders(value, message, "tool_calls", pieces, split)
    if isinstance(value, dict):
        return {k: _sentinel_values(v, message, pieces, split) for k, v in value.items()}
    if isinstance(value, list):
        return [_sentinel_values(v, message, pieces, split) for v in value]
    return value


def with_sentinels(messages: list[dict], split: re.Pattern | None = None) -> tuple[list[dict], list[Piece]]:
    """Copy of messages with every non-empty content, assistant reasoning (the same sentinels under each
    reasoning key present: transformers aliases them) and tool-call argument string replaced by sentinels;
    `split` (Specials.split_re) keeps the special tokens in them."""
    pieces: list[Piece] = []
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        value = message.get("content")
        if isinstance(value, str) and value:
            message["content"] = _placeholders(value, i, "content", pieces, split)
        if message["role"] == "assistant" and len(message) > 1 + ("content" in message):  # keys besides those two
            present = [k for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k]]
            if present:
                replaced = _placeholders(message[present[0]], i, present[0], pieces, split)
                for key in present:
                    message[key] = replaced
            if isinstance(message.get("tool_calls"), list):
                calls = []
                for call in message["tool_calls"]:
                    if isinstance(call, dict):
                        call = dict(call)
                        fn = call.get("function")
                        target = call if not isinstance(fn, dict) else dict(fn)
                        if "arguments" in target:
                            target["arguments"] = _sentinel_values(target["arguments"], i, pieces, split)
                        if isinstance(fn, dict):
                            call["function"] = target
                    calls.append(call)
                message["tool_calls"] = calls
        out.append(message)
    return out, pieces


_NEEDS_JSON_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _variants(value: str) -> list[str]:
    """How a template may render a value: as is, stripped (`|trim`, Qwen3's strip('\\n'), ...), JSON-escaped
    (`|tojson` of a string, inside the quotes the sentinel render shows as literal text)."""
    out = [value]
    if value[:1].isspace() or value[-1:].isspace():
        for v in (value.strip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n"), value.lstrip(), value.rstrip()):
            if v not in out:
                out.append(v)
    if _NEEDS_JSON_ESCAPE.search(value) or not value.isascii():
        for ascii_only in (False, True):
            v = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
            if v not in out:
                out.append(v)
    return out


def align(real: str, literals: list[str], values: list[str]) -> list[tuple[int, int]]:
    """Where each rendered value lies in `real`, given real == literals[0] X1 literals[1] X2 ... exactly.

    Raises MaskError when there is no such alignment or more than one (then the masks would be a guess).
    """
    # Fast path: every value rendered as it is. Another alignment would need a value rendered shorter (stripped)
    # and another longer (JSON-escaped) by exactly as much, with the same text around: we take this one.
    # (real is then exactly the literals and values interleaved: one comparison of the joined text)
    if len(real) == sum(map(len, literals)) + sum(map(len, values)):
        parts = [literals[0]]
        for value, literal in zip(values, literals[1:]):
            parts += (value, literal)
        if real == "".join(parts):
            edges = list(accumulate(map(len, parts)))  # the end of each part: values are parts 1, 3, 5, ...
            return [(edges[k - 1], edges[k]) for k in range(1, len(parts), 2)]
    found: list[list[tuple[int, int]]] = []

    def search(k: int, pos: int, spans: list[tuple[int, int]]) -> None:
        if len(found) >= MAX_ALIGNMENTS:
            return
        if k == len(values):
            if pos == len(real):
                found.append(list(spans))
            return
        for v in _variants(values[k]):
            end = pos + len(v)
            if real.startswith(v, pos) and real.startswith(literals[k + 1], end):
                spans.append((pos, end))
                search(k + 1, end + len(literals[k + 1]), spans)
                spans.pop()

    if real.startswith(literals[0]):
        search(0, len(literals[0]), [])
    if not found:
        raise MaskError("the conversation renders differently once its contents are replaced (template branches on content)")
    if len(found) > 1 and found[0] != found[1]:
        raise MaskError("ambiguous alignment of contents with whitespace-only template text around them")
    return found[0]


def _sentinels(marked: str, pieces: list[Piece]) -> tuple[list[str], list[int]]:
    """The sentinel render's literal pieces and its sentinel ids in order (MaskError if the template repeated or
    altered a placeholder)."""
    parts = SENTINEL_RE.split(marked)  # literal, id, literal, id, ..., literal
    literals, ids = parts[0::2], [int(k) for k in parts[1::2]]
    if len(set(ids)) != len(ids):
        raise MaskError("the chat template renders a message more than once")
    if any(k >= len(pieces) for k in ids) or OPEN in "".join(literals) or CLOSE in "".join(literals):
        raise MaskError("the chat template altered a content placeholder")
    return literals, ids


def _aligned(real: str, marked: str, pieces: list[Piece]) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """The sentinel render's literal pieces, its sentinel ids in order, and where each value lies in `real`."""
    literals, ids = _sentinels(marked, pieces)
    return literals, ids, align(real, literals, [pieces[k].value for k in ids])


def content_char_spans(real: str, marked: str, pieces: list[Piece]) -> dict[int, tuple[int, int]]:
    """Where each rendered piece's value (as rendered, e.g. trimmed) lies in `real`: piece index -> span."""
    _, ids, real_spans = _aligned(real, marked, pieces)
    return dict(zip(ids, real_spans))


def _turn_end(text: str, specials: Specials, shape: TemplateShape, header: str, lo: int, hi: int, next_is_assistant: bool) -> int:
    """The end of an assistant turn whose body ends at `lo`, in text[lo:hi] (template structure only): the end of
    the last run of special tokens before the token that opens the next turn."""
    boundary = hi
    for a, b in specials.spans(text, lo, hi):
        if text[a:b] in shape.openers and not (header and text.startswith(header, a) and not next_is_assistant):
            boundary = a
            break
    if next_is_assistant and header:  # two assistant messages in a row: the second one's header opens it
        at = text.rfind(header, lo, hi)
        boundary = min(boundary, at) if at >= 0 else boundary
    runs = specials.runs(text, lo, boundary)
    if not runs:
        raise MaskError("no end-of-turn token closes an assistant turn")
    return runs[-1][1]


@dataclass(frozen=True)
class SentinelPlan:
    """What a sentinel render says. It depends only on the sample's skeleton (the sentinel-replaced messages and
    the template variables), so samples with the same skeleton share it (process_data caches it)."""

    literals: tuple[str, ...]  # the render's literal pieces around the sentinels
    ids: tuple[int, ...]  # the sentinels in render order
    starts: tuple[int, ...]  # where each starts in the sentinel render, in render order
    ends: tuple[int, ...]
    turns: tuple[tuple[int, int], ...]  # the trained spans, in sentinel-render positions


def sentinel_plan(
    shape: TemplateShape, header: str, specials: Specials, marked: str, messages: list[dict], pieces: list[Piece]
) -> SentinelPlan:
    """The trained spans of every assistant turn in the sentinel render `marked` (MaskError where they cannot be
    found consistently)."""
    literals, ids = _sentinels(marked, pieces)

    marked_at: dict[int, tuple[int, int]] = {}  # sentinel id -> (start, end) in `marked`
    pos = len(literals[0])
    for j, k in enumerate(ids):
        marked_at[k] = (pos, pos + len(sentinel(k)))
        pos += len(sentinel(k)) + len(literals[j + 1])
    by_message: dict[int, list[tuple[int, int]]] = {}
    for k, span in marked_at.items():
        by_message.setdefault(pieces[k].message, []).append(span)
    for spans_of in by_message.values():
        spans_of.sort()
    owner = sorted((span[0], span[1], pieces[k].message) for k, span in marked_at.items())  # pieces in render order
    ends = [b for _, b, _ in owner]
    first_after = [len(marked)] * (len(messages) + 1)  # first piece of any message after i
    for i in range(len(messages) - 1, -1, -1):
        first_after[i] = min(first_after[i + 1], by_message[i + 1][0][0] if i + 1 in by_message else len(marked))
    starts = [a for a, _, _ in owner]

    candidates = header_candidates(header, specials) if header else []
    tail = len(marked) - len(shape.end) if shape.end and marked.endswith(shape.end) else len(marked)
    turns: list[tuple[int, int]] = []
    cursor = 0  # the end of the previous assistant turn's span
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        own = by_message.get(i, [])
        later = first_after[i]
        first_own = own[0][0] if own else later
        # after the last piece of an earlier message rendered before this turn (not Mistral's system prompt,
        # moved on to a later user turn)
        j = bisect_left(ends, first_own + 1) - 1
        while j >= 0 and owner[j][2] >= i:
            j -= 1
        lo = max(cursor, ends[j] if j >= 0 else 0)
        if candidates:
            # the first occurrence after the previous message, and of the candidates there the longest: the turn
            # may hold the header again (gpt-oss writes `<|start|>assistant` after an empty analysis block)
            found = [(at, -len(c)) for c in candidates if (at := marked.find(c, lo, first_own)) >= 0]
            if not found:
                raise MaskError("cannot find the assistant header before an assistant turn")
            at, n = min(found)
            start = at - n
        else:  # no header (Mistral): the turn starts where the previous message's turn closes
            closer = shape.closer(messages[i - 1]["role"]) if i > 0 else None
            at = marked.rfind(closer, lo, first_own) if closer else -1
            if at < 0:
                raise MaskError("cannot find where an assistant turn starts (the template has no generation prompt)")
            start = at + len(closer)
        body_end = max(start, own[-1][1] if own else start)
        next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        hi = later if later < len(marked) else tail
        end = _turn_end(marked, specials, shape, header, body_end, max(hi, body_end), next_is_assistant)
        # never across a turn: no opener in the template's text of the turn, but a header's (the turn's own
        # contents may quote any token: they lie between its first and last pieces)
        body = (own[0][0], own[-1][1]) if own else (start, start)
        for a, b in specials.spans(marked, start, end):
            if body[0] <= a < body[1]:
                continue
            if marked[a:b] in shape.openers and not (header and marked.startswith(candidates[-1], a)):
                raise MaskError("an assistant turn's trained region crosses into another turn")
        for p in (start, end):
            k = bisect_left(starts, p + 1) - 1
            if k >= 0 and starts[k] < p < ends[k]:
                raise MaskError("a trained span boundary falls inside a content")
        turns.append((start, end))
        cursor = end
    return SentinelPlan(tuple(literals), tuple(ids), tuple(starts), tuple(ends), tuple(turns))


def apply_plan(plan: SentinelPlan, real: str, pieces: list[Piece]) -> list[tuple[int, int]]:
    """Trained character spans in `real`: the plan's, once the real render aligns with its literal pieces."""
    real_spans = align(real, list(plan.literals), [pieces[k].value for k in plan.ids])

    def to_real(p: int) -> int:
        """Map a position in the sentinel render (in a literal, or at a sentinel's start) to `real`."""
        j = bisect_left(plan.starts, p + 1) - 1  # last sentinel starting at or before p
        if j < 0:
            return p
        if p == plan.starts[j]:
            return real_spans[j][0]
        return real_spans[j][1] + (p - plan.ends[j])

    return [(to_real(a), to_real(b)) for a, b in plan.turns]


def sentinel_spans(
    shape: TemplateShape, header: str, specials: Specials, real: str, marked: str, messages: list[dict], pieces: list[Piece]
) -> list[tuple[int, int]]:
    """Trained character spans in `real`, one per assistant turn, from the sentinel render `marked`."""
    return apply_plan(sentinel_plan(shape, header, specials, marked, messages, pieces), real, pieces)


# ---- method 2: prefix renders, the rule itself ----


def prefix_spans(
    render, shape: TemplateShape, header: str, specials: Specials, real: str, messages: list[dict], extra: dict
) -> list[tuple[int, int]]:
    """Trained character spans in `real` from the render of each assistant turn's prompt and of the conversation
    up to and including the turn. Raises MaskError where the full render does not extend them."""
    spans: list[tuple[int, int]] = []
    tail = len(real) - len(shape.end) if shape.end and real.endswith(shape.end) else len(real)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise MaskError("an assistant turn opens the conversation: it has no prompt to render")
        prompt = render(messages[:i], extra, True)
        if real.startswith(prompt):
            start = len(prompt)
        else:  # the full render has less of the header here (history rendered without the think block)
            base = prompt[: len(prompt) - len(header)] if header and prompt.endswith(header) else None
            cands = [c for c in header_candidates(header, specials)[1:]] if header else []
            hit = next((c for c in cands if base is not None and real.startswith(base + c)), None)
            if hit is None:
                raise MaskError("the full render does not start with the prompt of an assistant turn (history rendered differently)")
            start = len(base) + len(hit)
        if spans and start < spans[-1][1]:
            raise MaskError("an assistant turn's prompt ends inside the previous turn")
        if i == len(messages) - 1:  # the last turn: it runs to the end of the render, less what follows any last turn
            end_at = tail
            region = real
        else:  # render the turn as history, followed by a user turn whose opener ends the template structure before
            # its placeholder: the turn's closing is before that opener, and must be what the full render has
            region = render([*messages[: i + 1], {"role": "user", "content": sentinel(0)}], extra, False)
            at = region.find(sentinel(0), start)
            openers = [a for a, b in specials.spans(region, start, at) if region[a:b] in shape.openers] if at >= 0 else []
            if not openers:
                raise MaskError("cannot find where an assistant turn's closing ends when rendered as history")
            end_at = openers[-1]
        runs = specials.runs(region, start, end_at)
        if not runs or region[runs[-1][1] : end_at].strip():  # GLM-4: text after the last special token
            raise MaskError("no end-of-turn token closes an assistant turn")
        end = runs[-1][1]
        if region is not real and not real.startswith(region[:end]):
            raise MaskError("the full render differs from the render of the conversation up to an assistant turn")
        spans.append((start, end))
    return spans


def check_spans(real: str, spans: list[tuple[int, int]], specials: Specials) -> None:
    """What every method's result must satisfy: in order, inside the render, each ending with a special token."""
    prev = 0
    ends = {b for _, b in specials.spans(real)}
    for a, b in spans:
        if not (prev <= a < b <= len(real)) or b not in ends:
            raise MaskError("derived trained spans are inconsistent with the render")
        prev = b


def token_mask(
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    ids: list[int] = (),
    added_ids: frozenset[int] = frozenset(),
) -> list[bool]:
    """True for every token whose characters overlap a trained span (offsets are sorted, non-overlapping).

    Except an added token (id in `added_ids`) that straddles a span's start: that is template structure which
    swallowed the content's leading whitespace (Phi-3's `<|assistant|>` has rstrip), e.g. the assistant header,
    and training it would teach the model to produce the header.
    """
    mask = [False] * len(offsets)
    for a, b in spans:
        i = bisect_left(offsets, (a, -1))  # first token starting at or after a
        if i > 0 and offsets[i - 1][1] > a and not (ids and ids[i - 1] in added_ids):  # the token before straddles a
            i -= 1
        while i < len(offsets) and offsets[i][0] < b:
            mask[i] = True
            i += 1
    return mask


def _bisect_start(encoding, a: int, lo: int = 0) -> int:
    """bisect_left(encoding.offsets, (a, -1), lo): the first token from `lo` on starting at or after character a,
    with the same probes, reading each probed token's offsets from the Rust encoding."""
    hi = len(encoding)
    while lo < hi:
        mid = (lo + hi) // 2
        if encoding.token_to_chars(mid)[0] < a:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _first_start(encoding, a: int, lo: int = 0) -> int:
    """_bisect_start(encoding, a, lo) from a hint: the token holding character a (one Rust scan), kept when its
    neighbours show it is the first from `lo` on to start at or after a (with sorted starts that is the answer),
    else the bisection. Three offsets read instead of a bisection's ~log2(tokens)."""
    t = encoding.char_to_token(a)
    if t is not None and t >= lo:
        n = len(encoding)
        c = t if encoding.token_to_chars(t)[0] >= a else t + 1
        if (c == lo or encoding.token_to_chars(c - 1)[0] < a) and (c == n or encoding.token_to_chars(c)[0] >= a):
            return c
    return _bisect_start(encoding, a, lo)


def token_ranges(
    encoding, spans: list[tuple[int, int]], ids: list[int], added_ids: frozenset[int]
) -> list[tuple[int, int]]:
    """token_mask(encoding.offsets, spans, ids, added_ids) as token index ranges [i, j), one per span (the mask is
    True on their union), without building the offsets list, which costs more than the rest of the masks: the
    same steps on the offsets of the few tokens they look at. token_mask's scan to the first token starting at or
    after b is a bisection here, as its own first step is: both take the offsets as sorted (tokenizers gives
    non-decreasing starts; tests/test_process_data.py checks that the two agree)."""
    out = []
    for a, b in spans:
        i = _first_start(encoding, a)
        if i > 0 and encoding.token_to_chars(i - 1)[1] > a and not (ids and ids[i - 1] in added_ids):
            i -= 1
        out.append((i, _first_start(encoding, b, i)))
    return out


def covers_every_span(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> bool:
    """Whether every non-empty span overlaps at least one token."""
    for a, b in spans:
        i = bisect_left(offsets, (a, -1))
        if a < b and not ((i > 0 and offsets[i - 1][1] > a) or (i < len(offsets) and offsets[i][0] < b)):
            return False
    return True


# ---- templates with {% generation %} tags: they say themselves which characters are trained ----

GENERATION_TAG_RE = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
GEN_OPEN, GEN_CLOSE = "\ue002", "\ue003"


def has_generation_tags(template: str) -> bool:
    return GENERATION_TAG_RE.search(template) is not None


def marking_template(template: str) -> str:
    """The template with each {% generation %} / {% endgeneration %} writing GEN_OPEN / GEN_CLOSE instead.

    We find the trained characters from these marks rather than trusting transformers' assistant_masks, which
    maps them to tokens through the post-processor's trimmed offsets and stops at the first turn whose start
    it cannot map (a turn starting with a space under GPT-2's trim_offsets), leaving later turns untrained.
    """

    def mark(m: re.Match) -> str:
        # block tags around the mark keep what the original tag did to whitespace: its -, and transformers'
        # lstrip_blocks (before it) and trim_blocks (the newline after it)
        return "{%" + m[1] + " if true %}{{ " + repr(GEN_CLOSE if m[2] else GEN_OPEN) + " }}{% endif " + m[3] + "%}"

    return GENERATION_TAG_RE.sub(mark, template)


def generation_spans(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The render without its generation marks, and the character spans the marks enclosed."""
    parts = re.split(f"([{GEN_OPEN}{GEN_CLOSE}])", marked)
    text, spans, start = [], [], None
    pos = 0
    for part in parts:
        if part == GEN_OPEN or part == GEN_CLOSE:
            if (part == GEN_OPEN) != (start is None):
                raise MaskError("the chat template's {% generation %} blocks are nested or unbalanced")
            if part == GEN_OPEN:
                start = pos
            else:
                spans.append((start, pos))
                start = None
        else:
            text.append(part)
            pos += len(part)
    if start is not None:
        raise MaskError("the chat template's {% generation %} blocks are nested or unbalanced")
    return "".join(text), spans


# U+E000..U+E003 as UTF-8 bytes or as JSON escapes
RAW_SENTINEL_RE = re.compile(rb"\xee\x80[\x80-\x83]|\\u[eE]00[0-3]")


def check_placeholders(raw: bytes) -> None:
    # both forms start with b"\xee\x80" or b"\\u": a substring test first, much cheaper than the search
    if (b"\xee\x80" in raw or b"\\u" in raw) and RAW_SENTINEL_RE.search(raw):
        raise MaskError("contains the private-use characters U+E000..U+E003 reserved for mask placeholders")


def markers_pattern(markers: list[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


def _literal_strings(value):
    """Every string in a sentinel-replaced sample that the template renders as it is (keys included)."""
    if isinstance(value, str):
        if OPEN not in value:
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):  # templates render keys too: tool-call argument names, schema properties
                yield key
            yield from _literal_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _literal_strings(item)


def check_literals(marked_messages: list[dict], extra: dict, markers: re.Pattern) -> None:
    """Raise MaskError when a value the sentinel render keeps literal (a tool name, an argument name, a tool
    definition) contains template structure such as "<|im_end|>": a turn boundary could be found in it."""
    for value in (marked_messages, extra):
        for text in _literal_strings(value):
            if markers.search(text):
                raise MaskError("a tool name, argument name or tool definition contains chat-template control text")
