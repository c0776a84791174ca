"""Training throughput and loss memory, ours against a baseline measured in the same run.

    python bench/bench_train.py                # ~10 min on 2 CPU cores; writes bench/RESULTS_train.md
    python bench/bench_train.py --steps 3 --skip-loss-memory   # quicker

1. Throughput: `torchrun --nproc-per-node 2 train.py` on the default SmolLM2-135M-Instruct (fp32, CPU) against
   `bench/padded_baseline.py` (the same optimizer steps on the same samples, right-padded micro-batches and a plain
   Hugging Face forward with labels). Same model, data, batch, token budget, precision, sharding, no activation
   checkpointing for either. Figures: median over the steps after the first (warm-up) of tokens/s (real tokens,
   padding not counted) and trained tokens/s, and rank 0's peak RSS.
2. Loss memory: peak RSS of one forward+backward of the loss at a 152k vocabulary and 16k tokens per micro-step,
   our chunked path (loss.chunked_ce_sum) against full logits + cross-entropy, each in a fresh process.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(records: list[dict]) -> dict:
    timed = records[1:] or records  # the first step pays for warm-up (allocations, first collectives)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "trained_tokens_per_s": statistics.median(r["tokens_per_s"] * r["trained_tokens"] / r["tokens"] for r in timed),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "losses": [round(r["loss"], 4) for r in records],
    }


def throughput(work: Path, steps: int, batch_size: int, max_tokens: int, nproc: int) -> tuple[dict, dict]:
    from minitrain.tools import default_model, example_data

    model_dir = default_model.materialize()
    raw, tokenized = work / "chat.jsonl", work / "tokenized.jsonl"
    example_data.convert(raw)
    run([sys.executable, "process_data.py", "--input-file", raw, "--output-file", tokenized, "--model-name-or-path",
         model_dir, "--max-sample-num-tokens", max_tokens, "--num-printed-samples", 0], stdout=subprocess.DEVNULL)
    flags = ["--data-path", tokenized, "--model-name-or-path", model_dir, "--batch-size", batch_size,
             "--max-tokens-per-gpu", max_tokens, "--max-steps", steps, "--learning-rate", 1e-5, "--seed", 0,
             "--fsdp-sharding-strategy", "SHARD_GRAD_OP", "--no-activation-checkpointing"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc]
    run([*torchrun, "train.py", *flags, "--output-dir", work / "ours", "--save-dtype", "float32"])
    run([*torchrun, "bench/padded_baseline.py", *flags, "--output-dir", work / "baseline"])
    return summarise(metrics(work / "ours")), summarise(metrics(work / "baseline"))


LOSS_PROBE = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from minitrain.training.loss import chunked_ce_sum
torch.manual_seed(0)
tokens, hidden, vocab, path = {tokens}, {hidden}, {vocab}, {path!r}
h = torch.randn(tokens, hidden, requires_grad=True)
w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
t = torch.randint(0, vocab, (tokens,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = chunked_ce_sum(h, w, None, t) if path == "chunked" else F.cross_entropy(h @ w.T, t, reduction="sum")
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e6)
"""


def loss_memory(tokens: int, hidden: int, vocab: int) -> dict[str, float]:
    """Peak RSS added by one loss forward+backward (GB), each path in a fresh process."""
    result = {}
    for path in ("chunked", "full"):
        code = LOSS_PROBE.format(root=str(ROOT), tokens=tokens, hidden=hidden, vocab=vocab, path=path)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        result[path] = float(out.stdout.strip())
        print(f"loss memory, {path}: {result[path]:.2f} GB", flush=True)
    return result


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens-per-gpu", type=int, default=1024)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--loss-tokens", type=int, default=16384)
    p.add_argument("--loss-vocab", type=int, default=151936)  # Qwen2.5's vocabulary
    p.add_argument("--loss-hidden", type=int, default=128)  # memory does not depend on it; compute does
    p.add_argument("--skip-loss-memory", action="store_true")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS_train.md")
    args = p.parse_args()

    lines = ["# Training benchmarks\n", f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPU cores, "
             f"{platform.processor() or platform.machine()}; command: `python bench/bench_train.py "
             f"{' '.join(sys.argv[1:])}`\n"]
    with tempfile.TemporaryDirectory() as work:
        ours, base = throughput(Path(work), args.steps, args.batch_size, args.max_tokens_per_gpu, args.nproc_per_node)
    lines += [
        f"## Throughput: SmolLM2-135M-Instruct, fp32, {args.nproc_per_node} CPU processes (gloo, FSDP2 SHARD_GRAD_OP), "
        f"{args.steps} steps of {args.batch_size} chatterbot samples, --max-tokens-per-gpu {args.max_tokens_per_gpu}\n",
        "Medians over the steps after the first. Tokens are real tokens; the baseline's padding is not counted.\n",
        "| figure | ours (packed, chunked loss) | padded baseline (HF forward with labels) | ratio |",
        "|---|---|---|---|",
    ]
    for key, label in (("tokens_per_s", "tokens/s"), ("trained_tokens_per_s", "trained tokens/s")):
        lines.append(f"| {label} | {ours[key]:.0f} | {base[key]:.0f} | {ours[key] / base[key]:.2f}x |")
    lines.append(f"| peak RSS, rank 0 | {ours['peak_memory_gb']:.2f} GB | {base['peak_memory_gb']:.2f} GB | "
                 f"{ours['peak_memory_gb'] / base['peak_memory_gb']:.2f}x |")
    lines += [f"\nLosses per step, ours: {ours['losses']}; baseline: {base['losses']} (same steps, same samples).\n"]

    if not args.skip_loss_memory:
        tokens = args.loss_tokens
        need = 3 * tokens * args.loss_vocab * 4 / 1e9  # logits, their gradient and softmax workspace, fp32
        while need > 0.7 * available_gb():  # measure full logits only where it fits on this machine
            tokens //= 2
            need /= 2
        mem = loss_memory(tokens, args.loss_hidden, args.loss_vocab)
        lines += [
            f"## Loss memory: vocabulary {args.loss_vocab}, {tokens} tokens, fp32, one forward+backward\n",
            "| path | peak RSS added | ratio to full logits |", "|---|---|---|",
            f"| ours: chunked, 1024 rows of logits at a time | {mem['chunked']:.2f} GB | "
            f"{mem['chunked'] / mem['full']:.3f}x |",
            f"| full logits + cross_entropy | {mem['full']:.2f} GB | 1.00x |",
        ]
        if tokens != args.loss_tokens:
            lines.append(f"\n{args.loss_tokens} tokens would need ~{2 * need:.0f} GB for full logits; "
                         f"measured at {tokens}.")
    text = "\n".join(lines) + "\n"
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
