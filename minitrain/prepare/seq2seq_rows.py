"""Stage 1 for encoder-decoder models (T5, BART, ...): source/target pairs become seq2seq rows.

A model is encoder-decoder when `AutoConfig.from_pretrained(model).is_encoder_decoder` (a folder with a tokenizer
and no config.json is not). Each pair row becomes, in input order:

    {"input_ids": SOURCE_IDS, "labels": TARGET_IDS, "len": len(SOURCE_IDS), "target_len": len(TARGET_IDS),
     "num_loss_counted_tokens": len(TARGET_IDS)}

SOURCE_IDS = tokenizer(--source-prefix + source)["input_ids"], the tokenizer's special tokens included (T5 appends
</s>, BART wraps <s> ... </s>): the encoder's input. TARGET_IDS = tokenizer(text_target=target)["input_ids"], with
EOS appended when the tokenizer did not end it with EOS: the decoder's target, every token trained (no -100). Stage 2
tells these rows by their "target_len" key.

Limits: --max-source-tokens and --max-target-tokens (each defaults to --max-sample-num-tokens). --on-too-long drop
counts the sample under "source longer than ..." or "target longer than ..."; error stops at its line; truncate
cuts as the tokenizer's own truncation does (truncation=True, max_length=N: its final special tokens kept, the
target still ends with EOS) and counts the cut sources and targets. Messages, text and preference rows need a causal
LM, and so do the chat-template and raw-pair flags: refused, one line.
"""

from dataclasses import dataclass
from pathlib import Path

import orjson

from minitrain.prepare import formats
from minitrain.prepare.encode import DROP_EMPTY_TARGET, Chunk, encode_lines
from minitrain.prepare.formats import InputSpec, RunError

DROP_SOURCE_TOO_LONG = "source longer than --max-source-tokens"
DROP_TARGET_TOO_LONG = "target longer than --max-target-tokens"
DROP_EMPTY_SOURCE = "empty source (no encoder input token)"


@dataclass(frozen=True)
class Settings:
    """The seq2seq flags a worker needs (the limits with --max-sample-num-tokens already applied)."""

    source_prefix: str = ""
    max_source: int | None = None
    max_target: int | None = None


def encoder_decoder_type(model: str) -> str | None:
    """The model_type of an encoder-decoder model, None for a causal LM (or no config to tell: a tokenizer folder)."""
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        return None  # and transformers is not even imported (the main process of a multi-worker run)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception:  # no readable config (a hub name offline, an unknown model_type): the tokenizer decides
        return None
    return config.model_type if getattr(config, "is_encoder_decoder", False) else None


