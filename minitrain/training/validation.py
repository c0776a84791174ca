"""Seeing a run: exact validation loss, greedy sample generations, early stopping, the best export.

Validation loss is the token-mean cross-entropy over the WHOLE validation set, all ranks together:

    validation loss = (sum over every validation sample and trained token of CE) / (trained tokens of the set)

The set is packed once, the way training packs one step (sampler.pack_step: the same token budget per rank, the
same number of micro-steps on every rank, empty packs where a rank has nothing left), and run without gradient.
Each rank sums its CE and its trained tokens; one all_reduce of both gives the figure on every rank.

With --eval-metric rouge each evaluation also generates a prediction for EVERY validation sample that has a prompt
(batched; under FSDP each rank generates its share and all ranks gather them) and scores them with ROUGE against the
data's replies, so early stopping and the best export can follow ROUGE instead of the loss.

Evaluation must not change the training trajectory: it runs in eval mode (no dropout), inside a forked RNG state
(nothing it draws shifts the training's random streams), and puts the model back in train mode and its FSDP
parameters back into shards.
"""

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain.training import attention, sequence_parallel
from minitrain.training.data import IGNORE, TokenCache
from minitrain.training.distributed import (
    World,
    compute_autocast,
    gathered_once,
    print0,
    reshard,
    root_unsharded,
)
from minitrain.training.objectives import metric_means, metric_sums
from sampler import pack_step

# The validation split must not move when --seed changes, so runs with different seeds are compared on the same
# held-out samples: it has its own fixed seed.
SPLIT_SEED = 0x5EED_0F_5A1D

EVAL_METRICS = ("rouge",)  # --eval-metric
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LOSS = "validation_loss"
STOPPING_METRICS = (LOSS, *ROUGE_TYPES)  # --early-stopping-metric: lower is better for the loss, higher for ROUGE


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
    if num_samples < 2:
        raise ValidationError(f"--validation-split {fraction}: the data has {num_samples} sample, and training and "
                              f"validation each need one; pass --validation-data-path or more data")
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


def generation_prompts(cache: TokenCache, indices: np.ndarray, count: int | None = None) -> list[Prompt]:
    """The first `count` (None: all) validation samples, in order, that have a prompt: for a seq2seq cache its source
    (the reference: its target); otherwise the tokens before its first trained one (the reference: the first run of
    trained tokens). Samples trained from their first token (raw text) have nothing to prompt with: skipped."""
    source_lengths = getattr(cache, "source_lengths", None)  # a seq2seq cache's
    prompts = []
    for i in indices:
        if len(prompts) == count:
            break
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        if source_lengths is not None:
            first, last = int(source_lengths[i]), end - start - 1
        else:
            trained = np.flatnonzero(cache.labels[start:end] != IGNORE)
            first = int(trained[0])
            gaps = np.flatnonzero(np.diff(trained) > 1)  # the reply ends where the trained run is first broken
            last = int(trained[gaps[0]]) if len(gaps) else int(trained[-1])
        if first == 0:
            continue
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
    begin_step = getattr(objective, "begin_step", None)  # KTO: the KL estimate, here over the whole set
    if begin_step is not None:
        begin_step(model, cache, packs, device)
    totals = torch.zeros(2 + metric_sums(objective), dtype=torch.float64, device=device)  # (loss, units, metrics)
    # Sequence parallelism: the S ranks of a group share each pack (each sums its slice's losses), so each counts
    # 1 / S of its units
    split = getattr(model, "sequence_parallel", None)
    sharing = 1 if split is None else split.size
    for indices in packs:
        pack = objective.pack(cache, indices).to(device)
        with compute_autocast(model, device):
            loss_sum, pack_sums = objective.loss_sum(model, pack, cache, indices)
        totals[0] += loss_sum.double()
        totals[1] += objective.step_units(cache, indices) / sharing
        totals[2:] += pack_sums.double()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, units, *sums = totals.tolist()
    return loss_sum / units, int(units), metric_means(objective, sums, units)


