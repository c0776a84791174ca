"""Stage 2: fine-tune a Hugging Face causal LM on process_data.py's output with FSDP2 on torchrun.

    torchrun --nproc-per-node 8 train.py --data-path data.jsonl --model-name-or-path MODEL --output-dir out \
        --batch-size 128 --max-tokens-per-gpu 16384 --max-epochs 3

Reads top to bottom: config -> distributed setup -> data (token cache + planner) -> model (meta build, FSDP2,
weights broadcast from rank 0) -> loop (micro-steps -> clip -> step -> log -> checkpoint) -> cleanup.
"""

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
from checkpoint import CheckpointError, StopSignals
from data import DataError, TokenCache, build_token_cache, cache_dir_for, make_pack, open_token_cache
from validation import (
    TRACKERS, EarlyStopping, EvalError, Validation, build_evaluator, generation_records, open_tracker,
    split_validation, tracker_problem,
)
from loss import CausalLMLoss
from sampler import MultipackPlanner, SamplerError

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
LR_SCHEDULERS = ("constant", "linear", "cosine")
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BACKENDS = ("auto", "nccl", "gloo")


class ConfigError(ValueError):
    """Bad flags or paths, found before any weights load."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); raised identically on every rank."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    data_path: str
    model_name_or_path: str
    output_dir: str
    batch_size: int  # samples per optimizer step, all ranks together
    max_tokens_per_gpu: int  # token budget of one rank's packed row
    learning_rate: float = 1e-5
    num_warmup_steps: int = 0
    lr_scheduler: str = "constant"  # after warmup: constant, linear to 0 or cosine to 0 over the training steps
    max_epochs: int | None = None  # stop conditions: the first one reached ends training; none = until stopped
    max_steps: int | None = None
    max_samples: int | None = None
    min_samples_per_checkpoint: int | None = None  # Hugging Face export cadence; also always saved at the end
    # Full-state checkpoints (exact resume): every N steps, with every export, at the end and on SIGTERM/INT/USR1.
    checkpoint_every_steps: int | None = None
    keep_last_n_checkpoints: int | None = None  # None = keep all full-state checkpoints
    keep_last_n_exports: int | None = None  # None = keep every Hugging Face export
    resume_from: str | None = None  # default: the newest complete checkpoint in output_dir, if any
    fresh: bool = False  # start over: delete output_dir's full-state checkpoints (exports are moved aside)
    allow_config_change: bool = False  # resume even if flags that change the run differ from the checkpoint's
    weight_decay: float = 0.0  # applied to matrices only, not to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    fsdp_sharding_strategy: str = "SHARD_GRAD_OP"
    activation_checkpointing: bool = True
    use_liger_kernels: bool = False
    save_dtype: str = "bfloat16"
    seed: int = 42
    distributed_backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    # Seeing the run: a held-out set (a second file, or a fraction of --data-path held out by sample), evaluated
    # every N samples and at every export; greedy sample replies; early stopping; a tracker. None = not asked.
    validation_data_path: str | None = None
    validation_split: float | None = None
    eval_every_samples: int | None = None
    num_eval_generations: int = 3
    eval_max_new_tokens: int = 32
    early_stopping_patience: int | None = None  # evaluations in a row without improvement before stopping
    early_stopping_min_delta: float = 0.0  # an improvement must lower the best validation loss by more than this
    tracker: str | None = None  # wandb or tensorboard


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="JSONL from process_data.py (input_ids, labels, len)")
    p.add_argument("--model-name-or-path", required=True, help="Hugging Face model folder (or hub id in the cache)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, required=True, help="samples per optimizer step, all ranks together")
    p.add_argument("--max-tokens-per-gpu", type=int, required=True, help="token budget of one rank's packed row")
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--num-warmup-steps", type=int, default=TrainConfig.num_warmup_steps)
    p.add_argument("--lr-scheduler", default=TrainConfig.lr_scheduler, choices=LR_SCHEDULERS)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--min-samples-per-checkpoint", type=int, help="export a Hugging Face folder every N samples")
    p.add_argument(
        "--checkpoint-every-steps", type=int,
        help="full-state checkpoint (exact resume) every N steps; also written with every export, at the end and "
             "on SIGTERM/SIGINT/SIGUSR1",
    )
    p.add_argument("--keep-last-n-checkpoints", type=int, help="delete older full-state checkpoints (exports stay)")
    p.add_argument("--keep-last-n-exports", type=int, help="delete older hf_format exports (default: keep all)")
    p.add_argument("--resume-from", help="a checkpoints/step_<N> folder (default: the newest in --output-dir)")
    p.add_argument(
        "--fresh", action="store_true",
        help="start over: delete --output-dir's full-state checkpoints (its exports are moved aside, not deleted)",
    )
    p.add_argument(
        "--allow-config-change", action="store_true",
        help="resume even if the data, model, batch size, seed, schedule or stop flags differ from the checkpoint's",
    )
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--adam-beta1", type=float, default=TrainConfig.adam_beta1)
    p.add_argument("--adam-beta2", type=float, default=TrainConfig.adam_beta2)
    p.add_argument("--adam-epsilon", type=float, default=TrainConfig.adam_epsilon)
    p.add_argument("--max-grad-norm", type=float, default=TrainConfig.max_grad_norm, help="0 disables clipping")
    # No `choices` here: validate() reports an unknown strategy together with every other problem.
    p.add_argument(
        "--fsdp-sharding-strategy", default=TrainConfig.fsdp_sharding_strategy, help=" | ".join(SHARDING_STRATEGIES)
    )
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=TrainConfig.activation_checkpointing,
    )
    p.add_argument("--use-liger-kernels", action="store_true")
    p.add_argument("--save-dtype", default=TrainConfig.save_dtype, choices=list(SAVE_DTYPES))
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--distributed-backend", default=TrainConfig.distributed_backend, choices=BACKENDS)
    p.add_argument("--validation-data-path", help="a second JSONL from process_data.py, held out for validation")
    p.add_argument("--validation-split", type=float, help="hold out this fraction of --data-path's samples instead")
    p.add_argument("--eval-every-samples", type=int, help="evaluate every N trained samples (and at every export)")
    p.add_argument("--num-eval-generations", type=int, default=TrainConfig.num_eval_generations,
                   help="greedy replies to this many validation prompts at each evaluation (0 = none)")
    p.add_argument("--eval-max-new-tokens", type=int, default=TrainConfig.eval_max_new_tokens)
    p.add_argument("--early-stopping-patience", type=int,
                   help="stop after this many evaluations in a row without improvement")
    p.add_argument("--early-stopping-min-delta", type=float, default=TrainConfig.early_stopping_min_delta)
    p.add_argument("--tracker", help=" | ".join(TRACKERS) + " (optional packages, used only when asked for)")
    return TrainConfig(**vars(p.parse_args(argv)))


def validate(config: TrainConfig, world_size: int, local_world_size: int, cuda: bool) -> None:
    """Collect every problem with the flags and paths, and raise them together before anything expensive."""
    problems = []
    if not Path(config.data_path).is_file():
        problems.append(f"--data-path {config.data_path}: no such file; pass the JSONL written by process_data.py")
    problems += model_path_problems(config.model_name_or_path)
    if config.batch_size < world_size:
        problems.append(
            f"--batch-size {config.batch_size} is smaller than the {world_size} ranks; every rank needs at least "
            f"one sample per step, so use --batch-size >= {world_size}"
        )
    if config.max_tokens_per_gpu < 1:
        problems.append(f"--max-tokens-per-gpu must be positive, got {config.max_tokens_per_gpu}")
    if config.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(
            f"--fsdp-sharding-strategy {config.fsdp_sharding_strategy!r} is unknown; "
            f"use one of {', '.join(SHARDING_STRATEGIES)}"
        )
    if config.fsdp_sharding_strategy == "HYBRID_SHARD" and world_size % local_world_size:
        problems.append(
            f"HYBRID_SHARD needs the same number of ranks on every node "
            f"({world_size} ranks, {local_world_size} per node)"
        )
    if not config.learning_rate > 0:
        problems.append(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.num_warmup_steps < 0:
        problems.append(f"--num-warmup-steps must be >= 0, got {config.num_warmup_steps}")
    for flag in (
        "max_epochs", "max_steps", "max_samples", "min_samples_per_checkpoint", "checkpoint_every_steps",
        "keep_last_n_checkpoints", "keep_last_n_exports",
    ):
        value = getattr(config, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    stop = (config.max_epochs, config.max_steps, config.max_samples)
    if config.lr_scheduler != "constant" and all(v is None for v in stop):
        problems.append(
            f"--lr-scheduler {config.lr_scheduler} decays over the whole run; "
            f"give --max-epochs, --max-steps or --max-samples"
        )
    if config.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0, got {config.weight_decay}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(config, flag)}")
    if not config.adam_epsilon > 0:
        problems.append(f"--adam-epsilon must be positive, got {config.adam_epsilon}")
    if config.max_grad_norm < 0:
        problems.append(f"--max-grad-norm must be >= 0 (0 = no clipping), got {config.max_grad_norm}")
    if config.fresh and config.resume_from is not None:
        problems.append("--fresh starts over and --resume-from continues a run; pass one of them")
    if config.resume_from is not None and not checkpoint.is_complete(Path(config.resume_from)):
        problems.append(
            f"--resume-from {config.resume_from}: not a complete checkpoint; pass a "
            f"<output-dir>/checkpoints/step_<N> folder that holds a {checkpoint.COMPLETE} file"
        )
    if config.distributed_backend == "nccl" and not cuda:
        problems.append("--distributed-backend nccl needs CUDA GPUs and none is visible; use gloo (or auto) on CPU")
    if config.use_liger_kernels and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(
            "--use-liger-kernels needs a GPU (on CPU only under TRITON_INTERPRET=1, which is slow and meant for tests)"
        )
    problems += evaluation_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))


def evaluation_problems(config: TrainConfig) -> list[str]:
    problems = []
    path, split = config.validation_data_path, config.validation_split
    if path is not None and split is not None:
        problems.append("--validation-data-path and --validation-split each give a validation set; pass one of them")
    if path is not None and not Path(path).is_file():
        problems.append(f"--validation-data-path {path}: no such file; pass a JSONL written by process_data.py")
    if split is not None and not 0 < split < 1:
        problems.append(f"--validation-split is the fraction of samples held out, in (0, 1); got {split}")
    needs_set = [f"--{k.replace('_', '-')}" for k in ("eval_every_samples", "early_stopping_patience")
                 if getattr(config, k) is not None]
    if needs_set and path is None and split is None:
        problems.append(f"{' and '.join(needs_set)} need a validation set; pass --validation-data-path or "
                        f"--validation-split")
    for flag in ("eval_every_samples", "early_stopping_patience", "eval_max_new_tokens"):
        value = getattr(config, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if config.num_eval_generations < 0:
        problems.append(f"--num-eval-generations must be >= 0, got {config.num_eval_generations}")
    if not config.early_stopping_min_delta >= 0:
        problems.append(f"--early-stopping-min-delta must be >= 0, got {config.early_stopping_min_delta}")
    tracker = tracker_problem(config.tracker)
    return problems + ([tracker] if tracker else [])


def model_path_problems(name: str) -> list[str]:
    path = Path(name)
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [f"--model-name-or-path {name}: folder has no config.json"]
    missing = [f"--model-name-or-path {name}: no such model folder; pass a saved Hugging Face model folder"]
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return missing  # a filesystem path, not an "org/name" hub id
    from transformers import AutoConfig

    try:  # a hub id in the local Hugging Face cache (or a reachable hub)
        AutoConfig.from_pretrained(name)
        return []
    except (OSError, ValueError):
        return missing


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: no-ops in a single process, so `python train.py` runs the same code as torchrun.


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int, int]:
    env = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
    return env("RANK", 0), env("LOCAL_RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_WORLD_SIZE", 1)


def init_distributed(backend: str) -> Dist:
    rank, local_rank, world_size, local_world_size = world_from_env()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, local_world_size, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def raise_if_any_rank_failed(error: Exception | None, error_type: type[Exception]) -> None:
    """Collective (and barrier): if any rank failed, every rank raises `error_type`, so none waits forever."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [m for m in messages if m is not None]
    if failed:
        raise error_type(failed[0])


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_data(config: TrainConfig, d: Dist, vocab_size: int, path: str | None = None) -> TokenCache:
    """Local rank 0 of each node builds the token cache once (others wait); every rank then memory-maps it.

    `path`: the file to load, --data-path by default (the validation file passes its own).
    """
    data_path = Path(path or config.data_path).resolve()
    cache_dir = cache_dir_for(data_path, Path(config.output_dir) / "token_cache")
    error = None
    if d.local_rank == 0 and not (cache_dir / "meta.json").exists():
        print0(f"building token cache {cache_dir}")
        try:
            build_token_cache(data_path, cache_dir)
        except DataError as e:
            error = e
        except Exception as e:  # e.g. a full disk: still tell the other ranks, or they wait forever
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the exception says
            error = DataError(f"cannot build the token cache in {cache_dir} from {data_path}: {reason}")
    raise_if_any_rank_failed(error, DataError)
    cache = open_token_cache(cache_dir)
    if cache.skipped_lines:
        lines = ", ".join(map(str, cache.skipped_lines[:10])) + (", ..." if len(cache.skipped_lines) > 10 else "")
        print0(f"{data_path}: dropped {len(cache.skipped_lines)} samples with no trained token after the shift "
               f"(lines {lines})")
    too_long = np.flatnonzero(cache.lengths > config.max_tokens_per_gpu)
    if len(too_long):
        i = int(too_long[0])
        raise DataError(
            f"{data_path}:{cache.lines[i]}: sample is {cache.lengths[i]} tokens, longer than --max-tokens-per-gpu "
            f"{config.max_tokens_per_gpu} ({len(too_long)} samples are); raise --max-tokens-per-gpu or re-run "
            f"process_data.py with a smaller maximum length"
        )
    if cache.max_token_id >= vocab_size:
        raise DataError(
            f"{data_path}: token id {cache.max_token_id} is outside the model's vocabulary ({vocab_size}); "
            f"tokenize the data with this model's tokenizer"
        )
    return cache


