"""Offline distillation's teacher (--objective distill --teacher-model PATH): its k likeliest next tokens and their
log-probs at every trained position of a token cache, computed once, stored beside the cache, and reused by a
resumed run or a later one on the same data (the loss is in loss.TopKTeacher, the objective in objectives.Distill).

    <output-dir>/token_cache/<data cache>/teacher_topk-<key>/ids.npy       (trained tokens, k) int32
                                                             logprobs.npy  (trained tokens, k) float32
                                                             meta.json

Rows follow the cache: sample i's trained positions, in order (objectives.TeacherTable). The log-probs are the
teacher's at temperature 1 over its whole vocabulary; the loss renormalises them over the k ids at
--distill-temperature, so another temperature or alpha reuses the table. The key, as for DPO's reference table
(reference.model_key): the teacher's folder (config, weight files by name, size and mtime), k and the device type
(bf16 on CUDA and fp32 on CPU give different numbers).

The pass runs before the student is built, so the two models are never in memory together: the teacher is built as
a student would be (model.build_model: FSDP2-sharded, each rank reading its shards), in eval mode, run, and freed.
The ranks share the samples as DPO's reference pass does (reference.sharded_pass); the table is assembled in blocks
of about BLOCK_BYTES, each summed over the ranks (every row is computed by one rank, zeros elsewhere) and written by
the cache folder's writer into a memory-mapped file, so no rank ever holds the whole table. Every rank then
memory-maps it. The teacher must have the student's tokenizer (check_teacher, before any weight loads).
"""

import json
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain import atomic
from minitrain.training.config import ConfigError
from minitrain.training.data import DataError, TokenCache, make_pack
from minitrain.training.distributed import (
    World,
    compute_autocast,
    gathered_once,
    print0,
    raise_if_any_rank_failed,
    reshard,
)
from minitrain.training.model import ModelError, build_model
from minitrain.training.objectives import TeacherTable
from minitrain.training.reference import (
    model_key,
    on_every_rank,
    reference_mode,
    sharded_pass,
)

VERSION = 1
TABLE = "teacher_topk"
BLOCK_BYTES = 256 * 2**20  # the pass sums the table over the ranks in blocks of about this size


def bytes_per_token(k: int) -> int:
    """What the table stores per trained token: k int32 ids and k float32 log-probs."""
    return k * (np.dtype(np.int32).itemsize + np.dtype(np.float32).itemsize)


# ----------------------------------------------------------------------------------------------------------------
# The teacher must speak the student's token ids


def vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """How two tokenizers' vocabularies (token -> id) differ, in words; None when they are the same."""
    if teacher == student:
        return None
    sizes = f"{len(teacher)} tokens vs the student's {len(student)}"
    for token, i in sorted(student.items(), key=lambda item: item[1]):
        if teacher.get(token) != i:
            there = "absent" if token not in teacher else f"id {teacher[token]}"
            return f"{sizes}; the student's token {token!r} (id {i}) is {there} in the teacher's"
    return f"{sizes}; the teacher has tokens the student lacks"


