"""train.py's configuration: one dataclass whose fields are the flags (--data-path for data_path; each help is
declared here and only here), read from the command line over a --config file over the defaults, and checked as a
whole before anything expensive runs (validate). docs/flags.md is generated from this module."""

import argparse
import importlib.util
import math
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from minitrain import flag_table
from minitrain.config_file import CommandLineError, Parser, config_path_from_argv, read_config_file
from minitrain.training import attention, checkpoint, lora
from minitrain.training.data import DataError
from minitrain.training.mixture import parse_sources
from minitrain.training.model import SHARDING_STRATEGIES
from minitrain.training.objectives import DPO_LOSS_TYPES, LOSS_REDUCTIONS, OBJECTIVES
from minitrain.training.run_log import TRACKERS, tracker_problem
from minitrain.training.sequence_parallel import head_counts, split_sizes
from minitrain.training.validation import EVAL_METRICS, LOSS, STOPPING_METRICS

DESCRIPTION = ("Stage 2: fine-tune a Hugging Face causal LM (or an encoder-decoder: T5, BART, ...) on process_data.py's "
               "output with FSDP2 on torchrun.")


LR_SCHEDULERS = ("constant", "linear", "cosine")


SAVE_DTYPES = ("bfloat16", "float16", "float32")


BACKENDS = ("auto", "nccl", "gloo")


LORA_EXPORTS = lora.EXPORTS


CONFIG_HELP = "a YAML or TOML file of flags (keys are flag names); command-line flags win"


class ConfigError(ValueError):
    """Bad flags or paths, found before any weights load."""


