"""Stage 1 for preference data (DPO, SimPO): a chosen and a rejected reply to the same prompt, as two training
sequences with the SFT masks, trained only on the final assistant turn.

Rows, detected by their keys (formats.detect) or forced with --input-format preference; JSONL, CSV or Parquet:

    torchllms / TRL implicit prompt  {"chosen": [messages...], "rejected": [messages...]}
                                     both conversations share every message before their last (an assistant turn)
    TRL explicit prompt              {"prompt": P, "chosen": C, "rejected": R}
                                     P messages or text (text = one user turn); C, R messages (appended to P) or
                                     text (one assistant turn); CSV cells are text

Each side is encoded by process_data's Encoder exactly as a messages sample (ids equal apply_chat_template, the
same mask rule and the same drops), then only its LAST run of trained tokens is kept: the final assistant turn
(the SFT rule trains one contiguous run per assistant turn; earlier turns belong to the shared prompt, masked in
both sides). Output row, in input order:

    {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "chosen_len", "rejected_len",
     "len" (both: the pair is packed whole), "num_loss_counted_tokens" (both)}
    plus "margin" where the input row has one (TRL's reward-model margin: a number, or a CSV cell holding one)

What stops the run (one line, FILE:LINE): a missing side, a side that is neither messages nor text, a text side
without a prompt, anything a messages sample stops on. What drops a pair (counted, first lines printed): the
prompts of the two sides differ (as messages, or as rendered tokens), chosen identical to rejected, a side whose
last message is not an assistant turn, a side with no trained token, a pair longer than --max-sample-num-tokens
(both sides together: a pair must fit one packed row), and a side that a messages sample would drop.
"""

import dataclasses
import math

import orjson

from minitrain import IGNORE
from minitrain.prepare import formats
from minitrain.prepare.encode import (
    DROP_NO_TRAINED,
    DROP_TOO_LONG,
    Chunk,
    Encoder,
    check_messages,
    encode_lines,
)
from minitrain.prepare.formats import Format, InputSpec, RunError

SIDES = ("chosen", "rejected")
DROP_PROMPTS_DIFFER = "the chosen and rejected prompts differ"
DROP_IDENTICAL = "chosen is identical to rejected"
DROP_NO_FINAL_REPLY = "a side's last message is not an assistant turn"


SIDE_FIX = ('each side must be a non-empty list of {"role": ..., "content": ...} messages, or a string with a '
            '`prompt`')


