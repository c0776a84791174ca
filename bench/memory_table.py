"""The table of docs/memory.md: estimated peak memory per GPU (minitrain/training/memory.py, one training step on fake tensors)
for Qwen2.5-0.5B/1.5B and Llama-3.1-8B/70B (tests/configs/, their published config.json) on 1, 8 and 64 GPUs, full
fine-tuning and LoRA, at a few row lengths, each cell simulated on its own (the peak is affine in the row only within
one phase of the step: a short row's peak can be the optimizer step's, so no cell is extrapolated).

    python bench/memory_table.py > table.md     # ~10 minutes on 2 CPU cores
    python bench/memory_table.py --sequence-parallel > sp.md     # long rows: about an hour on 2 loaded cores

Defaults of a run: FULL_SHARD, bf16 compute on fp32 masters (CUDA), AdamW, SFT, activation checkpointing on,
variable-length attention.

--sequence-parallel: Llama-3.1-8B and 70B, full fine-tuning, with --sequence-parallel-size S (S ranks share each row,
the all-to-all attention simulated), with and without --activation-offload: the peak at the goal row (8B: 128k
tokens, 70B: 32k) and the longest row whose estimate fits what --max-tokens-per-gpu auto fills (90% of 80 GB), found
and checked by simulation (memory.checked_longest_row: every row it returns was simulated).
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from minitrain.training import memory  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.1-8b", "llama-3.1-70b")
GPUS = (1, 8, 64)
ROWS = (4096, 8192, 32768)
GPU_GIB = 80 * 10**9 / 2**30  # an "80 GB" GPU: 74.5 GiB


# (model, GPUs, S, goal row): S = the GPUs of a node (8), or the GPU count where the heads allow it
SP_CELLS = (("llama-3.1-8b", 8, 8, 131072), ("llama-3.1-8b", 64, 8, 131072), ("llama-3.1-70b", 64, 8, 32768),
            ("llama-3.1-70b", 64, 64, 32768), ("llama-3.1-70b", 32, 8, 32768))


def sequence_parallel_table() -> None:
    budget = GPU_GIB * (1 - memory.MARGIN)
    print("| model | GPUs | S | offload | peak at the goal row | longest row (tokens per GPU x S) |")
    print("|---|---|---|---|---|---|")
    for name, gpus, split, goal in SP_CELLS:
        for offload in (False, True):
            started = time.perf_counter()
            config = train.parse_args(["--estimate-memory", "--model-name-or-path", str(ROOT / "tests/configs" / name),
                                       "--max-tokens-per-gpu", str(goal // split), "--activation-checkpointing",
                                       "--sequence-parallel-size", str(split),
                                       *(["--activation-offload"] if offload else [])])
            e = memory.estimate(config, gpus, budget, True, memory.run_optimizer(config), None, min(gpus, 8))
            longest = e.longest_row_that_fits
            row = "none" if longest is None else f"{longest} x {split} = {longest * split:,}"
            print(f"| {name} | {gpus} | {split} | {'yes' if offload else 'no'} | {goal:,} tokens: "
                  f"{e.peak_gib:.1f} GiB | {row} |", flush=True)
            print(f"{name} {gpus} S={split} offload={offload}: {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)


def main() -> None:
    if "--sequence-parallel" in sys.argv:
        sequence_parallel_table()
        return
    print("| model | GPUs | adapter | " + " | ".join(f"{t} tokens" for t in ROWS) + " |")
    print("|---|---|---|" + "---|" * len(ROWS))
    for name in MODELS:
        for gpus in GPUS:
            for adapter in ("full", "lora"):
                started = time.perf_counter()
                cells = []
                for tokens in ROWS:
                    config = train.parse_args(["--estimate-memory", "--model-name-or-path",
                                               str(ROOT / "tests/configs" / name), "--max-tokens-per-gpu", str(tokens),
                                               "--activation-checkpointing", *(["--lora"] if adapter == "lora" else [])])
                    e = memory.estimate(config, gpus, GPU_GIB, True, memory.run_optimizer(config), None,
                                        min(gpus, 8), slope=False)
                    cells.append(f"{e.peak_gib:.1f} {'yes' if e.peak_gib <= GPU_GIB else '**no**'}")
                print(f"| {name} | {gpus} | {adapter} | " + " | ".join(cells) + " |", flush=True)
                print(f"{name} {gpus} {adapter}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