# ----------------------------------------------------------------------------------------------------------------
# Model: build on the meta device, shard with FSDP2, then fill the shards from rank 0's copy of the weights.


def shard_model(model: CausalLMLoss, strategy: str, d: Dist) -> None:
    """FSDP2 on every decoder layer and on the root (embeddings, final norm, LM head), FSDP1 names mapped:

    FULL_SHARD    1-D mesh, parameters resharded after forward (all-gathered again in backward)
    SHARD_GRAD_OP 1-D mesh, parameters kept unsharded from forward to backward
    NO_SHARD      2-D mesh (world, 1): replicated everywhere, gradients all-reduced (DDP-like)
    HYBRID_SHARD  2-D mesh (nodes, ranks per node): sharded within a node, replicated across nodes
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dims = {
        "NO_SHARD": (d.world_size, 1),
        "HYBRID_SHARD": (d.world_size // d.local_world_size, d.local_world_size),
    }.get(strategy, (d.world_size,))
    names = ("replicate", "shard")[-len(dims):]
    mesh = init_device_mesh(d.device.type, dims, mesh_dim_names=names)
    # CUDA: bf16 compute on fp32 master weights, gradients reduced in fp32. CPU: everything fp32.
    mp = MixedPrecisionPolicy()
    if d.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    layers = getattr(model.lm.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"model type {model.lm.config.model_type!r} has no decoder `layers` list to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(config: TrainConfig, d: Dist) -> CausalLMLoss:
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention_implementation(d.device)

    def load():
        return AutoModelForCausalLM.from_pretrained(
            config.model_name_or_path, dtype=torch.float32, attn_implementation=attn
        )

    if d.world_size == 1:
        lm = load().to(d.device)
    else:
        # Only rank 0 ever holds the full model, on CPU; the others allocate nothing until sharding.
        hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn)
    if config.use_liger_kernels and d.device.type == "cuda":
        apply_liger_model_kernels(lm)
    if config.activation_checkpointing:
        lm.activation_checkpointing_enable()
    model = CausalLMLoss(lm, use_liger=config.use_liger_kernels)
    if d.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        shard_model(model, config.fsdp_sharding_strategy, d)
        model.to_empty(device=d.device)
        full = load() if d.is_main else None
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(lm, full.state_dict() if d.is_main else {}, options=options)
        # Buffers (e.g. rotary inv_freq) are not in the state dict and were left uninitialised by to_empty.
        reference = dict(full.named_buffers()) if d.is_main else {}
        for name, buffer in lm.named_buffers():
            if d.is_main:
                buffer.copy_(reference[name])
            dist.broadcast(buffer, src=0)
        if d.is_main:
            lm.generation_config = full.generation_config
        del full
    model.train()
    return model


def apply_liger_model_kernels(lm) -> None:
    """Liger's RMSNorm/RoPE/SwiGLU kernels through its public per-architecture entry point, on this instance."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{lm.config.model_type}", None)
    if apply is None:
        print0(f"Liger has no kernels for model type {lm.config.model_type!r}; using only its fused cross-entropy")
        return
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm)


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def lr_multiplier(step: int, warmup: int, total_steps: int | None, kind: str) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def count_total_steps(config: TrainConfig, planner: MultipackPlanner, num_samples: int) -> int | None:
    """The number of optimizer steps the stop conditions allow (the first one reached wins); None = until stopped."""
    limits = []
    if config.max_steps is not None:
        limits.append(config.max_steps)
    if config.max_epochs is not None:
        limits.append(config.max_epochs * planner.steps_per_epoch)
    if config.max_samples is not None:
        # Every epoch covers every sample once, so whole epochs are counted without planning them.
        epochs, remaining = divmod(config.max_samples, num_samples)
        steps = epochs * planner.steps_per_epoch
        while remaining > 0:
            remaining -= planner.plan(steps).num_samples
            steps += 1
        limits.append(steps)
    return min(limits) if limits else None


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step's forward/backward


