"""The flag reference as Markdown (docs/flags.md): one table row per flag, written from the code that declares the
flags (train.py's TrainConfig fields, process_data.py's argparse parser), so the reference cannot drift from them."""

HEADER = ("flag", "value", "default", "meaning")


def cell(text: str) -> str:
    """Text that stays inside one Markdown table cell, shown as written: `|` escaped, and `<N>` outside code spans
    escaped so that a renderer does not take it for an HTML tag."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`"


def table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def default_text(value) -> str:
    """A default as the reference shows it: none, off/on, a number or a quoted string."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return code(value) if value else "empty"
    if isinstance(value, (list, tuple)):
        return " ".join(code(v) for v in value)
    return code(value)


def value_text(kind: type | None, choices=None, many: bool = False, switch: bool = False) -> str:
    """What a flag takes: a switch, one of its choices, a number, a path or text (several with `many`)."""
    if switch:
        return "switch"
    if choices:
        return " | ".join(code(c) for c in choices)
    name = {int: "integer", float: "number", bool: "switch"}.get(kind, "path" if getattr(kind, "__name__", "") in
                                                                  ("Path", "PosixPath") else "text")
    return f"{name}, one or more" if many else name