def pad_token_id(lm, eos_token_ids: list[int]) -> int:
    """What generate pads with: the generation config's pad token, else the first end token (else 0)."""
    pad = getattr(getattr(lm, "generation_config", None), "pad_token_id", None)
    return pad if pad is not None else eos_token_ids[0] if eos_token_ids else 0


def padded(prompts: list[np.ndarray], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (B, longest prompt): padded on the left (causal LMs continue at the right end) or
    on the right (an encoder's source)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, cols], mask[row, cols] = torch.from_numpy(p.astype(np.int64)), 1
    return ids, mask


@contextmanager
def generation_attention(lm):
    """minitrain_varlen attends within one packed row given its boundaries; generate (padded batches, a KV cache)
    runs on sdpa meanwhile, then the training kernel is put back."""
    trained_with = lm.config._attn_implementation
    if trained_with == sequence_parallel.ULYSSES:  # generation runs without sequence parallelism
        with sequence_parallel.plain_attention(lm):
            yield
        return
    if trained_with != attention.VARLEN:
        yield
        return
    lm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.set_attn_implementation(trained_with)


# Decoding settings a checkpoint's generation_config.json may hold, each at the value that does nothing
# (min_new_tokens=0 overrides a checkpoint's min_length; setting min_length too makes transformers warn at each call)
NEUTRAL_DECODING = dict(num_beam_groups=1, diversity_penalty=0.0, min_new_tokens=0,
                        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, repetition_penalty=1.0,
                        encoder_repetition_penalty=1.0, length_penalty=1.0, early_stopping=False)


@torch.no_grad()
def generate_replies(model, batches: list[list[np.ndarray]], max_new_tokens: int, eos_token_ids: list[int],
                     device: torch.device, num_beams: int = 1) -> list[list[int]]:
    """The reply to each prompt of each batch, in order: greedy (beam search with `num_beams` > 1), at most
    `max_new_tokens`, cut after its first end token (so the pads of a batch's early finishers are not counted).
    A causal LM's output is its prompt and the reply; an encoder-decoder's, the decoder's tokens from its start token.
    Collective: every rank passes the same number of batches.

    Under FSDP2 every rank runs generate on its sharded model: the root's weights (embeddings, final norm, LM head)
    are all-gathered here, because generate calls the Hugging Face model inside the root, not the root itself; the
    blocks' are gathered once for all tokens where the whole model fits, else in each block's forward, once per
    token (gathered_once). `synced_gpus` keeps every rank stepping until all are
    done, so no rank waits in a collective that another never reaches. Call it after validation_loss: the root's
    first forward must be a forward of the root.
    """
    from torch.distributed.fsdp import FSDPModule
    from transformers import GenerationConfig

    lm = model.lm
    encoder_decoder = bool(getattr(lm.config, "is_encoder_decoder", False))
    pad_id = pad_token_id(lm, eos_token_ids)
    sharded = isinstance(model, FSDPModule)
    # Every decoding choice is ours: transformers fills what a config leaves unset from the checkpoint's own
    # generation config (bart-large-cnn's 4 beams, no_repeat_ngram_size 3, min_length 56, ...), which would then
    # decide the metric. Its token ids (decoder start, mBART's forced language id) still come from there.
    config = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_ids or None, pad_token_id=pad_id, **NEUTRAL_DECODING)
    replies = []
    with gathered_once(model), root_unsharded(model), generation_attention(lm):
        for prompts in batches:
            ids, mask = (t.to(device) for t in padded(prompts, pad_id, left=not encoder_decoder))
            with compute_autocast(model, device):
                out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  synced_gpus=sharded and dist.get_world_size() > 1)
            for reply in out[:, 1 if encoder_decoder else ids.shape[1] :].tolist():
                ends = [k for k, token in enumerate(reply) if token in eos_token_ids]
                replies.append(reply[: ends[0] + 1] if ends else reply)
    return replies


# ----------------------------------------------------------------------------------------------------------------
# --eval-metric rouge: a prediction for every validation sample, scored with ROUGE


