"""Seeing a run: exact validation loss, greedy sample generations, early stopping, the best export.

Validation loss is the token-mean cross-entropy over the WHOLE validation set, all ranks together:

    validation loss = (sum over every validation sample and trained token of CE) / (trained tokens of the set)

The set is packed once, the way training packs one step (sampler.pack_step: the same token budget per rank, the
same number of micro-steps on every rank, empty packs where a rank has nothing left), and run without gradient.
Each rank sums its CE and its trained tokens; one all_reduce of both gives the figure on every rank.

Evaluation must not change the training trajectory: it runs in eval mode (no dropout), inside a forked RNG state
(nothing it draws shifts the training's random streams), and puts the model back in train mode and its FSDP
parameters back into shards.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain.data import IGNORE, TokenCache
from minitrain.distributed import World, compute_autocast, print0
from sampler import pack_step

# The validation split must not move when --seed changes, so runs with different seeds are compared on the same
# held-out samples: it has its own fixed seed.
SPLIT_SEED = 0x5EED_0F_5A1D


class ValidationError(ValueError):
    """A validation set that cannot work; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# The validation set


def split_validation(num_samples: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample indices, each sorted: round(fraction * num_samples) samples held out.

    Each sample gets a fixed pseudo-random key (the i-th draw of a generator seeded with SPLIT_SEED); the samples
    with the smallest keys are held out. The split depends only on the number of samples, and appending samples to
    the file moves at most a few samples at the margin.
    """
    count = round(fraction * num_samples)
    if not 0 < count < num_samples:
        raise ValidationError(
            f"--validation-split {fraction} of {num_samples} samples leaves {count} for validation and "
            f"{num_samples - count} for training; both need at least one sample, so choose a fraction between "
            f"{1 / num_samples:.3g} and {1 - 1 / num_samples:.3g}"
        )
    keys = np.random.default_rng(SPLIT_SEED).random(num_samples)
    held_out = np.zeros(num_samples, dtype=bool)
    held_out[np.argsort(keys, kind="stable")[:count]] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def plan_validation(lengths: np.ndarray, indices: np.ndarray, world_size: int, max_tokens: int) -> list[list]:
    """The validation samples `indices` packed as one training step: [micro_step][rank] -> sample indices."""
    positions = pack_step(lengths[indices], world_size, max_tokens)
    return [[indices[p] for p in micro] for micro in positions]


@dataclass(frozen=True)
class Prompt:
    index: int  # sample index in the validation cache
    prompt: np.ndarray  # the tokens before the first trained one: what the model is asked
    reference: np.ndarray  # the first run of trained tokens: what the data answers


def generation_prompts(cache: TokenCache, indices: np.ndarray, count: int) -> list[Prompt]:
    """The first `count` validation samples (in order) that have an untrained prompt before their first reply."""
    prompts = []
    for i in indices:
        if len(prompts) == count:
            break
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        trained = np.flatnonzero(cache.labels[start:end] != IGNORE)
        first = int(trained[0])
        if first == 0:  # raw text, trained from its first token: nothing to prompt with
            continue
        gaps = np.flatnonzero(np.diff(trained) > 1)  # the reply ends where the trained run is first broken
        last = int(trained[gaps[0]]) if len(gaps) else int(trained[-1])
        ids = cache.input_ids[start:end]
        prompts.append(Prompt(int(i), np.array(ids[:first]), np.array(ids[first : last + 1])))
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, objective, cache: TokenCache, packs: list[np.ndarray], device: torch.device
                    ) -> tuple[float, int, dict[str, float]]:
    """(the objective's mean loss over the whole set, its units (e.g. trained tokens), the mean of each of its
    metrics over the set). Collective: every rank passes its own packs, and all ranks have the same number of them
    (see plan_validation)."""
    totals = torch.zeros(2 + len(objective.metrics), dtype=torch.float64, device=device)  # (loss, units, metrics)
    for indices in packs:
        pack = objective.pack(cache, indices).to(device)
        with compute_autocast(model, device):
            loss_sum, metric_sums = objective.loss_sum(model, pack, cache, indices)
        totals[0] += loss_sum.double()
        totals[1] += objective.step_units(cache, indices)
        totals[2:] += metric_sums.double()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, units, *metric_sums = totals.tolist()
    return loss_sum / units, int(units), {name: m / units for name, m in zip(objective.metrics, metric_sums)}


@torch.no_grad()
def generate_replies(
    model, prompts: list[Prompt], max_new_tokens: int, eos_token_ids: list[int], device: torch.device
) -> list[list[int]]:
    """Greedy continuations of each prompt (at most `max_new_tokens`, stopping at an end token). Collective.

    Under FSDP2 every rank runs the same generate on its sharded model: the decoder layers all-gather their weights
    in their own forward hooks; the root's (embeddings, final norm, LM head) are all-gathered here, because generate
    calls the Hugging Face model inside the root, not the root itself. `synced_gpus` keeps every rank stepping until
    all are done, so no rank waits in a collective that another never reaches. Call it after validation_loss: the
    root's first forward must be a forward of the root.
    """
    from torch.distributed.fsdp import FSDPModule
    from transformers import GenerationConfig

    sharded = isinstance(model, FSDPModule)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids or None,
        pad_token_id=eos_token_ids[0] if eos_token_ids else 0,
    )
    if sharded:
        model.unshard()
    replies = []
    try:
        for p in prompts:
            ids = torch.from_numpy(p.prompt.astype(np.int64))[None].to(device)  # (1, T)
            with compute_autocast(model, device):
                out = model.lm.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                    synced_gpus=sharded and dist.get_world_size() > 1,
                )
            reply = out[0, ids.shape[1] :].tolist()
            # A sequence that ended early is padded to the batch's length by generate: cut at the first end token.
            ends = [k for k, token in enumerate(reply) if token in eos_token_ids]
            replies.append(reply[: ends[0] + 1] if ends else reply)
    finally:
        if sharded:  # back to shards everywhere, so training resumes with the memory it had
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
    return replies


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    tokens: int
    replies: list[list[int]]  # one per generation prompt
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's metrics (DPO: rewards/chosen, ...)


@dataclass
class ValidationSet:
    """One rank's view of the validation set, planned once; `evaluate` runs the model on it (collective)."""

    objective: object
    cache: TokenCache
    packs: list[np.ndarray]  # this rank's pack for each micro-step of the validation "step"
    prompts: list[Prompt]
    max_new_tokens: int
    eos_token_ids: list[int]

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> ValidationResult:
        was_training = model.training
        model.eval()  # no dropout
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                loss, tokens, metrics = validation_loss(model, self.objective, self.cache, self.packs, device)
                replies = []
                if self.prompts:
                    replies = generate_replies(model, self.prompts, self.max_new_tokens, self.eos_token_ids, device)
        finally:
            model.train(was_training)
        return ValidationResult(loss, tokens, replies, metrics)


def plan_validation_set(
    objective,
    cache: TokenCache,
    indices: np.ndarray,
    max_tokens: int,
    world_size: int,
    rank: int,
    num_generations: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
) -> ValidationSet:
    micro_steps = plan_validation(objective.costs(cache), indices, world_size, max_tokens)
    return ValidationSet(
        objective=objective,
        cache=cache,
        packs=[packs[rank] for packs in micro_steps],
        prompts=generation_prompts(cache, indices, num_generations),
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
    )


# ----------------------------------------------------------------------------------------------------------------
# Early stopping


@dataclass
class EarlyStopping:
    """Stop once the validation loss has not improved on the best so far by more than `min_delta` for `patience`
    evaluations in a row."""

    patience: int
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_samples: int | None = None  # samples seen at the best evaluation
    evaluations_without_improvement: int = 0

    def update(self, loss: float, samples_seen: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_samples = loss, samples_seen
            self.evaluations_without_improvement = 0
            return True
        self.evaluations_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evaluations_without_improvement >= self.patience


# ----------------------------------------------------------------------------------------------------------------
# The validator: owns its cadence (every N samples and before every export), early stopping and the best export


@dataclass
class Validator:
    validation_set: ValidationSet
    every_samples: int | None  # evaluate each time samples seen crosses a multiple of this; also at every export
    stopper: EarlyStopping | None
    last_samples: int | None = None  # samples seen at the latest evaluation
    last_loss: float = math.nan
    best_export: str | None = None  # the exported model with the lowest validation loss
    best_export_loss: float = math.inf

    def due(self, samples_before: int, samples_seen: int, export_follows: bool) -> bool:
        every = self.every_samples
        return export_follows or (every is not None and samples_seen // every > samples_before // every)

    def after_step(self, model: torch.nn.Module, device: torch.device, samples_before: int, samples_seen: int,
                   export_follows: bool) -> ValidationResult | None:
        """Collective: evaluate if this step is due (None if not). Every export is preceded by an evaluation, so the
        best export is known."""
        if not self.due(samples_before, samples_seen, export_follows):
            return None
        return self.run(model, device, samples_seen)

    def run(self, model: torch.nn.Module, device: torch.device, samples_seen: int) -> ValidationResult:
        result = self.validation_set.evaluate(model, device)
        self.last_samples, self.last_loss = samples_seen, result.loss
        if self.stopper is not None:
            self.stopper.update(result.loss, samples_seen)
        return result

    def export_saved(self, path: Path, samples_seen: int) -> bool:
        """Record an export just written; True when it is the best so far (it was evaluated just before)."""
        if self.last_samples == samples_seen and self.last_loss < self.best_export_loss:
            self.best_export, self.best_export_loss = str(path), self.last_loss
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    def stop_message(self, step: int) -> str:
        stopper = self.stopper
        return (f"early stopping after step {step}: the validation loss has not improved on its best "
                f"({stopper.best_loss:.4f} at {stopper.best_samples} samples) by more than {stopper.min_delta} "
                f"for {stopper.patience} evaluations")

    def summary(self) -> str:
        text = f"latest validation loss {self.last_loss:.4f} at {self.last_samples} samples"
        if self.stopper is not None:
            text += f"; best {self.stopper.best_loss:.4f} at {self.stopper.best_samples} samples"
        if self.best_export is not None:
            text += f"; best checkpoint {self.best_export} (validation loss {self.best_export_loss:.4f})"
            if not Path(self.best_export).exists():
                text += ", since deleted by --keep-last-n-exports"
        return text

    def state_dict(self) -> dict:
        """What a full-state checkpoint keeps, so a resumed run stops early and names the best as it would have."""
        state = {key: getattr(self, name) for key, name in STATE_KEYS.items()}
        if self.stopper is not None:
            state["stopper"] = asdict(self.stopper)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, name in STATE_KEYS.items():
            setattr(self, name, state[key])
        if self.stopper is not None and "stopper" in state:
            saved = state["stopper"]
            self.stopper.best_loss, self.stopper.best_samples = saved["best_loss"], saved["best_samples"]
            self.stopper.evaluations_without_improvement = saved["evaluations_without_improvement"]


# trainer_state.json's keys (as earlier versions wrote them) -> attributes
STATE_KEYS = {"last_samples": "last_samples", "last_loss": "last_loss", "best_checkpoint": "best_export",
              "best_checkpoint_loss": "best_export_loss"}


def build_validator(config, objective, world: World, cache: TokenCache | None, held_out: np.ndarray | None,
                    eos_ids: list[int]) -> Validator | None:
    """The validation set (a second file's cache, or the samples held out of --data-path), planned once; None if
    neither was asked for."""
    if cache is None:
        return None
    indices = np.arange(len(cache)) if held_out is None else held_out
    validation_set = plan_validation_set(objective, cache, indices, config.max_tokens_per_gpu, world.world_size,
                                         world.rank, config.num_eval_generations, config.eval_max_new_tokens, eos_ids)
    stopper = None
    if config.early_stopping_patience is not None:
        stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)
    units = "pairs" if cache.pairs else "samples"
    print0(f"validation: {len(indices)} {units}, {objective.step_units(cache, indices)} {objective.unit}, "
           f"{len(validation_set.packs)} micro-steps and {len(validation_set.prompts)} generations per evaluation")
    return Validator(validation_set, config.eval_every_samples, stopper)


def eos_token_ids(hf_config, tokenizer) -> list[int]:
    """Where a generated reply ends: the model config's end tokens and the tokenizer's."""
    eos = hf_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generation_records(tokenizer, cache: TokenCache, prompts: list[Prompt], replies: list[list[int]], step: int,
                       samples_seen: int) -> list[dict]:
    """One JSON record per prompt for generations.jsonl: the prompt, what the data answers and what the model says."""
    return [
        {
            "step": step,
            "samples_seen": samples_seen,
            "data_line": int(cache.lines[p.index]),
            "prompt": tokenizer.decode(p.prompt.tolist()),
            "reference": tokenizer.decode(p.reference.tolist(), skip_special_tokens=True),
            "reply": tokenizer.decode(reply, skip_special_tokens=True),
        }
        for p, reply in zip(prompts, replies)
    ]
