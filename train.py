"""Stage 2: fine-tune a Hugging Face causal LM (or an encoder-decoder: T5, BART, ...) on process_data.py's output
with FSDP2 on torchrun.

    torchrun --nproc-per-node 8 train.py --data-path data.jsonl --model-name-or-path MODEL --output-dir out \
        --batch-size 128 --max-tokens-per-gpu 16384 --max-epochs 3

Reads top to bottom: the config (one dataclass; its fields are the flags) -> main() -> train(): data (token cache
+ planner) -> model (minitrain/model.py: meta build, adapter, FSDP2, weights broadcast from rank 0) -> the loop:
plan the step -> the objective's forward/backward over this rank's micro-steps -> clip -> optimizer step -> log ->
the validator and the checkpointer, which decide for themselves whether this step is theirs.

The loss of a step (minitrain/objectives.py says what a unit is; SFT: a trained token; DPO, SimPO: a pair):

    L = (1 / N) * sum over every rank, micro-step and unit of the objective's loss,   N = the step's units

N is known on every rank from the plan and the cache. Each rank backpropagates (world_size / N) * its local sum;
FSDP averages gradients over the world_size ranks, which turns the sum of these into exactly dL/dθ, however the step
is split into ranks and micro-steps (see forward_backward).
"""

import argparse
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain import atomic, attention, checkpoint, families, lora, memory
from minitrain.checkpoint import Checkpointer, CheckpointError, RunState, StopSignals
from minitrain.config_file import ConfigFileError, config_path_from_argv, read_config_file
from minitrain.data import DataError, TokenCache, load_data
from minitrain.distributed import (
    World, cleanup_distributed, compute_autocast, init_distributed, print0, raise_if_any_rank_failed,
    world_from_env,
)
from minitrain.mixture import Mixture, Source, concat_caches, parse_sources
from minitrain.model import SHARDING_STRATEGIES, ModelError, build_model, checkpointing_needed
from minitrain.objectives import LOSS_REDUCTIONS, OBJECTIVES, build_objective
from minitrain.reference import attach_reference
from minitrain.run_log import TRACKERS, RunLog, tracker_problem
from minitrain.validation import (
    EVAL_METRICS, LOSS, STOPPING_METRICS, ValidationError, Validator, build_validator, eos_token_ids,
    split_validation,
)
from sampler import MultipackPlanner, SamplerError

LR_SCHEDULERS = ("constant", "linear", "cosine")
SAVE_DTYPES = ("bfloat16", "float16", "float32")
BACKENDS = ("auto", "nccl", "gloo")
LORA_EXPORTS = lora.EXPORTS