def flag_problem(cfg, spec: InputSpec, model_type: str | None) -> str | None:
    """Why these flags (process_data.Config) and this file's format cannot go with the model, None when they can."""
    if model_type is None:
        if cfg.on_too_long == "truncate":
            return ("--on-too-long truncate is for encoder-decoder models (it would cut a causal sample's trained "
                    "turns); use --on-too-long drop or error")
        seq2seq_only = (("--max-source-tokens", cfg.max_source_tokens), ("--max-target-tokens", cfg.max_target_tokens),
                        ("--source-prefix", cfg.source_prefix))
        for flag, value in seq2seq_only:
            if value:
                return f"{flag} is for encoder-decoder models and {cfg.model_name_or_path} is a causal LM; drop it"
        kind = spec.fmt.kind
        chat = kind != "text" and not (kind == "pairs" and cfg.pair_rendering == "raw")  # a chat template renders
        # flag: (the rows it applies to, whether it was given, whether it applies to this file's rows)
        flags_for = {"--pair-rendering": ("pair", cfg.pair_rendering is not None, kind == "pairs"),
                     "--separator": ("pair", cfg.separator is not None, kind == "pairs"),
                     "--train-source": ("pair", cfg.train_source, kind == "pairs"),
                     "--source-column": ("pair", cfg.source_column is not None, kind == "pairs"),
                     "--target-column": ("pair", cfg.target_column is not None, kind == "pairs"),
                     "--text-column": ("text", cfg.text_column != "text", kind == "text"),
                     "--chat-template": ("chat-rendered", cfg.chat_template is not None, chat),
                     "--chat-template-name": ("chat-rendered", cfg.chat_template_name is not None, chat)}
        ignored = [flag for flag, (_, given, applies) in flags_for.items() if given and not applies]
        if ignored and spec.first_line:  # they would change no row: said, not ignored
            many, rows = len(ignored) > 1, " and ".join(dict.fromkeys(flags_for[f][0] for f in ignored))
            shown = f"{kind}, rendered raw" if kind == "pairs" else kind
            return (f"{cfg.input_file}:{spec.first_line}: {', '.join(ignored)} appl{'y' if many else 'ies'} to "
                    f"{rows} rows and this file's rows are {shown}; drop {'them' if many else 'it'}")
        if cfg.separator is not None and cfg.pair_rendering != "raw":
            return ("--separator goes between source and target of raw pairs; add --pair-rendering raw or drop "
                    "--separator")
        if cfg.max_sample_num_tokens is None:
            return "a causal LM needs --max-sample-num-tokens (the longest sample kept); pass e.g. 4096"
        return None
    if spec.fmt.kind != "pairs" and spec.first_line:
        return (f"{cfg.input_file}:{spec.first_line}: {spec.fmt.kind} rows need a causal LM; an encoder-decoder model "
                f'({model_type}) trains on source/target pairs: write {{"source": ..., "target": ...}} rows (or '
                "--source-column/--target-column)")
    causal_only = (("--pair-rendering", cfg.pair_rendering), ("--train-source", cfg.train_source or None),
                   ("--separator", cfg.separator), ("--chat-template", cfg.chat_template),
                   ("--chat-template-name", cfg.chat_template_name))
    for flag, value in causal_only:
        if value is not None:
            return (f"{flag} means nothing for an encoder-decoder model ({model_type}): the source is the encoder's "
                    "input and the target the decoder's, no chat template; drop the flag")
    if limits(cfg).max_source is None or limits(cfg).max_target is None:
        return (f"an encoder-decoder model ({model_type}) needs --max-source-tokens and --max-target-tokens "
                "(or --max-sample-num-tokens for both)")
    return None


def limits(cfg) -> Settings:
    def pick(value):
        return value if value is not None else cfg.max_sample_num_tokens

    return Settings(cfg.source_prefix, pick(cfg.max_source_tokens), pick(cfg.max_target_tokens))


def truncation_line(cfg, truncated) -> str | None:
    """The summary's line for --on-too-long truncate: how many sources and targets were cut, to which limit."""
    if cfg.on_too_long != "truncate":
        return None
    cut = limits(cfg)
    return (f"truncated: {truncated['sources']} sources to --max-source-tokens {cut.max_source}, "
            f"{truncated['targets']} targets to --max-target-tokens {cut.max_target}")