def conversations(row: object, where: str) -> tuple[list, list] | tuple[str, str]:
    """(chosen messages, rejected messages) of a preference row, or (why the pair is dropped, a detail) as two
    strings. RunError for a row that is not a preference row."""
    fix = 'each row must be {"chosen": [...], "rejected": [...]} or {"prompt": ..., "chosen": ..., "rejected": ...}'
    if not isinstance(row, dict):
        raise RunError(f"{where}: not a JSON object — {fix}")
    for side in SIDES:
        if side not in row:
            raise RunError(f"{where}: no `{side}` field — {fix}")
        if not isinstance(row[side], (str, list)):
            got = "null" if row[side] is None else type(row[side]).__name__
            raise RunError(f"{where}: `{side}` must be a list of messages or a string, got {got} — {fix}")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise RunError(f"{where}: `prompt` must be a list of messages or a string — {fix}")
    if prompt is None and not all(isinstance(row[side], list) for side in SIDES):
        raise RunError(f"{where}: a text `chosen`/`rejected` needs a `prompt` — {fix}")
    prefix = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
    sides = []
    for side in SIDES:
        reply = row[side]
        sides.append(prefix + ([{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply))
    chosen, rejected = sides

    for side, messages in zip(SIDES, sides):
        check_messages({"messages": messages}, f"{where}: {side}", SIDE_FIX)  # a malformed conversation stops the run
    for side, messages in zip(SIDES, sides):
        if messages[-1]["role"] != "assistant":
            return DROP_NO_FINAL_REPLY, f"{side} ends with a {messages[-1]['role']} message"
    if chosen[:-1] != rejected[:-1]:
        return DROP_PROMPTS_DIFFER, "the messages before the final reply differ"
    if chosen == rejected:
        return DROP_IDENTICAL, "the same conversation on both sides"
    return chosen, rejected


def pair_margin(row: dict, where: str) -> float | None:
    """The row's optional `margin` (TRL's reward-model field) as a finite number, or a RunError naming FILE:LINE."""
    value = row.get("margin")
    if value is None or value == "":
        return None
    try:
        margin = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        margin = None
    if margin is None or not math.isfinite(margin):
        raise RunError(f"{where}: `margin` must be a finite number, got {value!r}")
    return margin


def final_turn_only(labels: list[int]) -> list[int]:
    """The labels with every trained run but the last masked."""
    last = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = last
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [label if i >= start else IGNORE for i, label in enumerate(labels)]


class PreferenceEncoder:
    """Turns preference rows into pair rows, with a encode.Encoder for messages doing each side."""

    def __init__(self, model: str, input_name: str, max_tokens: int, on_too_long: str, spec: InputSpec):

        self.input_name, self.max_tokens, self.on_too_long, self.spec = input_name, max_tokens, on_too_long, spec
        # A side longer than the limit makes the pair longer: the messages encoder drops it (counted here as the
        # pair's drop), and --on-too-long error is applied to the pair below.
        messages = dataclasses.replace(spec, fmt=Format("messages"), forced=True)  # the same template flags
        self.encoder = Encoder(model, input_name, max_tokens, "drop", messages)
        self.tokenizer, self.template = self.encoder.tokenizer, self.encoder.template

    def encode_chunk(self, lines: list[tuple[int, bytes]]) -> Chunk:
        return encode_lines(self._encode, lines)

    def _encode(self, lines: list[tuple[int, bytes]], chunk) -> None:

        batches = {side: [] for side in SIDES}  # messages rows for the encoder, keyed by the real line number
        margins = {}  # line number -> the row's margin, where it has one
        for lineno, _, where, row in formats.rows_of(lines, self.input_name, self.spec, chunk):
            found = conversations(row, where)
            if isinstance(found[0], str):
                chunk.drops.append((lineno, *found))
                continue
            margin = pair_margin(row, where)
            if margin is not None:
                margins[lineno] = margin
            extra = {k: v for k, v in row.items() if k not in ("prompt", "margin", *SIDES)}  # e.g. tools
            for side, messages in zip(SIDES, found):
                batches[side].append((lineno, formats.dump_row({**extra, "messages": messages})))
        encoded = {}
        for side in SIDES:
            result = self.encoder.encode_chunk(batches[side])
            if result.error:
                raise RunError(result.error)
            encoded[side] = ({n: orjson.loads(line) for n, line in result.rows},
                             {n: (reason, detail) for n, reason, detail in result.drops}, result.masked_by)
        for lineno, _ in batches["chosen"]:
            drop = None  # the first side the messages encoder dropped, and why
            for side in SIDES:
                if lineno in encoded[side][1]:
                    reason, detail = encoded[side][1][lineno]
                    drop = (reason, f"{side}: {detail}")
                    break
            if drop is not None:
                if drop[0] == DROP_TOO_LONG and self.on_too_long == "error":
                    raise RunError(f"{self.input_name}:{lineno}: a side has more than --max-sample-num-tokens "
                                   f"{self.max_tokens} tokens — raise the limit, or pass --on-too-long drop")
                chunk.drops.append((lineno, *drop))
                continue
            sides = {side: encoded[side][0][lineno] for side in SIDES}
            ids = {side: sides[side]["input_ids"] for side in SIDES}
            labels = {side: final_turn_only(sides[side]["labels"]) for side in SIDES}
            first = {side: next(i for i, x in enumerate(labels[side]) if x != IGNORE) for side in SIDES}
            if ids["chosen"][: first["chosen"]] != ids["rejected"][: first["rejected"]]:
                chunk.drops.append((lineno, DROP_PROMPTS_DIFFER, "the prompts render to different tokens"))
                continue
            if ids["chosen"] == ids["rejected"]:
                chunk.drops.append((lineno, DROP_IDENTICAL, "the two sides tokenize identically"))
                continue
            trained = {side: sum(x != IGNORE for x in labels[side]) for side in SIDES}
            if min(sum(x != IGNORE for x in labels[side][1:]) for side in SIDES) == 0:  # none after the shift
                chunk.drops.append((lineno, DROP_NO_TRAINED, "a side's final assistant turn trains no token"))
                continue
            total = len(ids["chosen"]) + len(ids["rejected"])
            if total > self.max_tokens:
                if self.on_too_long == "error":
                    raise RunError(f"{self.input_name}:{lineno}: the pair has {total} tokens (chosen + rejected) > "
                                   f"--max-sample-num-tokens {self.max_tokens} — raise the limit, or pass "
                                   f"--on-too-long drop")
                chunk.drops.append((lineno, DROP_TOO_LONG, f"{total} > {self.max_tokens} tokens (chosen + rejected)"))
                continue
            out = {}
            for side in SIDES:
                out.update({f"{side}_input_ids": ids[side], f"{side}_labels": labels[side],
                            f"{side}_len": len(ids[side])})
            out.update(len=total, num_loss_counted_tokens=sum(trained.values()))
            if lineno in margins:
                out["margin"] = margins[lineno]
            chunk.rows.append((lineno, orjson.dumps(out) + b"\n"))
            chunk.tokens += total
            chunk.trained += sum(trained.values())
            chunk.masked_by[lineno] = encoded["chosen"][2][lineno]  # a pair: its chosen side's masking method
        chunk.drops.sort()
