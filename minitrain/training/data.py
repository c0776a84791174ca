"""Stage-2 data: a memory-mapped token cache built once from process_data.py's JSONL, and packed rows read from it.

The cache is four flat arrays: every sample's `input_ids` concatenated (int32, memory-mapped, so the ranks of a
node share one copy through the page cache) with a one-byte trained mask beside them (labels are the input ids where
the mask is 1, IGNORE elsewhere: process_data.py's labels are never anything else, so they cost 1 byte per token, not
4), `offsets` (sample i is tokens offsets[i]:offsets[i+1]) and `trained` (tokens each sample trains on after the
shift). Per rank, memory grows with the number of samples
(offsets, trained, lengths), never with the number of tokens. meta.json holds a hash of the tokens and labels, which
the data fingerprint of a checkpoint includes.

Label shift: position t of a sample predicts labels[t + 1] of the SAME sample. The last token of a sample predicts
nothing, so no sample ever learns to predict the first token of the next sample in its pack.

Preference data (process_data.py --input-format preference: chosen_input_ids/chosen_labels/rejected_input_ids/
rejected_labels rows) gives a cache of PAIRS: sample i is the pair's chosen sequence followed by its rejected one,
`chosen_lengths[i]` tokens of chosen, so a pair's length is the planner's cost of both sequences and a pair can never
be split across micro-steps or ranks. The shift stays inside each sequence (objectives.make_pair_pack).

Unpaired data for KTO (process_data.py on prompt/completion/label or messages/label rows: input_ids/labels/len rows
with a boolean `label`, true = desirable) gives a cache of LABELLED samples: `desirable[i]` is the label,
`prompt_lengths[i]` where the sample's completion starts (its first token trained after the shift) and
`prompt_hashes[i]` a hash of the tokens before it, so that the objective can pair each prompt with another prompt's
completion (objectives.KTO).

Encoder-decoder data (process_data.py with a T5/BART model: rows with `target_len`, input_ids = the source, labels =
the target) gives a cache of SOURCE-TARGET samples: sample i is its source (`source_lengths[i]` tokens, labels
IGNORE) followed by its target (labels = the target ids, every one trained, no shift: the decoder's input is the
target shifted right by the model's own rule, see seq2seq.py). Micro-batches are padded, not packed: an encoder's
attention cannot be split into samples through position ids.
"""

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
import torch

from minitrain import IGNORE, atomic  # noqa: F401 (IGNORE: stage 2 imports it from here)
from minitrain.training.distributed import World, folder_owners, print0, raise_if_any_rank_failed

CACHE_VERSION = 5  # 2: meta.json holds the content hash; 3: a one-byte trained mask instead of int32 labels;
#                   4: pairs' margins (margins.npy); 5: KTO's labelled samples (desirable, prompt_lengths,
#                   prompt_hashes)


class DataError(ValueError):
    """Bad training data; the message names the file and line and says how to fix it."""