class ConfigError(ValueError):
    """Bad flags or paths, found before any weights load."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); raised identically on every rank."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration: each field is a flag (--data-path for data_path); its help is declared here and only here.


def flag(default=MISSING, help: str = "", **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    data_path: list[str] = flag(help="JSONL from process_data.py (input_ids, labels, len); several for a mixture, "
                                     "each as path, path:WEIGHT or path:Nx (epochs), see minitrain/mixture.py")
    model_name_or_path: str = flag(help="Hugging Face model folder (or hub id in the cache)")
    output_dir: str = flag()
    batch_size: int = flag(help="samples (preference objectives: pairs) per optimizer step, all ranks together")
    max_tokens_per_gpu: int | str = flag(help="token budget of one rank's packed row, or auto: the longest row whose "
                                              "memory estimate fits 90%% of the device's memory (printed and saved)",
                                         type=lambda text: text if text == "auto" else int(text))
    # What is trained (minitrain/objectives.py): sft on process_data.py's samples; dpo or simpo on its preference
    # pairs (--input-format preference), a pair packed whole into one micro-step.
    objective: str = flag("sft", "sft | dpo | simpo", choices=OBJECTIVES)
    dpo_beta: float = flag(0.1, "DPO: beta of -log sigmoid(beta * (chosen - rejected log-ratio to the reference))")
    # SimPO: torchllms' defaults are --simpo_beta 1.0 --simpo_gamma 1.0 for -log sigmoid(beta * (m - gamma)); the
    # same loss here is --simpo-beta beta --simpo-gamma beta*gamma. Ours are the paper's and TRL's form.
    simpo_beta: float = flag(2.0, "SimPO: beta of -log sigmoid(beta * m - gamma), m = the chosen minus the rejected "
                                  "length-normalised log-prob (torchllms' default: 1.0)")
    simpo_gamma: float = flag(0.5, "SimPO: the target margin gamma, outside beta as in the SimPO paper and TRL "
                                   "(torchllms puts it inside: its gamma x its beta is this)")
    preference_sft_weight: float = flag(0.0, "dpo/simpo: plus this times the chosen side's token-mean cross-entropy")
    learning_rate: float = flag(1e-5)
    num_warmup_steps: int = flag(0)
    lr_scheduler: str = flag("constant", "after warmup: constant, linear to 0 or cosine to 0 over the training steps",
                             choices=LR_SCHEDULERS)
    # Stop conditions: the first one reached ends training; none = until stopped.
    max_epochs: int | None = flag(None)
    max_steps: int | None = flag(None)
    max_samples: int | None = flag(None)
    min_samples_per_checkpoint: int | None = flag(None, "export a Hugging Face folder every N samples (and at the end)")
    checkpoint_every_steps: int | None = flag(
        None, "full-state checkpoint (exact resume) every N steps; also written with every export, at the end and "
              "on SIGTERM/SIGINT/SIGUSR1")
    keep_last_n_checkpoints: int | None = flag(None, "delete older full-state checkpoints (exports stay)")
    keep_last_n_exports: int | None = flag(None, "delete older hf_format exports (default: keep all)")
    resume_from: str | None = flag(None, "a checkpoints/step_<N> folder (default: the newest in --output-dir)")
    fresh: bool = flag(False, "start over: delete --output-dir's full-state checkpoints (its exports are moved aside, "
                              "not deleted)")
    allow_config_change: bool = flag(False, "resume even if the data, model, batch size, seed, schedule or stop flags "
                                            "differ from the checkpoint's")
    weight_decay: float = flag(0.0, "applied to matrices only, not to norms and biases")
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.95)
    adam_epsilon: float = flag(1e-8)
    max_grad_norm: float = flag(1.0, "0 disables clipping (the norm is still logged)")
    # No `choices` for the strategy: validate() reports an unknown one together with every other problem.
    fsdp_sharding_strategy: str = flag("FULL_SHARD", " | ".join(SHARDING_STRATEGIES))
    fsdp_shard_group_size: int | None = flag(None, "HYBRID_SHARD: shard over groups of this many ranks, replicate "
                                                   "across the groups (default: the ranks of one node)")
    activation_checkpointing: bool | None = flag(
        None, "recompute each decoder block in the backward; default: on only when the memory estimate of a step "
              "with it off (weights, gradients, optimizer state, activations) would not fit 90%% of the device's "
              "memory (printed at start)")
    compile: bool = flag(False, "torch.compile each decoder block (fused norms, activations, RoPE); same losses")
    use_liger_kernels: bool = flag(False)
    attn_implementation: str = flag("auto", "attention kernel for packed rows: auto = flash-attn if installed, else "
                                            "minitrain_varlen (PyTorch's varlen kernel) on CUDA, sdpa on CPU; or "
                                            + " | ".join(attention.CHOICES[1:]))
    loss_reduction: str = flag("tokens", "tokens: mean over the step's trained tokens; sequences: mean over its "
                                         "samples of each sample's token mean", choices=LOSS_REDUCTIONS)
    save_dtype: str = flag("bfloat16", choices=SAVE_DTYPES)
    seed: int = flag(42)
    distributed_backend: str = flag("auto", "auto = nccl on CUDA, gloo on CPU", choices=BACKENDS)
    distributed_timeout_minutes: float = flag(
        60.0, "timeout of the training process group's collectives (NCCL's default is 10); waits for one rank's long "
              "work (token cache, model load, export) do not count against it")
    # Seeing the run: a held-out set (a second file, or a fraction of --data-path held out by sample), evaluated
    # every N samples and at every export; greedy sample replies; early stopping; a tracker. None = not asked.
    validation_data_path: str | None = flag(None, "a second JSONL from process_data.py, held out for validation")
    validation_split: float | None = flag(None, "hold out this fraction of --data-path's samples instead")
    eval_every_samples: int | None = flag(None, "evaluate every N trained samples (and at every export)")
    num_eval_generations: int = flag(3, "greedy replies to this many validation prompts at each evaluation (0 = none)")
    eval_max_new_tokens: int = flag(32)
    eval_metric: str | None = flag(None, "rouge: at each evaluation, predict every validation sample's reply and "
                                         "report ROUGE-1/2/L/Lsum (F-measure x 100) and the mean generated length",
                                   choices=EVAL_METRICS)
    eval_num_beams: int = flag(1, "--eval-metric's predictions: 1 = greedy, more = beam search")
    early_stopping_patience: int | None = flag(None, "stop after this many evaluations in a row without improvement")
    early_stopping_metric: str = flag(LOSS, "what early stopping and the best export follow: validation_loss (lower "
                                            "is better) or, with --eval-metric rouge, a ROUGE figure (higher is "
                                            "better)", choices=STOPPING_METRICS)
    early_stopping_min_delta: float = flag(0.0, "an improvement must beat the best value of --early-stopping-metric "
                                                "by more than this", aliases=["--early-stopping-threshold"])
    tracker: str | None = flag(None, " | ".join(TRACKERS) + " (optional packages, used only when asked for)")
    # LoRA (minitrain/lora.py, with peft): adapters train, the base weights stay frozen.
    lora: bool = flag(False, "train LoRA adapters instead of every weight; exports hold PEFT's adapter folder "
                             "(samples_<N>/adapter) and/or the merged model (--lora-export)")
    lora_r: int = flag(16, "the adapters' rank", aliases=["--lora-rank"])
    lora_alpha: float = flag(32.0, "the adapters' output is scaled by alpha / r")
    lora_dropout: float = flag(0.05, "dropout on the adapters' input")
    lora_target_modules: list[str] | None = flag(
        None, "module names to adapt (e.g. q_proj v_proj), or all-linear (default: every linear layer of the "
              "decoder blocks)", nargs="+")
    lora_modules_to_save: list[str] | None = flag(
        None, "modules trained in full beside the adapters and saved with them (e.g. lm_head for new tokens)",
        nargs="+")
    lora_init: str = flag("default", "default (peft's: A Kaiming-uniform, B zero, so step 0 is the base model), "
                                     "gaussian (A Gaussian, B zero) or random (B random too; step 0 differs)")
    lora_export: str = flag("both", "what each export holds: PEFT's adapter folder, the merged model, or both",
                            choices=LORA_EXPORTS)
    qlora: bool = flag(False, "QLoRA: the base's linear layers in 4-bit NF4 (bitsandbytes) on each GPU; CUDA only")
    # Planning memory (minitrain/memory.py): one step of this run on fake tensors, from config.json alone.
    estimate_memory: bool = flag(False, "print this run's estimated peak memory per GPU and its parts, and the "
                                        "longest row that fits, then exit (no data or weights read)")
    world_size: int | None = flag(None, "--estimate-memory: the number of GPUs to plan for (default: this launch's)")
    gpu_memory_gib: float | None = flag(None, "--estimate-memory: each GPU's memory in GiB (default: this machine's "
                                              "GPU; none: no verdict)")
    estimate_device: str = flag("cuda", "--estimate-memory: what to estimate for: cuda (bf16 compute on fp32 "
                                        "masters, variable-length attention) or cpu (fp32, sdpa)",
                                choices=("cuda", "cpu"))

    def __post_init__(self):
        if self.data_path is None:  # --estimate-memory reads no data
            self.data_path = []
        if isinstance(self.data_path, str):  # TrainConfig(data_path="one.jsonl", ...)
            self.data_path = [self.data_path]
        # "~" is the shell's, so a config file's "~/models/x" means what it says on the command line
        self.data_path = [os.path.expanduser(p) for p in self.data_path]
        for name in ("model_name_or_path", "output_dir", "validation_data_path", "resume_from"):
            if getattr(self, name) is not None:
                setattr(self, name, os.path.expanduser(getattr(self, name)))


def value_type(hint) -> type:
    """int for `int | None`, list for `list[str]` and `list[str] | None`, and so on."""
    options = [t for t in typing.get_args(hint) if t is not type(None)]
    kind = options[0] if isinstance(hint, types.UnionType) else hint
    return typing.get_origin(kind) or kind


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags, over the values of --config FILE (config_file.py), over the dataclass defaults."""
    argv = sys.argv[1:] if argv is None else argv
    hints = {name: value_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}
    path = config_path_from_argv(argv)
    from_file = read_config_file(path, hints) if path else {}
    estimating = "--estimate-memory" in argv  # needs neither data nor an output folder
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a YAML or TOML file of flags (keys are flag names); command-line flags win")
    for f in fields(TrainConfig):
        name, kind, kwargs = "--" + f.name.replace("_", "-"), hints[f.name], dict(f.metadata)
        default = from_file.get(f.name, f.default)
        names = [name, *kwargs.pop("aliases", [])]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction  # --x and --no-x: a config file may set either
        elif kind is list:  # a list of strings
            kwargs.update(type=str, nargs=kwargs.get("nargs", "+"))
        else:
            kwargs.setdefault("type", kind)
        if default is MISSING and estimating:
            kwargs["default"] = None
        elif default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        p.add_argument(*names, **kwargs)
    args = vars(p.parse_args(argv))
    del args["config"]  # its values are in the others
    return TrainConfig(**args)


