"""Stage 1 for KTO's labelled (unpaired) rows: a prompt and one completion that is desirable or not, as one training
sequence with the SFT masks, trained only on the final assistant turn (the completion).

Rows, detected by their keys (formats.detect: a `label` beside `messages` or `prompt`/`completion`) or forced with
--input-format unpaired; JSONL, CSV or Parquet:

    TRL's unpaired preference   {"prompt": P, "completion": C, "label": true|false}
                                P messages or text (text = one user turn); C messages (appended to P) or text (one
                                assistant turn)
    conversational              {"messages": [...], "label": true|false}: the last message, an assistant turn, is
                                the completion

`label` is a JSON boolean (true: desirable); a CSV cell holds the text true or false (any case). The sequence is
encoded by process_data's Encoder exactly as a messages sample (ids equal apply_chat_template, the same mask rule and
the same drops), then only its LAST run of trained tokens is kept, as for preference pairs. Output row, in input
order: {"input_ids", "labels", "len", "num_loss_counted_tokens", "label"}.

What stops the run (one line, FILE:LINE): a row without `label`, a `label` that is not true or false, a row without
a completion (`completion` or `messages`), a completion or prompt that is neither messages nor text, anything a
messages sample stops on. What drops a row (counted, first lines printed): an empty completion, a conversation whose
last message is not an assistant turn, a completion that trains no token after the shift, and whatever a messages
sample would drop (too long, ...).
"""

import dataclasses

import orjson

from minitrain import IGNORE
from minitrain.prepare import formats
from minitrain.prepare.encode import DROP_NO_TRAINED, Chunk, Encoder, check_messages, encode_lines
from minitrain.prepare.formats import Format, InputSpec, RunError
from minitrain.prepare.preference import final_turn_only

FIX = ('each row must be {"prompt": ..., "completion": ..., "label": true|false} or {"messages": [...], '
       '"label": true|false}')
DROP_EMPTY_COMPLETION = "empty completion"
DROP_NO_FINAL_REPLY = "the last message is not an assistant turn"
KEYS = ("prompt", "completion", "messages", "label")


def row_label(row: dict, where: str) -> bool:
    """The row's `label`: true (desirable) or false, as JSON booleans or CSV text; RunError otherwise."""
    if "label" not in row:
        raise RunError(f"{where}: no `label` field; give every row \"label\": true (desirable) or false — {FIX}")
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RunError(f"{where}: `label` must be true or false, got {value!r} — {FIX}")


def conversation(row: object, where: str) -> list | tuple[str, str]:
    """The row's messages, prompt and completion together, or (why the row is dropped, a detail) as two strings.
    RunError for a row that is not a labelled row."""
    if not isinstance(row, dict):
        raise RunError(f"{where}: not a JSON object — {FIX}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise RunError(f"{where}: `messages` must be a list of messages — {FIX}")
    else:
        for key in ("prompt", "completion"):
            if key not in row:
                raise RunError(f"{where}: no `{key}` field (nor `messages`) — {FIX}")
        prompt, completion = row["prompt"], row["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, (str, list)):
                got = "null" if value is None else type(value).__name__
                raise RunError(f"{where}: `{key}` must be a list of messages or a string, got {got} — {FIX}")
        if completion in ("", []):
            return DROP_EMPTY_COMPLETION, "`completion` is empty"
        prefix = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = prefix + ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                             else completion)
    check_messages({"messages": messages}, where, FIX)  # a malformed conversation stops the run
    last = messages[-1]
    if last["role"] != "assistant":
        return DROP_NO_FINAL_REPLY, f"it ends with a {last['role']} message"
    if last.get("content") == "" and not last.get("tool_calls"):  # else an earlier turn would pass for it
        return DROP_EMPTY_COMPLETION, "the final assistant turn is empty"
    return messages


class UnpairedEncoder:
    """Turns labelled rows into labelled sample rows, with an encode.Encoder for messages doing the encoding."""

    def __init__(self, model: str, input_name: str, max_tokens: int, on_too_long: str, spec: InputSpec):
        self.input_name, self.spec = input_name, spec
        messages = dataclasses.replace(spec, fmt=Format("messages"), forced=True)  # the same template flags
        self.encoder = Encoder(model, input_name, max_tokens, on_too_long, messages)
        self.tokenizer, self.template = self.encoder.tokenizer, self.encoder.template

    def encode_chunk(self, lines: list[tuple[int, bytes]]) -> Chunk:
        return encode_lines(self._encode, lines)

    def _encode(self, lines: list[tuple[int, bytes]], chunk: Chunk) -> None:
        batch, labels = [], {}  # messages rows for the encoder, and each line's label
        for lineno, _, where, row in formats.rows_of(lines, self.input_name, self.spec, chunk):
            found = conversation(row, where)
            label = row_label(row, where)
            if isinstance(found, tuple):
                chunk.drops.append((lineno, *found))
                continue
            extra = {k: v for k, v in row.items() if k not in KEYS}  # e.g. tools
            batch.append((lineno, formats.dump_row({**extra, "messages": found})))
            labels[lineno] = label
        encoded = self.encoder.encode_chunk(batch)
        if encoded.error:
            raise RunError(encoded.error)
        chunk.drops += encoded.drops
        for lineno, line in encoded.rows:
            row = orjson.loads(line)
            kept = final_turn_only(row["labels"])
            if all(x == IGNORE for x in kept[1:]):  # nothing trained after the shift
                chunk.drops.append((lineno, DROP_NO_TRAINED, "the final assistant turn trains no token"))
                continue
            trained = len(kept) - kept.count(IGNORE)
            out = {**row, "labels": kept, "num_loss_counted_tokens": trained, "label": labels[lineno]}
            chunk.rows.append((lineno, orjson.dumps(out) + b"\n"))
            chunk.tokens += len(kept)
            chunk.trained += trained
            chunk.masked_by[lineno] = encoded.masked_by[lineno]
        chunk.drops.sort()
