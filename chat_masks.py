"""Which characters of a rendered conversation the model is trained on, for any chat template.

Templates without `{% generation %}` tags (most official ones) do not say where an assistant turn starts or
ends, so we find out by rendering each conversation twice: once as is (the text we tokenize), once with every
message content (and assistant reasoning) replaced by a unique sentinel string of private-use characters:

    real:      <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    sentinel:  <|im_start|>user\\n\\ue0000\\ue001<|im_end|>\\n<|im_start|>assistant\\n\\ue0001\\ue001<|im_end|>\\n

The sentinel render is literal pieces L0 S1 L1 S2 ... and the real render must be exactly L0 X1 L1 X2 ...,
where each Xk is the original value or a whitespace-stripped variant of it (templates `|trim`). The literal
pieces hold only template structure, never user text, so the assistant header and end-of-turn marker found in
them are real structure even when a message contains `<|im_end|>`. Anything that does not fit fails closed:
`MaskError` for that sample, never a guessed mask.

Per assistant turn the trained characters run from its first model-produced piece (the reasoning block with
its wrapper when reasoning is rendered, else the content, else the tool calls after the header) to the end of
the end-of-turn marker that closes the turn. A think block the template injects empty is not trained. A trained
region that holds the opener of any role's turn (learned by probing) fails closed rather than train across turns.
Templates with `{% generation %}` tags mark their trained characters themselves (see marking_template).
"""

import re
from bisect import bisect_left
from dataclasses import dataclass

OPEN, CLOSE = "\ue000", "\ue001"
SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")
MAX_ALIGNMENTS = 2  # we only need to know whether the alignment is unique
# where templates read an assistant turn's reasoning: Qwen3/DeepSeek-R1, gpt-oss, others
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class MaskError(ValueError):
    """The trained spans of this sample cannot be derived consistently: skip the sample, report why."""


def sentinel(k: int) -> str:
    return f"{OPEN}{k}{CLOSE}"


def render(tokenizer, messages: list[dict], extra: dict, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **extra)


# ---- what the template looks like: learned once per tokenizer from probe renders ----


@dataclass(frozen=True)
class TemplateShape:
    header: str  # what add_generation_prompt appends: the assistant header ("" if the template has none)
    injected: str  # what the template puts between header and content on its own (Qwen3's empty think block)
    eot: str  # the end-of-turn marker closing every assistant turn, e.g. "<|im_end|>"
    next_turn: str  # how the turn after an assistant turn opens, e.g. "<|im_start|>user"
    openers: tuple[str, ...] = ()  # how a user, system or tool turn after an assistant turn opens


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _special_spans(text: str, specials: list[str]) -> list[tuple[int, int]]:
    spans = []
    for token in specials:
        start = text.find(token)
        while start != -1:
            spans.append((start, start + len(token)))
            start = text.find(token, start + 1)
    return sorted(spans)


def _after(text: str, k: int, until: int | None = None) -> str:
    """The literal text after sentinel k, up to sentinel `until` (or the end)."""
    start = text.index(sentinel(k)) + len(sentinel(k))
    return text[start : text.index(sentinel(until)) if until is not None else len(text)]


def learn_shape(tokenizer) -> TemplateShape:
    """Probe the template with sentinel conversations. Raises MaskError when it has no usable end-of-turn marker."""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    user = {"role": "user", "content": sentinel(0)}
    # The assistant header: what the generation prompt adds. A common prefix can end inside a special token
    # (Phi-3: "<|end|>\n<|endoftext|>" vs "<|end|>\n<|assistant|>\n"), so cut back to that token's start.
    with_prompt = _after(tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True), 0)
    without = _after(tokenizer.apply_chat_template([user], tokenize=False), 0)
    cut = len(_common_prefix(with_prompt, without))
    for start, end in _special_spans(with_prompt, specials):
        if start < cut < end:
            cut = start
    header = with_prompt[cut:]

    two_turns = [user, {"role": "assistant", "content": sentinel(1)}]
    two_turns += [{"role": "user", "content": sentinel(2)}, {"role": "assistant", "content": sentinel(3)}]
    text = render(tokenizer, two_turns, {})
    between = _after(text, 2, 3)  # before the final turn, where Qwen3 injects its empty think block
    injected = between[between.rindex(header) + len(header) :] if header and header in between else ""
    # The end-of-turn marker: what closes both a middle and a final assistant turn, up to and including the
    # first special token they share; the separator after it ("\n") is not part of the turn, and neither is
    # what may follow it in both (a template appending a block after the last message opens it with the next
    # turn's "<|im_start|>").
    middle, final = _after(text, 1, 2), _after(text, 3)
    shared = _common_prefix(middle, final)
    ends = [end for _, end in _special_spans(shared, specials) if end <= len(shared)]
    if not ends:
        raise MaskError(
            f"the chat template closes assistant turns with {final!r}, which has no special token to use as "
            "end-of-turn marker"
        )
    eot = shared[: ends[0]]
    next_turn = middle[len(eot) :].strip()
    openers = tuple(o for role in ("user", "system", "tool") if (o := _opener(tokenizer, role, eot, specials)))
    return TemplateShape(header=header, injected=injected, eot=eot, next_turn=next_turn, openers=openers)