def forward_backward(
    model: CausalLMLoss,
    cache: TokenCache,
    packs: list[np.ndarray],
    step_trained_tokens: int,
    world_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Accumulate the gradient of this step's loss over this rank's micro-steps; return the local CE sum.

    The step's loss is  L = (1 / N) * sum over every rank, micro-step and trained token of CE,
    with N = `step_trained_tokens`, the trained tokens of the WHOLE step (all micro-steps, all ranks), known on every
    rank from the plan and the cache. Each rank backpropagates (world_size / N) * its local CE sum: FSDP averages
    gradients over the world_size ranks (reduce-scatter / all-reduce divide by world_size), which turns the sum of
    these into exactly dL/dθ, however the step is split into ranks and micro-steps.
    """
    from torch.distributed.fsdp import FSDPModule

    scale = world_size / step_trained_tokens
    # One CUDA process has no FSDP mixed-precision policy: autocast gives the same bf16 compute on fp32 weights.
    unsharded_cuda = device.type == "cuda" and not isinstance(model, FSDPModule)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16, enabled=unsharded_cuda)
    local_sum = torch.zeros((), device=device)
    for indices in packs:
        pack = make_pack(cache, indices).to(device)
        with bf16:
            ce_sum = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets)
        (ce_sum * scale).backward()
        local_sum += ce_sum.detach()
    return local_sum


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the global gradient norm, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(model: CausalLMLoss, tokenizer, config: TrainConfig, d: Dist, samples_seen: int) -> Path:
    """Write <output-dir>/hf_format/samples_<N>/ atomically: saved into a temp folder, then renamed into place.

    Collective: every rank takes part in gathering the full state dict; only rank 0 writes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    final = Path(config.output_dir) / "hf_format" / f"samples_{samples_seen}"
    if d.world_size > 1:
        state = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.lm.state_dict().items()}
    error = None
    if d.is_main:
        try:
            write_hf_folder(model.lm, state, tokenizer, config, final)
            if config.keep_last_n_exports is not None:
                for old in prune_exports(final.parent, config.keep_last_n_exports, final):
                    print0(f"removed {old} (--keep-last-n-exports {config.keep_last_n_exports})")
        except OSError as e:
            error = TrainingError(f"could not write checkpoint {final}: {e}")
    raise_if_any_rank_failed(error, TrainingError)  # nobody goes on before the checkpoint is complete
    return final