def generation_batches(lengths: list[int], max_tokens: int, max_new_tokens: int, num_beams: int = 1
                       ) -> list[list[int]]:
    """Positions into `lengths` (prompt lengths), longest first, in batches of as many prompts as keep
    batch x beams x (its longest prompt + max_new_tokens) within `max_tokens` (one prompt at least)."""
    batches = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if batches and (len(batches[-1]) + 1) * num_beams * (lengths[batches[-1][0]] + max_new_tokens) <= max_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Each ROUGE type's mean F-measure x 100 (rouge_score, offline; rougeLsum splits sentences on newlines, as
    rouge_score does: no NLTK sentence splitter, which needs a download), with RougeTokens' words."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), tokenizer=RougeTokens())
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {kind: 100 * float(np.mean([s[kind].fmeasure for s in scores])) for kind in ROUGE_TYPES}


class RougeTokens:
    """rouge_score's default words (lowercased runs of [a-z0-9], Porter-stemmed when longer than 3 letters) for any
    script: its default drops every other letter, so Cyrillic, Greek or Arabic text has no words (ROUGE 0 for an
    exact match) and "Größe" is "gr" + "e". Here a word is a run of Unicode letters and digits; Chinese and Japanese
    characters, written without spaces, are one word each. On ASCII text the words are rouge_score's, exactly."""

    CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")

    def __init__(self):
        from nltk.stem import porter  # rouge_score's own stemmer (no data download)

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = re.findall(r"[^\W_]+", self.CJK.sub(r" \1 ", text.lower()))
        return [self.stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


@dataclass
class Predictions:
    """--eval-metric rouge: every validation sample with a prompt, predicted and scored at each evaluation."""

    prompts: list[Prompt]
    lines: np.ndarray  # the cache's data-file lines
    tokenizer: object
    max_tokens: int  # --max-tokens-per-gpu: the batch budget
    num_beams: int = 1

    def generate(self, model, max_new_tokens: int, eos_token_ids: list[int], device: torch.device
                 ) -> list[list[int]]:
        """Every prompt's reply, on every rank. Collective: rank r generates prompts r, r + world size, ... in
        batches; a rank with fewer batches runs the first batch again (discarded), so every rank makes as many
        generate calls; the replies are all-gathered."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        shares = [list(range(r, len(self.prompts), world)) for r in range(world)]
        batches = [[[share[k] for k in batch] for batch in generation_batches(
            [len(self.prompts[i].prompt) for i in share], self.max_tokens, max_new_tokens, self.num_beams)]
            for share in shares]
        calls = batches[rank] + batches[0][:1] * (max(map(len, batches)) - len(batches[rank]))
        replies = generate_replies(model, [[self.prompts[i].prompt for i in batch] for batch in calls],
                                   max_new_tokens, eos_token_ids, device, self.num_beams)
        mine = list(zip([i for batch in batches[rank] for i in batch], replies))  # zip drops the dummies
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            mine = [pair for part in gathered for pair in part]
        by_prompt = dict(mine)
        return [by_prompt[i] for i in range(len(self.prompts))]

    def score(self, model, max_new_tokens: int, eos_token_ids: list[int], device: torch.device
              ) -> tuple[dict[str, float], list[dict]]:
        """(ROUGE and the mean generated length, one record per prompt for predictions/samples_<N>.jsonl). ROUGE is
        computed on exactly the records' strings. Collective."""
        replies = self.generate(model, max_new_tokens, eos_token_ids, device)
        records = [
            {"data_line": int(self.lines[p.index]),
             "prediction": self.tokenizer.decode(reply, skip_special_tokens=True),
             "reference": self.tokenizer.decode(p.reference.tolist(), skip_special_tokens=True)}
            for p, reply in zip(self.prompts, replies)
        ]
        scores = rouge_scores([r["prediction"] for r in records], [r["reference"] for r in records])
        scores["gen_len"] = float(np.mean([len(reply) for reply in replies]))
        return scores, records


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    tokens: int
    replies: list[list[int]]  # one per generation prompt
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (DPO: rewards/chosen, ...), ROUGE
    predictions: list[dict] = field(default_factory=list)  # --eval-metric rouge: one record per scored sample


@dataclass
class ValidationSet:
    """One rank's view of the validation set, planned once; `evaluate` runs the model on it (collective)."""

    objective: object
    cache: TokenCache
    packs: list[np.ndarray]  # this rank's pack for each micro-step of the validation "step"
    prompts: list[Prompt]
    max_new_tokens: int
    eos_token_ids: list[int]
    predictions: Predictions | None = None  # --eval-metric rouge

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> ValidationResult:
        was_training = model.training
        model.eval()  # no dropout
        devices = [device] if device.type == "cuda" else []
        try:
            # one all-gather of the whole model for the whole evaluation where it fits (root_unsharded)
            with torch.random.fork_rng(devices=devices), gathered_once(model):
                loss, tokens, metrics = validation_loss(model, self.objective, self.cache, self.packs, device)
                replies, predictions = [], []
                if self.prompts:
                    replies = generate_replies(model, [[p.prompt] for p in self.prompts], self.max_new_tokens,
                                               self.eos_token_ids, device)
                if self.predictions is not None:
                    scores, predictions = self.predictions.score(model, self.max_new_tokens, self.eos_token_ids,
                                                                 device)
                    metrics = {**metrics, **scores}
        finally:
            model.train(was_training)
            reshard(model)  # a no-grad forward leaves SHARD_GRAD_OP's and NO_SHARD's modules gathered
        return ValidationResult(loss, tokens, replies, metrics, predictions)


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
    predictions: Predictions | None = None,
) -> ValidationSet:
    micro_steps = plan_validation(objective.costs(cache), indices, world_size, max_tokens)
    return ValidationSet(
        objective=objective,
        cache=cache,
        packs=[packs[rank] for packs in micro_steps],
        prompts=generation_prompts(cache, indices, num_generations),
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        predictions=predictions,
    )


