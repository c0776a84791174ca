"""The objective seam: what a unit of data is, what it costs the planner, how a micro-step's pack is built, what its
loss is, and what the step's loss is divided by.

The loop (train.py) does the same thing for every objective: it asks for the step's denominator (`step_units`,
known on every rank from the plan and the cache), runs `loss_sum` on each of this rank's packs and backpropagates

    loss_sum * world_size / step_units

FSDP averages gradients over the ranks, so the sum of those is exactly the gradient of (step's loss sum) /
step_units, however the step is split into ranks and micro-steps.

An objective is a small object with these members:

    name            the --objective value
    unit            what the denominator counts (printed and logged)
    costs(cache)    the planner's cost of each sample: tokens of its packed row, or (source, target) tokens for
                    padded micro-batches
    step_units(cache, indices)   the step's denominator over its sample indices (all ranks, all micro-steps)
    pack(cache, indices)         one micro-step's input (data.Pack, or PairPack for pairs)
    metrics         names of the metrics it reports (TRL's names), each a mean over the step's units
    loss_sum(model, pack, cache, indices, row_ce=None)
                    (the summed loss of the pack, a scalar tensor with gradient; the sums of its metrics over the
                    pack's units, a detached (len(metrics),) tensor). `row_ce` (N,), when given, receives each
                    trained position's plain CE (a mixture's per-file losses)

The loop all-reduces the metric sums with the loss sum and divides both by step_units, so a metric is the exact
mean over the step's units too (SFT has none: its records hold only the loss). An objective whose metrics are means
over other counts (KTO's over its desirable or undesirable samples) says what it sums (`sums`) and how the step's
sums become its metrics (`means(sums, step_units)`); metric_sums and metric_means are the loop's view of both.

`Seq2SeqSFT` is SFT for encoder-decoder models (T5, BART, ...): the same loss over a source-target cache's target
tokens, on padded micro-batches whose planner cost is their padded size (costs are (source, target) pairs).

`SFT` is the mean cross-entropy over the step's trained tokens (--loss-reduction tokens), or over its samples of
each sample's token mean (--loss-reduction sequences, torchllms' `sequences`: the denominator is the step's samples,
not its packs, so a pack's size never weighs in). `DPO` and `SimPO` are preference objectives: the unit is a pair
(chosen + rejected, one sample of a pair cache, see data.py), the step's loss the mean over its pairs:

    DPO    -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]),  log π summed over a side's trained
           tokens; π_ref's log-probs are precomputed once by the initial model (reference.py) and read here
    SimPO  -log σ(β (log π(c) / |c| - log π(r) / |r|) - γ),  no reference, |x| = the side's trained tokens
    ORPO   -log π(c) / |c| - λ log σ(log odds(c) - log odds(r)),  odds(x) = p / (1 - p), p = exp(log π(x) / |x|)
    reward -log σ(s(c) - s(r) - m) [+ κ (s(c) + s(r))²],  m the pair's margin field (0 without),  s(x) the score head's value at x's last token (reward.py)

plus, with --preference-sft-weight w (DPO, SimPO), w x the chosen side's token-mean cross-entropy (per pair). DPO's
--dpo-loss-type picks TRL's loss of the log-ratio margin (sigmoid above; ipo, hinge, robust: see `DPO`).

`Distill` (offline distillation) trains on samples as SFT does, with the same unit (trained tokens): each trained
position's loss is (1 - α) CE + α T² KL(teacher's top-k || student, both renormalised over the top-k ids at
temperature T) (loss.TopKTeacher), the teacher's top-k log-probs read from a table computed once (teacher.py).

`KTO` trains labelled, unpaired samples (a prompt and a completion, desirable or not; the unit is a sample):

    KTO    desirable w_d (1 - σ(β (r - z))), undesirable w_u (1 - σ(β (z - r))),  r = log π(y|x) - log π_ref(y|x),
           z = max(0, the step's mean of log π(y'|x) - log π_ref(y'|x)) without gradient, y' another prompt's
           completion (kto.py); computed before the step's losses by `begin_step(model, cache, packs, device)`,
           which the loop calls (collectively) when an objective has one

docs/objectives.md has every formula with its data format and a command.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minitrain.training import kto
from minitrain.training.data import (
    IGNORE,
    DataError,
    Pack,
    Seq2SeqPack,
    TokenCache,
    make_pack,
    make_seq2seq_pack,
)
from minitrain.training.distributed import compute_autocast
from minitrain.training.loss import TopKTeacher
from minitrain.training.sequence_parallel import sum_over_row

OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "reward", "kto", "distill")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LOSS_REDUCTIONS = ("tokens", "sequences")
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected")
ORPO_METRICS = (*PREFERENCE_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")  # TRL's ORPO trainer's names
KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
KTO_SUMS = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "desirable", "undesirable")


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning. tokens: sum of CE over the step's trained tokens / its trained tokens. sequences:
    sum over the step's samples of (the sample's CE sum / its trained tokens) / the step's samples."""

    reduction: str = "tokens"
    name: str = "sft"
    metrics: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return "trained tokens" if self.reduction == "tokens" else "samples"

    def check(self, cache: TokenCache, path: str) -> None:
        if cache.pairs:
            raise DataError(f"{path}: holds preference pairs, which --objective sft cannot train; pass "
                            f"--objective dpo, simpo or orpo, or a file of samples from process_data.py")
        if cache.seq2seq:
            raise DataError(f"{path}: holds encoder-decoder (source-target) samples, and the model is a causal LM; "
                            f"train them with the encoder-decoder model they were made for, or re-run "
                            f"process_data.py with this model")
        if cache.unpaired:  # training on the undesirable completions would be the opposite of their label
            raise DataError(f"{path}: holds labelled (KTO) samples, desirable or not, which --objective sft cannot "
                            f"train; pass --objective kto, or a file of samples without `label`s")

    def costs(self, cache: TokenCache) -> np.ndarray:
        return cache.lengths

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        if self.reduction == "sequences":
            return len(indices)
        return int(cache.trained[indices].sum())  # > 0: every cached sample trains at least one token

    def pack(self, cache: TokenCache, indices: np.ndarray) -> Pack:
        return make_pack(cache, indices)

    def weights(self, pack, cache: TokenCache, indices: np.ndarray) -> torch.Tensor | None:
        """--loss-reduction sequences: each target weighs 1 / (trained tokens of its sample); tokens: None."""
        if self.reduction != "sequences":
            return None
        per_sample = 1.0 / cache.trained[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(per_sample[pack.sample_of_target]).float().to(pack.targets.device)

    def loss_sum(self, model: torch.nn.Module, pack: Pack, cache: TokenCache, indices: np.ndarray,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets,
                     self.weights(pack, cache, indices), row_ce, pack.cu_seq_lens, pack.max_length)
        return loss, torch.zeros(0, device=loss.device)


@dataclass(frozen=True)
class Seq2SeqSFT(SFT):
    """SFT of an encoder-decoder model on source-target samples: the same loss (the mean CE over the step's target
    tokens, or over its samples of each one's mean), on padded micro-batches (data.make_seq2seq_pack) whose cost to
    the planner is their padded size: `costs` gives each sample's (source, target) tokens (sampler.py)."""

    pad_id: int = 0
    max_positions: int | None = None  # learned position embeddings (BART family): no longer source or target

    def check(self, cache: TokenCache, path: str) -> None:
        if not cache.seq2seq:
            what = "preference pairs" if cache.pairs else "causal-LM samples (labels aligned with input_ids)"
            raise DataError(f"{path}: holds {what}, and the model is an encoder-decoder; re-run process_data.py "
                            f"with this model on source/target pairs")
        if self.max_positions is None:
            return
        for side, lengths in zip(("source", "target"), self.costs(cache).T):
            over = np.flatnonzero(lengths > self.max_positions)
            if len(over):
                i = int(over[0])
                raise DataError(f"{path}:{cache.lines[i]}: the {side} has {lengths[i]} tokens, more than the model's "
                                f"{self.max_positions} positions ({len(over)} samples do); re-run process_data.py "
                                f"with --max-{side}-tokens {self.max_positions}")

    def costs(self, cache: TokenCache) -> np.ndarray:
        return np.stack([cache.source_lengths, cache.lengths - cache.source_lengths], axis=1)

    def pack(self, cache: TokenCache, indices: np.ndarray) -> Seq2SeqPack:
        return make_seq2seq_pack(cache, indices, self.pad_id)

    def loss_sum(self, model: torch.nn.Module, pack: Seq2SeqPack, cache: TokenCache, indices: np.ndarray,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        loss = model(pack.input_ids, pack.attention_mask, pack.labels, pack.positions, pack.targets,
                     self.weights(pack, cache, indices), row_ce)
        return loss, torch.zeros(0, device=loss.device)


# ----------------------------------------------------------------------------------------------------------------
# Offline distillation


@dataclass(frozen=True)
class TeacherTable:
    """A teacher's k likeliest next tokens at every trained position of a cache (teacher.py writes it), rows in the
    cache's order: sample i's trained positions, in order, are rows row_starts[i]:row_starts[i + 1]."""

    ids: np.ndarray  # (trained tokens, k) int32, memory-mapped
    logprobs: np.ndarray  # (trained tokens, k) float32: log-probs at T = 1 over the whole vocabulary, memory-mapped
    row_starts: np.ndarray  # (num_samples + 1,) int64: 0, then the cumulative sum of cache.trained

    @classmethod
    def synthetic(cls, rows: int, k: int) -> "TeacherTable":
        """A stand-in of one sample of `rows` trained positions (the memory estimate's)."""
        return cls(np.tile(np.arange(k, dtype=np.int32), (rows, 1)), np.full((rows, k), -float(np.log(k)), np.float32),
                   np.array([0, rows]))

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probs) of the samples `indices`' trained positions, in make_pack's order of targets."""
        spans = [(int(self.row_starts[i]), int(self.row_starts[i + 1])) for i in indices]
        k = self.ids.shape[1]
        if not spans:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        return (np.concatenate([self.ids[a:b] for a, b in spans]),
                np.concatenate([self.logprobs[a:b] for a, b in spans]))


@dataclass(frozen=True)
class DistillPack(Pack):
    """A packed row of samples (data.Pack) and the teacher's top-k at each of its targets."""

    teacher_ids: torch.Tensor = None  # (N, k) long
    teacher_logprobs: torch.Tensor = None  # (N, k) float32

    def to(self, device: torch.device) -> "DistillPack":
        return DistillPack(**vars(Pack.to(self, device)), teacher_ids=self.teacher_ids.to(device),
                           teacher_logprobs=self.teacher_logprobs.to(device))


@dataclass
class Distill:
    """Offline distillation on samples: per trained position (1 - α) CE + α T² KL(q || s), q the teacher's top-k
    log-probs renormalised at temperature T, s the student's softmax at T renormalised over the same k ids
    (loss.TopKTeacher says it exactly); the step's loss is the mean over its trained tokens, as SFT's. Metrics: `kl`
    (KL(q || s), not times T²) and `ce`, each a mean over the trained tokens, so loss = α T² kl + (1 - α) ce."""

    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int = 16
    name: str = "distill"
    unit: str = "trained tokens"
    metrics: tuple[str, ...] = ("kl", "ce")
    needs_teacher: bool = True
    # the teacher's table of each cache, by its content hash (teacher.attach_teachers fills it)
    tables: dict = field(default_factory=dict)

    def check(self, cache: TokenCache, path: str) -> None:
        if cache.pairs or cache.seq2seq or cache.unpaired:
            what = ("preference pairs" if cache.pairs else "labelled (KTO) samples, some undesirable" if cache.unpaired
                    else "encoder-decoder (source-target) samples")
            raise DataError(f"{path}: holds {what}; --objective distill trains a causal LM on samples (process_data.py "
                            f"output of conversations or text)")

    def costs(self, cache: TokenCache) -> np.ndarray:
        return cache.lengths

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        return int(cache.trained[indices].sum())

    def pack(self, cache: TokenCache, indices: np.ndarray) -> DistillPack:
        table = self.tables.get(cache.content_hash)
        if table is None:
            raise RuntimeError("distillation needs the teacher's table of this cache; teacher.attach_teachers() "
                               "computes it")
        indices = np.asarray(indices, dtype=np.int64)
        pack = make_pack(cache, indices)
        ids, logprobs = table.rows(indices)
        return DistillPack(**vars(pack), teacher_ids=torch.from_numpy(ids.astype(np.int64)),
                           teacher_logprobs=torch.from_numpy(logprobs.astype(np.float32)))

    def loss_sum(self, model: torch.nn.Module, pack: DistillPack, cache: TokenCache, indices: np.ndarray,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(2, device=pack.targets.device)
        teacher = TopKTeacher(pack.teacher_ids, pack.teacher_logprobs, self.alpha, self.temperature, sums)
        loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, None, row_ce, pack.cu_seq_lens,
                     pack.max_length, teacher=teacher)
        return loss, sums


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs


@dataclass(frozen=True)
class PairPack:
    """One micro-step's pairs packed padding-free in one row: chosen_0, rejected_0, chosen_1, ... each sequence's
    positions restarting at 0, the label shift inside each sequence. (KTO packs its samples the same way, one
    sequence per sample: `pairs` are then the samples, and each has one sequence.)"""

    pack: Pack  # the row and its trained positions
    segments: torch.Tensor  # (N,) long: the sequence (2 * pair + 0 chosen / 1 rejected) of each trained position
    trained: torch.Tensor  # (2P,) float: trained tokens of each sequence
    reference: torch.Tensor | None  # (2P,) float64: the reference model's log-probs of each sequence (DPO)
    pairs: np.ndarray  # (P,) the cache's pair indices

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def to(self, device: torch.device) -> "PairPack":
        reference = None if self.reference is None else self.reference.to(device)
        return PairPack(self.pack.to(device), self.segments.to(device), self.trained.to(device), reference,
                        self.pairs)


def make_pair_pack(cache: TokenCache, indices: np.ndarray, reference: np.ndarray | None = None) -> PairPack:
    """The pairs `indices` of a pair cache in one row (an empty `indices`: make_pack's dummy pack, no pairs)."""
    indices = np.asarray(indices, dtype=np.int64)
    sequences = []
    for i in indices:
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        split = start + int(cache.chosen_lengths[i])
        sequences += [(cache.input_ids[a:b], cache.labels[a:b]) for a, b in ((start, split), (split, end))]
    ref = None if reference is None or not len(indices) else np.ascontiguousarray(reference[indices]).reshape(-1)
    return pack_sequences(cache, sequences, indices, 2, ref)


def pack_sequences(cache: TokenCache, sequences: list[tuple[np.ndarray, np.ndarray]], units: np.ndarray,
                   per_unit: int, reference: np.ndarray | None = None) -> PairPack:
    """`per_unit` sequences (input_ids, labels) of each of the units `units` in one row, each sequence its own (the
    shift inside it); no units: make_pack's dummy pack."""
    if len(units) == 0:
        return PairPack(make_pack(cache, units), torch.zeros(0, dtype=torch.long), torch.zeros(0), None, units)
    ids, pos, targets, segments = [], [], [], []
    for k, (seq_ids, labels) in enumerate(sequences):
        ids.append(seq_ids)
        pos.append(np.arange(len(seq_ids)))
        targets.append(np.append(labels[1:], IGNORE))  # shift inside the sequence
        segments.append(np.full(len(seq_ids), k))
    targets, segments = np.concatenate(targets), np.concatenate(segments)
    positions = np.flatnonzero(targets != IGNORE)
    sizes = [len(p) for p in pos]
    pack = Pack(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
        position_ids=torch.from_numpy(np.concatenate(pos))[None],
        positions=torch.from_numpy(positions),
        targets=torch.from_numpy(targets[positions].astype(np.int64)),
        num_tokens=len(targets),
        sample_of_target=segments[positions] // per_unit,  # the unit
        cu_seq_lens=torch.from_numpy(np.cumsum([0, *sizes]).astype(np.int32)),  # each sequence on its own
        max_length=max(sizes),
    )
    seg = torch.from_numpy(segments[positions])
    # numpy, not torch.bincount: the memory estimate builds packs under FakeTensorMode, where a bincount's output
    # shape is data-dependent and refused
    trained = torch.from_numpy(np.bincount(segments[positions], minlength=len(sequences)).astype(np.float32))
    ref = None if reference is None else torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    return PairPack(pack, seg, trained, ref, units)


def sequence_logps(model: torch.nn.Module, pair_pack: PairPack) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each sequence summed over its trained tokens, (2P,) (KTO: (P,)) with gradient; a zero-valued
    scalar that carries the model's graph, to add to the loss so a pack without pairs still runs every parameter's
    backward)."""
    p = pair_pack.pack
    boundaries = dict(cu_seq_lens=p.cu_seq_lens, max_length=p.max_length)
    if pair_pack.num_pairs == 0:  # a dummy pack: the same forward/backward collectives, zero gradient
        return torch.zeros(0, device=p.input_ids.device), model(p.input_ids, p.position_ids, p.positions, p.targets,
                                                                 **boundaries)
    ce = model(p.input_ids, p.position_ids, p.positions, p.targets, per_token=True, **boundaries)  # (N,)
    logps = torch.zeros(len(pair_pack.trained), dtype=ce.dtype, device=ce.device).index_add(0, pair_pack.segments, -ce)
    # Sequence parallelism: each rank summed the positions of its slice of the row; the group's sums are the row's.
    logps = sum_over_row(logps, getattr(model, "sequence_parallel", None))
    return logps, torch.zeros((), device=ce.device)


@dataclass
class Preference:
    """What DPO, SimPO and ORPO share: pairs as units, their packs, their metrics; subclasses say the loss of a pair
    (`pair_losses`: the (P,) losses, the rewards of each side, the logps shown of each side, then the per-pair values
    of any metrics past PREFERENCE_METRICS)."""

    beta: float
    sft_weight: float = 0.0
    unit: str = "pairs"
    metrics: tuple[str, ...] = PREFERENCE_METRICS
    # DPO: the reference log-probs (num_pairs, 2) of each pair cache, by its content hash (reference.py fills it)
    reference: dict = field(default_factory=dict)

    def check(self, cache: TokenCache, path: str) -> None:
        if not cache.pairs:
            what = "labelled (KTO) samples" if cache.unpaired else "samples"
            raise DataError(f"{path}: holds {what}, not preference pairs; --objective {self.name} needs "
                            f"process_data.py --input-format preference output (chosen_*/rejected_* rows)")

    def costs(self, cache: TokenCache) -> np.ndarray:
        return cache.lengths  # both sequences of the pair

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        return len(indices)

    def pack(self, cache: TokenCache, indices: np.ndarray) -> PairPack:
        return make_pair_pack(cache, indices, self.reference.get(cache.content_hash))

    def loss_sum(self, model: torch.nn.Module, pack: PairPack, cache: TokenCache = None, indices=None,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logps, graph = sequence_logps(model, pack)
        if pack.num_pairs == 0:
            return graph, torch.zeros(len(self.metrics), device=graph.device)
        chosen, rejected = logps[0::2], logps[1::2]  # (P,)
        losses, chosen_rewards, rejected_rewards, shown, *extra = self.pair_losses(chosen, rejected, pack)
        if self.sft_weight:
            losses = losses - self.sft_weight * chosen / pack.trained[0::2]  # chosen's token-mean CE
        metrics = torch.stack([
            chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(), shown[0].sum(), shown[1].sum(), *(e.sum() for e in extra),
        ]).detach().float()
        # Sequence parallelism: the S ranks sharing the row hold the same pairs' losses; each counts 1 / S of them, so
        # the step's sums count every pair once (and the gradient, through sum_over_row's backward, too).
        sp = getattr(model, "sequence_parallel", None)
        replicas = 1 if sp is None else sp.size
        if replicas > 1:
            return (losses.sum() + graph) / replicas, metrics / replicas
        return losses.sum() + graph, metrics


@dataclass
class DPO(Preference):
    """DPO and TRL's variants of its loss (`loss_type`, TRL's DPOConfig.loss_type), of the log-ratio margin
    l = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)), sums over each side's trained tokens:

        sigmoid  -(1 - ε) log σ(β l) - ε log σ(-β l)              (ε = label_smoothing: cDPO; TRL < 0.29's form)
        robust   (-(1 - ε) log σ(β l) + ε log σ(-β l)) / (1 - 2ε)  (Robust DPO, Chowdhury et al.)
        hinge    max(0, 1 - β l)                                   (SLiC)
        ipo      (l' - 1 / (2β))²,  l' = l with each side's log-ratio divided by its trained tokens (TRL normalises
                 IPO's log-ratios by the completion length; IPO paper eq. 17 with τ = β)

    The rewards reported are β x each side's summed log-ratio for every loss type, as TRL reports them."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    name: str = "dpo"
    needs_reference: bool = True

    def pair_losses(self, chosen, rejected, pack: PairPack):
        if pack.reference is None:
            raise RuntimeError("DPO needs the reference log-probs of this cache; reference.attach() computes them")
        ref = pack.reference.to(chosen.dtype)
        chosen_rewards = self.beta * (chosen - ref[0::2])
        rejected_rewards = self.beta * (rejected - ref[1::2])
        margin = chosen_rewards - rejected_rewards  # β l
        eps = self.label_smoothing
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(margin)
            if eps:
                losses = (1 - eps) * losses - eps * F.logsigmoid(-margin)
        elif self.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - margin)
        elif self.loss_type == "ipo":
            normalised = ((chosen - ref[0::2]) / pack.trained[0::2] - (rejected - ref[1::2]) / pack.trained[1::2])
            losses = (normalised - 1 / (2 * self.beta)) ** 2
        else:
            raise ValueError(f"unknown DPO loss type {self.loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
        return losses, chosen_rewards.detach(), rejected_rewards.detach(), (chosen.detach(), rejected.detach())


@dataclass
class SimPO(Preference):
    beta: float = 2.0
    gamma: float = 0.5
    name: str = "simpo"
    needs_reference: bool = False

    def pair_losses(self, chosen, rejected, pack: PairPack):
        # Length-normalised log-probs; TRL's CPO trainer (loss_type="simpo") reports these as logps/* and
        # beta x these as rewards/*.
        chosen_avg, rejected_avg = chosen / pack.trained[0::2], rejected / pack.trained[1::2]
        losses = -F.logsigmoid(self.beta * (chosen_avg - rejected_avg) - self.gamma)
        chosen_rewards, rejected_rewards = (self.beta * chosen_avg).detach(), (self.beta * rejected_avg).detach()
        return losses, chosen_rewards, rejected_rewards, (chosen_avg.detach(), rejected_avg.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Mächler 2012: log(-expm1(x)) near 0, log1p(-exp(x)) below
    -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class ORPO(Preference):
    """ORPO (Hong et al. 2024), reference-free: the chosen side's token-mean NLL plus λ (`beta`, TRL's name; its
    default 0.1) x the odds-ratio loss of TRL's ORPOTrainer.odds_ratio_loss, on length-normalised log-probs:

        log odds(x) = a(x) - log(1 - exp(a(x))),  a(x) = log π(x) / |x|
        loss = -a(c) - λ log σ(log odds(c) - log odds(r))

    Metrics as TRL's: rewards/* = λ a(x), logps/* = a(x), nll_loss, log_odds_ratio (log σ(...)), log_odds_chosen
    (the log odds ratio itself). TRL's NLL differs in one way: it is the token mean over the micro-batch's chosen
    prompts and replies together; here it is each pair's own mean over its reply's trained tokens (the tokens the
    rest of the loss sees), so the step's loss does not depend on how its pairs are split into micro-steps."""

    beta: float = 0.1
    name: str = "orpo"
    needs_reference: bool = False
    metrics: tuple[str, ...] = ORPO_METRICS

    def pair_losses(self, chosen, rejected, pack: PairPack):
        chosen_avg, rejected_avg = chosen / pack.trained[0::2], rejected / pack.trained[1::2]  # a(c), a(r) < 0
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen_avg
        losses = nll - self.beta * ratio
        chosen_rewards, rejected_rewards = (self.beta * chosen_avg).detach(), (self.beta * rejected_avg).detach()
        return (losses, chosen_rewards, rejected_rewards, (chosen_avg.detach(), rejected_avg.detach()), nll.detach(),
                ratio.detach(), log_odds.detach())


# ----------------------------------------------------------------------------------------------------------------
# KTO: labelled, unpaired samples


@dataclass(frozen=True)
class KTOPack:
    """A KTO micro-step: its samples' own sequences (prompt + completion), one per sample, in one row."""

    sequences: PairPack  # `reference`: (P,) float64, the reference model's log-prob of each sample's completion
    desirable: torch.Tensor  # (P,) bool: each sample's label

    @property
    def num_samples(self) -> int:
        return self.sequences.num_pairs

    @property
    def targets(self) -> torch.Tensor:
        return self.sequences.pack.targets

    def to(self, device: torch.device) -> "KTOPack":
        return KTOPack(self.sequences.to(device), self.desirable.to(device))


@dataclass
class KTO:
    """KTO (Ethayarajh et al. 2024) as TRL's KTOTrainer (loss_type "kto") defines it, on labelled samples. With
    r(x, y) = log π(y|x) - log π_ref(y|x) (sums over the completion's trained tokens; π_ref precomputed once by the
    initial model, reference.py) and the step's KL estimate

        z = max(0, mean over the step's samples of (log π(y'|x) - log π_ref(y'|x))),  no gradient,

    y' the completion of another prompt's sample (kto.py: a fixed function of the data), a sample's loss is

        desirable    w_d (1 - σ(β (r - z)))        w_d = desirable_weight
        undesirable  w_u (1 - σ(β (z - r)))        w_u = undesirable_weight

    and the step's loss their mean over its samples. TRL estimates z over each micro-batch (its per-device means,
    averaged over the devices); here z is over the whole optimizer step, in one no-grad pass over the step's KL
    sequences before its losses (`begin_step`, collective), so the step's loss and gradient do not depend on how it
    is split into ranks and micro-steps. Metrics as TRL's: kl (z), rewards/chosen and logps/chosen (means over the
    step's desirable samples of β r and log π(y|x)), rewards/rejected and logps/rejected (over its undesirable
    ones), rewards/margins (chosen minus rejected); a mean without samples is left out of the step's record."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_tokens: int | None = None  # a KL sequence must fit a row (check)
    name: str = "kto"
    unit: str = "samples"
    needs_reference: bool = True
    reference_tag: str = "kto"  # its reference table (own and KL log-probs) is not DPO's: its own file name
    metrics: tuple[str, ...] = KTO_METRICS
    sums: tuple[str, ...] = KTO_SUMS  # what loss_sum adds up per sample; `means` turns the step's sums into metrics
    # the reference log-probs (num_samples, 2) of each cache, by content hash: [own completion, KL sequence]
    reference: dict = field(default_factory=dict)
    kl: float = 0.0  # the current step's z, set by begin_step before its losses
    partners: dict = field(default_factory=dict)  # kto.kl_partners of each cache, by content hash

    def check(self, cache: TokenCache, path: str) -> None:
        if not cache.unpaired:
            what = "preference pairs" if cache.pairs else "samples without a desirable/undesirable label"
            raise DataError(f"{path}: holds {what}; --objective kto needs process_data.py output of labelled rows "
                            f"(prompt/completion/label or messages/label, --input-format unpaired)")
        partners = self.partners_of(cache, path)
        if self.max_tokens is not None and (error := kto.too_long(cache, partners, path, self.max_tokens)):
            raise error

    def partners_of(self, cache: TokenCache, path: str = "") -> np.ndarray:
        if cache.content_hash not in self.partners:
            self.partners[cache.content_hash] = kto.kl_partners(cache, path)
        return self.partners[cache.content_hash]

    def costs(self, cache: TokenCache) -> np.ndarray:
        """A micro-step's row holds its samples, and then (begin_step) their KL sequences: the longer of the two."""
        return np.maximum(cache.lengths, kto.kl_lengths(cache, self.partners_of(cache)))

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        return len(indices)

    def pack(self, cache: TokenCache, indices: np.ndarray) -> KTOPack:
        indices = np.asarray(indices, dtype=np.int64)
        table = self.reference.get(cache.content_hash)
        sequences = pack_sequences(cache, [kto.own_sequence(cache, i) for i in indices], indices, 1,
                                   None if table is None else table[indices, 0])
        return KTOPack(sequences, torch.from_numpy(np.asarray(cache.desirable[indices], dtype=bool)))

    def kl_pack(self, cache: TokenCache, indices: np.ndarray) -> PairPack:
        """The KL sequences of the samples `indices` in one row (reference: their column of the table)."""
        indices = np.asarray(indices, dtype=np.int64)
        partners, table = self.partners_of(cache), self.reference.get(cache.content_hash)
        return pack_sequences(cache, [kto.kl_sequence(cache, i, partners[i]) for i in indices], indices, 1,
                              None if table is None else table[indices, 1])

    def reference_passes(self, cache: TokenCache) -> list:
        """The reference table's columns (reference.py): each sample's own sequence, then its KL sequence."""
        return [(cache.lengths, lambda c, i: self.pack(c, i).sequences, 1),
                (kto.kl_lengths(cache, self.partners_of(cache)), self.kl_pack, 1)]

    @torch.no_grad()
    def begin_step(self, model: torch.nn.Module, cache: TokenCache, packs: list[np.ndarray],
                   device: torch.device) -> None:
        """z for the step whose micro-steps on this rank are `packs`: the policy's log-probs of their KL sequences
        (eval mode: no dropout), minus the reference's, averaged over the step's samples on every rank. Collective:
        every rank runs the same number of packs (dummy ones included)."""
        if cache.content_hash not in self.reference:
            raise RuntimeError("KTO needs the reference log-probs of this cache; reference.attach() computes them")
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of log-ratios, samples
        was_training = model.training
        model.eval()
        try:
            for indices in packs:
                pack = self.kl_pack(cache, indices).to(device)
                with compute_autocast(model, device):
                    logps, _ = sequence_logps(model, pack)
                if pack.num_pairs:
                    totals[0] += (logps.double() - pack.reference).sum()
                    totals[1] += pack.num_pairs
        finally:
            model.train(was_training)
        # No reshard here: SHARD_GRAD_OP's modules stay gathered after this no-grad forward, and the step's forward
        # that follows uses them as they are, its backward resharding them (tests/test_kto.py runs both strategies)
        if dist.is_initialized():
            dist.all_reduce(totals)
        self.kl = max(totals[0].item() / totals[1].item(), 0.0)

    def loss_sum(self, model: torch.nn.Module, pack: KTOPack, cache: TokenCache = None, indices=None,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logps, graph = sequence_logps(model, pack.sequences)
        if pack.num_samples == 0:
            return graph, torch.zeros(len(self.sums), device=graph.device)
        if pack.sequences.reference is None:
            raise RuntimeError("KTO needs the reference log-probs of this cache; reference.attach() computes them")
        ratios = logps - pack.sequences.reference.to(logps.dtype)  # r
        z = torch.tensor(self.kl, dtype=logps.dtype, device=logps.device)
        desirable = pack.desirable
        losses = torch.where(desirable, self.desirable_weight * torch.sigmoid(-self.beta * (ratios - z)),
                             self.undesirable_weight * torch.sigmoid(-self.beta * (z - ratios)))  # 1 - σ(x) = σ(-x)
        rewards, chosen = (self.beta * ratios).detach(), desirable.to(logps.dtype)
        rejected = 1 - chosen
        sums = torch.stack([z * pack.num_samples, (rewards * chosen).sum(), (rewards * rejected).sum(),
                            (logps.detach() * chosen).sum(), (logps.detach() * rejected).sum(), chosen.sum(),
                            rejected.sum()]).detach().float()
        return losses.sum() + graph, sums

    def means(self, sums: list[float], units: float) -> dict[str, float]:
        """The step's metrics from its sums (KTO_SUMS, all ranks): TRL's means over the desirable or the undesirable
        samples; one without samples is left out."""
        kl, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, chosen, rejected = sums
        out = {"kl": kl / units}
        if chosen:
            out.update({"rewards/chosen": chosen_rewards / chosen, "logps/chosen": chosen_logps / chosen})
        if rejected:
            out.update({"rewards/rejected": rejected_rewards / rejected, "logps/rejected": rejected_logps / rejected})
        if chosen and rejected:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {name: out[name] for name in self.metrics if name in out}


def metric_sums(objective) -> int:
    """How many sums an objective's loss_sum returns besides the loss (its metrics', or KTO's `sums`)."""
    return len(getattr(objective, "sums", objective.metrics))


def metric_means(objective, sums: list[float], units: float) -> dict[str, float]:
    """The metrics of a step (or a validation set) from its sums over all ranks: each sum over the units, or the
    objective's own `means` (KTO: means over its desirable or undesirable samples)."""
    means = getattr(objective, "means", None)
    if means is not None:
        return means(sums, units)
    return {name: value / units for name, value in zip(objective.metrics, sums)}


@dataclass(frozen=True)
class ScorePack:
    """A reward micro-step: the pairs' row (PairPack) and each sequence's scoring position in it."""

    pairs: PairPack
    scoring: torch.Tensor  # (2P,) long; (1,) [0] for a dummy pack
    margins: torch.Tensor | None = None  # (P,) float64: the pairs' margin field, when the data has one

    @property
    def num_pairs(self) -> int:
        return self.pairs.num_pairs

    def to(self, device: torch.device) -> "ScorePack":
        margins = None if self.margins is None else self.margins.to(device)
        return ScorePack(self.pairs.to(device), self.scoring.to(device), margins)


@dataclass
class Reward:
    """A reward model (TRL's RewardTrainer): a one-label score head on the LM's last hidden state (reward.py), trained
    on pairs with -log σ(s(c) - s(r) - m) (m: the pair's `margin` field, 0 without; TRL's optional margin), plus
    κ (s(c) + s(r))² with κ = center_coefficient (TRL's center_rewards_coefficient) to keep the scores centred.
    Metrics as TRL's: accuracy (s(c) > s(r)), margin (s(c) - s(r)), mean_reward (of both sides)."""

    pad_token_id: int | None = None  # the scoring position skips trailing pad tokens, as Hugging Face's does
    center_coefficient: float = 0.0
    name: str = "reward"
    unit: str = "pairs"
    metrics: tuple[str, ...] = ("accuracy", "margin", "mean_reward")
    needs_reference: bool = False
    generates: bool = False  # a score head: no validation generations

    def check(self, cache: TokenCache, path: str) -> None:
        if not cache.pairs:
            what = "labelled (KTO) samples" if cache.unpaired else "samples"
            raise DataError(f"{path}: holds {what}, not preference pairs; --objective reward needs "
                            f"process_data.py --input-format preference output (chosen_*/rejected_* rows)")

    def costs(self, cache: TokenCache) -> np.ndarray:
        return cache.lengths

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        return len(indices)

    def pack(self, cache: TokenCache, indices: np.ndarray) -> ScorePack:
        from minitrain.training.reward import scoring_positions

        indices = np.asarray(indices, dtype=np.int64)
        pairs = make_pair_pack(cache, indices)
        if pairs.num_pairs == 0:
            return ScorePack(pairs, torch.zeros(1, dtype=torch.long))
        # From the cache, in numpy (the memory estimate runs this on fake tensors): the row is chosen_0, rejected_0, ...
        ids = np.concatenate([cache.input_ids[int(cache.offsets[i]):int(cache.offsets[i + 1])] for i in indices])
        sizes = [n for i in indices for n in (int(cache.chosen_lengths[i]),
                                              int(cache.offsets[i + 1] - cache.offsets[i] - cache.chosen_lengths[i]))]
        margins = getattr(cache, "margins", None)
        margins = None if margins is None else torch.from_numpy(np.ascontiguousarray(margins[indices]))
        return ScorePack(pairs, torch.from_numpy(scoring_positions(ids, sizes, self.pad_token_id)), margins)

    def loss_sum(self, model: torch.nn.Module, pack: ScorePack, cache: TokenCache = None, indices=None,
                 row_ce: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = pack.pairs.pack
        scores = model(p.input_ids, p.position_ids, pack.scoring, p.cu_seq_lens, p.max_length)  # (2P,)
        if pack.num_pairs == 0:  # a dummy pack: the same collectives, zero gradient
            return scores.sum() * 0.0, torch.zeros(len(self.metrics), device=scores.device)
        chosen, rejected = scores[0::2], scores[1::2]  # (P,)
        differences = chosen - rejected
        if pack.margins is not None:
            differences = differences - pack.margins.to(differences.dtype)
        losses = -F.logsigmoid(differences)
        if self.center_coefficient:
            losses = losses + self.center_coefficient * (chosen + rejected) ** 2
        metrics = torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(),
                               ((chosen + rejected) / 2).sum()]).detach().float()
        return losses.sum(), metrics


def build_objective(config, hf_config=None) -> SFT | DPO | SimPO | ORPO | Reward | KTO | Distill:
    """The objective of `config` (its objective, dpo_beta, dpo_loss_type, dpo_label_smoothing, simpo_beta,
    simpo_gamma, orpo_lambda, preference_sft_weight, kto_*, distill_*) for the model of `hf_config` (an
    encoder-decoder trains Seq2SeqSFT)."""
    name = getattr(config, "objective", "sft")
    if hf_config is not None and getattr(hf_config, "is_encoder_decoder", False):
        if name != "sft":
            raise DataError(f"--objective {name} trains causal LMs; an encoder-decoder model "
                            f"({hf_config.model_type}) trains with --objective sft")
        pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
        return Seq2SeqSFT(getattr(config, "loss_reduction", "tokens"), pad_id=pad,
                          max_positions=getattr(hf_config, "max_position_embeddings", None))
    if name == "dpo":
        return DPO(beta=config.dpo_beta, loss_type=config.dpo_loss_type, label_smoothing=config.dpo_label_smoothing,
                   sft_weight=config.preference_sft_weight)
    if name == "simpo":
        return SimPO(beta=config.simpo_beta, gamma=config.simpo_gamma, sft_weight=config.preference_sft_weight)
    if name == "orpo":
        return ORPO(beta=config.orpo_lambda)
    if name == "reward":
        return Reward(getattr(hf_config, "pad_token_id", None), config.reward_center_coefficient)
    if name == "kto":
        budget = config.max_tokens_per_gpu if isinstance(config.max_tokens_per_gpu, int) else None
        return KTO(beta=config.kto_beta, desirable_weight=config.kto_desirable_weight,
                   undesirable_weight=config.kto_undesirable_weight, max_tokens=budget)
    if name == "distill":
        return Distill(alpha=config.distill_alpha, temperature=config.distill_temperature, top_k=config.distill_top_k)
    return SFT(getattr(config, "loss_reduction", "tokens"))