def check_teacher(config, hf_config, tokenizer) -> None:
    """Refuse in one line, before any weight loads, a teacher whose token ids do not mean the student's (another
    tokenizer, another vocabulary size), an encoder-decoder teacher, and a top-k larger than the vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    flag = f"--teacher-model {config.teacher_model}"
    try:
        teacher_config = AutoConfig.from_pretrained(config.teacher_model)
        teacher_tokenizer = AutoTokenizer.from_pretrained(config.teacher_model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: cannot load its config and tokenizer ({' '.join(str(e).split())[:300]}); pass the "
                          f"teacher's Hugging Face folder, tokenizer included") from None
    if teacher_config.is_encoder_decoder:
        raise ConfigError(f"{flag}: an encoder-decoder ({teacher_config.model_type}); --objective distill's teacher is "
                          f"a causal LM")
    difference = vocabulary_difference(teacher_tokenizer.get_vocab(), tokenizer.get_vocab())
    if difference is not None:
        raise ConfigError(f"{flag}: its tokenizer is not the student's ({config.model_name_or_path}): {difference}; "
                          f"distillation compares the two models' probabilities of the same token ids, so pick a "
                          f"teacher with the student's tokenizer")
    if teacher_config.vocab_size != hf_config.vocab_size:
        raise ConfigError(f"{flag}: its logits cover {teacher_config.vocab_size} ids (config.json vocab_size), the "
                          f"student's {hf_config.vocab_size}; pick a teacher with the student's tokenizer and "
                          f"vocabulary size")
    if config.distill_top_k > hf_config.vocab_size:
        raise ConfigError(f"--distill-top-k {config.distill_top_k} is more than the {hf_config.vocab_size} ids of the "
                          f"vocabulary; lower it")


# ----------------------------------------------------------------------------------------------------------------
# The table: read, or computed once


def read_table(path: Path, cache: TokenCache, k: int) -> TeacherTable | None:
    """The table at `path` memory-mapped, or None if there is none complete for this cache and k."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    row_starts = np.concatenate([[0], np.cumsum(cache.trained)]).astype(np.int64)
    rows = int(row_starts[-1])
    if (meta.get("rows"), meta.get("top_k"), meta.get("content_hash")) != (rows, k, cache.content_hash):
        return None
    try:
        ids = np.load(path / "ids.npy", mmap_mode="r")
        logprobs = np.load(path / "logprobs.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if ids.shape != (rows, k) or logprobs.shape != (rows, k):
        return None
    return TeacherTable(ids, logprobs, row_starts)


def blocks(trained: np.ndarray, rows_per_block: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges [first, last) of at most `rows_per_block` trained tokens (one sample at least)."""
    bounds, first, rows = [], 0, 0
    for i, n in enumerate(trained.tolist()):
        if i > first and rows + n > rows_per_block:
            bounds.append((first, i))
            first, rows = i, 0
        rows += n
    bounds.append((first, len(trained)))
    return bounds


def block_table(model, cache: TokenCache, indices: np.ndarray, row_starts: np.ndarray, k: int, max_tokens: int,
                world: World) -> tuple[np.ndarray, np.ndarray]:
    """Collective: the (ids, log-probs) rows of the samples `indices` (consecutive), each computed by one rank."""
    first = int(row_starts[indices[0]])
    rows = int(row_starts[indices[-1] + 1]) - first
    ids = torch.zeros((rows, k), dtype=torch.int32, device=world.device)  # what the table stores (ids < 2**31)
    logprobs = torch.zeros((rows, k), dtype=torch.float32, device=world.device)
    for mine, _ in sharded_pass(cache.lengths, indices, world, max_tokens):
        pack = make_pack(cache, mine).to(world.device)
        with compute_autocast(model, world.device):
            top_ids, top_logprobs = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets,
                                          cu_seq_lens=pack.cu_seq_lens, max_length=pack.max_length, top_k=k)
        if len(mine):  # the pack's targets are its samples' trained positions, sample by sample
            where = np.concatenate([np.arange(row_starts[i], row_starts[i + 1]) for i in mine]) - first
            where = torch.from_numpy(where).to(world.device)
            ids[where], logprobs[where] = top_ids.to(ids.dtype), top_logprobs.float()
    if dist.is_initialized():
        dist.all_reduce(ids)
        dist.all_reduce(logprobs)
    return ids.cpu().numpy(), logprobs.cpu().numpy()


@torch.no_grad()
def compute_table(model, cache: TokenCache, k: int, max_tokens: int, world: World, path: Path, teacher: str) -> None:
    """Collective: the teacher's top-k at every trained position of `cache`, written to `path` (atomically) by the
    cache folder's writer."""
    row_starts = np.concatenate([[0], np.cumsum(cache.trained)]).astype(np.int64)
    rows = int(row_starts[-1])
    with (atomic.atomic_folder(path) if cache.writer else nullcontext()) as folder, reference_mode(model), \
            gathered_once(model):
        out = None
        if folder is not None:
            out = [np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=(rows, k))
                   for name, dtype in (("ids.npy", np.int32), ("logprobs.npy", np.float32))]
        for first, last in blocks(cache.trained, max(1, BLOCK_BYTES // bytes_per_token(k))):
            ids, logprobs = block_table(model, cache, np.arange(first, last), row_starts, k, max_tokens, world)
            if out is not None:
                a, b = int(row_starts[first]), int(row_starts[last])
                out[0][a:b], out[1][a:b] = ids, logprobs
        if out is not None:
            for array in out:
                array.flush()
            del out, array  # unmapped before the folder is renamed into place
            meta = {"version": VERSION, "teacher": teacher, "top_k": k, "rows": rows,
                    "content_hash": cache.content_hash}
            (folder / "meta.json").write_text(json.dumps(meta))
    reshard(model)


def announce(cache: TokenCache, path: Path, k: int, world: World) -> None:
    """Print the table's size before it is built; refuse in one line (every rank) if its disk cannot hold it."""
    rows = int(cache.trained.sum())
    size = rows * bytes_per_token(k)
    print0(f"teacher top-k: {k} log-probs (float32) + {k} token ids (int32) = {bytes_per_token(k)} bytes per trained "
           f"token; {rows:,} trained tokens: {size / 2**20:,.1f} MiB in {path}")
    error = None
    if cache.writer:
        import shutil

        free = shutil.disk_usage(cache.directory).free
        if size > free:
            error = DataError(f"--objective distill: the teacher's table needs {size / 2**30:.2f} GiB in "
                              f"{cache.directory} and {free / 2**30:.2f} GiB are free; free some space, put the cache "
                              f"on a larger disk (--cache-dir) or lower --distill-top-k")
    raise_if_any_rank_failed(error, DataError)


@contextmanager
def run_streams_untouched():
    """Nothing drawn inside (the teacher's load and pass) moves the run's random streams: the student starts the same
    whether the table was computed or read."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def load_teacher(config, world: World):
    """The teacher, built as a student with every training option that changes nothing in a forward switched off."""
    print0(f"teacher: loading {config.teacher_model}")
    as_student = replace(config, model_name_or_path=config.teacher_model, objective="sft", lora=False, qlora=False,
                         activation_checkpointing=False, activation_offload=False, compile=False,
                         sequence_parallel_size=1)
    try:
        return build_model(as_student, world)
    except ModelError as e:  # its lines name the folder by the student's flag: this folder is --teacher-model's
        raise ModelError(str(e).replace(f"--model-name-or-path {config.teacher_model}",
                                        f"--teacher-model {config.teacher_model}")) from None


def attach_teachers(objective, caches: list[TokenCache], config, world: World) -> None:
    """Give `objective` the teacher's table of each cache: read from beside the cache, or computed now (the teacher
    loaded once for all the caches that need it, run, freed) and written there. Collective; a no-op for objectives
    without a teacher. Call it before the student is built."""
    if not getattr(objective, "needs_teacher", False):
        return
    k = objective.top_k
    key = model_key(config.teacher_model, world.device.type, extra={"top_k": k, "teacher_table": VERSION})
    missing = []
    for cache in caches:
        if cache.content_hash in objective.tables:
            continue
        path = cache.directory / f"{TABLE}-{key}"
        table = read_table(path, cache, k)
        if on_every_rank(table is not None, world):  # all ranks take the same branch: computing is collective
            print0(f"teacher top-k: reused {path}")
            objective.tables[cache.content_hash] = table
        else:
            missing.append((cache, path))
    if not missing:
        return
    for cache, path in missing:
        announce(cache, path, k, world)
    with run_streams_untouched():
        model = load_teacher(config, world)
        for cache, path in missing:
            print0(f"teacher top-k: computing the top-{k} of {int(cache.trained.sum()):,} trained tokens")
            compute_table(model, cache, k, config.max_tokens_per_gpu, world, path, config.teacher_model)
        del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()  # every writer has renamed its table into place
    for cache, path in missing:
        table = read_table(path, cache, k)
        if not on_every_rank(table is not None, world):
            raise DataError(f"{path}: the teacher's table just written cannot be read back on every rank; check that "
                            f"the cache folder ({cache.directory}) is readable by every rank")
        objective.tables[cache.content_hash] = table
        print0(f"teacher top-k: wrote {path}")