def export_samples(path: Path) -> int | None:
    """N for an `hf_format/samples_<N>` folder, else None."""
    match = re.fullmatch(r"samples_(\d+)", path.name)
    return int(match.group(1)) if match else None


def exports_after(hf_dir: Path, samples: int) -> list[Path]:
    """The samples_<N> folders with N > `samples`, oldest first."""
    if not hf_dir.is_dir():
        return []
    found = [p for p in hf_dir.iterdir() if export_samples(p) is not None and export_samples(p) > samples]
    return sorted(found, key=export_samples)


def prune_exports(hf_dir: Path, keep: int, written: Path) -> list[Path]:
    """Delete all but the newest `keep` samples_<N> folders up to `written`, the export just written (always kept)."""
    exports = [p for p in exports_after(hf_dir, -1) if export_samples(p) <= export_samples(written)]
    old = exports[:-keep]
    for path in old:
        shutil.rmtree(path)
    return old


def write_hf_folder(lm, state: dict, tokenizer, config: TrainConfig, final: Path) -> None:
    """Save into a temp folder, then rename it: a crash never leaves a `samples_<N>` folder that looks complete."""
    dtype = SAVE_DTYPES[config.save_dtype]
    tied = tied_duplicates(lm)  # e.g. lm_head.weight == embed_tokens.weight: stored once
    state = {k: v.to(dtype) for k, v in state.items() if k not in tied}
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lm.save_pretrained(tmp, state_dict=state)
        hf_config = copy.deepcopy(lm.config)
        hf_config.dtype = dtype  # save_pretrained records the fp32 training dtype; the weights are in `dtype`
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_config.json", asdict(config))
        if final.exists():  # an older run's checkpoint of the same name: replace it
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tied_duplicates(lm) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    seen, duplicates = set(), set()
    for name, param in lm.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(name)
        seen.add(id(param))
    return duplicates


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Full-state checkpoints and resume (the format and its guarantees: checkpoint.py)


