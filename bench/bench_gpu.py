"""GPU training throughput and MFU of train.py's own step, on random weights from a config (nothing downloaded).

    torchrun --nproc-per-node $(nvidia-smi -L | wc -l) bench/bench_gpu.py            # both models, eager + compiled
    python bench/bench_gpu.py --models qwen2.5-1.5b --steps 5                          # one GPU, quicker

For each model shape (Llama-3-8B, Qwen2.5-1.5B) and mode (eager, --compile): the model is built as train.py builds
it (meta device, activation checkpointing, FSDP2 FULL_SHARD per block and root under torchrun, bf16 compute on fp32
weights, the default attention kernel), then timed over optimizer steps of packed rows of --tokens-per-gpu tokens
(samples of ~1k tokens, as chat data has) through train.forward_backward, clipping and the fused AdamW step.
Reported per GPU: tokens/s, MFU by torchtitan's formula (6N + 12 L d T FLOP per token, N = non-embedding parameters, T = the
sequence length attention sees: the ~1k-token samples), peak memory. Writes bench/RESULTS_gpu.md.
Published mark: torchtitan, Llama-3.1-8B, seq 8192, 8x H100, FSDP2 eager 5,762 tokens/s/GPU (~33% MFU), compiled
6,667.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from minitrain.training import attention  # noqa: E402
from minitrain.training.data import build_token_cache, open_token_cache  # noqa: E402
from minitrain.training.distributed import cleanup_distributed, init_distributed, print0  # noqa: E402
from minitrain.training.model import PackedCausalLM, decoder_blocks, shard_model  # noqa: E402
from minitrain.training.objectives import SFT  # noqa: E402

SHAPES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    # for the CPU smoke test of this script (tests/test_attention.py), not a benchmark
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rope_theta=10000.0,
                 max_position_embeddings=512, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         max_position_embeddings=32768, tie_word_embeddings=True),
}
# Dense bf16 peak FLOP/s by device name (NVIDIA's datasheets; SXM parts).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_flops(name: str) -> float:
    return next((v for k, v in PEAKS.items() if k in name), float("nan"))


def random_data(path: Path, vocab: int, tokens: int, sample_len: int, seed: int) -> Path:
    """Rows of ~sample_len tokens (+-50%), the second half trained, enough for the timed steps."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        total = 0
        while total < tokens:
            n = int(rng.integers(sample_len // 2, sample_len * 3 // 2))
            ids = rng.integers(0, vocab, n).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]}) + "\n")
            total += n
    return path