def flag(default=MISSING, help: str = "", **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    data_path: list[str] = flag(help="JSONL from process_data.py (input_ids, labels, len); several for a mixture, "
                                     "each as path, path:WEIGHT or path:Nx (epochs), see minitrain/training/mixture.py")
    model_name_or_path: str = flag(help="Hugging Face model folder (or hub id in the cache)")
    output_dir: str = flag(help="checkpoints, exports (hf_format/), metrics.jsonl, training_config.json and the token "
                                "cache (token_cache/)")
    batch_size: int = flag(help="samples (preference objectives: pairs) per optimizer step, all ranks together")
    max_tokens_per_gpu: int | str = flag(help="token budget of one rank's packed row, or auto: the longest row whose "
                                              "memory estimate fits 90%% of the device's memory (printed and saved)",
                                         type=lambda text: text if text == "auto" else int(text))
    # What is trained (minitrain/training/objectives.py, docs/objectives.md): sft on process_data.py's samples; dpo,
    # simpo or orpo on its preference pairs (--input-format preference), a pair packed whole into one micro-step;
    # kto on its labelled samples (--input-format unpaired).
    objective: str = flag("sft", "what is trained: sft on process_data.py's samples; dpo, simpo or orpo on its "
                                 "preference pairs; reward: a score head (sequence classifier) on the same pairs; "
                                 "kto on its labelled (unpaired) samples; distill: samples, learning a teacher's "
                                 "top-k next-token log-probs (--teacher-model)", choices=OBJECTIVES)
    dpo_beta: float = flag(0.1, "DPO: beta of -log sigmoid(beta * (chosen - rejected log-ratio to the reference))")
    dpo_loss_type: str = flag("sigmoid", "DPO: TRL's loss of the log-ratio margin: sigmoid (DPO), ipo (on "
                                         "length-normalised log-ratios, as TRL), hinge (SLiC) or robust (Robust DPO)",
                              choices=DPO_LOSS_TYPES)
    dpo_label_smoothing: float = flag(0.0, "DPO sigmoid (cDPO) and robust: the probability in [0, 0.5) that a "
                                           "pair's preference label is flipped")
    # SimPO: torchllms' defaults are --simpo_beta 1.0 --simpo_gamma 1.0 for -log sigmoid(beta * (m - gamma)); the
    # same loss here is --simpo-beta beta --simpo-gamma beta*gamma. Ours are the paper's and TRL's form.
    simpo_beta: float = flag(2.0, "SimPO: beta of -log sigmoid(beta * m - gamma), m = the chosen minus the rejected "
                                  "length-normalised log-prob (torchllms' default: 1.0)")
    simpo_gamma: float = flag(0.5, "SimPO: the target margin gamma, outside beta as in the SimPO paper and TRL "
                                   "(torchllms puts it inside: its gamma x its beta is this)")
    preference_sft_weight: float = flag(0.0, "dpo/simpo: plus this times the chosen side's token-mean cross-entropy")
    reward_center_coefficient: float = flag(0.0, "reward: plus this times (chosen score + rejected score)^2 per pair, "
                                                 "TRL's center_rewards_coefficient (0 = off)")
    orpo_lambda: float = flag(0.1, "ORPO: lambda (TRL's beta) of the chosen side's token-mean NLL - lambda * "
                                   "log sigmoid(log odds ratio of chosen over rejected)")
    # Offline distillation (docs/objectives.md#distillation): the teacher's top-k, computed once beside the cache.
    teacher_model: str | None = flag(None, "distill: the teacher's Hugging Face folder; it must have the student's "
                                           "tokenizer and vocabulary size")
    distill_top_k: int = flag(16, "distill: k, how many of the teacher's likeliest next tokens are stored per trained "
                                  "token (8 x k bytes) and matched by the student")
    distill_alpha: float = flag(0.5, "distill: each token's loss is alpha x T^2 x KL(teacher top-k || student) + "
                                     "(1 - alpha) x cross-entropy")
    distill_temperature: float = flag(1.0, "distill: the temperature T of both distributions in the KL (the table "
                                           "holds T = 1 log-probs, so any T reuses it)")
    kto_beta: float = flag(0.1, "KTO: beta of 1 - sigmoid(beta * (log-ratio to the reference - KL estimate)) (TRL's "
                                "KTOConfig.beta)")
    kto_desirable_weight: float = flag(1.0, "KTO: the weight of a desirable sample's loss (TRL's desirable_weight)")
    kto_undesirable_weight: float = flag(1.0, "KTO: the weight of an undesirable sample's loss (TRL's "
                                              "undesirable_weight)")
    learning_rate: float = flag(1e-5, "peak learning rate")
    num_warmup_steps: int = flag(0, "linear warmup up to the learning rate over this many steps")
    lr_scheduler: str = flag("constant", "after warmup: constant, linear to 0 or cosine to 0 over the training steps",
                             choices=LR_SCHEDULERS)
    # Stop conditions: the first one reached ends training; none = until stopped.
    max_epochs: int | None = flag(None, "stop after this many epochs (the first stop flag reached ends training; "
                                        "with none, train until stopped: constant LR only)")
    max_steps: int | None = flag(None, "stop after this many optimizer steps")
    max_samples: int | None = flag(None, "stop after this many trained samples (the step in which it is reached is "
                                         "finished)")
    min_samples_per_checkpoint: int | None = flag(None, "export a Hugging Face folder every N samples (and at the end)")
    checkpoint_every_steps: int | None = flag(
        None, "full-state checkpoint (exact resume) every N steps; also written by --checkpoint-every-minutes, at the "
              "end and on SIGTERM/SIGINT/SIGUSR1 (an export does not write one)")
    checkpoint_every_minutes: float = flag(
        30.0, "full-state checkpoint when this many minutes passed since the last one (rank 0's clock), so a killed "
              "run loses at most this much work; 0 = only --checkpoint-every-steps, signals and the end")
    async_save: bool | None = flag(
        None, "write full-state checkpoints in the background (dcp.async_save) while training goes on; a kill during "
              "one leaves the previous checkpoint whole; default: on with CUDA, off on CPU")
    keep_last_n_checkpoints: int | None = flag(2, "keep only the newest N full-state checkpoints (default 2; exports "
                                                  "are never deleted by this)")
    keep_last_n_exports: int | None = flag(None, "delete older hf_format exports (default: keep all)")
    cache_dir: str | None = flag(None, "where the token cache, DPO reference and distillation teacher tables go "
                                       "(default: <output-dir>/"
                                       "token_cache); a node-local disk is fine: each node then builds its own copy "
                                       "once")
    resume_from: str | None = flag(None, "a checkpoints/step_<N> folder (default: the newest in --output-dir)")
    fresh: bool = flag(False, "start over: delete --output-dir's full-state checkpoints (its exports are moved aside, "
                              "not deleted)")
    allow_config_change: bool = flag(False, "resume even if the data, model, batch size, seed, schedule or stop flags "
                                            "differ from the checkpoint's")
    weight_decay: float = flag(0.0, "applied to matrices only, not to norms and biases")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.95, "AdamW beta2")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "0 disables clipping (the norm is still logged)")
    # No `choices` for the strategy: validate() reports an unknown one together with every other problem.
    fsdp_sharding_strategy: str = flag("FULL_SHARD", " | ".join(SHARDING_STRATEGIES))
    fsdp_shard_group_size: int | None = flag(None, "HYBRID_SHARD: shard over groups of this many ranks, replicate "
                                                   "across the groups (default: the ranks of one node)")
    activation_checkpointing: bool | None = flag(
        None, "recompute each decoder block in the backward; default: on only when the memory estimate of a step "
              "with it off (weights, gradients, optimizer state, activations) would not fit 90%% of the device's "
              "memory (printed at start)")
    activation_offload: bool = flag(False, "with activation checkpointing, keep each checkpointed block's saved "
                                           "inputs in pinned host memory instead of GPU memory (longer rows; a copy "
                                           "each way per block); nothing to move on CPU")
    sequence_parallel_size: int = flag(
        1, "S ranks share each packed row (Ulysses sequence parallelism), so a row holds up to S x "
           "--max-tokens-per-gpu tokens; S divides the number of ranks and the model's attention heads; 1 = off "
           "(docs/sequence_parallel.md)")
    compile: bool = flag(False, "torch.compile each decoder block (fused norms, activations, RoPE); same losses")
    use_liger_kernels: bool = flag(False, "Liger's fused linear cross-entropy and its family's RMSNorm/RoPE/SwiGLU or "
                                          "GeGLU kernels; GPU only (on CPU only under TRITON_INTERPRET=1, for tests)")
    attn_implementation: str = flag("auto", "attention kernel for packed rows: auto = flash-attn if installed, else "
                                            "minitrain_varlen (PyTorch's varlen kernel) on CUDA, sdpa on CPU; or "
                                            + " | ".join(attention.CHOICES[1:]))
    loss_reduction: str = flag("tokens", "tokens: mean over the step's trained tokens; sequences: mean over its "
                                         "samples of each sample's token mean", choices=LOSS_REDUCTIONS)
    save_dtype: str = flag("bfloat16", "dtype of the exported safetensors", choices=SAVE_DTYPES)
    seed: int = flag(42, "data order and initialisation")
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
    eval_max_new_tokens: int = flag(32, "the most new tokens of a generated reply: the greedy replies and "
                                        "--eval-metric's predictions")
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
    # LoRA (minitrain/training/lora.py, with peft): adapters train, the base weights stay frozen.
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
    # Planning memory (minitrain/training/memory.py): one step of this run on fake tensors, from config.json alone.
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
        for name in ("model_name_or_path", "output_dir", "validation_data_path", "resume_from", "cache_dir",
                     "teacher_model"):
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
    declared = typing.get_type_hints(TrainConfig)
    hints = {name: value_type(hint) for name, hint in declared.items()}
    path = config_path_from_argv(argv)
    metadata = {f.name: f.metadata for f in fields(TrainConfig)}
    nullable = frozenset(name for name, hint in declared.items() if type(None) in typing.get_args(hint))
    from_file = read_config_file(path, hints, {name: m["choices"] for name, m in metadata.items() if "choices" in m},
                                 {name: m["type"] for name, m in metadata.items() if "type" in m},
                                 nullable) if path else {}
    estimating = "--estimate-memory" in argv  # needs neither data nor an output folder
    p = Parser(prog="train.py", description=DESCRIPTION)
    p.add_argument("--config", help=CONFIG_HELP)
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
    # nan passes every check written as x < 0 and inf overflows later: no flag means anything by either
    odd = [f"--{name.replace('_', '-')} {value}" for name, value in args.items()
           if isinstance(value, float) and not math.isfinite(value)]
    if odd:
        raise CommandLineError(f"{', '.join(odd)}: must be a finite number")
    return TrainConfig(**args)