class Seq2SeqEncoder:
    """Turns pair rows into seq2seq rows for one tokenizer. Built once per worker process."""

    template = None  # no chat template: none is saved beside the rows

    def __init__(self, model: str, model_type: str, input_name: str, on_too_long: str, spec: InputSpec,
                 settings: Settings):
        from transformers import AutoTokenizer

        self.model_type, self.input_name, self.on_too_long, self.spec = model_type, input_name, on_too_long, spec
        self.prefix, self.max_source, self.max_target = settings.source_prefix, settings.max_source, settings.max_target
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as e:  # transformers raises OSError, ValueError, ... for a folder without a tokenizer
            raise RunError(f"{model}: cannot load a tokenizer ({str(e).splitlines()[0]}); pass a folder with "
                           "tokenizer files") from None
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise RunError(f"{model}: the tokenizer has no EOS token, which ends every seq2seq target; use a "
                           "tokenizer with an eos_token")
        # Does the tokenizer end a target with its own special tokens (T5: </s>; mBART: </s> + language id)? Then
        # its encoding is kept as it is; otherwise EOS is appended.
        self.adds_eos = self.eos_id in self.tokenizer(text_target="a")["input_ids"]
        from transformers import AutoConfig

        positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)  # learned positions
        for side, limit in (("source", self.max_source), ("target", self.max_target)):
            if positions is not None and limit > positions:
                raise RunError(f"--max-{side}-tokens {limit} is more than {model_type}'s {positions} positions "
                               f"(max_position_embeddings): a longer {side} cannot run; pass --max-{side}-tokens "
                               f"{positions} or less")

    def encode_chunk(self, lines: list[tuple[int, bytes]]) -> Chunk:
        return encode_lines(self._encode, lines)

    def _encode(self, lines: list[tuple[int, bytes]], chunk) -> None:

        fmt = self.spec.fmt
        kept, sources, targets = [], [], []
        for lineno, _, where, row in formats.rows_of(lines, self.input_name, self.spec, chunk):
            source = formats.string_field(row, fmt.source, where, fmt)
            target = formats.string_field(row, fmt.target, where, fmt)
            if not target:
                chunk.drops.append((lineno, DROP_EMPTY_TARGET, f"`{fmt.target}` is empty"))
                continue
            kept.append(lineno)
            sources.append(self.prefix + source)
            targets.append(target)
        if not kept:
            return
        # one batch call per side over the chunk (verbose=False: our limits, not model_max_length, decide)
        source_ids = self.tokenizer(sources, verbose=False)["input_ids"]
        target_ids = [self.ended(ids) for ids in self.tokenizer(text_target=targets, verbose=False)["input_ids"]]
        if self.on_too_long == "truncate":
            chunk.truncated["sources"] += self.truncate(source_ids, sources, self.max_source, "source")
            chunk.truncated["targets"] += self.truncate(target_ids, targets, self.max_target, "target")
        for lineno, source, target in zip(kept, source_ids, target_ids):
            self._finish(lineno, source, target, chunk)
        chunk.drops.sort()

    def ended(self, ids: list[int]) -> list[int]:
        """The target ids as the tokenizer encodes them, with EOS appended when the tokenizer adds none."""
        return ids if self.adds_eos or ids[-1:] == [self.eos_id] else [*ids, self.eos_id]

    def truncate(self, encoded: list[list[int]], texts: list[str], limit: int, side: str) -> int:
        """Cut the over-long encodings in place as the tokenizer's own truncation does; how many were cut."""
        long = [k for k, ids in enumerate(encoded) if len(ids) > limit]
        if not long:
            return 0
        kwargs = {"text_target" if side == "target" else "text": [texts[k] for k in long]}
        cut = self.tokenizer(**kwargs, truncation=True, max_length=limit, verbose=False)["input_ids"]
        for k, ids in zip(long, cut):
            if side == "target" and not self.adds_eos:
                ids = [*ids[: limit - 1], self.eos_id]  # the tokenizer adds no EOS: keep ours as the last token
            if len(ids) > limit:  # the tokenizer's special tokens alone are longer than the limit
                raise RunError(f"--max-{side}-tokens {limit} is shorter than the tokenizer's special tokens around "
                               f"a {side}; raise it")
            encoded[k] = ids
        return len(long)

    def _finish(self, lineno: int, source: list[int], target: list[int], chunk) -> None:
        for side, ids, limit, reason in (("source", source, self.max_source, DROP_SOURCE_TOO_LONG),
                                         ("target", target, self.max_target, DROP_TARGET_TOO_LONG)):
            if len(ids) > limit:
                if self.on_too_long == "error":
                    raise RunError(f"{self.input_name}:{lineno}: the {side} has {len(ids)} tokens > --max-{side}-"
                                   f"tokens {limit}; raise the limit, or pass --on-too-long drop or truncate")
                chunk.drops.append((lineno, reason, f"{len(ids)} > {limit} tokens"))
                return
        if not source:
            chunk.drops.append((lineno, DROP_EMPTY_SOURCE, "the prefix and source tokenize to no token"))
            return
        row = {"input_ids": source, "labels": target, "len": len(source), "target_len": len(target),
               "num_loss_counted_tokens": len(target)}
        chunk.rows.append((lineno, orjson.dumps(row) + b"\n"))
        chunk.tokens += len(source) + len(target)
        chunk.trained += len(target)