def build(shape: dict, world, compile_blocks: bool) -> PackedCausalLM:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**shape)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                              attn_implementation=attention.choose("auto", world.device))
    lm.activation_checkpointing_enable()
    if compile_blocks:
        for block in decoder_blocks(lm):
            block.compile()
    model = PackedCausalLM(lm)
    if world.world_size > 1:  # as train.py: FSDP2 under torchrun; one process trains unsharded (bf16 autocast)
        shard_model(model, "FULL_SHARD", world)
    model.to_empty(device=world.device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, buffer in lm.named_buffers():  # rotary inv_freq
            if "inv_freq" in name:
                dim = buffer.shape[0] * 2
                buffer.copy_(1.0 / (shape["rope_theta"] ** (torch.arange(0, dim, 2, device=buffer.device) / dim)))
    model.train()
    return model


def run_one(name: str, compile_blocks: bool, args, world, work: Path) -> dict:
    shape = SHAPES[name]
    model = build(shape, world, compile_blocks)
    params = train.TrainConfig(data_path="-", model_name_or_path="-", output_dir="-", batch_size=1,
                               max_tokens_per_gpu=args.tokens_per_gpu, learning_rate=1e-5)
    optimizer, _ = train.build_optimizer(params, list(model.parameters()), None)
    data = work / f"{name}.jsonl"
    if world.rank == 0 and not data.exists():
        random_data(data, shape["vocab_size"], args.tokens_per_gpu * world.world_size * (args.steps + 3) * 2,
                    args.sample_len, seed=0)
    if world.world_size > 1:
        torch.distributed.barrier()
    cache_dir = work / f"{name}.cache"
    if world.rank == 0 and not cache_dir.exists():
        build_token_cache(data, cache_dir)
    if world.world_size > 1:
        torch.distributed.barrier()
    cache = open_token_cache(cache_dir)
    from sampler import pack_step

    objective, cursor, times, tokens = SFT(), 0, [], []
    for step in range(args.steps + 3):  # 3 warm-up steps (compilation, allocator)
        take = []
        while sum(cache.lengths[take]) < args.tokens_per_gpu * world.world_size * 0.95 and cursor < len(cache):
            take.append(cursor)
            cursor += 1
        take = np.array(take[:-1])
        micro = pack_step(cache.lengths[take], world.world_size, args.tokens_per_gpu)
        packs = [take[np.asarray(m[world.rank], dtype=np.int64)] for m in micro]
        units = objective.step_units(cache, take)
        sync(world.device)
        t0 = time.perf_counter()
        local = train.forward_backward(model, objective, cache, packs, units, world.world_size, world.device)
        train.clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        local.item()
        sync(world.device)
        if step >= 3:
            times.append(time.perf_counter() - t0)
            tokens.append(int(cache.lengths[take].sum()) / world.world_size)
    per_gpu = sum(tokens) / sum(times)
    n_params = sum(p.numel() for p in model.parameters()) - shape["vocab_size"] * shape["hidden_size"] * (
        1 if shape["tie_word_embeddings"] else 2)
    flop_per_token = 6 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * args.sample_len
    cuda = world.device.type == "cuda"
    device = torch.cuda.get_device_name(world.device) if cuda else "CPU"
    result = {"model": name, "mode": "compiled" if compile_blocks else "eager", "gpus": world.world_size,
              "tokens_per_s_per_gpu": per_gpu, "mfu": per_gpu * flop_per_token / peak_flops(device),
              "peak_memory_gib": train.peak_memory_gb(world.device) * 1e9 / 2**30, "device": device,
              "attention": attention.choose("auto", world.device)}
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(world.device)
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-1.5b"], choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--tokens-per-gpu", type=int, default=8192)
    p.add_argument("--sample-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS_gpu.md")
    p.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)  # the test of this script
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke_test:
        sys.exit("bench_gpu.py: error: no CUDA GPU visible; run it on a GPU machine")
    world = init_distributed("auto")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("BENCH_GPU_WORK", tmp))
        for name in args.models:
            for mode in args.modes:
                r = run_one(name, mode == "compiled", args, world, work)
                print0(json.dumps(r))
                results.append(r)
    if world.rank == 0:
        lines = ["# GPU benchmark (bench/bench_gpu.py)\n",
                 f"{datetime.date.today()}, {results[0]['device']} x {world.world_size}, torch {torch.__version__}, "
                 f"attention {results[0]['attention']}, "
                 f"{'FSDP2 FULL_SHARD' if world.world_size > 1 else 'one process'}, bf16 compute / fp32 weights, "
                 f"activation checkpointing, {args.tokens_per_gpu} tokens per GPU per step in ~{args.sample_len}-token samples, "
                 f"{args.steps} timed steps after 3 warm-up; MFU = tokens/s x (6N + 12 L d T) / dense bf16 peak.\n",
                 "| model | mode | tokens/s/GPU | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
                  f"{r['peak_memory_gib']:.1f} |" for r in results]
        lines.append("\nPublished mark: torchtitan Llama-3.1-8B, seq 8192, 8x H100, FSDP2 eager 5,762 tokens/s/GPU "
                     "(~33% MFU), compiled 6,667.")
        args.output.write_text("\n".join(lines) + "\n")
        print0(f"wrote {args.output}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