def find_resume_point(config: TrainConfig) -> Path | None:
    """The checkpoint this run continues from: --resume-from, else the newest complete one in --output-dir."""
    if config.fresh:
        return None
    if config.resume_from is not None:
        return Path(config.resume_from)
    return checkpoint.latest_checkpoint(checkpoint.checkpoint_root(config.output_dir))


def check_resumable(path: Path, config: TrainConfig, data_fingerprint: str) -> int:
    """Refuse, before any weights load, a resume whose flags or data would make a different run; return the
    checkpoint's samples seen."""
    saved_config, saved_state = checkpoint.read_saved_run(path)
    problems = checkpoint.config_problems(
        saved_config, asdict(config), saved_state["data"], data_fingerprint, config.allow_config_change
    )
    if problems:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(problems)}")
    return saved_state["samples_seen"]


def tidy_output_dir(config: TrainConfig, resume: Path | None, resumed_samples: int, metrics_path: Path) -> None:
    """Rank 0, once every rank has chosen where to resume: drop killed saves, another trajectory's checkpoints, set
    its exports aside, and drop later log lines.

    What this run does not continue is another trajectory: with no checkpoint to resume (a first start or --fresh),
    everything already in the folder; resuming from step k, every checkpoint after k and every export after k's
    samples. Left in place, pruning and the next restart would take them for this run's own.
    """
    root = checkpoint.checkpoint_root(config.output_dir)
    for path in checkpoint.remove_unfinished(root):
        print0(f"removed {path}, a checkpoint whose save was interrupted")
    if config.fresh and root.exists():
        old = checkpoint.complete_checkpoints(root)
        shutil.rmtree(root)
        print0(f"--fresh: removed {len(old)} full-state checkpoints of the earlier run in {root}")
    out = Path(config.output_dir)
    if resume is None:
        set_aside_exports(out, -1, "this run starts over")
        metrics_path.unlink(missing_ok=True)  # a new run in an old output folder starts a new log
        return
    for path in checkpoint.remove_later(root, checkpoint.checkpoint_step(resume)):
        print0(f"removed {path}: this run resumes from {resume}, so its later checkpoints are another run's")
    set_aside_exports(out, resumed_samples, f"this run resumes from {resume} at {resumed_samples} samples")
    dropped = checkpoint.trim_metrics(metrics_path, checkpoint.checkpoint_step(resume))
    if dropped:
        print0(f"{metrics_path}: removed {dropped} lines logged after the checkpoint (those steps run again)")


