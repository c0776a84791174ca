"""Token-budget multipack planner: which samples each rank trains on in each micro-step.

One optimizer step trains on `batch_size` samples (global, across all ranks). Each epoch has its own
seeded shuffle; step k of an epoch takes the k-th slice of `batch_size` samples of that shuffle (the
last, smaller slice is kept). Which samples a step sees, and in which order, does not depend on the
world size; only how they are split into packs does.

Within a step the samples are packed into micro-steps: in every micro-step each rank gets one pack
of at most `max_tokens_per_rank` tokens (the cost of a pack is the sum of its samples' lengths: no
padding). Every rank gets the same number of micro-steps, since FSDP collectives hang otherwise; a
rank with nothing to do gets an empty pack.

Packing one step: try M = a lower bound on the number of micro-steps (Martello-Toth L2 bound on the
bins of capacity T, divided by world_size), then M+1, ... For each M, the step's samples go into
M * world_size bins of capacity T: longest-processing-time first (each sample, longest first, into
the least-loaded bin: balanced); if a bin ends over T, best-fit decreasing (tighter, less balanced);
if that fails too, LPT again followed by a local search that moves or swaps samples between the
fullest / emptiest bin and the others. The first M that fits wins; the same local search then evens
out the loads. The bins are sorted by load and dealt to micro-steps in groups of world_size, so each
micro-step's packs have similar loads.

Encoder-decoder samples cannot be packed into one row (an encoder attends over its whole input), so their
micro-batches are padded: `lengths` is then (n, 2), each sample's (source, target) tokens, and a micro-batch of B
samples costs B * (longest source + longest target), its padded size. Packing one such step: the samples sorted
longest first (source + target), each micro-batch filled greedily while its padded size fits, so a micro-batch
holds samples of similar lengths and little padding; consecutive micro-batches (similar sizes) are dealt to the
ranks of one micro-step.

The plan is a pure function of (lengths, batch_size, max_tokens_per_rank, world_size, seed, step):
every rank computes it independently, and resuming at step k is `plan(k)`, with nothing replayed.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numba import njit

# Caps on the local search (each round moves or swaps one sample). In bench/bench_sampler.py more
# rounds changed neither micro-step counts nor imbalance, only time.
REPAIR_ROUNDS = 256  # to make an over-budget LPT result fit
BALANCE_ROUNDS = 64  # to even out loads between ranks
FIX_TOO_LONG = "raise --max-tokens-per-gpu or re-run process_data.py with a lower --max-sample-num-tokens"


class SamplerError(ValueError):
    """A planner input that cannot work; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class StepPlan:
    step: int  # global optimizer step, 0-based, counts across epochs
    epoch: int
    step_in_epoch: int
    micro_batches: list[list[np.ndarray]]  # [micro_step][rank] -> int64 sample indices; empty = dummy pack
    num_samples: int  # real samples in this optimizer step, all ranks together

    @property
    def num_micro_steps(self) -> int:
        return len(self.micro_batches)

    def rank_packs(self, rank: int) -> list[np.ndarray]:
        """This rank's pack for each micro-step."""
        return [packs[rank] for packs in self.micro_batches]


# ---------------------------------------------------------------------------------------------
# Packing kernels. `sizes` is always sorted longest first; a "bin" is one (micro-step, rank) pack.


@njit(cache=True)
def _before(loads, a, b):
    """Heap order: lighter bin first, lower bin number on ties (keeps the plan deterministic)."""
    return loads[a] < loads[b] or (loads[a] == loads[b] and a < b)


@njit(cache=True)
def _lpt(sizes, num_bins):
    """Longest processing time first: each sample into the currently least-loaded bin."""
    bin_of = np.empty(sizes.shape[0], np.int64)
    loads = np.zeros(num_bins, np.int64)
    heap = np.arange(num_bins)  # min-heap of bins by load; all loads are 0, so this is a valid heap
    for i in range(sizes.shape[0]):
        b = heap[0]
        bin_of[i] = b
        loads[b] += sizes[i]
        pos = 0  # the root got heavier: sift it down
        while True:
            child = 2 * pos + 1
            if child >= num_bins:
                break
            if child + 1 < num_bins and _before(loads, heap[child + 1], heap[child]):
                child += 1
            if not _before(loads, heap[child], heap[pos]):
                break
            heap[pos], heap[child] = heap[child], heap[pos]
            pos = child
    return bin_of, loads