@dataclass(frozen=True)
class TokenCache:
    input_ids: np.ndarray  # (total_tokens,) int32, memory-mapped
    labels: "MaskedLabels"  # (total_tokens,) int32 when sliced; IGNORE where not trained
    offsets: np.ndarray  # (num_samples + 1,) int64
    trained: np.ndarray  # (num_samples,) int64, trained tokens after the shift
    lines: np.ndarray  # (num_samples,) int64, 1-based line of each sample in the data file, memory-mapped
    max_token_id: int
    skipped_lines: tuple[int, ...]  # lines dropped because nothing in them is trained after the shift
    content_hash: str  # blake2b of input_ids and labels: the tokens themselves, for the resume check
    sources: np.ndarray | None = None  # (num_samples,) which --data-path file each sample is from (mixtures)
    chosen_lengths: np.ndarray | None = None  # (num_pairs,) int64 for a cache of preference pairs, else None
    margins: np.ndarray | None = None  # (num_pairs,) float64: the pairs' `margin` field (reward models), if any has it
    source_lengths: np.ndarray | None = None  # (num_samples,) int64 for a cache of source-target samples, else None
    desirable: np.ndarray | None = None  # (num_samples,) bool for a cache of labelled (KTO) samples, else None
    prompt_lengths: np.ndarray | None = None  # (num_samples,) int64, labelled samples: where the completion starts
    prompt_hashes: np.ndarray | None = None  # (num_samples,) uint64, labelled samples: a hash of the prompt's tokens
    directory: Path | None = None  # where the cache lives (files keyed to it, e.g. reference log-probs, go here)
    writer: bool = True  # whether this rank writes the files that go beside it (one rank per copy of the folder)

    @property
    def pairs(self) -> bool:
        return self.chosen_lengths is not None

    @property
    def seq2seq(self) -> bool:
        return self.source_lengths is not None

    @property
    def unpaired(self) -> bool:
        """Labelled samples (KTO): each a prompt and a completion that is desirable or not."""
        return self.desirable is not None

    def padded_tokens(self, indices: np.ndarray) -> int:
        """What a micro-batch of these source-target samples costs, padded: samples x (longest source + longest
        target); for packed rows, their tokens."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0 or not self.seq2seq:
            return int(self.lengths[indices].sum())
        sources = self.source_lengths[indices]
        return len(indices) * int(sources.max() + (self.lengths[indices] - sources).max())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


class MaskedLabels:
    """The labels of a cache, stored as the input ids and a one-byte trained mask: labels[a:b] is the int32 array
    of input_ids[a:b] where trained, IGNORE elsewhere (for slices, as every reader takes them)."""

    def __init__(self, input_ids: np.ndarray, mask: np.ndarray):
        self.input_ids, self.mask = input_ids, mask

    def __len__(self) -> int:
        return len(self.mask)

    def __getitem__(self, window: slice) -> np.ndarray:
        return np.where(self.mask[window] != 0, self.input_ids[window], IGNORE).astype(np.int32)


def cache_dir_for(data_path: Path, cache_root: Path) -> Path:
    """The cache folder for this exact data file: a changed file (size or mtime) gets a fresh cache."""
    stat = data_path.stat()
    return cache_root / f"{data_path.name}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_VERSION}"


ROW_KINDS = {"samples": "samples", "pairs": "preference pairs", "seq2seq": "encoder-decoder (source-target) samples",
             "unpaired": "labelled (KTO) samples"}


def row_kind_of(row: dict) -> str:
    if "chosen_input_ids" in row:
        return "pairs"
    return "seq2seq" if "target_len" in row else "unpaired" if "label" in row else "samples"


def sample_label(row: dict, where: str) -> bool:
    """A labelled sample's `label` (true: desirable), a JSON boolean, or a DataError naming FILE:LINE."""
    if "label" not in row:
        raise DataError(f"{where}: a row without a 'label' field in a file of labelled (KTO) samples; every row "
                        f"needs \"label\": true or false; re-run process_data.py")
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: 'label' must be true or false, got {row['label']!r}; re-run process_data.py")
    return row["label"]


def completion_start(labels: np.ndarray) -> int:
    """Where a labelled sample's completion starts: its first token trained after the shift (labels[0] never is)."""
    return 1 + int(np.flatnonzero(labels[1:] != IGNORE)[0])


def prompt_hash(input_ids: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes(),
                                          digest_size=8).digest(), "little")


PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def load_json_row(raw: bytes, where: str) -> dict:
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def parse_row(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One JSONL row -> (input_ids, labels) as int32 arrays, or a DataError naming `where` (FILE:LINE)."""
    return parse_sequence(load_json_row(raw, where), where)


def parse_pair_row(row: dict, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One preference row -> (chosen input_ids, chosen labels, rejected input_ids, rejected labels)."""
    fix = "re-run process_data.py --input-format preference"
    for key in PAIR_KEYS:
        if key not in row:
            raise DataError(f"{where}: preference row has no {key!r} field; {fix}")
    sides = [parse_sequence(row, where, prefix) for prefix in ("chosen_", "rejected_")]
    return (*sides[0], *sides[1])


def pair_margin(row: dict, where: str) -> float | None:
    """A pair's optional `margin` (TRL's reward-model field), a finite number, or a DataError naming FILE:LINE."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DataError(f"{where}: `margin` must be a finite number, got {value!r}; re-run process_data.py")
    return float(value)


def parse_seq2seq_row(row: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One encoder-decoder row -> (source ids, target ids) as int32 arrays; every target token is trained."""
    fix = "re-run process_data.py with the encoder-decoder model"
    arrays = []
    for key in ("input_ids", "labels"):
        values = row.get(key)
        if not (isinstance(values, list) and values and set(map(type, values)) == {int}):
            raise DataError(f"{where}: {key!r} must be a non-empty list of integers (flat, no booleans); {fix}")
        ids = np.array(values, dtype=np.int64) if max(map(abs, values)) < 2**62 else None
        if ids is None or ids.min() < 0 or ids.max() >= 2**31:
            what = "every target token is trained, so labels hold no -100" if key == "labels" else "ids"
            raise DataError(f"{where}: {key!r} must be token ids in [0, 2^31) ({what}); {fix}")
        arrays.append(ids.astype(np.int32))
    source, target = arrays
    for key, array in (("len", source), ("target_len", target)):
        if key in row and row[key] != len(array):
            raise DataError(f"{where}: {key!r} is {row[key]} but there are {len(array)} tokens; {fix}")
    return source, target


def parse_sequence(row: dict, where: str, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """row[prefix + input_ids], row[prefix + labels] checked (and row[prefix + len] if present), as int32 arrays."""
    fix = "re-run process_data.py to produce input_ids/labels/len rows"
    for key in ("input_ids", "labels"):
        if prefix + key not in row:
            raise DataError(f"{where}: row has no {prefix + key!r} field; {fix}")
    arrays = []
    for key in (prefix + "input_ids", prefix + "labels"):
        values = row[key]
        # Exactly Python ints: no floats, no nested lists (np.asarray would raise on ragged ones), no bools (an int
        # subclass that np.asarray would quietly turn into 0 and 1).
        if not (isinstance(values, list) and values and set(map(type, values)) == {int}):
            raise DataError(f"{where}: {key!r} must be a non-empty list of integers (flat, no booleans); {fix}")
        try:
            arrays.append(np.array(values, dtype=np.int64))
        except OverflowError:
            raise DataError(f"{where}: {key!r} holds an integer outside the 64-bit range; {fix}") from None
    input_ids, labels = arrays
    if len(input_ids) != len(labels):
        raise DataError(f"{where}: {len(input_ids)} {prefix}input_ids but {len(labels)} {prefix}labels; they must "
                        f"match; {fix}")
    if prefix + "len" in row and row[prefix + "len"] != len(input_ids):
        raise DataError(f"{where}: {prefix + 'len'!r} is {row[prefix + 'len']} but there are {len(input_ids)} "
                        f"{prefix}input_ids; {fix}")
    if input_ids.min() < 0 or input_ids.max() >= 2**31:
        raise DataError(f"{where}: {prefix}input_ids must be in [0, 2^31); {fix}")
    trained = labels != IGNORE
    if not np.array_equal(labels[trained], input_ids[trained]):
        t = int(np.flatnonzero(trained & (labels != input_ids))[0])
        raise DataError(
            f"{where}: {prefix}labels[{t}] = {labels[t]} but {prefix}input_ids[{t}] = {input_ids[t]}; labels must be "
            f"{IGNORE} or equal to input_ids at the same (unshifted) position; {fix}"
        )
    return input_ids.astype(np.int32), labels.astype(np.int32)


def build_token_cache(data_path: Path, cache_dir: Path) -> None:
    """Stream the JSONL once into flat binary files in a temporary folder, then rename it into place (atomic.py):
    a crash leaves only a hidden `.*.tmp-*` folder behind, never a cache that looks complete."""
    offsets, trained, lines, skipped, chosen_lengths, source_lengths, margins = [0], [], [], [], [], [], []
    desirable, prompt_lengths, prompt_hashes = [], [], []  # labelled (KTO) samples
    kind, pairs = None, False  # the first row decides: a file of samples, preference pairs or source-target samples
    max_token_id = -1
    ids_hash, labels_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    # replace=False: if another node's writer got there first (shared filesystem), its identical cache is kept.
    complete = lambda folder: (folder / "meta.json").exists()  # noqa: E731
    with atomic.atomic_folder(cache_dir, tag=f"{os.uname().nodename}-", replace=False, complete=complete) as tmp:
        ids_out, labels_out = open(tmp / "input_ids.bin", "wb"), open(tmp / "trained_mask.bin", "wb")
        with open(data_path, "rb") as f, ids_out, labels_out:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{data_path}:{line_no}"
                row = load_json_row(raw, where)
                row_kind = row_kind_of(row)
                if kind is None:
                    kind, pairs = row_kind, row_kind == "pairs"
                missing_label = kind == "unpaired" and row_kind == "samples"  # sample_label says so below
                if row_kind != kind and kind != "pairs" and not missing_label:  # in a pairs file: say what is missing
                    raise DataError(f"{where}: a row of {ROW_KINDS[row_kind]} in a file of {ROW_KINDS[kind]} (line 1 "
                                    f"is one); one kind of row per file")
                if kind == "seq2seq":
                    source, target = parse_seq2seq_row(row, where)
                    input_ids = np.concatenate([source, target])
                    labels = np.concatenate([np.full(len(source), IGNORE, dtype=np.int32), target])
                    n_trained = len(target)
                    source_lengths.append(len(source))
                elif pairs:
                    chosen_ids, chosen_labels, rejected_ids, rejected_labels = parse_pair_row(row, where)
                    input_ids = np.concatenate([chosen_ids, rejected_ids])
                    labels = np.concatenate([chosen_labels, rejected_labels])
                    # each side's own shift; a pair trains only if both sides do
                    sides = [int((lab[1:] != IGNORE).sum()) for lab in (chosen_labels, rejected_labels)]
                    n_trained = sum(sides) if min(sides) > 0 else 0
                else:
                    input_ids, labels = parse_sequence(row, where)
                    n_trained = int((labels[1:] != IGNORE).sum())  # after the shift, labels[0] is never predicted
                    label = sample_label(row, where) if kind == "unpaired" else None
                if n_trained == 0:
                    skipped.append(line_no)
                    continue
                if pairs:
                    chosen_lengths.append(len(chosen_ids))
                    margins.append(pair_margin(row, where))
                if kind == "unpaired":
                    start = completion_start(labels)
                    desirable.append(label)
                    prompt_lengths.append(start)
                    prompt_hashes.append(prompt_hash(input_ids[:start]))
                # Labels are the input ids or IGNORE (parse_sequence refuses anything else; a seq2seq sample's
                # labels are its target ids, its input ids there): the mask says which.
                input_ids.tofile(ids_out)
                (labels != IGNORE).astype(np.uint8).tofile(labels_out)
                ids_hash.update(input_ids.tobytes())
                labels_hash.update(labels.tobytes())  # the int32 labels, as before: the same data, the same hash
                offsets.append(offsets[-1] + len(input_ids))
                trained.append(n_trained)
                lines.append(line_no)
                max_token_id = max(max_token_id, int(input_ids.max()))
        if not trained and not skipped:
            raise DataError(f"{data_path}: the file is empty (no rows); pass the JSONL written by process_data.py")
        if not trained:
            raise DataError(f"{data_path}: no sample has any trained token; check the labels from process_data.py")
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "trained.npy", np.asarray(trained, dtype=np.int64))
        np.save(tmp / "lines.npy", np.asarray(lines, dtype=np.int64))
        if pairs:
            np.save(tmp / "chosen_lengths.npy", np.asarray(chosen_lengths, dtype=np.int64))
        has_margins = any(m is not None for m in margins)
        if has_margins:  # a pair without one: margin 0
            margins = np.asarray([0.0 if m is None else m for m in margins], dtype=np.float64)
            np.save(tmp / "margins.npy", margins)
        if kind == "seq2seq":
            np.save(tmp / "source_lengths.npy", np.asarray(source_lengths, dtype=np.int64))
        if kind == "unpaired":
            np.save(tmp / "desirable.npy", np.asarray(desirable, dtype=bool))
            np.save(tmp / "prompt_lengths.npy", np.asarray(prompt_lengths, dtype=np.int64))
            np.save(tmp / "prompt_hashes.npy", np.asarray(prompt_hashes, dtype=np.uint64))
        # The sample boundaries are in offsets; these two hashes pin down the tokens and labels within them.
        content_hash = hashlib.blake2b(ids_hash.digest() + labels_hash.digest(), digest_size=16)
        if pairs:  # where each pair's chosen side ends is part of the content too
            content_hash.update(np.asarray(chosen_lengths, dtype=np.int64).tobytes())
        if has_margins:
            content_hash.update(margins.tobytes())
        if kind == "seq2seq":  # and where each sample's source ends
            content_hash.update(np.asarray(source_lengths, dtype=np.int64).tobytes())
        if kind == "unpaired":  # and each sample's label (where its completion starts follows from the labels)
            content_hash.update(np.asarray(desirable, dtype=bool).tobytes())
        content_hash = content_hash.hexdigest()
        meta = {"source": str(data_path), "max_token_id": max_token_id, "skipped_lines": skipped,
                "content_hash": content_hash, "pairs": bool(pairs), "margins": has_margins,
                "seq2seq": kind == "seq2seq", "unpaired": kind == "unpaired"}
        (tmp / "meta.json").write_text(json.dumps(meta))


def open_token_cache(cache_dir: Path) -> TokenCache:
    meta = json.loads((cache_dir / "meta.json").read_text())
    offsets = np.load(cache_dir / "offsets.npy")
    total = int(offsets[-1])
    input_ids = np.memmap(cache_dir / "input_ids.bin", dtype=np.int32, mode="r", shape=(total,))
    mask = np.memmap(cache_dir / "trained_mask.bin", dtype=np.uint8, mode="r", shape=(total,))
    return TokenCache(
        input_ids=input_ids,
        labels=MaskedLabels(input_ids, mask),
        offsets=offsets,
        trained=np.load(cache_dir / "trained.npy"),
        lines=np.load(cache_dir / "lines.npy", mmap_mode="r"),
        max_token_id=meta["max_token_id"],
        skipped_lines=tuple(meta["skipped_lines"]),
        content_hash=meta["content_hash"],
        chosen_lengths=np.load(cache_dir / "chosen_lengths.npy") if meta.get("pairs") else None,
        margins=np.load(cache_dir / "margins.npy") if meta.get("margins") else None,
        source_lengths=np.load(cache_dir / "source_lengths.npy") if meta.get("seq2seq") else None,
        **({name: np.load(cache_dir / f"{name}.npy") for name in ("desirable", "prompt_lengths", "prompt_hashes")}
           if meta.get("unpaired") else {}),
        directory=cache_dir,
    )


def cache_root(config) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "token_cache"


def cache_writer(config, world: World) -> bool:
    """Collective: whether this rank builds (and writes beside) the token caches. One rank per copy of the cache
    folder: rank 0 alone when every node sees the same folder (the default, inside the shared --output-dir), the
    lowest rank of each node when --cache-dir is node-local; never several nodes into one folder at once."""
    if world.world_size == 1:
        return True
    return folder_owners(cache_root(config), world)[world.rank] == world.rank


def load_data(config, world: World, vocab_size: int, path: str | None = None, writer: bool | None = None) -> TokenCache:
    """The cache's writer (cache_writer) builds the token cache once (others wait); every rank then memory-maps it.

    `path`: the file to load, --data-path by default (the validation file passes its own).
    """
    data_path = Path(path or config.data_path[0]).resolve()
    cache_dir = cache_dir_for(data_path, cache_root(config))
    writer = cache_writer(config, world) if writer is None else writer
    error = None
    if writer and not (cache_dir / "meta.json").exists():
        print0(f"building token cache {cache_dir}")
        try:
            build_token_cache(data_path, cache_dir)
        except DataError as e:
            error = e
        except Exception as e:  # e.g. a full disk: still tell the other ranks, or they wait forever
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the exception says
            error = DataError(f"cannot build the token cache in {cache_dir} from {data_path}: {reason}")
    raise_if_any_rank_failed(error, DataError)
    cache = replace(open_token_cache(cache_dir), writer=writer)
    if cache.skipped_lines:
        lines = ", ".join(map(str, cache.skipped_lines[:10])) + (", ..." if len(cache.skipped_lines) > 10 else "")
        what = "pairs with a side that has" if cache.pairs else "samples with"
        print0(f"{data_path}: dropped {len(cache.skipped_lines)} {what} no trained token after the shift "
               f"(lines {lines})")
    sp = max(1, getattr(config, "sequence_parallel_size", 1))  # S ranks share a row of S x the per-GPU budget
    limit = config.max_tokens_per_gpu * sp
    too_long = np.flatnonzero(cache.lengths > limit)
    if len(too_long):
        i = int(too_long[0])
        budget = f"--max-tokens-per-gpu {config.max_tokens_per_gpu}" + (
            f" x --sequence-parallel-size {sp} = {limit}" if sp > 1 else "")
        raise DataError(
            f"{data_path}:{cache.lines[i]}: {'pair (chosen + rejected)' if cache.pairs else 'sample'} is "
            f"{cache.lengths[i]} tokens, longer than {budget} ({len(too_long)} samples are); raise "
            f"--max-tokens-per-gpu or --sequence-parallel-size, or re-run process_data.py with a smaller maximum "
            f"length"
        )
    if cache.max_token_id >= vocab_size:
        raise DataError(
            f"{data_path}: token id {cache.max_token_id} is outside the model's vocabulary ({vocab_size}); "
            f"tokenize the data with this model's tokenizer"
        )
    return cache


@dataclass(frozen=True)
class Pack:
    """One rank's micro-batch: a single row of concatenated samples."""

    input_ids: torch.Tensor  # (1, T) long
    position_ids: torch.Tensor  # (1, T) long, restarts at 0 at every sample
    positions: torch.Tensor  # (N,) long, the positions whose next token is trained
    targets: torch.Tensor  # (N,) long, the token each of those positions must predict
    num_tokens: int  # real tokens (0 for a dummy pack)
    sample_of_target: np.ndarray  # (N,) int64, which of the pack's samples each target belongs to
    cu_seq_lens: torch.Tensor  # (samples + 1,) int32, where each sample starts, for variable-length attention
    max_length: int  # the longest sample

    def to(self, device: torch.device) -> "Pack":
        """On the device; from pinned memory and without waiting, on CUDA."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

        tensors = (self.input_ids, self.position_ids, self.positions, self.targets)
        return Pack(*map(move, tensors), self.num_tokens, self.sample_of_target, move(self.cu_seq_lens),
                    self.max_length)


def make_pack(cache: TokenCache, indices: np.ndarray) -> Pack:
    """Concatenate the samples `indices` into one row; an empty `indices` gives a 1-token dummy pack with no target.

    The dummy still runs a real forward/backward (see loss.py) so that every rank issues the same FSDP collectives.
    """
    if len(indices) == 0:
        zero = torch.zeros((1, 1), dtype=torch.long)
        empty = torch.zeros((0,), dtype=torch.long)
        return Pack(zero, zero.clone(), empty, empty.clone(), 0, np.zeros(0, dtype=np.int64),
                    torch.tensor([0, 1], dtype=torch.int32), 1)
    ids, pos, targets = [], [], []
    for i in indices:
        start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
        labels = cache.labels[start:end]
        ids.append(cache.input_ids[start:end])
        pos.append(np.arange(end - start))
        targets.append(np.append(labels[1:], IGNORE))  # shift inside the sample: the last token predicts nothing
    targets = np.concatenate(targets)
    positions = np.flatnonzero(targets != IGNORE)
    sizes = [len(p) for p in pos]
    sample_of_position = np.repeat(np.arange(len(indices)), sizes)
    return Pack(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
        position_ids=torch.from_numpy(np.concatenate(pos))[None],
        positions=torch.from_numpy(positions),
        targets=torch.from_numpy(targets[positions].astype(np.int64)),
        num_tokens=len(targets),
        sample_of_target=sample_of_position[positions],
        cu_seq_lens=torch.from_numpy(np.cumsum([0, *sizes]).astype(np.int32)),
        max_length=max(sizes),
    )


@dataclass(frozen=True)
class Seq2SeqPack:
    """One rank's micro-batch of source-target samples, padded on the right: sources to the longest source (attention
    mask 0 after each), targets to the longest target (label IGNORE after each). The decoder's input is the model's
    own shift of the labels (Seq2SeqLM), so decoder position t predicts target token t."""

    input_ids: torch.Tensor  # (B, S) long, sources, pad after each
    attention_mask: torch.Tensor  # (B, S) long, 1 on source tokens
    labels: torch.Tensor  # (B, T) long, targets, IGNORE after each
    positions: torch.Tensor  # (N,) long, flat indices into (B * T) of the trained target tokens
    targets: torch.Tensor  # (N,) long, the target token at each of those positions
    num_tokens: int  # real tokens, sources and targets (0 for a dummy pack)
    padded_tokens: int  # B * (S + T): what the micro-batch costs
    sample_of_target: np.ndarray  # (N,) int64, which of the pack's samples each target belongs to

    def to(self, device: torch.device) -> "Seq2SeqPack":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

        tensors = (self.input_ids, self.attention_mask, self.labels, self.positions, self.targets)
        return Seq2SeqPack(*map(move, tensors), self.num_tokens, self.padded_tokens, self.sample_of_target)


def make_seq2seq_pack(cache: TokenCache, indices: np.ndarray, pad_id: int) -> Seq2SeqPack:
    """The source-target samples `indices` as one padded micro-batch; an empty `indices` gives a dummy (one token on
    each side, nothing trained) that still runs a forward/backward, so every rank issues the same FSDP collectives."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        # a label that is not the pad token: mBART's shift looks for the last non-pad label
        one, label = torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), int(pad_id == 0))
        empty = torch.zeros(0, dtype=torch.long)
        return Seq2SeqPack(one, torch.ones((1, 1), dtype=torch.long), label, empty, empty.clone(), 0, 0,
                           np.zeros(0, np.int64))
    starts, sources = cache.offsets[indices], cache.source_lengths[indices]
    targets_len = cache.offsets[indices + 1] - starts - sources
    batch, s_max, t_max = len(indices), int(sources.max()), int(targets_len.max())
    ids = np.full((batch, s_max), pad_id, dtype=np.int64)
    labels = np.full((batch, t_max), IGNORE, dtype=np.int64)
    for row, (start, n_source, n_target) in enumerate(zip(starts.tolist(), sources.tolist(), targets_len.tolist())):
        ids[row, :n_source] = cache.input_ids[start : start + n_source]
        labels[row, :n_target] = cache.labels[start + n_source : start + n_source + n_target]
    flat = np.flatnonzero(labels != IGNORE)
    return Seq2SeqPack(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy((np.arange(s_max) < sources[:, None]).astype(np.int64)),
        labels=torch.from_numpy(labels),
        positions=torch.from_numpy(flat),
        targets=torch.from_numpy(labels.reshape(-1)[flat]),
        num_tokens=int(sources.sum() + targets_len.sum()),
        padded_tokens=batch * (s_max + t_max),
        sample_of_target=flat // t_max,
    )
