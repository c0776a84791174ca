"""Stage 1: turn conversations, prompt/target pairs or raw text into training rows with exact masks.

    python process_data.py --input-file data.jsonl --output-file rows.jsonl \\
        --model-name-or-path MODEL --max-sample-num-tokens 4096

Input: JSONL, CSV or Parquet (by the file's suffix); the row format is detected per file (see minitrain/prepare/formats.py).
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
see minitrain/prepare/preference.py. Labelled rows ({"prompt", "completion", "label"} or {"messages", "label"}, for
KTO) become samples with their `label`: see minitrain/prepare/unpaired.py.

Encoder-decoder models (T5, BART, ...: the config's is_encoder_decoder) take pair rows only and write seq2seq rows
(minitrain/prepare/seq2seq_rows.py): {"input_ids": tokenizer(--source-prefix + source) with its special tokens, "labels":
tokenizer(text_target=target) + EOS (every token trained), "len", "target_len", "num_loss_counted_tokens"}, limited
by --max-source-tokens / --max-target-tokens (default --max-sample-num-tokens, then optional), over-long ones
dropped, an error, or --on-too-long truncate (counted). Messages, text and preference rows, --pair-rendering,
--train-source, --separator and the chat-template flags are refused there; no chat template is saved.

Output lines, in input order: {"input_ids", "labels" (-100 where not trained), "len", "num_loss_counted_tokens"}.
`input_ids` equal `tokenizer.apply_chat_template(messages, tokenize=True)`. Trained, for assistant turn i: what the
full render has after the render of messages[:i] with the generation prompt, through the end-of-turn token(s)
closing the turn (the rule and how it is computed: minitrain/prepare/chat_masks.py). The output file is written atomically: a failed
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

import sys
import time
import typing
from pathlib import Path

from minitrain.config_file import (
    CommandLineError,
    ConfigFileError,
    config_path_from_argv,
    read_config_file,
)
from minitrain.prepare import flags, pipeline
from minitrain.prepare.formats import RunError
from minitrain.prepare.pipeline import Config, report, run

PROG = flags.PROG




def parse_args(argv: list[str] | None = None) -> Config:
    """The flags, over the values of --config FILE (YAML or TOML, keys are the flag names; minitrain/config_file.py),
    over the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = None
    try:
        path = config_path_from_argv(argv)
        if path is not None:
            nullable = frozenset(name for name, hint in typing.get_type_hints(Config).items()
                                 if type(None) in typing.get_args(hint))
            argv = config_as_flags(read_config_file(path, config_types(), nullable=nullable)) + argv  # later flags win
        args = flags.parser(description=__doc__.split("\n\n")[0]).parse_args(argv)
        problems = flag_problems(args)
        if problems:
            raise CommandLineError("; ".join(problems))  # all of them, in one line
    except (ConfigFileError, CommandLineError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    values = vars(args)
    del values["config"]  # its values are in the others
    return Config(**values, config_file=None if path is None else Path(path))


def flag_problems(args) -> list[str]:
    """What is wrong with the parsed flags beyond what argparse checks, every problem (reported together)."""
    problems = []
    for flag in ("max_sample_num_tokens", "max_source_tokens", "max_target_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_workers < 1:
        problems.append("--num-workers must be at least 1")
    if not args.mask_marker.strip():  # the printed samples would show no trained part
        problems.append("--mask-marker must be visible text, e.g. '[[ ]]' or '@@'")
    if args.num_printed_samples < 0:
        problems.append("--num-printed-samples must be 0 or more")
    if (args.source_column is None) != (args.target_column is None):
        problems.append("--source-column and --target-column go together")
    if args.source_column is not None and args.source_column == args.target_column:
        problems.append("--source-column and --target-column must differ")
    if args.chat_template is not None and args.chat_template_name is not None:
        problems.append("--chat-template and --chat-template-name exclude each other")
    return problems


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

def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = run(cfg)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if pipeline.PLACED:
            print(f"{PROG}: interrupted after {pipeline.PLACED[-1]} was written whole (the summary, samples and --report "
                  f"may be missing)", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted, no output written", file=sys.stderr)
        sys.exit(130)
    report(cfg, summary, time.perf_counter() - start)


if __name__ == "__main__":
    main()
