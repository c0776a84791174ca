"""process_data.py's flags: the argparse parser (its help is declared here and only here) and the same flags as
Markdown for docs/flags.md. process_data.parse_args reads a --config file, parses and checks the flags."""

import argparse
import dataclasses
from pathlib import Path

from minitrain import flag_table
from minitrain.config_file import Parser
from minitrain.prepare import formats
from minitrain.prepare.pipeline import Config

PROG = "process_data.py"
DESCRIPTION = "Stage 1: turn conversations, prompt/target pairs or raw text into training rows with exact masks."


def parser(description: str = DESCRIPTION) -> Parser:
    defaults = Config(Path(), Path(), "")
    p = Parser(prog=PROG, description=description)
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
    p.add_argument("--num-workers", type=int, default=defaults.num_workers,
                   help="processes (default and most: the cores this process may use)")
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
    return p


def markdown() -> str:
    """The flags as a Markdown table, in the parser's order. A default the machine decides (Config's
    default_factory: --num-workers, the number of cores) is shown as `computed`, so the table is the same anywhere."""
    computed = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
    rows = []
    for action in parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        switch = isinstance(action, argparse._StoreTrueAction)
        if action.required:
            default = "required"
        elif action.dest in computed:
            default = "computed"
        else:
            default = flag_table.default_text(action.default)
        value = flag_table.value_text(action.type, action.choices, switch=switch)
        names = ", ".join(flag_table.code(name) for name in action.option_strings)
        rows.append((names, value, default, action.help or ""))
    return flag_table.table(rows)
