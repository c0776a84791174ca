"""Stage-1 throughput and memory: process_data.py vs a bare pool of apply_chat_template(tokenize=True).

    python bench/bench_process_data.py [--data chitchat chitchat-long chatterbot] [--conversations 20000]
                                       [--long-conversations 3000] [--memory-base 5000] [--workers 2] [--repeats 3]

Data (each sample a multi-turn messages row, user/assistant alternating):
- chitchat: the `chitchat-dataset` package's 7,168 real conversations (BYU PCC lab), windows of 2-8 turns drawn
  at random: about the shape of the issue-15 measurement (5 turns, ~150 tokens per sample).
- chitchat-long: whole chitchat conversations (~34 turns, ~850 tokens per sample).
- chatterbot: chatterbot-corpus conversations, several joined into each sample (short turns).
Tokenizer: the real SmolLM2-135M-Instruct one (default_model.py). Both sides read the same JSONL, use the same
number of processes and write the ids to a JSONL file; ours also derives the masks. Peak memory is the largest
sum of RSS over the process tree, sampled every 50 ms. Prints a markdown report and writes it to
bench/RESULTS_process_data.md.
"""

import argparse
import importlib.util
import multiprocessing as mp
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chatterbot_conversations() -> list[list[str]]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        sys.exit("bench_process_data.py: error: chatterbot-corpus is not installed — pip install chatterbot-corpus")
    english = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    out = []
    for path in sorted(english.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in conversation][: len(conversation) // 2 * 2]  # user/assistant pairs
            if turns:
                out.append(turns)
    return out


def chitchat_conversations() -> list[list[str]]:
    try:
        import chitchat_dataset
    except ImportError:
        sys.exit("bench_process_data.py: error: chitchat-dataset is not installed; pip install chitchat-dataset")
    out = []
    for conversation in chitchat_dataset.Dataset().values():
        turns = ["\n".join(m["text"] for m in group) for group in conversation["messages"]]
        turns = turns[: len(turns) // 2 * 2]
        if turns:
            out.append(turns)
    return out


def samples(kind: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    if kind == "chatterbot":
        pool = chatterbot_conversations()
        for _ in range(n):
            yield [t for _ in range(rng.randint(2, 8)) for t in rng.choice(pool)]
        return
    pool = chitchat_conversations()
    for k in range(n):
        turns = pool[k % len(pool)] if kind == "chitchat-long" else rng.choice(pool)
        if kind == "chitchat":
            size = min(len(turns), rng.choice([2, 4, 4, 6, 6, 8]))
            start = rng.randrange(0, (len(turns) - size) // 2 + 1) * 2
            turns = turns[start : start + size]
        yield turns


def write_data(path: Path, kind: str, n: int, seed: int = 0) -> None:
    with open(path, "wb") as f:
        for turns in samples(kind, n, seed):
            messages = [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]
            f.write(orjson.dumps({"messages": messages}) + b"\n")


# ---- the baseline: what a bare script does, one apply_chat_template call per row ----

_TOKENIZER = None


def _bare_init(model: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(model)


def _bare_row(line: bytes) -> bytes:
    ids = _TOKENIZER.apply_chat_template(orjson.loads(line)["messages"], tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return orjson.dumps({"input_ids": ids, "len": len(ids)}) + b"\n"


def bare_baseline(input_file: str, output_file: str, model: str, workers: int) -> None:
    with open(input_file, "rb") as f, open(output_file, "wb") as out:
        with mp.get_context("spawn").Pool(workers, initializer=_bare_init, initargs=(model,)) as pool:
            for row in pool.imap(_bare_row, f, chunksize=256):
                out.write(row)


# ---- measuring ----


def tree_rss(pid: int) -> int:
    """Sum of RSS (bytes) of pid and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measure(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak tree RSS and CPU seconds (user + system, all its processes) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_process_data.py: error: {' '.join(cmd[:3])} failed: {proc.stderr.read().decode()[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command's, with the pool workers it waited for
    return seconds, peak, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def ours_cmd(data: Path, out: Path, model: Path, workers: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "process_data.py"), "--input-file", str(data), "--output-file", str(out),
        "--model-name-or-path", str(model), "--max-sample-num-tokens", "100000", "--num-workers", str(workers),
        "--num-printed-samples", "0",
    ]  # fmt: skip


def bare_cmd(data: Path, out: Path, model: Path, workers: int) -> list[str]:
    return [sys.executable, __file__, "--bare", str(data), str(out), str(model), str(workers)]


def compare(kind: str, n: int, model: Path, workers: int, repeats: int, tmp: Path) -> tuple[str, dict]:
    """Interleaved runs of both sides on n samples of `kind`: a markdown table row pair and the figures."""
    data = tmp / f"{kind}.jsonl"
    write_data(data, kind, n)
    runs: dict[str, list[tuple[float, int, float]]] = {"bare": [], "ours": []}
    loads = []
    for _ in range(repeats):  # interleaved, so both sides see the same machine load
        loads.append(os.getloadavg()[0])
        runs["bare"].append(measure(bare_cmd(data, tmp / "bare.jsonl", model, workers)))
        runs["ours"].append(measure(ours_cmd(data, tmp / "ours.jsonl", model, workers)))
    tokens = sum(orjson.loads(line)["len"] for line in open(tmp / "ours.jsonl", "rb"))
    bare_ids = [orjson.loads(line)["input_ids"] for line in open(tmp / "bare.jsonl", "rb")]
    ours_ids = [orjson.loads(line)["input_ids"] for line in open(tmp / "ours.jsonl", "rb")]
    turns = sum(len(orjson.loads(line)["messages"]) for line in open(data, "rb")) / n
    bare_s, ours_s = (statistics.median(s for s, _, _ in runs[side]) for side in ("bare", "ours"))
    bare_mem, ours_mem = (max(m for _, m, _ in runs[side]) for side in ("bare", "ours"))
    bare_cpu, ours_cpu = (statistics.median(c for _, _, c in runs[side]) for side in ("bare", "ours"))
    ratios = [b[0] / o[0] for b, o in zip(runs["bare"], runs["ours"])]
    cpu_ratios = [b[2] / o[2] for b, o in zip(runs["bare"], runs["ours"])]
    lines = [
        f"### {kind}: {n:,} samples, {turns:.1f} turns and {tokens / n:.0f} tokens per sample ({tokens:,} tokens)\n",
        f"Same input_ids on both sides: {bare_ids == ours_ids}. Per-round ratios in run order (bare / ours), wall "
        "time: " + ", ".join(f"{r:.2f}x" for r in ratios) + "; CPU seconds of all processes: "
        + ", ".join(f"{r:.2f}x" for r in cpu_ratios) + "; load average at each round's start: "
        + ", ".join(f"{x:.1f}" for x in loads) + ".\n",
        "| | samples/s | tokens/s | CPU s (all processes) | peak RSS (MB) | vs bare (wall) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| bare pool, apply_chat_template(tokenize=True) per row | {n / bare_s:,.0f} | {tokens / bare_s:,.0f} | "
        f"{bare_cpu:.1f} | {bare_mem / 2**20:,.0f} | 1.00x |",
        f"| process_data.py (ids + masks) | {n / ours_s:,.0f} | {tokens / ours_s:,.0f} | {ours_cpu:.1f} | "
        f"{ours_mem / 2**20:,.0f} | {bare_s / ours_s:.2f}x |",
        "",
    ]
    return "\n".join(lines), {"ratio": bare_s / ours_s}


def cpu_compare(kind: str, n: int, model: Path, rounds: int = 3) -> str:
    """CPU seconds (time.process_time, one process each, one thread) of the per-sample work on the same chunks,
    alternating chunk by chunk: robust on a shared machine where wall time is noise. Ours: process_data's
    Encoder.encode_chunk (render, masks, batch tokenization, output lines); bare: apply_chat_template(tokenize=True)
    per row and the same output line without labels."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import process_data

    encoder = process_data.Encoder(str(model), "bench.jsonl", 10**9, "drop")
    tok = encoder.tokenizer
    lines = [(k, orjson.dumps({"messages": [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(turns)]}))
             for k, turns in enumerate(samples(kind, n, seed=2), 1)]  # fmt: skip
    chunks = [lines[k : k + process_data.CHUNK_LINES] for k in range(0, len(lines), process_data.CHUNK_LINES)]
    bare = ours = 0.0
    for _ in range(rounds):
        for chunk in chunks:
            t = time.process_time()
            for _, raw in chunk:
                ids = tok.apply_chat_template(orjson.loads(raw)["messages"], tokenize=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                orjson.dumps({"input_ids": ids, "len": len(ids)})
            bare += time.process_time() - t
            t = time.process_time()
            out = encoder.encode_chunk(chunk)
            ours += time.process_time() - t
            assert not out.drops and out.error is None
    return (f"| {kind} | {n:,} | {n * rounds / bare:,.0f} | {n * rounds / ours:,.0f} | **{bare / ours:.2f}x** | "
            f"{', '.join(f'{m} {c}' for m, c in out.methods.items())} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        bare_baseline(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["chitchat", "chitchat-long"], choices=["chitchat", "chitchat-long", "chatterbot"])
    p.add_argument("--conversations", type=int, default=20_000, help="samples for chitchat and chatterbot")
    p.add_argument("--long-conversations", type=int, default=3_000, help="samples for chitchat-long")
    p.add_argument("--memory-base", type=int, default=5_000, help="memory is compared at this many and 10x (first --data)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-samples", type=int, default=3_000, help="samples per data kind in the CPU-time comparison")
    args = p.parse_args()

    from minitrain.tools import default_model

    model = default_model.materialize(weights=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_process_data."))
    sections = []
    for kind in args.data:
        n = args.long_conversations if kind == "chitchat-long" else args.conversations
        sections.append(compare(kind, n, model, args.workers, args.repeats, tmp)[0])
    cpu = ["### CPU time per sample, alternating chunk by chunk (one process each)\n",
           "| data | samples | bare samples/CPU-s | ours samples/CPU-s | vs bare | masks (last chunk) |", "|---|---:|---:|---:|---:|---|"]
    for kind in args.data:
        cpu.append(cpu_compare(kind, min(args.long_conversations if kind == "chitchat-long" else args.conversations, args.cpu_samples), model))
    sections.append("\n".join(cpu) + "\n")
    kind = args.data[0]
    data1, data10 = tmp / "memory1.jsonl", tmp / "memory10.jsonl"
    write_data(data1, kind, args.memory_base, seed=1)
    write_data(data10, kind, args.memory_base * 10, seed=1)
    one_x = measure(ours_cmd(data1, tmp / "ours1.jsonl", model, args.workers))
    ten_x = measure(ours_cmd(data10, tmp / "ours10.jsonl", model, args.workers))
    head = [
        "# process_data.py benchmark\n",
        f"SmolLM2-135M-Instruct tokenizer, {args.workers} processes, median of {args.repeats} interleaved runs per side "
        "(wall time including start-up), `python bench/bench_process_data.py "
        + " ".join(sys.argv[1:]) + "`.\n",
    ]
    tail = [
        f"Memory as the input grows (process_data.py, {kind}): {args.memory_base:,} samples {one_x[1] / 2**20:,.0f} MB, "
        f"{10 * args.memory_base:,} samples {ten_x[1] / 2**20:,.0f} MB ({ten_x[1] / one_x[1]:.2f}x); "
        f"{10 * args.memory_base / ten_x[0]:,.0f} samples/s at {10 * args.memory_base:,}.",
    ]
    text = "\n".join(head + sections + tail) + "\n"
    print(text)
    (ROOT / "bench" / "RESULTS_process_data.md").write_text(text)
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