def markdown() -> str:
    """The flags as a Markdown table (docs/flags.md), written from TrainConfig's fields: each flag's names, what it
    takes, its default and its help, in the dataclass's order."""
    hints = {name: value_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}
    rows = [(flag_table.code("--config"), flag_table.value_text(Path), "none", CONFIG_HELP)]
    for f in fields(TrainConfig):
        kind, meta = hints[f.name], f.metadata
        names = ["--" + f.name.replace("_", "-"), *meta.get("aliases", [])]
        if kind is bool:  # BooleanOptionalAction: --x and --no-x
            names = [f"--[no-]{name[2:]}" for name in names]
        if f.default is MISSING:
            default = "required"
        elif kind is bool and f.default is None:
            default = "auto"  # decided at start-up (the help says how)
        else:
            default = flag_table.default_text(f.default)
        value = flag_table.value_text(kind, meta.get("choices"), many=kind is list, switch=kind is bool)
        rows.append((", ".join(flag_table.code(n) for n in names), value, default, meta.get("help", "")))
    return flag_table.table(rows)


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
    problems += model_problems + output_dir_problems(config.output_dir, config.model_name_or_path)
    sp = config.sequence_parallel_size
    groups = world_size // sp if sp >= 1 and world_size % sp == 0 else world_size
    problems += sequence_parallel_problems(config, world_size)
    if config.batch_size < groups:
        ranks = f"{groups} data-parallel groups" if sp > 1 else f"{world_size} ranks"
        problems.append(
            f"--batch-size {config.batch_size} is smaller than the {ranks}; every rank needs at least "
            f"one sample per step, so use --batch-size >= {groups}"
        )
    if not 0 <= config.seed < 2**63:  # torch.manual_seed's range (a traceback beyond it), numpy's from 0
        problems.append(f"--seed must be in [0, 2^63), got {config.seed}")
    if config.max_tokens_per_gpu != "auto" and config.max_tokens_per_gpu < 1:
        problems.append(f"--max-tokens-per-gpu must be positive (or auto), got {config.max_tokens_per_gpu}")
    if config.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(
            f"--fsdp-sharding-strategy {config.fsdp_sharding_strategy!r} is unknown; "
            f"use one of {', '.join(SHARDING_STRATEGIES)}"
        )
    problems += shard_group_problems(config, world_size, local_world_size)
    problems += objective_problems(config)
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
    if not config.checkpoint_every_minutes >= 0:
        problems.append(f"--checkpoint-every-minutes must be >= 0 (0 = off), got {config.checkpoint_every_minutes}")
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
    elif config.resume_from is not None and str(config.output_dir).strip():
        own = checkpoint.checkpoint_root(config.output_dir)
        elsewhere = Path(config.resume_from).resolve().parent != own.resolve()
        if elsewhere and (checkpoint.complete_checkpoints(own) or (Path(config.output_dir) / "metrics.jsonl").exists()):
            problems.append(  # its own checkpoints after that step would go, the earlier ones and its log stay: mixed
                f"--resume-from {config.resume_from} is another run's checkpoint and --output-dir {config.output_dir} "
                f"holds a run of its own; branch into a new --output-dir, or resume from one of its own checkpoints"
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
    if config.activation_offload and config.activation_checkpointing is False:
        problems.append("--activation-offload keeps the checkpointed blocks' inputs in host memory; drop "
                        "--no-activation-checkpointing")
    attn = attention.problem(config.attn_implementation, cuda)
    problems += [attn] if attn else []
    problems += validation_problems(config)
    problems += lora.flag_problems(config, cuda, model_ok=not model_problems)
    if problems:
        raise ConfigError("; ".join(problems))


def shard_group_problems(config, world_size: int, local_world_size: int, nodes_assumed: bool = False) -> list[str]:
    """--fsdp-shard-group-size: for HYBRID_SHARD only, and dividing the ranks; without it, HYBRID_SHARD's groups are
    the nodes, whose ranks must divide the world (`nodes_assumed`: the estimate's 8 GPUs per node, not a real count)."""
    group, strategy = config.fsdp_shard_group_size, config.fsdp_sharding_strategy
    if group is not None and strategy != "HYBRID_SHARD":
        return [f"--fsdp-shard-group-size {group} is for HYBRID_SHARD (this run's strategy is {strategy}); drop it "
                f"or pass --fsdp-sharding-strategy HYBRID_SHARD"]
    if group is not None and (group < 1 or world_size % group):
        return [f"--fsdp-shard-group-size {group} must divide the {world_size} ranks (HYBRID_SHARD shards within "
                f"groups of that many ranks)"]
    if strategy == "HYBRID_SHARD" and group is None and world_size % local_world_size:
        if nodes_assumed:
            return [f"HYBRID_SHARD on --world-size {world_size}: nodes of {local_world_size} GPUs are assumed, which "
                    f"do not divide it; pass --fsdp-shard-group-size (the GPUs per node)"]
        return [f"HYBRID_SHARD needs the same number of ranks on every node ({world_size} ranks, {local_world_size} "
                f"per node), or --fsdp-shard-group-size"]
    return []


def attention_heads(model_name_or_path: str) -> int | None:
    """The model's number of attention heads from its config.json, None where it cannot be read (checked apart)."""
    from transformers import AutoConfig

    try:
        return head_counts(AutoConfig.from_pretrained(model_name_or_path))[0]
    except Exception:  # noqa: BLE001 (a bad model path is model_path_problems' to name)
        return None


def sequence_parallel_problems(config, world_size: int) -> list[str]:
    """--sequence-parallel-size S: S divides the ranks; --compile is not supported with S > 1 (its compiled blocks
    have never run the all-to-all attention; untested, so refused), nor reward models (their forward runs whole
    rows)."""
    sp, problems = config.sequence_parallel_size, []
    if sp < 1 or world_size % sp:
        heads = attention_heads(config.model_name_or_path)
        working = split_sizes(world_size, heads)
        also = "" if heads is None else f" and the model's {heads} attention heads"
        problems.append(f"--sequence-parallel-size {sp} must divide the {world_size} ranks{also}; use one of "
                        f"{', '.join(map(str, working))}")
    if sp > 1 and config.compile:
        problems.append(f"--compile is not supported with --sequence-parallel-size {sp} (untested: the compiled "
                        f"blocks around the all-to-all attention); drop --compile or use --sequence-parallel-size 1")
    if sp > 1 and config.objective == "reward":
        problems.append(f"--objective reward is not supported with --sequence-parallel-size {sp} (the score model's "
                        f"rows are not split between ranks); use --sequence-parallel-size 1")
    return problems


# Each objective's own flags: given (set to other than their default) for another objective, they would be ignored
OBJECTIVE_FLAGS = {
    "dpo_beta": ("dpo",), "dpo_loss_type": ("dpo",), "dpo_label_smoothing": ("dpo",), "simpo_beta": ("simpo",),
    "simpo_gamma": ("simpo",), "preference_sft_weight": ("dpo", "simpo", "orpo"), "orpo_lambda": ("orpo",),
    "reward_center_coefficient": ("reward",), "kto_beta": ("kto",), "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",), "distill_top_k": ("distill",), "distill_alpha": ("distill",),
    "distill_temperature": ("distill",),
    "loss_reduction": ("sft", "distill"),  # the preference objectives' losses are per pair or sample (distill: refused)
}