def set_aside_exports(out: Path, samples: int, reason: str) -> None:
    """Move the exports after `samples` (another run's) to a new <out>/hf_format.earlier_run_<K>: they are models
    someone may want, so they are kept, but never mixed with (or pruned in favour of) this run's own."""
    later = exports_after(out / "hf_format", samples)
    if not later:
        return
    k = 1
    while (out / f"hf_format.earlier_run_{k}").exists():
        k += 1
    aside = out / f"hf_format.earlier_run_{k}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    print0(f"moved {len(later)} exports of an earlier run ({', '.join(p.name for p in later)}) to {aside}: "
           f"{reason}; delete them if not needed")


def save_full_state(model, optimizer, scheduler, config: TrainConfig, d: Dist, step: int, trainer_state: dict) -> Path:
    """Collective: write checkpoints/step_<step>, then prune to --keep-last-n-checkpoints."""
    root = checkpoint.checkpoint_root(config.output_dir)
    state = {**trainer_state, "scheduler": scheduler.state_dict()}
    path = checkpoint.save(root, step, model, optimizer, state, asdict(config))
    if d.is_main and config.keep_last_n_checkpoints is not None:
        for old in checkpoint.prune(root, config.keep_last_n_checkpoints):
            print0(f"removed {old} (--keep-last-n-checkpoints {config.keep_last_n_checkpoints})")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training


def build_validation(
    config: TrainConfig, d: Dist, cache: TokenCache, held_out: np.ndarray | None, hf_config, tokenizer
) -> Validation | None:
    """The validation set (a second file, or the samples held out of --data-path), planned once; None if not asked."""
    if config.validation_data_path is not None:
        cache = load_data(config, d, hf_config.vocab_size, path=config.validation_data_path)
        held_out = np.arange(len(cache))
    if held_out is None:
        return None
    eos = hf_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    evaluator = build_evaluator(cache, held_out, config.max_tokens_per_gpu, d.world_size, d.rank,
                                config.num_eval_generations, config.eval_max_new_tokens, eos_ids)
    stopper = None
    if config.early_stopping_patience is not None:
        stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)
    print0(f"validation: {len(held_out)} samples, {int(cache.trained[held_out].sum())} trained tokens, "
           f"{len(evaluator.packs)} micro-steps and {len(evaluator.prompts)} generations per evaluation")
    return Validation(evaluator, config.eval_every_samples, stopper)


