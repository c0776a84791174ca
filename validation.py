"""Seeing a run: exact validation loss, greedy sample generations, early stopping and optional trackers.

Validation loss is the token-mean cross-entropy over the WHOLE validation set, all ranks together:

    validation loss = (sum over every validation sample and trained token of CE) / (trained tokens of the set)

The set is packed once, the way training packs one step (sampler.pack_step: the same token budget per rank, the
same number of micro-steps on every rank, empty packs where a rank has nothing left), and run without gradient.
Each rank sums its CE and its trained tokens; one all_reduce of both gives the figure on every rank.

Evaluation must not change the training trajectory: it runs in eval mode (no dropout), inside a forked RNG state
(nothing it draws shifts the training's random streams), and puts the model back in train mode and its FSDP
parameters back into shards.
"""

import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import IGNORE, TokenCache, make_pack
from sampler import pack_step

# The validation split must not move when --seed changes, so runs with different seeds are compared on the same
# held-out samples: it has its own fixed seed.
SPLIT_SEED = 0x5EED_0F_5A1D
TRACKERS = ("wandb", "tensorboard")
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # what `pip install` needs for each


class EvalError(ValueError):
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
        raise EvalError(
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


def compute_autocast(model: torch.nn.Module, device: torch.device):
    """The compute dtype training uses: FSDP's own bf16 policy on CUDA, autocast for one unsharded CUDA process."""
    from torch.distributed.fsdp import FSDPModule

    unsharded_cuda = device.type == "cuda" and not isinstance(model, FSDPModule)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=unsharded_cuda)


@torch.no_grad()
def validation_loss(model, cache: TokenCache, packs: list[np.ndarray], device: torch.device) -> tuple[float, int]:
    """(token-mean CE over the whole set, its trained tokens). Collective: every rank passes its own packs, and all
    ranks have the same number of them (see plan_validation)."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (CE sum, trained tokens) of this rank
    for indices in packs:
        pack = make_pack(cache, indices).to(device)
        with compute_autocast(model, device):
            ce_sum = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets)
        totals[0] += ce_sum.double()
        totals[1] += pack.targets.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    ce_sum, tokens = totals.tolist()
    return ce_sum / tokens, int(tokens)


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
class Evaluation:
    loss: float
    tokens: int
    replies: list[list[int]]  # one per generation prompt


@dataclass
class Evaluator:
    """One rank's view of the validation set, planned once; `run` evaluates the model on it (collective)."""

    cache: TokenCache
    packs: list[np.ndarray]  # this rank's pack for each micro-step of the validation "step"
    prompts: list[Prompt]
    max_new_tokens: int
    eos_token_ids: list[int]

    def run(self, model: torch.nn.Module, device: torch.device) -> Evaluation:
        was_training = model.training
        model.eval()  # no dropout
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                loss, tokens = validation_loss(model, self.cache, self.packs, device)
                replies = []
                if self.prompts:
                    replies = generate_replies(model, self.prompts, self.max_new_tokens, self.eos_token_ids, device)
        finally:
            model.train(was_training)
        return Evaluation(loss, tokens, replies)


def build_evaluator(
    cache: TokenCache,
    indices: np.ndarray,
    max_tokens: int,
    world_size: int,
    rank: int,
    num_generations: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
) -> Evaluator:
    micro_steps = plan_validation(cache.lengths, indices, world_size, max_tokens)
    return Evaluator(
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
# train.py's bookkeeping: when to evaluate, when to stop, which exported checkpoint is best


@dataclass
class Validation:
    evaluator: Evaluator
    every_samples: int | None  # evaluate each time samples seen crosses a multiple of this; also at every export
    stopper: EarlyStopping | None
    last_samples: int | None = None  # samples seen at the latest evaluation
    last_loss: float = math.nan
    best_checkpoint: str | None = None  # the exported checkpoint with the lowest validation loss
    best_checkpoint_loss: float = math.inf

    def due(self, samples_before: int, samples_seen: int, export_follows: bool) -> bool:
        every = self.every_samples
        return export_follows or (every is not None and samples_seen // every > samples_before // every)

    def run(self, model: torch.nn.Module, device: torch.device, samples_seen: int) -> Evaluation:
        result = self.evaluator.run(model, device)
        self.last_samples, self.last_loss = samples_seen, result.loss
        if self.stopper is not None:
            self.stopper.update(result.loss, samples_seen)
        return result

    def checkpoint_saved(self, path: Path, samples_seen: int) -> None:
        if self.last_samples == samples_seen and self.last_loss < self.best_checkpoint_loss:
            self.best_checkpoint, self.best_checkpoint_loss = str(path), self.last_loss

    @property
    def should_stop(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    def summary(self) -> str:
        text = f"latest validation loss {self.last_loss:.4f} at {self.last_samples} samples"
        if self.stopper is not None:
            text += f"; best {self.stopper.best_loss:.4f} at {self.stopper.best_samples} samples"
        if self.best_checkpoint is not None:
            text += f"; best checkpoint {self.best_checkpoint} (validation loss {self.best_checkpoint_loss:.4f})"
            if not Path(self.best_checkpoint).exists():
                text += ", since deleted by --keep-last-n-exports"
        return text

    def state_dict(self) -> dict:
        """What a full-state checkpoint keeps, so a resumed run stops early and names the best as it would have."""
        keys = ("last_samples", "last_loss", "best_checkpoint", "best_checkpoint_loss")
        state = {k: getattr(self, k) for k in keys}
        if self.stopper is not None:
            state["stopper"] = asdict(self.stopper)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("last_samples", "last_loss", "best_checkpoint", "best_checkpoint_loss"):
            setattr(self, key, state[key])
        if self.stopper is not None and "stopper" in state:
            saved = state["stopper"]
            self.stopper.best_loss, self.stopper.best_samples = saved["best_loss"], saved["best_samples"]
            self.stopper.evaluations_without_improvement = saved["evaluations_without_improvement"]


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


# ----------------------------------------------------------------------------------------------------------------
# Trackers: Weights & Biases or TensorBoard through their public APIs, only when asked for


def tracker_problem(name: str | None) -> str | None:
    """Why --tracker `name` cannot work here (not installed), or None; checked before anything expensive."""
    if name is None:
        return None
    if name not in TRACKERS:
        return f"--tracker {name!r} is unknown; use one of {', '.join(TRACKERS)}"
    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        return f"--tracker {name} needs the {package} package, which is not installed; pip install {package}"
    return None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (booleans and text are not plotted by trackers)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    def __init__(self, writer):
        self.writer = writer

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


def open_tracker(name: str, output_dir: Path, config: dict) -> WandbTracker | TensorBoardTracker:
    """Rank 0 only. W&B takes its project and entity from WANDB_PROJECT / WANDB_ENTITY as usual."""
    if name == "wandb":
        import wandb

        return WandbTracker(wandb.init(dir=str(output_dir), config=config))
    from torch.utils.tensorboard import SummaryWriter

    return TensorBoardTracker(SummaryWriter(log_dir=str(output_dir / "tensorboard")))