def _opener(tokenizer, role: str, eot: str, specials: list[str]) -> str:
    """How a `role` turn right after an assistant turn opens, through its last special token (Llama-3's
    "<|start_header_id|>ipython<|end_header_id|>"), or "" when the template refuses that order."""
    probe = [{"role": "user", "content": sentinel(0)}, {"role": "assistant", "content": sentinel(1)}]
    probe.append({"role": role, "content": sentinel(2)})
    try:
        between = _after(render(tokenizer, probe, {}), 1, 2)
    except Exception:  # the template rejects the order (roles must alternate) or the role
        return ""
    if not between.startswith(eot):
        return ""
    opener = between[len(eot) :].lstrip()
    ends = [end for _, end in _special_spans(opener, specials)]
    return opener[: max(ends)] if ends else opener.strip()


# ---- one sample ----


@dataclass(frozen=True)
class Piece:
    message: int  # index into messages
    key: str  # "content" or one of REASONING_KEYS
    value: str  # the original string


def with_sentinels(messages: list[dict]) -> tuple[list[dict], list[Piece]]:
    """Copy of messages with every non-empty content (and assistant reasoning, under any of REASONING_KEYS)
    replaced by sentinel(k)."""
    pieces: list[Piece] = []
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        keys = ("content", *REASONING_KEYS) if message["role"] == "assistant" else ("content",)
        for key in keys:
            value = message.get(key)
            if isinstance(value, str) and value:
                message[key] = sentinel(len(pieces))
                pieces.append(Piece(i, key, value))
        out.append(message)
    return out, pieces


