"""The padded baseline for bench_train.py: the same optimizer steps on the same samples, the usual way.

Takes train.py's flags and does what train.py does (same planner, same samples per rank and micro-step, FSDP2,
AdamW, same loss normalisation) except the two things we claim matter: each micro-batch is right-padded to its
longest sample (batch x longest, with an attention mask), and the loss is a plain Hugging Face forward with
`labels`, which materialises the full (tokens x vocab) logits. Writes the same metrics.jsonl as train.py.

    torchrun --nproc-per-node 2 bench/padded_baseline.py <train.py flags>
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from minitrain.training.data import IGNORE, load_data  # noqa: E402
from minitrain.training.distributed import cleanup_distributed, init_distributed  # noqa: E402
from sampler import MultipackPlanner  # noqa: E402


def padded_batch(cache, indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """(samples, longest) input_ids / attention_mask / labels; labels unshifted (the HF model shifts them)."""
    spans = [(int(cache.offsets[i]), int(cache.offsets[i + 1])) for i in indices]
    longest = max(end - start for start, end in spans)
    input_ids = np.full((len(spans), longest), pad_id, dtype=np.int64)
    labels = np.full((len(spans), longest), IGNORE, dtype=np.int64)
    mask = np.zeros((len(spans), longest), dtype=np.int64)
    for row, (start, end) in enumerate(spans):
        input_ids[row, : end - start] = cache.input_ids[start:end]
        labels[row, : end - start] = cache.labels[start:end]
        mask[row, : end - start] = 1
    return {k: torch.from_numpy(v) for k, v in (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels))}


def main() -> None:
    config = train.parse_args()
    d = init_distributed("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
    cache = load_data(config, d, hf_config.vocab_size)
    planner = MultipackPlanner(cache.lengths, config.batch_size, config.max_tokens_per_gpu, d.world_size,
                               seed=config.seed)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    mesh = init_device_mesh("cpu", (d.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2))
    pad_id = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, int) else 0

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for plan in planner.iter_steps(0):
        if plan.step >= config.max_steps:
            break
        t0 = time.perf_counter()
        all_indices = np.concatenate([idx for micro in plan.micro_batches for idx in micro])
        step_tokens = int(cache.lengths[all_indices].sum())
        step_trained = int(cache.trained[all_indices].sum())
        padded_tokens = 0
        local_sum = torch.zeros(())
        for indices in plan.rank_packs(d.rank):
            if len(indices) == 0:  # dummy micro-step: same collectives, zero gradient
                model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False).logits.sum().mul(0.0).backward()
                continue
            batch = padded_batch(cache, indices, pad_id)
            padded_tokens += batch["input_ids"].numel()
            n = int(cache.trained[indices].sum())
            mean_loss = model(**batch, use_cache=False).loss  # mean over this micro-batch's trained tokens
            (mean_loss * n * d.world_size / step_trained).backward()  # the same step loss as train.py
            local_sum += mean_loss.detach() * n
        dist.all_reduce(local_sum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if d.is_main:
            record = {"step": plan.step + 1, "loss": local_sum.item() / step_trained, "tokens": step_tokens,
                      "trained_tokens": step_trained, "padded_tokens_rank0": padded_tokens,
                      "tokens_per_s": step_tokens / seconds, "peak_memory_gb": train.peak_memory_gb(d.device),
                      "step_time_s": seconds}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"baseline step {record['step']} | loss {record['loss']:.4f} | {record['tokens_per_s']:.0f} tok/s",
                  flush=True)
    cleanup_distributed()


if __name__ == "__main__":
    main()
