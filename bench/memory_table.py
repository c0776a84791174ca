"""The table of docs/memory.md: estimated peak memory per GPU (minitrain/training/memory.py, one training step on fake tensors)
for Qwen2.5-0.5B/1.5B and Llama-3.1-8B/70B (tests/configs/, their published config.json) on 1, 8 and 64 GPUs, full
fine-tuning and LoRA, at a few row lengths, each cell simulated on its own (the peak is affine in the row only within
one phase of the step: a short row's peak can be the optimizer step's, so no cell is extrapolated).

    python bench/memory_table.py > table.md     # ~10 minutes on 2 CPU cores

Defaults of a run: FULL_SHARD, bf16 compute on fp32 masters (CUDA), AdamW, SFT, activation checkpointing on,
variable-length attention.
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


def main() -> None:
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
