"""Stage 2: fine-tune a Hugging Face causal LM (or an encoder-decoder: T5, BART, ...) on process_data.py's output
with FSDP2 on torchrun.

    torchrun --nproc-per-node 8 train.py --data-path data.jsonl --model-name-or-path MODEL --output-dir out \
        --batch-size 128 --max-tokens-per-gpu 16384 --max-epochs 3

Reads top to bottom: the config (one dataclass; its fields are the flags) -> main() -> train(): data (token cache
+ planner) -> model (minitrain/training/model.py: meta build, adapter, FSDP2, each rank reads its shards of the
weights, or of a resume's checkpoint when it holds every weight) -> the loop: plan the step -> the objective's
forward/backward over this rank's micro-steps -> clip -> optimizer step -> log -> the validator and the
checkpointer, which decide for themselves whether this step is theirs.

The loss of a step (minitrain/training/objectives.py says what a unit is; SFT: a trained token; DPO, SimPO: a pair):

    L = (1 / N) * sum over every rank, micro-step and unit of the objective's loss,   N = the step's units

N is known on every rank from the plan and the cache. Each rank backpropagates (world_size / N) * its local sum;
FSDP averages gradients over the world_size ranks, which turns the sum of these into exactly dL/dθ, however the step
is split into ranks and micro-steps (see forward_backward).
"""

import gc
import json
import math
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

# The imports below (torch, transformers) allocate about a million objects and free almost none: the collections they
# trigger find nothing and cost ~0.5 CPU-s of the ~3 every process (each rank, each estimate) spends importing. Then
# gc.freeze() leaves those objects out of every later collection, which would otherwise walk them all again (a rank
# of the quickstart: 1.2 -> 0.15 s of collections; torchtitan turns the collector off in its loop instead).
_collecting = gc.isenabled()
gc.disable()

import numpy as np
import torch
import torch.distributed as dist

from minitrain import atomic
from minitrain.config_file import (
    CommandLineError,
    ConfigFileError,
)
from minitrain.training import checkpoint, families, lora, reference, sequence_parallel
from minitrain.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    RunState,
    StopSignals,
)
from minitrain.training.config import ConfigError, TrainConfig, parse_args, validate
from minitrain.training.optim import build_optimizer, lr_multiplier  # noqa: F401 (lr_multiplier: train's API)
from minitrain.training import memory
from minitrain.training.data import DataError, TokenCache, cache_writer, load_data
from minitrain.training.distributed import (
    World,
    all_gather,
    check_shared_output_dir,
    cleanup_distributed,
    compute_autocast,
    init_distributed,
    print0,
    raise_if_any_rank_failed,
    world_from_env,
)
from minitrain.training.mixture import Mixture, Source, concat_caches, parse_sources
from minitrain.training.model import (
    ModelError,
    build_model,
)
from minitrain.training.objectives import build_objective, metric_means, metric_sums
from minitrain.training.reference import attach_reference
from minitrain.training.run_log import RunLog
from minitrain.training.teacher import attach_teachers, check_teacher
from minitrain.training.validation import (
    ValidationError,
    Validator,
    build_validator,
    eos_token_ids,
    split_validation,
)
from sampler import MultipackPlanner, SamplerError

gc.freeze()
if _collecting:
    gc.enable()


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); raised identically on every rank."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration: each field is a flag (--data-path for data_path); its help is declared here and only here.



# ----------------------------------------------------------------------------------------------------------------
# Schedule



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



# ----------------------------------------------------------------------------------------------------------------
# One optimizer step's forward/backward


