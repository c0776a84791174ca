r"""Training throughput against TRL's SFTTrainer, side by side on the same machine, model, data and steps.

    python3 -m venv --system-site-packages /work/trlenv   # sees the system torch and transformers
    /work/trlenv/bin/pip install -r bench/requirements.txt -c <(python3 -c \
        "import torch, transformers; print(f'torch=={torch.__version__}\ntransformers=={transformers.__version__}')")
    python3 bench/bench_vs_trl.py --trl-python /work/trlenv/bin/python \
        --ours-extra-flags="--no-activation-checkpointing"   # ~20 min on 2 idle CPU cores with 3 rounds

TRL is installed for this benchmark only (bench/requirements.txt), never as a dependency of minitrain: the TRL side
runs under `--trl-python` (a venv that sees the system torch/transformers), ours under this interpreter.

Both sides: SmolLM2-135M-Instruct (default_model.py), fp32 weights and compute, `torchrun --nproc-per-node N`
(gloo on CPU), one optimizer step = --batch-size samples (all ranks together, N per-rank rows of batch/N samples),
--steps steps = exactly one pass over the --train-samples training conversations, AdamW lr 1e-5 constant,
no warmup, betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient clipping at 1.0, loss = token mean over the step's
trained tokens of all ranks. Rounds alternate the order of the runs; figures are medians over rounds.

What is equal:
- The tokens. Both sides read the same rows written by process_data.py (chatterbot-corpus conversations through
  SmolLM2's chat template): TRL gets them pre-tokenized with a `labels` column (-100 where process_data masks,
  i.e. system/user turns and template tokens; the assistant replies and their end-of-turn token are trained), which
  SFTTrainer leaves as is. That is TRL's completion/assistant-only loss made exact: TRL's own
  `assistant_only_loss` needs `{% generation %}` tags that SmolLM2's template lacks. TRL's padding-free collator
  then concatenates a rank's samples into one row with position_ids restarting at 0 and masks the first token of
  each sample; ours packs one row per rank with the same position_ids and the same shift. So every sample trains
  the same target tokens, and no token attends across samples on either side (SDPA, no attention mask, no KV
  cache: TRL passes use_cache=False, and so do we).
- Model, precision (fp32, SDPA attention), optimizer hyper-parameters, data-parallel world size, threads per
  process (torchrun's default of 1 unless --omp-num-threads is given, the same on both sides), seed 0.
- The held-out figure: this script itself loads each side's final export (fp32 safetensors) with plain
  `AutoModelForCausalLM`, runs each held-out conversation alone (no packing), and takes the token mean of the
  cross-entropy over the trained (assistant) tokens, shifted by one. The same code for both exports and for the
  untrained base model.

What is not equal:
- Which samples share a step: each side shuffles with its own sampler (TRL: torch RandomSampler +
  DistributedSampler; ours: the multipack planner, which also balances tokens across ranks). Every training sample is
  seen exactly once on both sides, so the total tokens and trained tokens are equal, not the per-step mix.
- Data parallelism: TRL wraps the model in DDP (all-reduce of gradients), ours in FSDP2 (SHARD_GRAD_OP by default).
- TRL computes entropy and token accuracy for its logs each step (part of what a TRL user runs); its LM head is its
  own chunked "fused_lm_head"; ours is loss.py's chunked cross-entropy at the trained positions only.
- Our export is asked for in float32 (`--save-dtype float32`; the default is bfloat16) so that both exports are
  evaluated at the precision they trained in. Ours also writes a full-state checkpoint at the end (exact resume);
  TRL is run with save_strategy "no" and one `save_model` at the end. Both are in the whole-process wall time.

Figures per run:
- loop tokens/s: all tokens of the --steps steps (input tokens, trained or not; equal on both sides) divided by the
  time from the start of the first step to the end of the last optimizer step (ours: metrics.jsonl `elapsed_s`
  of the last step; TRL: a TrainerCallback, first on_step_begin to last on_step_end). Start-up (imports, model
  load, sharding, dataset preparation) and the final export are outside it.
- wall: the whole `torchrun` command, from launch to exit.
- CPU s: user + system CPU seconds of the whole process tree (wait4), start-up included: on a shared machine
  it moves far less with the load than wall time does.
- peak RSS: the largest resident set of any one process of the run (wait4's ru_maxrss over the process tree).
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Training vs TRL SFTTrainer (bench/bench_vs_trl.py)"


# ----------------------------------------------------------------------------------------------------------------
# TRL worker: runs under torchrun with the TRL venv's python


def trl_worker(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)

    class Timing(TrainerCallback):
        first = last = None
        steps = 0

        def on_step_begin(self, a, state, control, **kw):
            if self.first is None:
                self.first = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.last = time.perf_counter()
            self.steps += 1

    timing = Timing()
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size // world,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        ddp_backend="gloo",
        padding_free=True,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timing])
    trainer.train()
    trainer.save_model(str(out / "final"))
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (out / "timing.json").write_text(json.dumps(
            {"loop_s": timing.last - timing.first, "steps": timing.steps, "losses": losses}))


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run_measured(cmd: list, env: dict, log: Path) -> dict:
    """Run `cmd`; return its wall time, CPU time and the peak RSS of the largest process in its tree (GB)."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}; log: {log}\n" + log.read_text()[-4000:])
    # CPU seconds of the whole process tree: a figure that a loaded machine inflates far less than wall time
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": usage.ru_maxrss / 1e6, "load_before": load}


