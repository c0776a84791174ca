"""LoRA against full fine-tuning: peak memory per rank and tokens/s, same model, data, steps and flags.

    python bench/bench_lora.py                 # ~5-10 min on 2 CPU cores; writes bench/RESULTS_lora.md
    python bench/bench_lora.py --steps 3       # quicker

`torchrun --nproc-per-node 2 train.py` on the default SmolLM2-135M-Instruct (fp32, CPU, gloo, FSDP2 SHARD_GRAD_OP,
activation checkpointing on as in train.py, or --no-activation-checkpointing), once with every weight training and
once with `--lora` (its defaults: r 16, alpha 32, dropout 0.05, every linear layer of the decoder blocks), on the
same chatterbot samples. Each rank runs train.py's setup() and loop() inside this file (`--worker`) and records its
own peak RSS per phase: building the model (rank 0 also holds the full model while it is broadcast into the shards;
rank 1 never does), the training steps, the final export and checkpoint (Linux VmHWM, reset between phases), and
the largest of them. tokens/s: the median over the steps after the first (warm-up), from metrics.jsonl.
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


def peak_rss_gb() -> float:
    """This process's peak resident memory since start or the last reset_peak() (Linux VmHWM)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1e6


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def worker(flags: list[str]) -> int:
    """One torchrun rank: train.py's main() step by step, with this process's peak RSS in each phase -- building
    the model (rank 0 holds the full model while it is broadcast), the training steps, the final export and
    checkpoint -- into <output-dir>/peak_rss_rank<R>.json."""
    import train
    from minitrain.training.checkpoint import StopSignals
    from minitrain.training.distributed import cleanup_distributed, init_distributed

    config = train.parse_args(flags)
    train.validate(config, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), False)
    run = train.setup(config, init_distributed(config.distributed_backend))
    peaks = {"build": peak_rss_gb()}
    reset_peak()
    finish = run.checkpointer.finish

    def measured_finish(state):
        peaks["steps"] = peak_rss_gb()
        reset_peak()
        finish(state)
        peaks["export and checkpoint"] = peak_rss_gb()

    run.checkpointer.finish = measured_finish
    train.loop(run, StopSignals())
    run.log.close()
    (Path(config.output_dir) / f"peak_rss_rank{world_rank()}.json").write_text(json.dumps(peaks))
    cleanup_distributed()
    return 0


def world_rank() -> int:
    return int(os.environ.get("RANK", 0))


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, **kwargs)


def summarise(out: Path, nproc: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records  # the first step pays for warm-up
    log = (out / "train.log").read_text()
    params = next(line for line in log.splitlines() if "parameters train" in line)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_rss_gb": [json.loads((out / f"peak_rss_rank{r}.json").read_text()) for r in range(nproc)],
        "losses": [round(r["loss"], 4) for r in records],
        "parameters": params.strip(),
    }


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Small enough for a shared 2-core machine: 32 x 1024 got a full fine-tuning rank OOM-killed beside other jobs.
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens-per-gpu", type=int, default=512)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="train.py's default; bench_train.py runs without")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS_lora.md")
    args = p.parse_args()

    from minitrain.tools import default_model, example_data

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = default_model.materialize()
        raw, tokenized = work / "chat.jsonl", work / "tokenized.jsonl"
        example_data.convert(raw)
        run([sys.executable, "process_data.py", "--input-file", raw, "--output-file", tokenized,
             "--model-name-or-path", model_dir, "--max-sample-num-tokens", args.max_tokens_per_gpu,
             "--num-printed-samples", 0], stdout=subprocess.DEVNULL)
        flags = ["--data-path", tokenized, "--model-name-or-path", model_dir, "--batch-size", args.batch_size,
                 "--max-tokens-per-gpu", args.max_tokens_per_gpu, "--max-steps", args.steps, "--seed", 0,
                 "--fsdp-sharding-strategy", "SHARD_GRAD_OP", "--save-dtype", "bfloat16"]
        if not args.activation_checkpointing:
            flags.append("--no-activation-checkpointing")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    args.nproc_per_node]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc_per_node)))
        for name, extra in (("full", ["--learning-rate", 1e-5]), ("lora", ["--learning-rate", 1e-4, "--lora"])):
            out = work / name
            out.mkdir()
            with open(out / "train.log", "w") as log:
                run([*torchrun, "bench/bench_lora.py", "--worker", *flags, *extra, "--output-dir", out], env=env,
                    stdout=log)
            results[name] = summarise(out, args.nproc_per_node)
            print(name, results[name], flush=True)

    text = report(results, args, " ".join(sys.argv[1:]))
    args.output.write_text(text)
    print(text)


def report(results: dict, args, command: str) -> str:
    full, lora = results["full"], results["lora"]
    lines = [
        "# LoRA vs full fine-tuning\n",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}; command: `python bench/bench_lora.py {command}`\n",
        f"SmolLM2-135M-Instruct, fp32, {args.nproc_per_node} CPU processes (gloo, FSDP2 SHARD_GRAD_OP, activation "
        f"checkpointing {'on' if args.activation_checkpointing else 'off'}), {args.steps} steps of {args.batch_size} "
        f"chatterbot samples, --max-tokens-per-gpu {args.max_tokens_per_gpu}; LoRA with its defaults (r 16, alpha "
        f"32, dropout 0.05, all linear layers of the decoder blocks). Each run ends with an export (LoRA: adapter "
        f"folder + merged model) and a full-state "
        f"checkpoint. Peak RSS per rank and phase (each phase's own peak; the whole process's is the largest).\n",
        f"- {full['parameters']}",
        f"- {lora['parameters']}\n",
        "| figure | full fine-tuning | LoRA | LoRA / full |",
        "|---|---|---|---|",
        f"| tokens/s (median, steps 2..) | {full['tokens_per_s']:.0f} | {lora['tokens_per_s']:.0f} | "
        f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}x |",
        f"| step time (median) | {full['step_time_s']:.1f} s | {lora['step_time_s']:.1f} s | "
        f"{lora['step_time_s'] / full['step_time_s']:.2f}x |",
    ]
    for phase in ("steps", "build", "export and checkpoint", "whole process"):
        for rank in range(args.nproc_per_node):
            f, lo = (peak(r["peak_rss_gb"][rank], phase) for r in (full, lora))
            lines.append(f"| peak RSS, rank {rank}, {phase} | {f:.2f} GB | {lo:.2f} GB | {lo / f:.2f}x |")
    lines += [f"\nLosses per step, full (lr 1e-5): {full['losses']}; LoRA (lr 1e-4): {lora['losses']}.\n"]
    return "\n".join(lines) + "\n"


def peak(phases: dict, phase: str) -> float:
    return max(v for k, v in phases.items() if k in PHASES) if phase == "whole process" else phases[phase]


PHASES = ("build", "steps", "export and checkpoint")


if __name__ == "__main__":
    main()