@njit(cache=True)
def _best_fit(sizes, num_bins, cap):
    """Best-fit decreasing: each sample into the fullest bin it still fits in. fits=False if one fits nowhere."""
    bin_of = np.empty(sizes.shape[0], np.int64)
    loads = np.zeros(num_bins, np.int64)
    for i in range(sizes.shape[0]):
        best = -1
        for b in range(num_bins):
            if loads[b] + sizes[i] <= cap and (best < 0 or loads[b] > loads[best]):
                best = b
        if best < 0:
            return bin_of, loads, False
        bin_of[i] = best
        loads[best] += sizes[i]
    return bin_of, loads, True


@njit(cache=True)
def _lower_peak(sizes, bin_of, loads, hi, lo):
    """Move one sample out of bin `hi`, or swap it for a smaller one, to lower hi's load the most.

    A change is only taken if both bins end below hi's old load, so the sum of squared loads
    strictly falls and the local search terminates. Returns whether anything changed.
    """
    best_peak, best_a, best_b = loads[hi], -1, -1  # best_b = -1: move a to bin lo
    for a in range(sizes.shape[0]):
        if bin_of[a] != hi:
            continue
        if lo != hi:
            peak = max(loads[hi] - sizes[a], loads[lo] + sizes[a])
            if peak < best_peak:
                best_peak, best_a, best_b = peak, a, -1
        for b in range(sizes.shape[0]):
            other = bin_of[b]
            if other == hi or sizes[b] >= sizes[a]:
                continue
            d = sizes[a] - sizes[b]
            peak = max(loads[hi] - d, loads[other] + d)
            if peak < best_peak:
                best_peak, best_a, best_b = peak, a, b
    if best_a < 0:
        return False
    if best_b < 0:
        bin_of[best_a] = lo
        loads[hi] -= sizes[best_a]
        loads[lo] += sizes[best_a]
    else:
        other = bin_of[best_b]
        d = sizes[best_a] - sizes[best_b]
        bin_of[best_a], bin_of[best_b] = other, hi
        loads[hi] -= d
        loads[other] += d
    return True


@njit(cache=True)
def _raise_floor(sizes, bin_of, loads, lo):
    """Move one sample into bin `lo`, or swap one of lo's samples for a bigger one, to raise lo the most.

    Same acceptance rule as _lower_peak (both bins end strictly between their old loads).
    """
    members = np.flatnonzero(bin_of == lo)
    best_floor, best_a, best_b = loads[lo], -1, -1  # best_b = -1: plain move of a into lo
    for a in range(sizes.shape[0]):
        src = bin_of[a]
        if src == lo:
            continue
        if loads[lo] + sizes[a] < loads[src]:
            floor = min(loads[lo] + sizes[a], loads[src] - sizes[a])
            if floor > best_floor:
                best_floor, best_a, best_b = floor, a, -1
        for b in members:
            if sizes[b] >= sizes[a]:
                continue
            d = sizes[a] - sizes[b]
            if loads[lo] + d < loads[src]:
                floor = min(loads[lo] + d, loads[src] - d)
                if floor > best_floor:
                    best_floor, best_a, best_b = floor, a, b
    if best_a < 0:
        return False
    src = bin_of[best_a]
    d = sizes[best_a]
    if best_b >= 0:
        d -= sizes[best_b]
        bin_of[best_b] = src
    bin_of[best_a] = lo
    loads[src] -= d
    loads[lo] += d
    return True


