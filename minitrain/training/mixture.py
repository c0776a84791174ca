"""Data mixtures: several tokenized files in one run, each with a weight or a number of epochs.

    --data-path chat.jsonl:0.7 code.jsonl:0.3     weights: each epoch has as many samples as all files together,
                                                   70% of them drawn from chat.jsonl and 30% from code.jsonl
    --data-path chat.jsonl code.jsonl:2x          epochs: each epoch has every sample of chat.jsonl once and
                                                   every sample of code.jsonl twice (0.5x: half of them)

One form per run (all weights, or epochs where no suffix means 1x). A file's samples are drawn without replacement:
whole passes over its own seeded shuffle, then the first part of one more, a different shuffle in every epoch; the
epoch's draws of all files are then shuffled together. So the mixture is a pure function of (files, specs, seed,
epoch), the same on every rank and for any world size, and a resumed run draws what the interrupted one would have.
"""

import hashlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from minitrain.training.data import DataError, TokenCache

SPEC = re.compile(r"(?P<path>.+?):(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?P<epochs>x?)")


@dataclass(frozen=True)
class Source:
    path: str
    weight: float | None = None  # share of each epoch's samples
    epochs: float = 1.0  # passes over the file per epoch (when no weights are given)


MAX_EPOCH_SAMPLES = 2**31  # an epoch's plan holds an int64 per sample: 16 GiB at this many


def parse_sources(specs: list[str]) -> list[Source]:
    """`path`, `path:WEIGHT` or `path:Nx` -> Sources; a DataError (one line) for a mixture that cannot work."""
    sources = []
    for spec in specs:
        match = SPEC.fullmatch(spec)
        if match is None:
            sources.append(Source(spec))
        elif match["epochs"]:
            sources.append(Source(match["path"], epochs=float(match["value"])))
        else:
            sources.append(Source(match["path"], weight=float(match["value"])))
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) != len(sources):
        bare = [s.path for s in sources if s.weight is None]
        raise DataError(f"--data-path: {', '.join(bare)} have no weight while others do; give every file a weight "
                        f"(path:0.3) or use epochs for all (path:2x; no suffix = 1x)")
    for s in sources:
        if (s.weight is not None and not 0 < s.weight < math.inf) or not 0 < s.epochs < math.inf:
            raise DataError(f"--data-path {s.path}: weights and epochs must be positive finite numbers; give it one "
                            f"(path:0.3 or path:2x) or drop the file")
    if len({os.path.realpath(s.path) for s in sources}) != len(sources):  # ./a.jsonl, a link to it: the same file
        raise DataError("--data-path names a file twice; give it one weight or one number of epochs instead")
    return sources


class SegmentedTokens:
    """Several memory-mapped token arrays read as one: a sample never crosses two of them."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        k = int(np.searchsorted(self.starts, window.start, side="right")) - 1
        base = int(self.starts[k])
        return self.parts[k][window.start - base : window.stop - base]


def concat_caches(caches: list[TokenCache]) -> TokenCache:
    """One cache over several files' caches (no token is copied); `sources` says which file each sample is from."""
    if len(caches) == 1:
        return caches[0]
    token_starts = np.cumsum([0] + [int(c.offsets[-1]) for c in caches])
    offsets = np.concatenate([[0]] + [c.offsets[1:] + start for c, start in zip(caches, token_starts)])
    content = hashlib.blake2b("".join(c.content_hash for c in caches).encode(), digest_size=16).hexdigest()
    return TokenCache(
        input_ids=SegmentedTokens([c.input_ids for c in caches]),
        labels=SegmentedTokens([c.labels for c in caches]),
        offsets=offsets.astype(np.int64),
        trained=np.concatenate([c.trained for c in caches]),
        lines=np.concatenate([np.asarray(c.lines) for c in caches]),
        max_token_id=max(c.max_token_id for c in caches),
        skipped_lines=(),
        content_hash=content,
        sources=np.concatenate([np.full(len(c), k, dtype=np.int64) for k, c in enumerate(caches)]),
        source_lengths=np.concatenate([c.source_lengths for c in caches]) if caches[0].seq2seq else None,
    )


class Mixture:
    """Which samples each epoch holds. `members[k]`: the planner's sample numbers that come from file k."""

    def __init__(self, sources: list[Source], members: list[np.ndarray], seed: int):
        self.sources, self.members, self.seed = sources, members, seed
        sizes = np.array([len(m) for m in members])
        if sources[0].weight is not None:
            weights = np.array([s.weight for s in sources])
            self.counts = np.rint(weights / weights.sum() * sizes.sum()).astype(np.int64)
        else:
            counts = np.rint(np.array([s.epochs for s in sources]) * sizes)
            if counts.sum() > MAX_EPOCH_SAMPLES:
                k = int(np.argmax(counts))
                raise DataError(f"--data-path {sources[k].path}:{sources[k].epochs:g}x: an epoch of the mixture would "
                                f"hold {counts.sum():,.0f} samples, more than {MAX_EPOCH_SAMPLES:,}; lower the epochs")
            self.counts = counts.astype(np.int64)
        empty = [s.path for s, n in zip(sources, sizes) if n == 0]  # weighted or in passes: it would add nothing
        if empty:
            raise DataError(f"--data-path {empty[0]}: no training sample left in it; drop it from the mixture")
        self.epoch_size = int(self.counts.sum())
        if self.epoch_size == 0:
            raise DataError("--data-path: the mixture draws no sample per epoch; raise the weights or epochs")

    def epoch_samples(self, epoch: int) -> np.ndarray:
        draws = []
        for k, (members, count) in enumerate(zip(self.members, self.counts)):
            passes = -(-int(count) // len(members)) if count else 0
            order = [members[np.random.default_rng([self.seed, epoch, k, p]).permutation(len(members))]
                     for p in range(passes)]
            draws.append(np.concatenate(order)[:count] if order else np.zeros(0, np.int64))
        drawn = np.concatenate(draws)
        return drawn[np.random.default_rng([self.seed, epoch]).permutation(len(drawn))]

    def describe(self) -> str:
        return ", ".join(f"{s.path}: {c} per epoch (of {len(m)})"
                         for s, c, m in zip(self.sources, self.counts, self.members))

    def fingerprint(self) -> str:
        return "mixture " + ", ".join(f"{c}/{len(m)}" for c, m in zip(self.counts, self.members))