def validate(config: TrainConfig, world_size: int, local_world_size: int, cuda: bool) -> None:
    """Collect every problem with the flags and paths, and raise them together before anything expensive."""
    problems = []
    try:
        sources = parse_sources(config.data_path)
    except DataError as e:
        problems.append(str(e))
        sources = []
    for source in sources:
        if not Path(source.path).is_file():
            problems.append(f"--data-path {source.path}: no such file; pass the JSONL written by process_data.py")
    model_problems = model_path_problems(config.model_name_or_path)
    problems += model_problems
    if config.batch_size < world_size:
        problems.append(
            f"--batch-size {config.batch_size} is smaller than the {world_size} ranks; every rank needs at least "
            f"one sample per step, so use --batch-size >= {world_size}"
        )
    if config.max_tokens_per_gpu != "auto" and config.max_tokens_per_gpu < 1:
        problems.append(f"--max-tokens-per-gpu must be positive (or auto), got {config.max_tokens_per_gpu}")
    if config.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(
            f"--fsdp-sharding-strategy {config.fsdp_sharding_strategy!r} is unknown; "
            f"use one of {', '.join(SHARDING_STRATEGIES)}"
        )
    group = config.fsdp_shard_group_size
    if group is not None and (group < 1 or world_size % group):
        problems.append(f"--fsdp-shard-group-size {group} must divide the {world_size} ranks (HYBRID_SHARD shards "
                        f"within groups of that many ranks)")
    elif config.fsdp_sharding_strategy == "HYBRID_SHARD" and group is None and world_size % local_world_size:
        problems.append(
            f"HYBRID_SHARD needs the same number of ranks on every node "
            f"({world_size} ranks, {local_world_size} per node), or --fsdp-shard-group-size"
        )
    for name in ("dpo_beta", "simpo_beta"):
        if not getattr(config, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.preference_sft_weight < 0:
        problems.append(f"--preference-sft-weight must be >= 0, got {config.preference_sft_weight}")
    if not config.learning_rate > 0:
        problems.append(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.num_warmup_steps < 0:
        problems.append(f"--num-warmup-steps must be >= 0, got {config.num_warmup_steps}")
    for name in (
        "max_epochs", "max_steps", "max_samples", "min_samples_per_checkpoint", "checkpoint_every_steps",
        "keep_last_n_checkpoints", "keep_last_n_exports",
    ):
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    stop = (config.max_epochs, config.max_steps, config.max_samples)
    if config.lr_scheduler != "constant" and all(v is None for v in stop):
        problems.append(
            f"--lr-scheduler {config.lr_scheduler} decays over the whole run; "
            f"give --max-epochs, --max-steps or --max-samples"
        )
    if config.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0, got {config.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
    if not config.adam_epsilon > 0:
        problems.append(f"--adam-epsilon must be positive, got {config.adam_epsilon}")
    if not config.distributed_timeout_minutes > 0:
        problems.append(f"--distributed-timeout-minutes must be positive, got {config.distributed_timeout_minutes}")
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
    if config.use_liger_kernels and config.loss_reduction == "sequences":
        problems.append("--loss-reduction sequences weighs each token by its sample and runs on the chunked loss; "
                        "drop --use-liger-kernels or use --loss-reduction tokens")
    if config.use_liger_kernels and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(
            "--use-liger-kernels needs a GPU (on CPU only under TRITON_INTERPRET=1, which is slow and meant for tests)"
        )
    attn = attention.problem(config.attn_implementation, cuda)
    problems += [attn] if attn else []
    problems += validation_problems(config)
    problems += lora.flag_problems(config, cuda, model_ok=not model_problems)
    if problems:
        raise ConfigError("; ".join(problems))


def validation_problems(config: TrainConfig) -> list[str]:
    problems = []
    path, split = config.validation_data_path, config.validation_split
    if path is not None and split is not None:
        problems.append("--validation-data-path and --validation-split each give a validation set; pass one of them")
    if path is not None and not Path(path).is_file():
        problems.append(f"--validation-data-path {path}: no such file; pass a JSONL written by process_data.py")
    if split is not None and not 0 < split < 1:
        problems.append(f"--validation-split is the fraction of samples held out, in (0, 1); got {split}")
    needs_set = [f"--{k.replace('_', '-')}" for k in ("eval_every_samples", "early_stopping_patience", "eval_metric")
                 if getattr(config, k) is not None]
    if needs_set and path is None and split is None:
        problems.append(f"{' and '.join(needs_set)} need a validation set; pass --validation-data-path or "
                        f"--validation-split")
    for name in ("eval_every_samples", "early_stopping_patience", "eval_max_new_tokens", "eval_num_beams"):
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if config.num_eval_generations < 0:
        problems.append(f"--num-eval-generations must be >= 0, got {config.num_eval_generations}")
    if not config.early_stopping_min_delta >= 0:
        problems.append(f"--early-stopping-min-delta must be >= 0, got {config.early_stopping_min_delta}")
    if config.eval_metric not in (None, *EVAL_METRICS):
        problems.append(f"--eval-metric {config.eval_metric!r} is unknown; use {' or '.join(EVAL_METRICS)}")
    if config.early_stopping_metric not in STOPPING_METRICS:
        problems.append(f"--early-stopping-metric {config.early_stopping_metric!r} is unknown; use one of "
                        f"{', '.join(STOPPING_METRICS)}")
    elif config.early_stopping_metric != LOSS and config.eval_metric != "rouge":
        problems.append(f"--early-stopping-metric {config.early_stopping_metric} needs --eval-metric rouge, which "
                        f"computes it")
    if config.eval_metric == "rouge" and importlib.util.find_spec("rouge_score") is None:
        problems.append("--eval-metric rouge needs the rouge-score package, which is not installed; "
                        "pip install rouge-score")
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
# Schedule


def lr_multiplier(step: int, warmup: int, total_steps: int | None, kind: str) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def count_total_steps(config: TrainConfig, planner: MultipackPlanner) -> int | None:
    """The number of optimizer steps the stop conditions allow (the first one reached wins); None = until stopped."""
    limits = []
    if config.max_steps is not None:
        limits.append(config.max_steps)
    if config.max_epochs is not None:
        limits.append(config.max_epochs * planner.steps_per_epoch)
    if config.max_samples is not None:
        # Every epoch has the same number of samples, so whole epochs are counted without planning them.
        epochs, remaining = divmod(config.max_samples, planner.epoch_size)
        steps = epochs * planner.steps_per_epoch
        while remaining > 0:
            remaining -= planner.plan(steps).num_samples
            steps += 1
        limits.append(steps)
    return min(limits) if limits else None


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], total_steps: int | None):
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


# ----------------------------------------------------------------------------------------------------------------
# Memory: one step of this run on fake tensors (minitrain/memory.py) decides what "auto" means, before any weight


def memory_plan(config: TrainConfig, world_size: int, local_world_size: int, gpu_memory_gib: float,
                cuda: bool) -> memory.Plan:
    """memory.plan with this run's optimizer; module-level so that it can run in a process of its own."""
    make_optimizer = lambda params: build_optimizer(config, params, None)[0]  # noqa: E731
    return memory.plan(config, world_size, gpu_memory_gib, cuda, make_optimizer, config.fsdp_shard_group_size,
                       local_world_size)


def plan_memory(config: TrainConfig, world: World, hf_config) -> str:
    """Before any weight loads: on CUDA, or when activation checkpointing or --max-tokens-per-gpu is auto, estimate a
    step's peak memory per device; set the auto values in `config` (so they are printed and saved); on CUDA, stop a
    run that will not fit, in one line with the fixes. Returns why checkpointing is on or off."""
    auto_tokens = config.max_tokens_per_gpu == "auto"
    if auto_tokens:  # a resumed run keeps the budget its checkpoint was trained with
        resume = checkpoint.find_resume_point(config.output_dir, config.resume_from, config.fresh)
        saved = checkpoint.read_json(resume / "training_config.json") if resume is not None else {}
        if isinstance(saved.get("max_tokens_per_gpu"), int):
            config.max_tokens_per_gpu = saved["max_tokens_per_gpu"]
            print0(f"--max-tokens-per-gpu auto: {config.max_tokens_per_gpu}, as saved in {resume}")
            auto_tokens = False
    cuda = world.device.type == "cuda"
    if not (cuda or auto_tokens or config.activation_checkpointing is None):
        return "asked for"
    if hf_config.is_encoder_decoder:  # the estimator covers causal LMs
        if auto_tokens:
            raise ConfigError(f"--max-tokens-per-gpu auto: the memory estimate covers causal LMs, not "
                              f"{hf_config.model_type}; give a number")
        if config.activation_checkpointing is None:
            config.activation_checkpointing, why = checkpointing_needed(hf_config, config.max_tokens_per_gpu, world)
            return why
        return "asked for"
    gib = memory.device_memory_gib(world.device, world.local_world_size)
    args = (config, world.world_size, world.local_world_size, gib, cuda)
    try:  # the estimate's fake process group must be alone in its process: under torchrun, a process of its own
        plan = memory.run_isolated(memory_plan, *args) if dist.is_initialized() else memory_plan(*args)
    except memory.EstimateError as e:
        raise ConfigError(str(e)) from None
    config.activation_checkpointing, config.max_tokens_per_gpu = plan.activation_checkpointing, plan.max_tokens_per_gpu
    print0(plan.estimate.describe())
    if auto_tokens:
        print0(f"--max-tokens-per-gpu {config.max_tokens_per_gpu} ({plan.tokens_why})")
    if cuda and not plan.estimate.fits:
        raise ConfigError(memory.does_not_fit(plan))
    return plan.checkpointing_why


def estimate_memory_main(config: TrainConfig) -> int:
    """--estimate-memory: the run's peak memory per GPU on --world-size GPUs of --gpu-memory-gib, its parts and the
    longest row that fits; the last line is JSON."""
    problems = model_path_problems(config.model_name_or_path)
    cuda = config.estimate_device == "cuda"
    world_size = config.world_size or world_from_env()[2]
    gib = config.gpu_memory_gib
    if gib is None and cuda and torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / memory.GIB
    if gib is None and config.max_tokens_per_gpu == "auto":
        problems.append("--max-tokens-per-gpu auto needs --gpu-memory-gib (no GPU here to read it from)")
    if config.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(f"--fsdp-sharding-strategy {config.fsdp_sharding_strategy!r} is unknown; use one of "
                        f"{', '.join(SHARDING_STRATEGIES)}")
    group = config.fsdp_shard_group_size
    if group is not None and (group < 1 or world_size % group):
        problems.append(f"--fsdp-shard-group-size {group} must divide --world-size {world_size}")
    if config.max_tokens_per_gpu is None:
        problems.append("--max-tokens-per-gpu: give the row length to estimate (or auto)")
    if problems:
        raise ConfigError("; ".join(problems))
    started = time.perf_counter()
    local = min(world_size, 8)
    try:
        if gib is None:  # no verdict: the estimate at the asked row, and the cost of a token
            run = replace(config, activation_checkpointing=bool(config.activation_checkpointing))
            make_optimizer = lambda params: build_optimizer(config, params, None)[0]  # noqa: E731
            result = memory.estimate(run, world_size, None, cuda, make_optimizer, group, local)
            plan = memory.Plan(result, result.activation_checkpointing, "asked for", result.max_tokens_per_gpu,
                               "asked for", [])
        else:
            plan = memory_plan(config, world_size, local, gib, cuda)
    except memory.EstimateError as e:
        raise ConfigError(str(e)) from None
    print(f"activation checkpointing: {'on' if plan.activation_checkpointing else 'off'} ({plan.checkpointing_why})")
    print(f"--max-tokens-per-gpu {plan.max_tokens_per_gpu} ({plan.tokens_why})")
    print(plan.estimate.describe())
    if plan.fixes:
        print(memory.does_not_fit(plan))
    print(f"(estimated in {time.perf_counter() - started:.0f} s on fake tensors, {world_size} fake ranks)")
    print(plan.estimate.json_line(), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step's forward/backward


def forward_backward(model, objective, cache: TokenCache, packs: list[np.ndarray], step_units: int,
                     world_size: int, device: torch.device, source_ce: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate the gradient of this step's loss over this rank's micro-steps; return the local sums,
    (1 + len(objective.metrics),): the loss sum, then the sum of each of the objective's metrics.

    The step's loss is  L = (1 / N) * sum over every rank, micro-step and unit of the objective's loss,
    with N = `step_units`, the units (SFT: trained tokens or samples; DPO/SimPO: pairs) of the WHOLE step (all
    micro-steps, all ranks), known on every rank from the plan and the cache. Each rank backpropagates
    (world_size / N) * its local sum: FSDP averages gradients over the world_size ranks (reduce-scatter / all-reduce
    divide by world_size), which turns the sum of these into exactly dL/dθ, however the step is split into ranks and
    micro-steps.

    `source_ce` (a mixture's metrics, not the loss): each file's CE sum over this rank's trained tokens is added.
    """
    scale = world_size / step_units
    local_sums = torch.zeros(1 + len(objective.metrics), device=device)
    for indices in packs:
        pack = objective.pack(cache, indices).to(device)
        rows = None if source_ce is None else torch.zeros(len(pack.targets), device=device)
        with compute_autocast(model, device):
            loss_sum, metric_sums = objective.loss_sum(model, pack, cache, indices, rows)
        (loss_sum * scale).backward()
        local_sums[0] += loss_sum.detach()
        local_sums[1:] += metric_sums
        if rows is not None and len(indices):
            of_target = cache.sources[np.asarray(indices, dtype=np.int64)][pack.sample_of_target]
            source_ce.index_add_(0, torch.from_numpy(of_target).to(device), rows)
    return local_sums


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the global gradient norm, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# Training: set up a run, then the loop


@dataclass
class Run:
    """Everything the loop works with, built once by setup()."""

    config: TrainConfig
    world: World
    objective: object  # objectives.py: what a unit is and what its loss is
    cache: TokenCache
    planner: MultipackPlanner
    train_indices: np.ndarray | None  # the planner's sample i is cache sample train_indices[i] (validation split)
    total_steps: int | None
    model: torch.nn.Module  # model.PackedCausalLM, FSDP2-sharded under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: RunState  # the counters a checkpoint restores
    validator: Validator | None
    checkpointer: Checkpointer
    log: RunLog
    source_names: list[str] | None  # a mixture's files, as named in metrics.jsonl


def setup(config: TrainConfig, world: World) -> Run:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: ours
    try:
        hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)  # saved with every export
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model-name-or-path {config.model_name_or_path}: cannot load its config and tokenizer "
                          f"({' '.join(str(e).split())})") from None
    # What "auto" resolves to is printed and saved as chosen.
    config.attn_implementation = families.attention_implementation(
        families.causal_lm_class(hf_config), world.device, config.attn_implementation, hf_config)
    checkpointing_why = plan_memory(config, world, hf_config)  # resolves auto checkpointing and token budget
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print0(json.dumps(asdict(config), indent=2))
    print0(f"attention: {config.attn_implementation}; activation checkpointing: "
           f"{'on' if config.activation_checkpointing else 'off'} ({checkpointing_why})")
    if world.device.type == "cuda" and config.attn_implementation == "sdpa":
        print0("warning: sdpa on CUDA isolates packed samples with a dense (T x T) mask per layer: slower and "
               "larger than the default variable-length kernel (--attn-implementation auto)")
    if world.is_main:
        atomic.write_json(out / "training_config.json", asdict(config))
    torch.manual_seed(config.seed)

    # Data: with --validation-split the planner sees only the training samples, numbered 0..n-1.
    if hf_config.is_encoder_decoder and config.use_liger_kernels:
        raise ConfigError(f"--use-liger-kernels: Liger has no kernels for encoder-decoder models "
                          f"({hf_config.model_type}); drop the flag")
    if hf_config.is_encoder_decoder and config.compile:
        raise ConfigError("--compile: an encoder-decoder's blocks take several code paths (encoder and decoder, the "
                          "first block's position bias, training and evaluation) beyond torch.compile's recompile "
                          "limit, so it would run eager without saying so; drop --compile")
    objective = build_objective(config, hf_config)  # an encoder-decoder trains on padded source-target batches
    positions = getattr(objective, "max_positions", None)
    generates = config.eval_metric is not None or config.num_eval_generations > 0
    if positions is not None and generates and config.eval_max_new_tokens >= positions:
        raise ConfigError(f"--eval-max-new-tokens {config.eval_max_new_tokens}: the decoder has {positions} positions "
                          f"(max_position_embeddings), the decoder start token included; pass at most {positions - 1}")
    sources = parse_sources(config.data_path)
    template = chat_template_of(sources)
    if template is not None:  # the template the data was rendered with goes into every export's tokenizer
        tokenizer.chat_template = template
    caches = [load_data(config, world, hf_config.vocab_size, path=s.path) for s in sources]
    for source, source_cache in zip(sources, caches):
        objective.check(source_cache, source.path)
    if len(caches) > 1 and caches[0].pairs:
        raise ConfigError("--data-path: mixtures of preference pairs are not supported yet; train on one file")
    cache = concat_caches(caches)
    train_indices, held_out, validation_cache = None, None, None
    if config.validation_split is not None:
        train_indices, held_out = split_validation(len(cache), config.validation_split)
        validation_cache = cache
    elif config.validation_data_path is not None:
        validation_cache = load_data(config, world, hf_config.vocab_size, path=config.validation_data_path)
        objective.check(validation_cache, config.validation_data_path)
    costs, trained = objective.costs(cache), cache.trained
    if train_indices is not None:
        costs, trained = costs[train_indices], trained[train_indices]
    mixture = None
    if len(sources) > 1 or sources[0] != Source(sources[0].path):  # a mixture: the planner's samples per file
        of_sample = cache.sources if train_indices is None else cache.sources[train_indices]
        mixture = Mixture(sources, [np.flatnonzero(of_sample == k) for k in range(len(sources))], config.seed)
        print0(f"mixture: {mixture.describe()}")
    planner = MultipackPlanner(costs, config.batch_size, config.max_tokens_per_gpu, world.world_size,
                               seed=config.seed, mixture=mixture)
    total_steps = count_total_steps(config, planner)
    units = "pairs" if cache.pairs else "samples"
    print0(f"{len(costs)} {units}, {int(costs.sum())} tokens, {planner.steps_per_epoch} steps per epoch, "
           f"{total_steps if total_steps is not None else 'unlimited'} steps")
    validator = build_validator(config, objective, world, validation_cache, held_out,
                                eos_token_ids(hf_config, tokenizer), tokenizer)

    # Where this run continues from; rank 0 makes the output folder consistent with it once every rank has chosen.
    state = RunState(data=checkpoint.data_fingerprint(costs, trained, cache.content_hash))
    if mixture is not None:
        state.data += f", {mixture.fingerprint()}"
    resume = checkpoint.find_resume_point(config.output_dir, config.resume_from, config.fresh)
    resumed_samples = 0 if resume is None else checkpoint.check_resumable(resume, asdict(config), state.data)
    raise_if_any_rank_failed(None, ConfigError)  # barrier
    if world.is_main:
        checkpoint.tidy_output_dir(config.output_dir, config.fresh, resume, resumed_samples)

    model = build_model(config, world, lora.build_adapter(config))
    trainable = sum(p.numel() for p in model.adapter.trainable_parameters(model))
    total = sum(lora.logical_numel(p) for p in model.parameters())
    base = f"; {model.adapter.base_weights}" if model.adapter.base_weights else ""
    print0(f"{model.adapter.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%){base}")
    # DPO: the reference log-probs, by the initial model (before a checkpoint's weights load; with LoRA, the base
    # model: the adapters are off), or read from disk
    for reference_cache in {id(c): c for c in (cache, validation_cache) if c is not None}.values():
        attach_reference(objective, model, reference_cache, config, world)
    optimizer, scheduler = build_optimizer(config, model.adapter.trainable_parameters(model), total_steps)
    if resume is not None:
        saved = checkpoint.load(resume, model, optimizer, scheduler)
        state.step, state.samples_seen = saved["step"], saved["samples_seen"]
        state.last_export_samples = saved["last_export_samples"]
        state.source_samples = saved.get("source_samples")
        if validator is not None and "validation" in saved:
            validator.load_state_dict(saved["validation"])
        note = "" if saved["world_size"] == world.world_size else (
            f"; saved with world size {saved['world_size']}, RNG states not restored")
        print0(f"resumed from {resume}: step {state.step}, {state.samples_seen} samples seen{note}")
    checkpointer = Checkpointer(config, world, model, optimizer, scheduler, tokenizer, validator, state)
    log = RunLog(config, world, tokenizer, total_steps, state.step)
    names = None if mixture is None else [Path(s.path).name for s in sources]
    if names is not None and state.source_samples is None:
        state.source_samples = [0] * len(names)
    return Run(config, world, objective, cache, planner, train_indices, total_steps, model, optimizer, scheduler,
               state, validator, checkpointer, log, names)


def loop(run: Run, stop: StopSignals) -> None:
    config, world, state, cache, validator = run.config, run.world, run.state, run.cache, run.validator
    started = time.perf_counter()
    for plan in run.planner.iter_steps(state.step):
        if run.total_steps is not None and plan.step >= run.total_steps:
            break
        if validator is not None and validator.should_stop:  # here, not after the evaluation: a resumed run too
            print0(validator.stop_message(plan.step))
            break
        if run.train_indices is not None:
            plan = replace(plan, micro_batches=[[run.train_indices[i] for i in m] for m in plan.micro_batches])
        t0 = time.perf_counter()
        all_indices = np.concatenate([idx for micro in plan.micro_batches for idx in micro])
        step_units = run.objective.step_units(cache, all_indices)
        lr = run.scheduler.get_last_lr()[0]

        source_ce = None if run.source_names is None else torch.zeros(len(run.source_names), device=world.device)
        sums = forward_backward(run.model, run.objective, cache, plan.rank_packs(world.rank), step_units,
                                world.world_size, world.device, source_ce)
        router_aux = run.model.pop_router_aux_sum()  # MoE asking for it: sum of trained tokens x aux loss; else None
        if dist.is_initialized():
            dist.all_reduce(sums)
            if source_ce is not None:
                dist.all_reduce(source_ce)
            if router_aux is not None:
                dist.all_reduce(router_aux)
        # the loss includes router_aux_loss_coef x router_aux_loss where there is one
        loss, *metrics = (value / step_units for value in sums.tolist())
        grad_norm = clip_gradients(run.model, config.max_grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"step {plan.step + 1}: loss {loss}, gradient norm {grad_norm}; stopped before the optimizer step "
                f"(lower --learning-rate, raise --num-warmup-steps or check the data)"
            )
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        samples_before = state.samples_seen
        state.step, state.samples_seen = plan.step + 1, samples_before + plan.num_samples
        seconds = time.perf_counter() - t0
        step_tokens = int(cache.lengths[all_indices].sum())
        record = {
            "step": state.step,  # 1-based, as in the progress line and errors
            "epoch": plan.epoch,
            "samples_seen": state.samples_seen,
            "sample_lines": sample_lines(cache, all_indices),  # data-file lines trained in this step
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "trained_tokens": int(cache.trained[all_indices].sum()),
            **({"pairs": step_units} if cache.pairs else {}),
            **dict(zip(run.objective.metrics, metrics)),  # the objective's, e.g. DPO's rewards/chosen
            "micro_steps": plan.num_micro_steps,
            "packing_utilisation": step_tokens / (plan.num_micro_steps * world.world_size * config.max_tokens_per_gpu),
            **padding_record(cache, plan.micro_batches, step_tokens),
            "tokens_per_s": step_tokens / seconds,
            "peak_memory_gb": peak_memory_gb(world.device),
            "step_time_s": seconds,
            "elapsed_s": time.perf_counter() - started,
        }
        if router_aux is not None:
            record["router_aux_loss"] = router_aux.item() / step_units
        if run.source_names is not None:
            record.update(source_metrics(run, all_indices, source_ce.tolist()))
        last_step = state.step == run.total_steps  # its export is written after the loop
        evaluation = None
        if validator is not None:  # the validator decides whether this step is its own
            export_follows = run.checkpointer.export_due(state) or last_step
            evaluation = validator.after_step(run.model, world.device, samples_before, state.samples_seen,
                                              export_follows)
            if evaluation is not None:
                record.update(validation_loss=evaluation.loss, validation_tokens=evaluation.tokens)
                record.update({f"validation_{name}": value for name, value in evaluation.metrics.items()})
        run.log.step(record, evaluation, validator)
        signum = stop.agreed(world.device)  # collective: all ranks stop after the same step
        if run.checkpointer.after_step(state, signum, last_step):  # so does the checkpointer
            run.log.progress.close()
            print0(f"stopped by {signal.Signals(signum).name} after step {state.step}; "
                   f"run the same command again to resume")
            return
    run.log.progress.close()
    run.checkpointer.finish(state)
    if validator is not None:
        print0(f"validation: {validator.summary()}")


def chat_template_of(sources) -> str | None:
    """The chat template process_data.py saved beside the data (<file>.chat_template.jinja), so that the fine-tuned
    model renders conversations as it was trained on them; the files of a mixture must agree."""
    templates = {}
    for source in sources:
        sidecar = Path(source.path + ".chat_template.jinja")
        if sidecar.is_file():
            templates[source.path] = sidecar.read_text()
    if len(set(templates.values())) > 1:
        raise ConfigError(f"--data-path: {', '.join(templates)} were rendered with different chat templates; an "
                          f"export can carry one: re-run process_data.py with the same --chat-template")
    return next(iter(templates.values()), None)


def sample_lines(cache: TokenCache, indices: np.ndarray) -> list:
    """The data-file lines of these samples, sorted; for a mixture, [file number, line] pairs."""
    lines = cache.lines[indices].tolist()
    if cache.sources is None:
        return sorted(lines)
    return sorted([int(s), line] for s, line in zip(cache.sources[indices], lines))


def padding_record(cache: TokenCache, micro_batches: list[list[np.ndarray]], step_tokens: int) -> dict:
    """Encoder-decoder steps train on padded micro-batches: their padded tokens, and the fraction that is padding."""
    if not cache.seq2seq:
        return {}
    padded = sum(cache.padded_tokens(indices) for micro in micro_batches for indices in micro)
    return {"padded_tokens": padded, "padding": 1 - step_tokens / padded}


def source_metrics(run: Run, indices: np.ndarray, ce_sums: list[float]) -> dict:
    """A mixture's per-file figures for this step: samples seen so far, and the token-mean loss of the step."""
    of_sample = run.cache.sources[indices]
    record = {}
    for k, name in enumerate(run.source_names):
        mine = of_sample == k
        run.state.source_samples[k] += int(mine.sum())
        record[f"samples_seen/{name}"] = run.state.source_samples[k]
        tokens = int(run.cache.trained[indices[mine]].sum())
        if tokens:
            record[f"loss/{name}"] = ce_sums[k] / tokens
    return record


def main(argv: list[str] | None = None) -> int:
    rank, _, world_size, local_world_size = world_from_env()
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    try:
        config = parse_args(argv)
    except ConfigFileError as e:
        print(f"{prefix}train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    if config.estimate_memory:
        try:
            return estimate_memory_main(config)
        except (ConfigError, ModelError) as e:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
            return 2
    stop = StopSignals()
    try:
        validate(config, world_size, local_world_size, torch.cuda.is_available())
        stop.install()
        world = init_distributed(config.distributed_backend, config.distributed_timeout_minutes)
        run = setup(config, world)
        try:
            loop(run, stop)
        except BaseException:
            run.log.close(failed=True)
            raise
        run.log.close()
    except (ConfigError, DataError, SamplerError, TrainingError, CheckpointError, ValidationError, ModelError) as e:
        print(f"{prefix}train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        stop.restore()
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