def export_checkpoint(model, tokenizer, config: TrainConfig, d: Dist, samples_seen: int,
                      validation: Validation | None, state: dict) -> None:
    """save_checkpoint, and note whether it is the best so far by validation loss (it was evaluated just before)."""
    path = save_checkpoint(model, tokenizer, config, d, samples_seen)
    print0(f"saved {path}")
    if validation is not None:
        validation.checkpoint_saved(path, samples_seen)
        state["validation"] = validation.state_dict()
        if validation.best_checkpoint == str(path):
            print0(f"best checkpoint so far: {path} (validation loss {validation.best_checkpoint_loss:.4f})")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def train(config: TrainConfig, d: Dist, stop: StopSignals) -> None:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: ours
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print0(json.dumps(asdict(config), indent=2))
    if d.is_main:
        write_json(out / "training_config.json", asdict(config))
    torch.manual_seed(config.seed)

    try:
        hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)  # saved with every checkpoint
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(
            f"--model-name-or-path {config.model_name_or_path}: cannot load its config and tokenizer ({reason})"
        ) from None
    cache = load_data(config, d, hf_config.vocab_size)
    # With --validation-split the planner sees only the training samples, numbered 0..n-1; train_indices maps
    # them back to the cache.
    train_indices, held_out = None, None
    if config.validation_split is not None:
        train_indices, held_out = split_validation(len(cache), config.validation_split)
    lengths, trained = cache.lengths, cache.trained
    if train_indices is not None:
        lengths, trained = lengths[train_indices], trained[train_indices]
    planner = MultipackPlanner(lengths, config.batch_size, config.max_tokens_per_gpu, d.world_size, seed=config.seed)
    total_steps = count_total_steps(config, planner, len(lengths))
    print0(f"{len(lengths)} samples, {int(lengths.sum())} tokens, {planner.steps_per_epoch} steps per epoch, "
           f"{total_steps if total_steps is not None else 'unlimited'} steps")
    validation = build_validation(config, d, cache, held_out, hf_config, tokenizer)
    data_fingerprint = checkpoint.data_fingerprint(lengths, trained, cache.content_hash)
    resume = find_resume_point(config)
    resumed_samples = 0
    if resume is not None:
        resumed_samples = check_resumable(resume, config, data_fingerprint)
    metrics_path = out / "metrics.jsonl"
    raise_if_any_rank_failed(None, ConfigError)  # barrier: every rank has chosen `resume` before rank 0 tidies
    generations_path = out / "generations.jsonl"
    if d.is_main:
        tidy_output_dir(config, resume, resumed_samples, metrics_path)
        if resume is None:
            generations_path.unlink(missing_ok=True)
        else:
            checkpoint.trim_metrics(generations_path, checkpoint.checkpoint_step(resume))
    tracker = open_tracker(config.tracker, out, asdict(config)) if d.is_main and config.tracker else None

    model = build_model(config, d)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config.num_warmup_steps, total_steps, config.lr_scheduler)
    )

    # Counters a full-state checkpoint restores; the sampler needs only the step (its plan is a function of it).
    state = {"step": 0, "samples_seen": 0, "last_export_samples": 0, "data": data_fingerprint}
    if resume is not None:
        saved = checkpoint.load(resume, model, optimizer, scheduler)
        state.update(step=saved["step"], samples_seen=saved["samples_seen"],
                     last_export_samples=saved["last_export_samples"])
        if validation is not None and "validation" in saved:
            validation.load_state_dict(saved["validation"])
        same_world = saved["world_size"] == d.world_size
        note = "" if same_world else f"; saved with world size {saved['world_size']}, RNG states not restored"
        print0(f"resumed from {resume}: step {state['step']}, {state['samples_seen']} samples seen{note}")
    samples_seen, last_saved, last_full = state["samples_seen"], state["last_export_samples"], state["step"]
    progress = tqdm(total=total_steps, initial=state["step"], disable=not d.is_main, dynamic_ncols=True, desc="train")
    started = time.perf_counter()
    for plan in planner.iter_steps(state["step"]):
        if total_steps is not None and plan.step >= total_steps:
            break
        if validation is not None and validation.should_stop:  # here, not after the evaluation: a resumed run too
            stopper = validation.stopper
            print0(f"early stopping after step {plan.step}: the validation loss has not improved on its best "
                   f"({stopper.best_loss:.4f} at {stopper.best_samples} samples) by more than {stopper.min_delta} "
                   f"for {stopper.patience} evaluations")
            break
        if train_indices is not None:
            plan = replace(plan, micro_batches=[[train_indices[i] for i in micro] for micro in plan.micro_batches])
        t0 = time.perf_counter()
        all_indices = np.concatenate([idx for micro in plan.micro_batches for idx in micro])
        step_tokens = int(cache.lengths[all_indices].sum())
        step_trained = int(cache.trained[all_indices].sum())  # > 0: every cached sample trains at least one token
        lr = scheduler.get_last_lr()[0]

        local_sum = forward_backward(model, cache, plan.rank_packs(d.rank), step_trained, d.world_size, d.device)
        if dist.is_initialized():
            dist.all_reduce(local_sum)
        loss = local_sum.item() / step_trained
        grad_norm = clip_gradients(model, config.max_grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            progress.close()
            raise TrainingError(
                f"step {plan.step + 1}: loss {loss}, gradient norm {grad_norm}; stopped before the optimizer step "
                f"(lower --learning-rate, raise --num-warmup-steps or check the data)"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        samples_seen += plan.num_samples
        seconds = time.perf_counter() - t0
        record = {
            "step": plan.step + 1,  # 1-based, as in the progress line and errors
            "epoch": plan.epoch,
            "samples_seen": samples_seen,
            "sample_lines": sorted(cache.lines[all_indices].tolist()),  # data-file lines trained in this step
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "trained_tokens": step_trained,
            "micro_steps": plan.num_micro_steps,
            "packing_utilisation": step_tokens / (plan.num_micro_steps * d.world_size * config.max_tokens_per_gpu),
            "tokens_per_s": step_tokens / seconds,
            "peak_memory_gb": peak_memory_gb(d.device),
            "step_time_s": seconds,
            "elapsed_s": time.perf_counter() - started,
        }
        every = config.min_samples_per_checkpoint
        export = every is not None and samples_seen // every > last_saved // every
        last_step = total_steps is not None and plan.step + 1 == total_steps  # exported after the loop
        evaluation = None
        samples_before = samples_seen - plan.num_samples
        if validation is not None and validation.due(samples_before, samples_seen, export or last_step):
            evaluation = validation.run(model, d.device, samples_seen)  # collective
            record.update(validation_loss=evaluation.loss, validation_tokens=evaluation.tokens)
            state["validation"] = validation.state_dict()
        if d.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.write(
                f"step {record['step']} | epoch {plan.epoch} | samples {samples_seen} | loss {loss:.4f} | "
                f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {record['tokens_per_s']:.0f} tok/s | "
                f"pack {record['packing_utilisation']:.0%}"
                + (f" | val loss {evaluation.loss:.4f}" if evaluation is not None else "")
            )
            if evaluation is not None and evaluation.replies:
                evaluator = validation.evaluator
                generations = generation_records(tokenizer, evaluator.cache, evaluator.prompts, evaluation.replies,
                                                 record["step"], samples_seen)
                with open(generations_path, "a") as f:
                    f.writelines(json.dumps(g) + "\n" for g in generations)
                for g in generations:
                    progress.write(f"  sample line {g['data_line']}: ...{g['prompt'][-80:]!r} -> {g['reply']!r}")
            if tracker is not None:
                tracker.log(record, record["step"])
        state.update(step=plan.step + 1, samples_seen=samples_seen)
        signum = stop.agreed(d.device)  # collective: all ranks stop after the same step
        if export:
            export_checkpoint(model, tokenizer, config, d, samples_seen, validation, state)
            last_saved = state["last_export_samples"] = samples_seen
        stop_now = signum and state["step"] != total_steps  # after the last step the run ends normally anyway
        every_steps = config.checkpoint_every_steps
        if export or stop_now or (every_steps is not None and state["step"] % every_steps == 0):
            print0(f"saved {save_full_state(model, optimizer, scheduler, config, d, state['step'], state)}")
            last_full = state["step"]
        if stop_now:
            progress.close()
            print0(f"stopped by {signal.Signals(signum).name} after step {state['step']}; "
                   f"run the same command again to resume")
            if tracker is not None:
                tracker.close()
            return
    progress.close()
    if samples_seen != last_saved:
        export_checkpoint(model, tokenizer, config, d, samples_seen, validation, state)
        last_saved = state["last_export_samples"] = samples_seen
    if state["step"] != last_full:
        print0(f"saved {save_full_state(model, optimizer, scheduler, config, d, state['step'], state)}")
    if validation is not None:
        print0(f"validation: {validation.summary()}")
    if tracker is not None:
        tracker.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    rank, _, world_size, local_world_size = world_from_env()
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    stop = StopSignals()
    try:
        validate(config, world_size, local_world_size, torch.cuda.is_available())
        stop.install()
        d = init_distributed(config.distributed_backend)
        train(config, d, stop)
    except (ConfigError, DataError, SamplerError, TrainingError, CheckpointError, EvalError) as e:
        print(f"{prefix}train.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.restore()
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
