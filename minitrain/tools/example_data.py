"""Example data: the English chatterbot-corpus as messages JSONL.

Source: the `chatterbot-corpus` package on PyPI (BSD-3-Clause, (c) Gunther Cox), `chatterbot_corpus/data/english/*.yml`.
Each YAML file holds `conversations`: lists of alternating turns, the first from the user. Most are one exchange;
some run over several turns. Each becomes one line `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`.
A conversation with an empty turn, or that ends on a user turn, cannot train an assistant reply as written: the
trailing user turn is cut, and a conversation left without an assistant turn is skipped; both are counted.

    python -m minitrain.tools.example_data --output-file data/chatterbot.jsonl
"""

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import orjson
import yaml

INSTALL_HINT = "pip install chatterbot-corpus pyyaml"


def corpus_files(language: str = "english") -> list[Path]:
    """The corpus YAML files, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"chatterbot-corpus is not installed: {INSTALL_HINT}")
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data" / language).glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"chatterbot-corpus has no {language} data; reinstall it: {INSTALL_HINT}")
    return files


def conversation_to_messages(turns: list, counts: Counter) -> list[dict] | None:
    """Alternate user/assistant over the turns; None (counted) when no assistant reply remains."""
    texts = [str(t).strip() if t is not None else "" for t in turns]
    if any(not t for t in texts):
        counts["skipped: empty turn"] += 1
        return None
    if len(texts) < 2:
        counts["skipped: no assistant reply"] += 1
        return None
    if len(texts) % 2:  # ends on a user turn: nothing answers it
        texts = texts[:-1]
        counts["trailing user turn cut"] += 1
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def convert(output_file: Path, language: str = "english", repeat: int = 1) -> Counter:
    """Write the corpus as messages JSONL (`repeat` times over, for benchmarks); returns counts."""
    counts = Counter()
    samples = []
    for path in corpus_files(language):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            messages = conversation_to_messages(turns, counts)
            if messages is None:
                continue
            counts["multi-turn" if len(messages) > 2 else "single-turn"] += 1
            samples.append(orjson.dumps({"messages": messages}))
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_file.with_name(output_file.name + ".tmp")
    with open(tmp, "wb") as f:
        for _ in range(repeat):
            for line in samples:
                f.write(line + b"\n")
    tmp.replace(output_file)
    counts["written"] = len(samples) * repeat
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert chatterbot-corpus to messages JSONL.")
    parser.add_argument("--output-file", type=Path, required=True)
    parser.add_argument("--language", default="english")
    parser.add_argument("--repeat", type=int, default=1, help="write the corpus this many times (benchmarks)")
    args = parser.parse_args()
    try:
        counts = convert(args.output_file, args.language, args.repeat)
    except FileNotFoundError as e:
        sys.exit(f"example_data.py: error: {e}")
    print(f"{args.output_file}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
