"""`--config FILE` for both stages: a YAML or TOML file whose keys are the flag names (dashes or underscores), as
axolotl and torchtune recipes (YAML) and training-wizard configs (TOML) have them.

    learning-rate: 2.0e-5          # YAML            learning_rate = 2.0e-5     # TOML
    fsdp_sharding_strategy: FULL_SHARD               use-liger-kernels = true

Flags given on the command line override the file. An unknown key is a one-line error naming the file, the key and
the closest valid one; so is a value of the wrong type. The command line's own errors are one line too (`Parser`).
"""

import argparse
import difflib
import re
import tomllib
from pathlib import Path

import yaml


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


class CommandLineError(ValueError):
    """A command line that cannot be used: one argparse refuses (an unknown flag, a value of the wrong type or not
    among the choices, a required flag missing; the message points to --help) or a stage's own check of the flags."""


class Parser(argparse.ArgumentParser):
    """argparse for both stages, whose errors are one line like every other error of minitrain's: raised as
    CommandLineError for the entry point to print as `PROG: error: what; see PROG --help` (exit code 2, and under
    torchrun with the rank), instead of the whole usage (some 60 lines for train.py) before the error."""

    def error(self, message: str):
        raise CommandLineError(f"{message}; see {self.prog} --help")


def config_path_from_argv(argv: list[str]) -> str | None:
    """The value of --config in `argv` (`--config F` or `--config=F`), without parsing the other flags."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def read_config_file(path: str, types: dict[str, type]) -> dict:
    """{field name: value} from the file, checked against `types` ({field name: the flag's value type})."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        reason = e.strerror or e
        raise ConfigFileError(f"{path}: cannot read it ({reason}); pass an existing YAML or TOML file") from None
    try:
        if file.suffix == ".toml":
            raw = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigFileError(f"{path}: unknown config file type {file.suffix!r}; use .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # YAML's; TOML says "(at line N, column M)" in its message
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = f":{mark.line + 1}" if mark is not None else f":{found.group(1)}" if found else ""
        reason = " ".join((getattr(e, "problem", None) or re.sub(r" \(at line \d+, column \d+\)", "", str(e))).split())
        raise ConfigFileError(f"{path}{line}: not valid {file.suffix[1:].upper()} ({reason}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: expected a mapping of flag names to values, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else "; see --help for the flags"
            raise ConfigFileError(f"{path}: unknown key {key!r}{hint}")
        values[name] = checked(path, key, value, types[name])
    return values


def checked(path: str, key: str, value, kind: type):
    """`value` as the flag's type: ints are accepted for floats, a YAML/TOML list for a list-valued flag."""
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    expected = "a list of strings" if kind is list else kind.__name__
    raise ConfigFileError(f"{path}: {key!r} must be {expected}, got {value!r}; fix the value in the file")
