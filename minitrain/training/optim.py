"""The optimizer and its schedule: AdamW with weight decay on matrices only, and linear warmup then constant, linear
or cosine decay to 0 over the run's steps."""

import math

import torch


def lr_multiplier(step: int, warmup: int, total_steps: int | None, kind: str) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(config, params: list[torch.nn.Parameter], total_steps: int | None):
    """AdamW with weight decay on matrices only, fused (one kernel over all parameters: 2-3x faster than foreach on
    FSDP2's shards, which runs one op per parameter), and the warmup + decay schedule as a LambdaLR."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config.num_warmup_steps, total_steps, config.lr_scheduler)
    )
    return optimizer, scheduler