def prepare_data(work: Path, model_dir: str, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path, int]:
    from minitrain.tools import example_data

    raw = work / "chatterbot.jsonl"
    example_data.convert(raw)
    lines = raw.read_text().splitlines()
    random.Random(seed).shuffle(lines)
    subset = work / "subset.jsonl"
    subset.write_text("\n".join(lines[: (n_train + n_heldout) * 2]) + "\n")  # spare rows in case some are dropped
    rows_file = work / "rows.jsonl"
    subprocess.run([sys.executable, "process_data.py", "--input-file", subset, "--output-file", rows_file,
                    "--model-name-or-path", model_dir, "--max-sample-num-tokens", "2048", "--num-printed-samples",
                    "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = rows_file.read_text().splitlines()
    assert len(rows) >= n_train + n_heldout, f"only {len(rows)} rows"
    train, heldout = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("\n".join(rows[:n_train]) + "\n")
    heldout.write_text("\n".join(rows[n_train : n_train + n_heldout]) + "\n")
    tokens = sum(len(json.loads(r)["input_ids"]) for r in rows[:n_train])
    return train, heldout, tokens


def heldout_loss(model_dir: Path, heldout: Path) -> float:
    """Token mean of cross-entropy over the held-out trained tokens, each conversation alone, plain HF forward."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in heldout.read_text().splitlines():
            row = json.loads(line)
            ids = torch.tensor(row["input_ids"])[None]
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            targets = labels[1:]
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def ours_export(out: Path) -> Path:
    configs = sorted((out / "hf_format").glob("**/config.json"))
    assert configs, f"no export under {out / 'hf_format'}"
    return configs[-1].parent


def run_ours(name: str, extra: list[str], a, train: Path, model_dir: str, work: Path, env: dict) -> dict:
    out = work / name
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", a.nproc_per_node]
    flags = ["--data-path", train, "--model-name-or-path", model_dir, "--output-dir", out, "--batch-size",
             a.batch_size, "--max-tokens-per-gpu", a.max_tokens_per_gpu, "--max-steps", a.steps, "--learning-rate",
             a.lr, "--seed", 0, "--save-dtype", "float32", *extra]
    result = run_measured([*torchrun, "train.py", *flags], env, work / f"{name}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == a.steps and all(r["micro_steps"] == 1 for r in records), "expected one micro-step a step"
    result.update(loop_s=records[-1]["elapsed_s"], tokens=sum(r["tokens"] for r in records),
                  losses=[r["loss"] for r in records], export=ours_export(out))
    return result


def run_trl(name: str, a, train: Path, model_dir: str, work: Path, env: dict) -> dict:
    out = work / name
    torchrun = [a.trl_python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", a.nproc_per_node]
    cmd = [*torchrun, Path(__file__).resolve(), "--trl-worker", "--data", train, "--model", model_dir, "--out", out,
           "--steps", a.steps, "--batch-size", a.batch_size, "--lr", a.lr]
    result = run_measured(cmd, env, work / f"{name}.log")
    timing = json.loads((out / "timing.json").read_text())
    assert timing["steps"] == a.steps, timing
    result.update(loop_s=timing["loop_s"], losses=timing["losses"], export=out / "final")
    return result


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, keeping every other section."""
    old = path.read_text() if path.exists() else "# minitrain benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[nxt + 1 :] if nxt >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def report(runs: dict, a, tokens: int, base_loss: float, minutes: float) -> None:
    """Medians over rounds -> this script's section of --output."""
    figures = ("tokens_per_s", "wall_s", "cpu_s", "peak_rss_gb", "heldout_loss")
    med = {k: {m: statistics.median(x.get(m, math.nan) for x in v) for m in figures} for k, v in runs.items()}
    counts = {k: len(v) for k, v in runs.items()}
    rounds = (f"{counts['trl']} alternating rounds" if len(set(counts.values())) == 1 else
              "alternating rounds (runs completed: " + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")")
    t = med["trl"]
    labels = {"trl": "TRL 1.16 SFTTrainer (padding-free, DDP)", "ours": "minitrain, default flags",
              "ours_best": f"minitrain `{a.ours_extra_flags}`"}
    threads = a.omp_num_threads or "1 (torchrun default)"
    loads = [x["load_before"] for v in runs.values() for x in v]
    lines = [
        SECTION + "\n",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPU "
        f"cores (shared; 1-min load average before each run {min(loads):.2f}-{max(loads):.2f}), "
        f"python {platform.python_version()}. "
        f"Command: `python3 bench/bench_vs_trl.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}` "
        f"({minutes:.1f} min).\n",
        f"SmolLM2-135M-Instruct, fp32, `torchrun --nproc-per-node {a.nproc_per_node}` (gloo), OMP threads per process "
        f"{threads}; {a.train_samples} chatterbot-corpus conversations ({tokens} tokens), {a.steps} steps x "
        f"{a.batch_size} samples, lr {a.lr:g} constant, AdamW (0.9, 0.95), clip 1.0; same rows and masks on both sides "
        f"(see the script's docstring for what is equal and what is not). Medians of {rounds}. "
        f"Held-out: token-mean CE of each final export on {a.heldout_samples} other conversations, computed by the "
        f"script (untrained model: {base_loss:.4f}).\n",
        "| run | loop tokens/s | vs TRL | wall s | TRL wall / wall | CPU s, all processes | TRL CPU / CPU | "
        "peak RSS GB | held-out loss | vs TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, m in med.items():
        lines.append(f"| {labels[k]} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                     f"{m['wall_s']:.1f} | {t['wall_s'] / m['wall_s']:.2f}x | {m['cpu_s']:.0f} | "
                     f"{t['cpu_s'] / m['cpu_s']:.2f}x | {m['peak_rss_gb']:.2f} | "
                     f"{m['heldout_loss']:.4f} | {(m['heldout_loss'] / t['heldout_loss'] - 1) * 100:+.2f}% |")
    lines.append("\nPer round (loop tokens/s; held-out loss): " + "; ".join(
        f"{k}: " + ", ".join(f"{x['tokens_per_s']:.1f} ({x['heldout_loss']:.4f})" for x in v) for k, v in runs.items()))
    lines.append("\nTraining losses per step, round 0: " + "; ".join(
        f"{k}: " + ", ".join(f"{x:.3f}" for x in v[0]["losses"]) for k, v in runs.items()))
    text = "\n".join(lines) + "\n"
    write_section(a.output, text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--heldout-samples", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--max-tokens-per-gpu", type=int, default=4096, help="ours: large enough for one micro-step")
    p.add_argument("--omp-num-threads", type=int, help="set OMP_NUM_THREADS for both sides (torchrun's default: 1)")
    p.add_argument("--ours-extra-flags", default="",
                   help='a second run of ours with these flags ("best flags"), e.g. --ours-extra-flags="--no-foo"')
    p.add_argument("--trl-python", default="/work/trlenv/bin/python", help="a python with trl installed")
    p.add_argument("--work-dir", type=Path, help="keep runs here (default: a temporary folder)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    # TRL worker mode (internal)
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)
    assert a.steps * a.batch_size == a.train_samples, "--steps x --batch-size must be one pass over the samples"

    from minitrain.tools import default_model

    started = time.perf_counter()
    model_dir = str(default_model.materialize())
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, heldout, tokens = prepare_data(work, model_dir, a.train_samples, a.heldout_samples, seed=0)
        env = dict(os.environ)
        if a.omp_num_threads:
            env["OMP_NUM_THREADS"] = str(a.omp_num_threads)
        variants = {"trl": None, "ours": []}
        if a.ours_extra_flags:
            variants["ours_best"] = shlex.split(a.ours_extra_flags)
        runs = {k: [] for k in variants}
        for r in range(a.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                label = f"{name}_r{r}"
                res = (run_trl(label, a, train, model_dir, work, env) if name == "trl"
                       else run_ours(label, variants[name], a, train, model_dir, work, env))
                res["tokens_per_s"] = tokens / res["loop_s"]
                res["heldout_loss"] = heldout_loss(res["export"], heldout)
                res["export"] = str(res["export"])
                print(f"{label}: {res['tokens_per_s']:.1f} loop tok/s, wall {res['wall_s']:.1f} s, peak "
                      f"{res['peak_rss_gb']:.2f} GB, held-out {res['heldout_loss']:.4f}, load {res['load_before']:.2f}",
                      flush=True)
                runs[name].append(res)
                (work / "runs.json").write_text(json.dumps(runs, indent=1))
        base_loss = heldout_loss(Path(model_dir), heldout)

    report(runs, a, tokens, base_loss, minutes=(time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