def changed(config: TrainConfig, names) -> list[str]:
    """Those of `names` whose value is not TrainConfig's default: the flags given (a default given is no change)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [name for name in names if getattr(config, name) != defaults[name]]


def objective_problems(config: TrainConfig) -> list[str]:
    """The objective's own flags (DPO, SimPO, ORPO, reward models, distillation)."""
    ignored = [name for name in changed(config, OBJECTIVE_FLAGS) if config.objective not in OBJECTIVE_FLAGS[name]]
    problems = [f"--{', --'.join(n.replace('_', '-') for n in ignored)} would be ignored by --objective "
                f"{config.objective}: drop them or pass the objective they are for"] if ignored else []
    for name in ("dpo_beta", "simpo_beta", "kto_beta"):
        if not getattr(config, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.simpo_gamma < 0:
        problems.append(f"--simpo-gamma must be >= 0 (the target margin), got {config.simpo_gamma}")
    if config.preference_sft_weight < 0:
        problems.append(f"--preference-sft-weight must be >= 0, got {config.preference_sft_weight}")
    if config.objective == "orpo" and config.preference_sft_weight:
        problems.append("--preference-sft-weight is for dpo and simpo; orpo has its own NLL term "
                        "(weigh the odds ratio with --orpo-lambda)")
    if config.objective == "reward":
        if config.reward_center_coefficient < 0:
            problems.append(f"--reward-center-coefficient must be >= 0, got {config.reward_center_coefficient}")
        if config.eval_metric is not None:
            problems.append(f"--eval-metric {config.eval_metric} scores generated text; a reward model does not "
                            f"generate (its validation reports loss, accuracy and margin)")
        if changed(config, ["num_eval_generations"]) and config.num_eval_generations > 0:
            problems.append(f"--num-eval-generations {config.num_eval_generations}: a reward model does not generate "
                            f"(its validation reports loss, accuracy and margin); drop it")
    problems += kto_problems(config)
    if config.orpo_lambda < 0:
        problems.append(f"--orpo-lambda must be >= 0, got {config.orpo_lambda}")
    problems += distill_problems(config)
    if not 0 <= config.dpo_label_smoothing < 0.5:
        problems.append(f"--dpo-label-smoothing must be in [0, 0.5), got {config.dpo_label_smoothing}")
    elif config.dpo_label_smoothing and config.dpo_loss_type not in ("sigmoid", "robust"):
        problems.append(f"--dpo-label-smoothing applies to --dpo-loss-type sigmoid and robust, not "
                        f"{config.dpo_loss_type}")
    return problems


def distill_problems(config: TrainConfig) -> list[str]:
    """--objective distill's flags, and what it does not support yet (each refused, not silently changed)."""
    if config.objective != "distill":
        if config.teacher_model is None:
            return []
        return [(f"--teacher-model is for --objective distill (this run's is {config.objective}); drop it or pass "
                 f"--objective distill")]
    if config.teacher_model is None:
        return [("--objective distill needs --teacher-model PATH: the teacher's Hugging Face folder, with the "
                 "student's tokenizer")]
    problems = model_path_problems(config.teacher_model, "--teacher-model")
    if config.distill_top_k < 1:
        problems.append(f"--distill-top-k must be >= 1, got {config.distill_top_k}")
    if not 0 <= config.distill_alpha <= 1:
        problems.append(f"--distill-alpha must be in [0, 1], got {config.distill_alpha}")
    if not config.distill_temperature > 0:
        problems.append(f"--distill-temperature must be positive, got {config.distill_temperature}")
    unsupported = {"--lora": config.lora, "--sequence-parallel-size > 1": config.sequence_parallel_size > 1,
                   "--loss-reduction sequences": config.loss_reduction == "sequences"}
    for name, asked in unsupported.items():
        if asked:
            problems.append(f"--objective distill does not support {name} yet; drop it")
    return problems


def kto_problems(config: TrainConfig) -> list[str]:
    """KTO's weights, and what it does not support yet."""
    problems = [f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}"
                for name in ("kto_desirable_weight", "kto_undesirable_weight") if not getattr(config, name) >= 0]
    if config.objective != "kto":
        return problems
    if config.preference_sft_weight:
        problems.append("--preference-sft-weight is for dpo and simpo; kto has no SFT term")
    if config.sequence_parallel_size > 1:
        problems.append(f"--objective kto does not support --sequence-parallel-size {config.sequence_parallel_size} "
                        f"yet (its KL pass over the step is not split); use --sequence-parallel-size 1")
    return problems


