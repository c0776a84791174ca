"""The main job, end to end on CPU: default model -> example data -> stage 1 -> stage 2 (torchrun) -> generate.

    python quickstart.py [--output-dir outputs/quickstart] [--max-steps 12] [--nproc-per-node 2]

Steps: materialise SmolLM2-135M-Instruct (default_model.py), convert chatterbot-corpus to messages JSONL
(example_data.py), tokenize and mask it (process_data.py, which prints masked samples), fine-tune it with
`torchrun --nproc-per-node 2 train.py` (the loss falls), then load the final checkpoint with
`AutoModelForCausalLM.from_pretrained` and answer a prompt from the data.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import orjson

from minitrain.tools import default_model, example_data, plot_run

ROOT = Path(__file__).resolve().parent


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def last_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted((run_dir / "hf_format").glob("samples_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'hf_format'}")
    return checkpoints[-1]


def generate(model_dir: Path, messages: list[dict], max_new_tokens: int = 40) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def print_loss_curve(metrics_file: Path) -> None:
    losses = [orjson.loads(line)["loss"] for line in metrics_file.read_bytes().splitlines() if line.strip()]
    if losses:
        print(f"loss per step: {' '.join(f'{x:.3f}' for x in losses)}")
        print(f"first {losses[0]:.3f} -> last {losses[-1]:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "quickstart")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--nproc-per-node", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    started = time.time()

    banner("1/5 default model")
    model_dir = default_model.materialize()
    print(f"SmolLM2-135M-Instruct as a Hugging Face folder: {model_dir}")

    banner("2/5 example data")
    raw = out / "chatterbot.jsonl"
    counts = example_data.convert(raw)
    print(f"{raw}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))

    tokenized = out / "tokenized.jsonl"
    banner("3/5 stage 1: process_data.py")
    run([sys.executable, "process_data.py", "--input-file", raw, "--output-file", tokenized,
         "--model-name-or-path", model_dir, "--max-sample-num-tokens", 512, "--num-printed-samples", 2])

    run_dir = out / "run"
    banner(f"4/5 stage 2: torchrun --nproc-per-node {args.nproc_per_node} train.py")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", args.nproc_per_node,
         "train.py", "--data-path", tokenized, "--output-dir", run_dir, "--model-name-or-path", model_dir,
         "--batch-size", args.batch_size, "--max-tokens-per-gpu", 1024, "--learning-rate", 1e-4,
         "--num-warmup-steps", 2, "--max-steps", args.max_steps, "--min-samples-per-checkpoint", 10_000_000,
         "--seed", 42, "--no-activation-checkpointing",  # 135M params: memory is no issue here
         "--validation-split", 0.02, "--eval-every-samples", 64, "--num-eval-generations", 1])
    print_loss_curve(run_dir / "metrics.jsonl")
    plot_run.main([str(run_dir)])  # run/metrics.png

    banner("5/5 generate with the fine-tuned checkpoint")
    checkpoint = last_checkpoint(run_dir)
    messages = orjson.loads(raw.read_bytes().splitlines()[0])["messages"][:1]
    print(f"checkpoint: {checkpoint}")
    print(f"user: {messages[0]['content']}")
    print(f"assistant: {generate(checkpoint, messages)}")

    banner(f"done in {time.time() - started:.0f} s")
    print(f"model:        {model_dir}\nraw data:     {raw}\ntokenized:    {tokenized}\n"
          f"run:          {run_dir} (config, metrics.jsonl, metrics.png, generations.jsonl, hf_format/)\n"
          f"checkpoint:   {checkpoint}")


if __name__ == "__main__":
    main()