# ----------------------------------------------------------------------------------------------------------------
# Early stopping


def improves(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `value` of `metric` beats `best` (None: nothing yet) by more than `min_delta`, in the metric's own
    direction: lower for the validation loss, higher for ROUGE."""
    if best is None:
        return True
    return value < best - min_delta if metric == LOSS else value > best + min_delta


def label(metric: str) -> str:
    return "validation loss" if metric == LOSS else metric


def describe(metric: str, value: float | None) -> str:
    """'validation loss 1.2345' or 'rougeL 41.23'."""
    if value is None:
        return f"{label(metric)} (none yet)"
    return f"{label(metric)} {value:{'.4f' if metric == LOSS else '.2f'}}"


@dataclass
class EarlyStopping:
    """Stop once `metric` (the validation loss, or a ROUGE figure) has not improved on the best so far by more than
    `min_delta` for `patience` evaluations in a row."""

    patience: int
    min_delta: float = 0.0
    metric: str = LOSS
    best: float | None = None  # the best value so far (None: no evaluation yet)
    best_samples: int | None = None  # samples seen at the best evaluation
    evaluations_without_improvement: int = 0

    def update(self, value: float, samples_seen: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        if improves(self.metric, value, self.best, self.min_delta):
            self.best, self.best_samples = value, samples_seen
            self.evaluations_without_improvement = 0
            return True
        self.evaluations_without_improvement += 1
        return False

    @property
    def best_loss(self) -> float | None:  # the name of earlier versions, which followed the loss only
        return self.best

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
    metric: str = LOSS  # --early-stopping-metric: what early stopping and the best export follow
    last_samples: int | None = None  # samples seen at the latest evaluation
    last_loss: float = math.nan
    last_value: float = math.nan  # of `metric`
    best_export: str | None = None  # the exported model with the best `metric`
    best_export_loss: float = math.inf  # its validation loss
    best_export_value: float | None = None  # its `metric`

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
        value = result.loss if self.metric == LOSS else result.metrics[self.metric]
        self.last_samples, self.last_loss, self.last_value = samples_seen, result.loss, value
        if self.stopper is not None:
            self.stopper.update(value, samples_seen)
        return result

    def export_saved(self, path: Path, samples_seen: int) -> bool:
        """Record an export just written; True when it is the best so far (it was evaluated just before)."""
        if self.last_samples == samples_seen and improves(self.metric, self.last_value, self.best_export_value):
            self.best_export, self.best_export_loss, self.best_export_value = (str(path), self.last_loss,
                                                                               self.last_value)
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    def stop_message(self, step: int) -> str:
        stopper = self.stopper
        return (f"early stopping after step {step}: the {label(self.metric)} has not "
                f"improved on its best ({describe(self.metric, stopper.best)} at {stopper.best_samples} samples) by "
                f"more than {stopper.min_delta} for {stopper.patience} evaluations")

    def summary(self) -> str:
        text = f"latest validation loss {self.last_loss:.4f}"
        if self.metric != LOSS:
            text += f", {describe(self.metric, self.last_value)}"
        text += f" at {self.last_samples} samples"
        if self.stopper is not None:
            text += f"; best {describe(self.metric, self.stopper.best)} at {self.stopper.best_samples} samples"
        if self.best_export is not None:
            text += f"; best checkpoint {self.best_export} ({describe(self.metric, self.best_export_value)})"
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
        if "metric" not in state:  # written before --early-stopping-metric: it followed the validation loss
            state = {**state, "metric": LOSS, "last_value": state["last_loss"],
                     "best_checkpoint_value": state["best_checkpoint_loss"] if state["best_checkpoint"] else None}
        self.last_samples, self.last_loss = state["last_samples"], state["last_loss"]
        if state["metric"] != self.metric:  # changed under --allow-config-change
            print0(f"validation: the checkpoint's best export and early stopping followed {label(state['metric'])}; "
                   f"they start over, following {label(self.metric)}")
            return
        for key, name in STATE_KEYS.items():
            setattr(self, name, state[key])
        if self.stopper is not None and "stopper" in state:
            saved = state["stopper"]
            self.stopper.best = saved["best"] if "best" in saved else saved["best_loss"]
            self.stopper.best_samples = saved["best_samples"]
            self.stopper.evaluations_without_improvement = saved["evaluations_without_improvement"]


# trainer_state.json's keys -> attributes (the first four as earlier versions wrote them)
STATE_KEYS = {"last_samples": "last_samples", "last_loss": "last_loss", "best_checkpoint": "best_export",
              "best_checkpoint_loss": "best_export_loss", "metric": "metric", "last_value": "last_value",
              "best_checkpoint_value": "best_export_value"}


def build_validator(config, objective, world: World, cache: TokenCache | None, held_out: np.ndarray | None,
                    eos_ids: list[int], tokenizer=None) -> Validator | None:
    """The validation set (a second file's cache, or the samples held out of --data-path), planned once; None if
    neither was asked for."""
    if cache is None:
        return None
    indices = np.arange(len(cache)) if held_out is None else held_out
    predictions, scored = None, ""
    if config.eval_metric == "rouge":
        prompts = generation_prompts(cache, indices)
        if not prompts:
            raise ValidationError(f"--eval-metric rouge: none of the {len(indices)} validation samples has a prompt "
                                  f"(each is trained from its first token); validate on prompt/reply data")
        predictions = Predictions(prompts, cache.lines, tokenizer, config.max_tokens_per_gpu, config.eval_num_beams)
        scored = (f"; ROUGE on {len(prompts)} of them"
                  + (f" ({len(indices) - len(prompts)} have no prompt)" if len(prompts) < len(indices) else ""))
    generations = config.num_eval_generations if getattr(objective, "generates", True) else 0  # reward: none
    layout = sequence_parallel.data_layout(config, world.rank, world.world_size)  # SP groups share rows
    validation_set = plan_validation_set(objective, cache, indices, layout.row_tokens, layout.size,
                                         layout.rank, generations, config.eval_max_new_tokens, eos_ids,
                                         predictions)
    stopper = None
    if config.early_stopping_patience is not None:
        stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta,
                                config.early_stopping_metric)
    units = "pairs" if cache.pairs else "samples"
    counted = "" if objective.unit == units else f"{objective.step_units(cache, indices)} {objective.unit}, "  # DPO: pairs
    print0(f"validation: {len(indices)} {units}, {counted}{len(validation_set.packs)} micro-steps and "
           f"{len(validation_set.prompts)} generations per evaluation{scored}")
    return Validator(validation_set, config.eval_every_samples, stopper, config.early_stopping_metric)


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