def _variants(value: str) -> list[str]:
    """How a template may render a value: as is, or stripped (`|trim`, Qwen3's strip('\\n'), ...)."""
    out = []
    for v in (value, value.strip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n"), value.lstrip(), value.rstrip()):
        if v not in out:
            out.append(v)
    return out


def align(real: str, literals: list[str], values: list[str]) -> list[tuple[int, int]]:
    """Where each rendered value lies in `real`, given real == literals[0] X1 literals[1] X2 ... exactly.

    Raises MaskError when there is no such alignment or more than one (then the masks would be a guess).
    """
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


def _aligned(real: str, marked: str, pieces: list[Piece]) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """The sentinel render's literal pieces, its sentinel ids in order, and where each value lies in `real`."""
    parts = SENTINEL_RE.split(marked)  # literal, id, literal, id, ..., literal
    literals, ids = parts[0::2], [int(k) for k in parts[1::2]]
    if len(set(ids)) != len(ids):
        raise MaskError("the chat template renders a message more than once")
    if any(k >= len(pieces) for k in ids) or OPEN in "".join(literals) or CLOSE in "".join(literals):
        raise MaskError("the chat template altered a content placeholder")
    return literals, ids, align(real, literals, [pieces[k].value for k in ids])


def content_char_spans(real: str, marked: str, pieces: list[Piece]) -> dict[int, tuple[int, int]]:
    """Where each rendered piece's value (as rendered, e.g. trimmed) lies in `real`: piece index -> span."""
    _, ids, real_spans = _aligned(real, marked, pieces)
    return dict(zip(ids, real_spans))


def assistant_char_spans(
    shape: TemplateShape, real: str, marked: str, messages: list[dict], pieces: list[Piece]
) -> list[tuple[int, int]]:
    """Trained character spans in `real`, one per assistant turn, from the sentinel render `marked`."""
    literals, ids, real_spans = _aligned(real, marked, pieces)

    # Positions in the sentinel render, and a map from them to the real render.
    marked_at: dict[int, tuple[int, int]] = {}  # sentinel id -> (start, end) in `marked`
    pos = len(literals[0])
    for j, k in enumerate(ids):
        marked_at[k] = (pos, pos + len(sentinel(k)))
        pos += len(sentinel(k)) + len(literals[j + 1])
    order = sorted(marked_at.values())
    sentinel_starts = [start for start, _ in order]

    def to_real(p: int) -> int:
        """Map a position in `marked` (in a literal, or a sentinel boundary) to `real`."""
        j = bisect_left(sentinel_starts, p + 1) - 1  # last sentinel starting at or before p
        if j < 0:
            return p
        start, end = order[j]
        real_start, real_end = real_spans[j]
        if p == start:
            return real_start
        if p < end:
            raise MaskError("a trained span boundary falls inside a content")
        return real_end + (p - end)

    def next_sentinel(p: int) -> int:
        j = bisect_left(sentinel_starts, p)
        return sentinel_starts[j] if j < len(sentinel_starts) else len(marked)

    def check_one_turn(start: int, end: int) -> None:
        region = marked[start:end]
        if any(marker and marker in region for marker in (shape.header, shape.next_turn, *shape.openers)):
            raise MaskError("an assistant turn's trained region crosses into another turn")

    by_message: dict[tuple[int, str], int] = {(p.message, p.key): k for k, p in enumerate(pieces)}
    spans: list[tuple[int, int]] = []
    cursor = 0  # in `marked`: the end of the previous assistant turn's span
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        rendered = [marked_at[by_message[i, key]] for key in REASONING_KEYS if by_message.get((i, key)) in marked_at]
        reasoning = (min(rendered)[0], max(rendered)[1]) if rendered else None
        content = marked_at.get(by_message.get((i, "content"), -1))
        if reasoning:  # train the reasoning with its wrapper: start right after the assistant header
            before = marked[cursor : reasoning[0]]
            if not shape.header or shape.header not in before:
                raise MaskError("cannot find the assistant header before the reasoning")
            start = cursor + before.rindex(shape.header) + len(shape.header)
            check_one_turn(start, reasoning[0])
        elif content:
            start = content[0]
        else:  # no content rendered (e.g. tool calls only): start after the header that opens this turn
            # the first header after the previous assistant turn, before any later message's content
            later = [marked_at[k][0] for k, p in enumerate(pieces) if p.message > i and k in marked_at]
            limit = min((start for start in later if start >= cursor), default=len(marked))
            found = marked.find(shape.header, cursor, limit) if shape.header else -1
            if found < 0:
                raise MaskError("cannot find the header of an assistant turn without content")
            start = found + len(shape.header)
            if shape.injected and marked.startswith(shape.injected, start):
                start += len(shape.injected)
        body_end = max(start, reasoning[1] if reasoning else 0, content[1] if content else 0)
        eot = marked.find(shape.eot, body_end, next_sentinel(body_end))
        if eot < 0:
            raise MaskError(f"no end-of-turn marker {shape.eot!r} closes an assistant turn")
        check_one_turn(body_end, eot)
        end = eot + len(shape.eot)
        spans.append((to_real(start), to_real(end)))
        cursor = end
    return spans


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
    if RAW_SENTINEL_RE.search(raw):
        raise MaskError("contains the private-use characters U+E000..U+E003 reserved for mask placeholders")


def _literal_strings(value, top: bool):
    """Strings the template renders as they are: every key and value but contents, reasoning and roles."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):  # templates render keys too: tool-call argument names, schema properties
                yield key
            if not (top and key in ("content", *REASONING_KEYS, "role")):
                yield from _literal_strings(item, False)
    elif isinstance(value, list):
        for item in value:
            yield from _literal_strings(item, False)


def markers_pattern(markers: list[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


def check_values(raw: bytes, sample: dict, markers: re.Pattern) -> None:
    """Raise MaskError for values the sentinel method cannot handle safely.

    Sentinel characters anywhere (`raw` is the sample's JSON line) would be confused with our placeholders.
    Values the template renders literally (tool calls, tool definitions, names) are not replaced by sentinels,
    so they must not contain template structure such as "<|im_end|>", or a turn boundary could be found in them.
    """
    check_placeholders(raw)
    others = {k: v for k, v in sample.items() if k != "messages"}
    for value in (*sample["messages"], others):
        for text in _literal_strings(value, True):
            if markers.search(text):
                raise MaskError("a tool call, tool definition or name contains chat-template control text")
