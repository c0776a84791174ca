"""`--config FILE` for both stages: a YAML or TOML file whose keys are the flag names (dashes or underscores), as
axolotl and torchtune recipes (YAML) and training-wizard configs (TOML) have them.

    learning-rate: 2.0e-5          # YAML            learning_rate = 2.0e-5     # TOML
    fsdp_sharding_strategy: FULL_SHARD               use-liger-kernels = true

Flags given on the command line override the file. An unknown key is a one-line error naming the file, the key and
the closest valid one; so is a value of the wrong type or not among the flag's choices, a file that is not UTF-8, and
a --config given twice or abbreviated (argparse would take `--conf F` and the file would go unread). The command
line's own errors are one line too (`Parser`).
"""

import argparse
import difflib
import re
import tomllib
from pathlib import Path

import yaml


YAML_FLOAT_AS_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    """The value of --config in `argv` (`--config F` or `--config=F`), without parsing the other flags. A second
    --config, or one abbreviated (argparse would take `--conf F` and the file would be silently ignored), is a
    CommandLineError."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
        elif len(name) > 3 and "--config".startswith(name) and name != "--config":
            raise CommandLineError(f"{name}: spell the flag out as --config (an abbreviated --config is not read)")
    if len(found) > 1:
        raise CommandLineError(f"--config is given {len(found)} times; give one file (merge the others into it, or "
                               f"pass their values as flags)")
    return found[0] if found else None


def read_config_file(path: str, types: dict[str, type], choices: dict[str, tuple] | None = None,
                     converters: dict | None = None, nullable: frozenset = frozenset()) -> dict:
    """{field name: value} from the file, checked against `types` ({field name: the flag's value type}), `choices`
    ({field name: the values the flag takes}, as argparse checks them on the command line; a file's values become
    defaults, which argparse never checks), `converters` ({field name: the flag's own type function}, for a flag
    whose text takes more than its type: `auto` for an int) and `nullable` (the fields whose value may be none: a
    YAML `key:` with no value, or `null`, is refused for any other)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or e
        raise ConfigFileError(f"{path}: cannot read it ({reason}); pass an existing YAML or TOML file") from None
    except UnicodeDecodeError as e:
        line = text_line(file.read_bytes(), e.start)
        raise ConfigFileError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as "
                              f"UTF-8") from None
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
        if value is None and name not in nullable:  # it became the default: a crash at the export, or a traceback
            raise ConfigFileError(f"{path}: {key!r} has no value; give it one or remove the line")
        convert = (converters or {}).get(name)
        if convert is not None and isinstance(value, str):
            try:
                values[name] = convert(value)
            except ValueError:
                raise ConfigFileError(f"{path}: {key!r} cannot be {value!r}; see --help for its values") from None
        else:
            values[name] = checked(path, key, value, types[name])
        allowed = (choices or {}).get(name)
        if allowed and values[name] is not None and values[name] not in allowed:
            raise ConfigFileError(f"{path}: {key!r} must be one of {', '.join(map(str, allowed))}, got {value!r}; "
                                  f"fix the value in the file")
    return values


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line of byte `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1


def checked(path: str, key: str, value, kind: type):
    """`value` as the flag's type: ints are accepted for floats, a YAML/TOML list for a list-valued flag."""
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and YAML_FLOAT_AS_TEXT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as text: what the command line reads as 1e-05
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    expected = "a list of strings" if kind is list else kind.__name__
    raise ConfigFileError(f"{path}: {key!r} must be {expected}, got {value!r}; fix the value in the file")