def validation_problems(config: TrainConfig) -> list[str]:
    problems = []
    path, split = config.validation_data_path, config.validation_split
    if path is not None and split is not None:
        problems.append("--validation-data-path and --validation-split each give a validation set; pass one of them")
    if path is not None and not Path(path).is_file():
        problems.append(f"--validation-data-path {path}: no such file; pass a JSONL written by process_data.py")
    if split is not None and not 0 < split < 1:
        problems.append(f"--validation-split is the fraction of samples held out, in (0, 1); got {split}")
    evaluation = ("eval_every_samples", "early_stopping_patience", "eval_metric", "num_eval_generations",
                  "eval_max_new_tokens", "eval_num_beams", "early_stopping_metric", "early_stopping_min_delta")
    needs_set = [f"--{k.replace('_', '-')}" for k in changed(config, evaluation)]  # without a set: unused
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


def output_dir_problems(output_dir: str, model: str) -> list[str]:
    """--output-dir must be a folder that can be made (not a file, nor under one) and not the model's own folder,
    whose files the run's checkpoints, exports and training_config.json would write over."""
    if not str(output_dir).strip():  # an unset shell variable, say: Path("") is the current folder
        return ["--output-dir is empty; name a folder (a new one is made)"]
    out = Path(output_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking == out:
        return [f"--output-dir {output_dir}: is a file, not a folder; name a folder (a new one is made)"]
    if blocking is not None:
        return [f"--output-dir {output_dir}: {blocking} is a file, so no folder can be made under it; name a folder "
                f"elsewhere"]
    if out.is_dir() and Path(model).is_dir() and out.resolve() == Path(model).resolve():
        return [f"--output-dir {output_dir}: is the model's folder (--model-name-or-path), whose files the run would "
                f"write over; name another folder"]
    return []


def model_path_problems(name: str, flag: str = "--model-name-or-path") -> list[str]:
    path = Path(name)
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [f"{flag} {name}: folder has no config.json"]
    missing = [f"{flag} {name}: no such model folder; pass a saved Hugging Face model folder"]
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return missing  # a filesystem path, not an "org/name" hub id
    from transformers import AutoConfig

    try:  # a hub id in the local Hugging Face cache (or a reachable hub)
        AutoConfig.from_pretrained(name)
        return []
    except (OSError, ValueError):
        return missing