@njit(cache=True)
def _water_level(sizes, num_bins):
    """The load every bin would have in a perfect split, where samples bigger than that sit alone."""
    rest, bins = sizes.sum(), num_bins
    for i in range(sizes.shape[0]):
        if bins == 1 or sizes[i] * bins <= rest:
            break
        rest -= sizes[i]
        bins -= 1
    return rest / bins


@njit(cache=True)
def _refine(sizes, bin_of, loads, cap, max_rounds):
    """Local search on the fullest and emptiest bins until every bin fits and all loads are within
    ~1.6% of the water level, or neither extreme bin can be improved."""
    level = _water_level(sizes, loads.shape[0])
    for _ in range(max_rounds):
        hi = np.argmax(loads)
        lo = np.argmin(loads)
        peak_off = loads[hi] > cap or loads[hi] > level * (1 + 1 / 64)
        floor_off = loads[lo] < level * (1 - 1 / 64)
        if peak_off and _lower_peak(sizes, bin_of, loads, hi, lo):
            continue
        if floor_off and _raise_floor(sizes, bin_of, loads, lo):
            continue
        return


@njit(cache=True)
def _above(ascending, prefix, x):
    """(count, sum) of the sizes in `ascending` (sorted, with its prefix sums) that are > x: a binary search."""
    lo, hi = 0, ascending.shape[0]
    while lo < hi:  # the first index whose size is > x
        mid = (lo + hi) // 2
        if ascending[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return ascending.shape[0] - lo, prefix[-1] - prefix[lo]


@njit(cache=True)
def _min_bins(sizes, cap):
    """Martello-Toth L2 lower bound on the bins of capacity `cap` that `sizes` (longest first) need.

    For a threshold k <= cap/2: samples over cap - k sit alone; samples over cap/2 cannot share a bin
    with each other; samples in [k, cap/2] can only go into the room those leave, or into new bins.
    """
    ascending = sizes[::-1].copy()
    prefix = np.zeros(ascending.shape[0] + 1, np.int64)
    for i in range(ascending.shape[0]):
        prefix[i + 1] = prefix[i] + ascending[i]
    n, total = ascending.shape[0], prefix[-1]
    num_big, sum_big = _above(ascending, prefix, cap // 2)
    best = max(num_big, (total + cap - 1) // cap)
    for j in range(n - num_big):  # every threshold k that is the size of a small sample
        k = ascending[j]
        num_alone, sum_alone = _above(ascending, prefix, cap - k)
        num_open, sum_open = num_big - num_alone, sum_big - sum_alone
        num_ge_k, sum_ge_k = _above(ascending, prefix, k - 1)
        small = sum_ge_k - sum_big  # samples in [k, cap/2]
        spill = small - (num_open * cap - sum_open)
        best = max(best, num_big + max(0, (spill + cap - 1) // cap))
    return best


@njit(cache=True)
def _order_longest_first(keys):
    """Indices of `keys` from largest to smallest, ties in index order: np.argsort(-keys, kind="stable"), as a
    merge sort of its own (compiling numba's np.argsort cost every process ~1 s on its first step)."""
    n, run = keys.shape[0], 32
    order, key = np.arange(n), keys.copy()
    for lo in range(0, n, run):  # runs of 32 by insertion: a later entry passes only strictly smaller ones
        for i in range(lo + 1, min(lo + run, n)):
            k, o, j = key[i], order[i], i
            while j > lo and key[j - 1] < k:
                key[j], order[j] = key[j - 1], order[j - 1]
                j -= 1
            key[j], order[j] = k, o
    merged_order, merged_key = np.empty(n, np.int64), np.empty(n, keys.dtype)
    width = run
    while width < n:  # then merges of neighbouring runs, the left run's entry first on ties
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                if j >= hi or (i < mid and key[i] >= key[j]):
                    merged_order[k], merged_key[k] = order[i], key[i]
                    i += 1
                else:
                    merged_order[k], merged_key[k] = order[j], key[j]
                    j += 1
        order, merged_order = merged_order, order
        key, merged_key = merged_key, key
        width *= 2
    return order


@njit(cache=True)
def _pack_step(lengths, num_ranks, cap):
    """Split one step's samples into packs.

    Returns (positions, offsets): pack p = micro_step * num_ranks + rank holds the samples at
    positions[offsets[p]:offsets[p + 1]] of `lengths`, in their original order.
    """
    n = lengths.shape[0]
    order = _order_longest_first(lengths)  # stable: ties keep shuffled order
    sizes = lengths[order]
    num_micro = (_min_bins(sizes, cap) + num_ranks - 1) // num_ranks
    while True:  # ends at the latest when every sample has its own bin
        num_bins = num_micro * num_ranks
        bin_of, loads = _lpt(sizes, num_bins)
        if loads[np.argmax(loads)] <= cap:  # argmax is compiled for _refine already; loads.max() would be one more
            break
        bin_of, loads, fits = _best_fit(sizes, num_bins, cap)
        if fits:
            break
        bin_of, loads = _lpt(sizes, num_bins)
        _refine(sizes, bin_of, loads, cap, REPAIR_ROUNDS)
        if loads[np.argmax(loads)] <= cap:
            break
        num_micro += 1
    if num_ranks > 1:  # balance only matters between the ranks of a micro-step
        _refine(sizes, bin_of, loads, cap, BALANCE_ROUNDS)

    # Heaviest bins first; consecutive groups of num_ranks bins form one micro-step. Empty bins sort
    # last, so a trailing micro-step with no samples at all is dropped.
    bin_order = _order_longest_first(loads)
    pack_of_bin = np.empty(num_bins, np.int64)
    used = 0
    for p in range(num_bins):
        pack_of_bin[bin_order[p]] = p
        if loads[p] > 0:
            used += 1
    num_packs = (used + num_ranks - 1) // num_ranks * num_ranks

    pack_of = np.empty(n, np.int64)  # pack of each sample, by original position
    for i in range(n):
        pack_of[order[i]] = pack_of_bin[bin_of[i]]
    offsets = np.zeros(num_packs + 1, np.int64)
    for i in range(n):
        offsets[pack_of[i] + 1] += 1
    for p in range(num_packs):
        offsets[p + 1] += offsets[p]
    fill = offsets[:-1].copy()
    positions = np.empty(n, np.int64)
    for i in range(n):
        positions[fill[pack_of[i]]] = i
        fill[pack_of[i]] += 1
    return positions, offsets


def _split(values: np.ndarray, offsets: np.ndarray, num_ranks: int) -> list[list[np.ndarray]]:
    """Cut `values` at `offsets` into [micro_step][rank] views."""
    bounds = offsets.tolist()
    return [
        [values[bounds[p] : bounds[p + 1]] for p in range(m, m + num_ranks)]
        for m in range(0, len(bounds) - 1, num_ranks)
    ]


def _pack_step_padded(lengths: np.ndarray, num_ranks: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """_pack_step for (n, 2) (source, target) lengths and padded micro-batches (see the module doc)."""
    order = np.argsort(-lengths.sum(axis=1), kind="mergesort")  # stable: ties keep shuffled order
    bins, current, longest = [], [], np.zeros(2, np.int64)
    for i in order.tolist():
        grown = np.maximum(longest, lengths[i])
        if current and (len(current) + 1) * int(grown.sum()) > cap:
            bins.append(current)
            current, grown = [], lengths[i].copy()
        current.append(i)
        longest = grown
    bins.append(current)
    bins += [[] for _ in range(-len(bins) % num_ranks)]  # every rank gets a pack in every micro-step
    offsets = np.cumsum([0, *map(len, bins)]).astype(np.int64)
    return np.asarray([i for b in bins for i in sorted(b)], dtype=np.int64), offsets


def plan_packs(lengths: np.ndarray, num_ranks: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, offsets) of one step's packs: padded micro-batches for (n, 2) lengths, packed rows for (n,)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    return (_pack_step_padded if lengths.ndim == 2 else _pack_step)(lengths, num_ranks, cap)


def pack_step(lengths: np.ndarray, num_ranks: int, cap: int) -> list[list[np.ndarray]]:
    """[micro_step][rank] -> positions into `lengths` (int64). Every length (or source + target) must fit in cap."""
    return _split(*plan_packs(lengths, num_ranks, cap), num_ranks)


# ---------------------------------------------------------------------------------------------


def _validate(lengths: np.ndarray, batch_size, max_tokens_per_rank, world_size, seed) -> None:
    """Collect every problem with the planner's inputs and raise them together."""
    problems = []
    if not (lengths.ndim == 1 or (lengths.ndim == 2 and lengths.shape[1] == 2)):
        problems.append(f"sample lengths must be a 1-D array (or (n, 2) for source-target), got shape {lengths.shape}")
    elif lengths.size == 0:
        problems.append("the dataset is empty (no samples to train on); check the output of process_data.py")
    elif not np.issubdtype(lengths.dtype, np.integer):
        problems.append(f"sample lengths must be integers, got dtype {lengths.dtype}; re-run process_data.py")
    for name, value, flag in (
        ("batch size", batch_size, "--batch-size"),
        ("max tokens per rank", max_tokens_per_rank, "--max-tokens-per-gpu"),
        ("world size", world_size, "the number of processes"),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{name} must be an integer >= 1, got {value!r}; set {flag}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    if problems:
        raise SamplerError("; ".join(problems))

    empty = int(np.count_nonzero(lengths < 1))
    if empty:
        raise SamplerError(f"{empty} samples have fewer than 1 token; re-run process_data.py")
    if lengths.ndim == 2:  # a source-target sample alone costs its source + its target
        lengths = lengths.sum(axis=1)
    too_long = lengths > max_tokens_per_rank
    if too_long.any():
        raise SamplerError(
            f"{int(too_long.sum())} samples are longer than --max-tokens-per-gpu={max_tokens_per_rank} "
            f"(longest: {int(lengths.max())} tokens) and cannot be placed; {FIX_TOO_LONG}"
        )


class MultipackPlanner:
    """Deterministic, resumable plan of packs per (optimizer step, micro-step, rank); see the module doc."""

    def __init__(self, lengths, batch_size: int, max_tokens_per_rank: int, world_size: int, seed: int = 0,
                 mixture=None):
        """`mixture` (minitrain/training/mixture.py): draws each epoch's samples instead of one shuffle of all of them."""
        lengths = np.asarray(lengths)
        _validate(lengths, batch_size, max_tokens_per_rank, world_size, seed)
        self.lengths = lengths.astype(np.int64)
        self.batch_size = int(batch_size)
        self.max_tokens_per_rank = int(max_tokens_per_rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.mixture = mixture
        self.epoch_size = len(self.lengths) if mixture is None else mixture.epoch_size
        self.steps_per_epoch = -(-self.epoch_size // self.batch_size)
        self._perm_epoch = -1  # the epoch whose shuffle is cached in _perm
        self._perm = np.empty(0, np.int64)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The epoch's shuffle of all sample indices (cached: consecutive steps reuse it)."""
        if epoch != self._perm_epoch:
            if self.mixture is None:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            else:
                self._perm = self.mixture.epoch_samples(epoch)
            self._perm_epoch = epoch
        return self._perm

    def plan(self, step: int) -> StepPlan:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise SamplerError(f"step must be an integer >= 0, got {step!r}")
        epoch, step_in_epoch = divmod(int(step), self.steps_per_epoch)
        start = step_in_epoch * self.batch_size
        indices = self.epoch_permutation(epoch)[start : start + self.batch_size]
        positions, offsets = plan_packs(self.lengths[indices], self.world_size, self.max_tokens_per_rank)
        return StepPlan(
            step=int(step),
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            micro_batches=_split(indices[positions], offsets, self.world_size),
            num_samples=len(indices),
        )

    def iter_steps(self, start_step: int = 0) -> Iterator[StepPlan]:
        """Plans for start_step, start_step + 1, ... forever, across epochs (the trainer stops it)."""
        step = start_step
        while True:
            yield self.plan(step)
            step += 1