def forward_backward(model, objective, cache: TokenCache, packs: list[np.ndarray], step_units: int,
                     world_size: int, device: torch.device, source_ce: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate the gradient of this step's loss over this rank's micro-steps; return the local sums,
    (1 + metric_sums(objective),): the loss sum, then the sum of each of the objective's metrics (or `sums`).
    Collective when the objective has a `begin_step` (KTO's KL estimate over the step, run first).

    The step's loss is  L = (1 / N) * sum over every rank, micro-step and unit of the objective's loss,
    with N = `step_units`, the units (SFT: trained tokens or samples; DPO/SimPO: pairs) of the WHOLE step (all
    micro-steps, all ranks), known on every rank from the plan and the cache. Each rank backpropagates
    (world_size / N) * its local sum: FSDP averages gradients over the world_size ranks (reduce-scatter / all-reduce
    divide by world_size), which turns the sum of these into exactly dL/dθ, however the step is split into ranks and
    micro-steps. With --sequence-parallel-size S the S ranks of a group run slices of the same packs: each local sum
    covers its slice, the all-to-alls' backward carries each slice's gradient to the ranks whose tokens fed it, and
    the same scaling stays exact (minitrain/training/sequence_parallel.py).

    `source_ce` (a mixture's metrics, not the loss): each file's CE sum over this rank's trained tokens is added.
    """
    scale = world_size / step_units
    begin_step = getattr(objective, "begin_step", None)  # KTO: the step's KL estimate, before any of its losses
    if begin_step is not None:
        begin_step(model, cache, packs, device)
    local_sums = torch.zeros(1 + metric_sums(objective), device=device)
    for indices in packs:
        pack = objective.pack(cache, indices).to(device)
        rows = None if source_ce is None else torch.zeros(len(pack.targets), device=device)
        with compute_autocast(model, device):
            loss_sum, sums = objective.loss_sum(model, pack, cache, indices, rows)
        (loss_sum * scale).backward()
        local_sums[0] += loss_sum.detach()
        local_sums[1:] += sums
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


class NothingToTrain(Exception):
    """The run to resume is at its stop condition already: said in a line, exit code 0, the output folder as it was."""


def setup(config: TrainConfig, world: World) -> Run:
    hf_config, tokenizer = start(config, world)
    split_problem = sequence_parallel.model_problem(hf_config, config.sequence_parallel_size, world.world_size)
    if split_problem is not None:  # before the data and the weights load
        raise ConfigError(split_problem)
    if hf_config.is_encoder_decoder and config.use_liger_kernels:
        raise ConfigError(f"--use-liger-kernels: Liger has no kernels for encoder-decoder models "
                          f"({hf_config.model_type}); drop the flag")
    if hf_config.is_encoder_decoder and config.compile:
        raise ConfigError("--compile: an encoder-decoder's blocks take several code paths (encoder and decoder, the "
                          "first block's position bias, training and evaluation) beyond torch.compile's recompile "
                          "limit, so it would run eager without saying so; drop --compile")
    objective = build_objective(config, hf_config)  # an encoder-decoder trains on padded source-target batches
    if getattr(objective, "needs_teacher", False):  # distillation: the teacher's token ids must be the student's
        check_teacher(config, hf_config, tokenizer)
    positions = getattr(objective, "max_positions", None)
    generates = config.eval_metric is not None or config.num_eval_generations > 0
    if positions is not None and generates and config.eval_max_new_tokens >= positions:
        raise ConfigError(f"--eval-max-new-tokens {config.eval_max_new_tokens}: the decoder has {positions} positions "
                          f"(max_position_embeddings), the decoder start token included; pass at most {positions - 1}")
    data = load_datasets(config, world, hf_config, tokenizer, objective)
    cache, costs, mixture, sources = data.cache, data.costs, data.mixture, data.sources
    layout = sequence_parallel.data_layout(config, world.rank, world.world_size)  # one planner rank per SP group
    planner = MultipackPlanner(costs, config.batch_size, layout.row_tokens, layout.size,
                               seed=config.seed, mixture=mixture)
    total_steps = count_total_steps(config, planner)
    if config.sequence_parallel_size > 1:
        print0(f"sequence parallelism: {config.sequence_parallel_size} ranks share each row of up to "
               f"{layout.row_tokens} tokens; {layout.size} data-parallel groups")
    units = "pairs" if cache.pairs else "samples"
    print0(f"{len(costs)} {units}, {int(costs.sum())} tokens, {planner.steps_per_epoch} steps per epoch, "
           f"{total_steps if total_steps is not None else 'unlimited'} steps")
    if config.batch_size > planner.epoch_size:
        print0(f"note: --batch-size {config.batch_size} is more than an epoch's {planner.epoch_size} {units}: each "
               f"step trains on the whole epoch")
    validator = build_validator(config, objective, world, data.validation_cache, data.held_out,
                                eos_token_ids(hf_config, tokenizer), tokenizer)

    # Where this run continues from; rank 0 makes the output folder consistent with it once every rank has chosen.
    state = RunState(data=checkpoint.data_fingerprint(costs, data.trained, cache.content_hash))
    if mixture is not None:
        state.data += f", {mixture.fingerprint()}"
    # Rank 0 chooses the checkpoint and checks it; every rank loads that one (a rank that looked for itself could
    # find another, e.g. one whose save completed while the others were looking).
    resume, resumed_samples, holds_weights, error = None, 0, False, None
    if world.is_main:
        resume = checkpoint.find_resume_point(config.output_dir, config.resume_from, config.fresh)
        try:
            resumed_samples = 0 if resume is None else checkpoint.check_resumable(resume, asdict(config), state.data)
            holds_weights = resume is not None and checkpoint.holds_every_weight(resume)
        except CheckpointError as e:
            error = e
    raise_if_any_rank_failed(error, CheckpointError)
    resume, resumed_samples, holds_weights = all_gather((resume, resumed_samples, holds_weights))[0]
    resumed_step = 0 if resume is None else checkpoint.checkpoint_step(Path(resume))
    if total_steps is not None and resumed_step >= total_steps:  # a finished run launched again, say: before the
        # folder is tidied (an older --resume-from would abandon the later checkpoints) and before any weights load
        raise NothingToTrain(f"nothing to train: the run is at step {resumed_step} and its stop condition "
                             f"(--max-steps, --max-epochs or --max-samples) is step {total_steps}; raise it to train "
                             f"on (nothing in {config.output_dir} was changed)")
    if world.is_main:
        atomic.write_json(Path(config.output_dir) / "training_config.json", asdict(config))  # the flags, resolved
        checkpoint.tidy_output_dir(config.output_dir, config.fresh, resume, resumed_samples)

    # Distillation: the teacher's top-k log-probs, computed by the teacher (loaded, run and freed before the student
    # loads) or read from disk
    caches = list({id(c): c for c in (cache, data.validation_cache) if c is not None}.values())
    attach_teachers(objective, caches, config, world)
    # A resume from a checkpoint that holds every weight reads none from the model folder (build_model decides),
    # unless DPO's or KTO's reference table is missing: it is computed with the initial weights.
    adapter = lora.build_adapter(config)
    weights = None
    if holds_weights and reference.tables_on_disk(objective, caches, config, world, adapter.base_weights):
        weights = partial(checkpoint.load_weights, resume)
    model = build_model(config, world, adapter, weights)
    trainable = sum(p.numel() for p in model.adapter.trainable_parameters(model))
    total = sum(lora.logical_numel(p) for p in model.parameters())
    base = f"; {model.adapter.base_weights}" if model.adapter.base_weights else ""
    print0(f"{model.adapter.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%){base}")
    # DPO: the reference log-probs, by the initial model (before a checkpoint's weights load; with LoRA, the base
    # model: the adapters are off), or read from disk
    for reference_cache in caches:
        attach_reference(objective, model, reference_cache, config, world)
    optimizer, scheduler = build_optimizer(config, model.adapter.trainable_parameters(model), total_steps)
    if resume is not None:
        restore(resume, model, optimizer, scheduler, validator, state, world)
    checkpointer = Checkpointer(config, world, model, optimizer, scheduler, tokenizer, validator, state)
    log = RunLog(config, world, tokenizer, total_steps, state.step)
    names = None if mixture is None or len(sources) == 1 else [Path(s.path).name for s in sources]  # per-file metrics
    if names is not None and (state.source_samples is None or len(state.source_samples) != len(names)):
        if state.source_samples is not None:  # resumed with other files (--allow-config-change): counts restart
            print0(f"per-file samples seen count from 0: the checkpoint's {len(state.source_samples)} data files are "
                   f"{len(names)} now")
        state.source_samples = [0] * len(names)
    return Run(config, world, objective, cache, planner, data.train_indices, total_steps, model, optimizer, scheduler,
               state, validator, checkpointer, log, names)


def start(config: TrainConfig, world: World):
    """The model's config and tokenizer; what "auto" flags resolve to, printed and saved as chosen."""
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
    offload_why = None
    if config.activation_checkpointing is None and config.activation_offload:
        config.activation_checkpointing, offload_why = True, "--activation-offload offloads its saved inputs"
    checkpointing_why = memory.plan_for_run(config, world, hf_config)  # resolves auto checkpointing and budget
    checkpointing_why = offload_why or checkpointing_why
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every rank must see rank 0's output folder: checkpoints, the resume point and the token cache live there.
    check_shared_output_dir(out, world, ConfigError)
    print0(json.dumps(asdict(config), indent=2))
    print0(f"attention: {config.attn_implementation}; activation checkpointing: "
           f"{'on' if config.activation_checkpointing else 'off'} ({checkpointing_why})")
    if world.device.type == "cuda" and config.attn_implementation == "sdpa":
        print0("warning: sdpa on CUDA isolates packed samples with a dense (T x T) mask per layer: slower and "
               "larger than the default variable-length kernel (--attn-implementation auto)")
    torch.manual_seed(config.seed)
    return hf_config, tokenizer


@dataclass
class Datasets:
    sources: list
    cache: TokenCache
    validation_cache: TokenCache | None
    train_indices: np.ndarray | None  # with --validation-split: the training samples (the planner numbers them 0..)
    held_out: np.ndarray | None
    costs: np.ndarray  # each training sample's (pair's) cost for the planner
    trained: np.ndarray  # each training sample's trained tokens
    mixture: Mixture | None


def load_datasets(config: TrainConfig, world: World, hf_config, tokenizer, objective) -> Datasets:
    """The token caches of the training and validation data, checked by the objective; with --validation-split the
    planner sees only the training samples, numbered 0..n-1."""
    sources = parse_sources(config.data_path)
    template = chat_template_of([s.path for s in sources], config.validation_data_path)
    if template is not None:  # the template the data was rendered with goes into every export's tokenizer
        tokenizer.chat_template = exported_templates(tokenizer.chat_template, template)
    writer = cache_writer(config, world)  # one builder per copy of the cache folder
    caches = [load_data(config, world, hf_config.vocab_size, path=s.path, writer=writer) for s in sources]
    for source, source_cache in zip(sources, caches):
        objective.check(source_cache, source.path)
    if len(caches) > 1 and (caches[0].pairs or caches[0].unpaired):
        what = "preference pairs" if caches[0].pairs else "labelled (KTO) samples"
        raise ConfigError(f"--data-path: mixtures of {what} are not supported yet; train on one file")
    if len(caches) > 1 and getattr(objective, "needs_teacher", False):
        raise ConfigError("--data-path: --objective distill does not support mixtures yet; train on one file")
    cache = concat_caches(caches)
    train_indices, held_out, validation_cache = None, None, None
    if config.validation_split is not None:
        train_indices, held_out = split_validation(len(cache), config.validation_split)
        validation_cache = cache
    elif config.validation_data_path is not None:
        validation_cache = load_data(config, world, hf_config.vocab_size, path=config.validation_data_path,
                                     writer=writer)
        objective.check(validation_cache, config.validation_data_path)
    costs, trained = objective.costs(cache), cache.trained
    if train_indices is not None:
        costs, trained = costs[train_indices], trained[train_indices]
    mixture = None
    if len(sources) > 1 or sources[0] != Source(sources[0].path):  # a mixture: the planner's samples per file
        # one file with a weight or epochs (data.jsonl:2x) has no `sources`: every sample is file 0's
        of_file = cache.sources if cache.sources is not None else np.zeros(len(cache.trained), dtype=np.int64)
        of_sample = of_file if train_indices is None else of_file[train_indices]
        mixture = Mixture(sources, [np.flatnonzero(of_sample == k) for k in range(len(sources))], config.seed)
        print0(f"mixture: {mixture.describe()}")
    return Datasets(sources, cache, validation_cache, train_indices, held_out, costs, trained, mixture)


def restore(resume: Path, model, optimizer, scheduler, validator, state: RunState, world: World) -> None:
    """The model, optimizer, scheduler, validator and counters of checkpoint `resume`."""
    loaded = getattr(model, "weights_from_checkpoint", False)  # build_model read the checkpoint's weights already
    saved = checkpoint.load(resume, model, optimizer, scheduler, weights=not loaded)
    state.step, state.samples_seen = saved["step"], saved["samples_seen"]
    state.last_export_samples = saved["last_export_samples"]
    state.source_samples = saved.get("source_samples")
    if validator is not None and "validation" in saved:
        validator.load_state_dict(saved["validation"])
    note = "" if saved["world_size"] == world.world_size else (
        f"; saved with world size {saved['world_size']}, RNG states not restored")
    print0(f"resumed from {resume}: step {state.step}, {state.samples_seen} samples seen{note}")


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
        # With --sequence-parallel-size S the S ranks of a group get the same packs (each runs its slice of each row)
        data_rank = sequence_parallel.data_layout(config, world.rank, world.world_size).rank
        sums = forward_backward(run.model, run.objective, cache, plan.rank_packs(data_rank), step_units,
                                world.world_size, world.device, source_ce)
        router_aux = run.model.pop_router_aux_sum()  # MoE asking for it: sum of trained tokens x aux loss; else None
        if dist.is_initialized():
            dist.all_reduce(sums)
            if source_ce is not None:
                dist.all_reduce(source_ce)
            if router_aux is not None:
                dist.all_reduce(router_aux)
        # the loss includes router_aux_loss_coef x router_aux_loss where there is one
        loss, *metrics = sums.tolist()
        loss, metrics = loss / step_units, metric_means(run.objective, metrics, step_units)
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
            **metrics,  # the objective's, e.g. DPO's rewards/chosen
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


def chat_template_of(paths: list[str], validation_path: str | None = None) -> str | None:
    """The chat template process_data.py saved beside the data (<file>.chat_template.jinja), so that the fine-tuned
    model renders conversations as it was trained on them; the files of a mixture must agree, and so must the
    validation file (its loss would measure another format, and pick the best checkpoint by it)."""
    templates = {}
    for path in [*paths, *([validation_path] if validation_path else [])]:
        sidecar = Path(path + ".chat_template.jinja")
        if sidecar.is_file():
            try:  # process_data.py writes it as UTF-8, whatever the locale
                templates[path] = sidecar.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{sidecar}: cannot read the chat template process_data.py saved with the rows "
                                  f"({type(e).__name__}: {e}); re-run process_data.py") from None
    if len(set(templates.values())) > 1:
        flags = "--data-path and --validation-data-path" if validation_path in templates else "--data-path"
        raise ConfigError(f"{flags}: {', '.join(templates)} were rendered with different chat templates; an "
                          f"export can carry one: re-run process_data.py with the same --chat-template")
    return next(iter(templates.values()), None)


def exported_templates(own, used: str):
    """The tokenizer's chat template(s) for the exports: the one the data was rendered with. A tokenizer with several
    named ones (Hermes' default and tool_use, which transformers picks when given tools) keeps them all: unchanged
    when `used` is one of them, else with `used` as its default."""
    if isinstance(own, dict):
        return own if used in own.values() else {**own, "default": used}
    return used


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
    except (ConfigFileError, CommandLineError) as e:
        print(f"{prefix}train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    if config.estimate_memory:
        try:
            return memory.estimate_main(config)
        except (ConfigError, ModelError) as e:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
            return 2
    stop = StopSignals()
    try:
        validate(config, world_size, local_world_size, torch.cuda.is_available())
        stop.install()
        world = init_distributed(config.distributed_backend, config.distributed_timeout_minutes)
        try:
            run = setup(config, world)
        except NothingToTrain as e:
            print0(str(e))
            return 0
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
