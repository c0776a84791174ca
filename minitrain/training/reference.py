"""Tables a model computes once over a token cache, stored beside it and reused: DPO's and KTO's reference log-probs
(here) and distillation's teacher top-k (teacher.py, through the helpers here: model_key, reference_mode,
sharded_pass, on_every_rank).

DPO's and KTO's reference log-probs: computed once, before the first step, by the initial model; never a second
model.

For every pair of a pair cache, log π_ref(chosen) and log π_ref(rejected) (each summed over the side's trained
tokens) are computed by the model as it is before the first optimizer step — `model_name_or_path` as loaded, or,
for an adapter that trains on top of frozen base weights (LoRA), the base with its adapters off. All ranks share
the work (the pairs are packed as one validation step, sampler.pack_step) and one all_reduce gives every rank the
whole table, (num_pairs, 2) float64. KTO's table is (num_samples, 2) too: each sample's own completion, and its KL
sequence (another prompt's completion after its prompt, kto.py), each column planned as its own pass.

The table is written next to the token cache it belongs to, keyed by the data (the cache's content hash, in its
folder) and the model (its config and weight files, by name, size and modification time) and the compute device
(bf16 on CUDA, fp32 on CPU give different numbers):

    <output-dir>/token_cache/<data cache>/reference_logps-<key>.npy       (KTO: reference_logps-kto-<key>.npy)

A later run or a resumed one finds it and reads it instead of recomputing. The table is attached in setup() after
the model is built and BEFORE a checkpoint's weights are loaded into it, so even a recomputation uses the initial
weights; a resume builds its model from the checkpoint alone (reading no weight of the model folder) only when
`tables_on_disk` finds every table it needs.
"""

import hashlib
import io
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain import atomic
from minitrain.training.data import TokenCache
from minitrain.training.distributed import World, compute_autocast, gathered_once, print0, reshard
from minitrain.training.families import ModelError
from minitrain.training.objectives import make_pair_pack, sequence_logps
from minitrain.training.validation import plan_validation

VERSION = 1
MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model")


def model_key(model_name_or_path: str, device_type: str, base_weights: str = "", extra: dict | None = None) -> str:
    """Identifies the reference model: a folder by its config (content) and weight files (name, size, mtime), and
    how its weights are held (the adapter's base_weights: QLoRA's reference is the 4-bit base); `extra`: what else
    the table depends on (a teacher table's k)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"version": VERSION, "device": device_type, **(extra or {})}).encode())
    if base_weights:
        h.update(base_weights.encode())
    path = Path(model_name_or_path)
    if not path.is_dir():  # a hub id in the local cache
        h.update(model_name_or_path.encode())
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in MODEL_FILES:
            stat = f.stat()
            h.update(f"{f.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()


def reference_file(cache: TokenCache, key: str, tag: str = "") -> Path:
    """Where the table goes; `tag` names an objective whose table is not DPO's (KTO: kto)."""
    return cache.directory / f"reference_logps-{tag + '-' if tag else ''}{key}.npy"


@contextmanager
def reference_mode(model: torch.nn.Module):
    """The model as the reference policy: eval mode (no dropout), random streams untouched, and the adapter's own
    `reference_mode(model)` context when it has one.

    THE LoRA HOOK: an adapter whose base weights stay frozen (LoRA) defines `reference_mode(model)`, a context
    manager that switches its adapters off (peft: `with lm.disable_adapter():`), so the reference is the base
    model. FullFineTuning has none: before the first step the model IS the reference.
    """
    hook = getattr(model.adapter, "reference_mode", None)
    was_training = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), (hook(model) if hook is not None else nullcontext()):
            yield
    finally:
        model.train(was_training)


def sharded_pass(costs: np.ndarray, indices: np.ndarray, world: World, max_tokens: int,
                 sequence_parallel_size: int = 1):
    """This rank's share of the samples `indices` (of tokens `costs`), one micro-step at a time, packed as one
    validation step
    (plan_validation): every rank yields as often (empty shares where it has nothing left), so the model's forwards
    stay collective. Yields (its sample indices, whether this rank writes their results: with sequence parallelism
    the S ranks of a group share each row (of S x `max_tokens`) and the group's first writes)."""
    sp = sequence_parallel_size
    for micro in plan_validation(costs, indices, world.world_size // sp, max_tokens * sp):
        yield np.asarray(micro[world.rank // sp], dtype=np.int64), world.rank % sp == 0


def on_every_rank(ok: bool, world: World) -> bool:
    """Collective: whether `ok` holds on every rank (so that all ranks take the same branch)."""
    flag = torch.tensor([ok], dtype=torch.int32, device=world.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, cache: TokenCache, world: World, max_tokens: int,
                            sequence_parallel_size: int = 1, objective=None) -> np.ndarray:
    """(num_pairs, 2) float64: the model's log-probs of each pair's chosen and rejected sides, or the columns of the
    objective's `reference_passes(cache)` (KTO: each sample's own sequence, then its KL sequence). Collective."""
    passes = getattr(objective, "reference_passes", None)
    # (each unit's cost, its pack of `width` sequences per unit, width): DPO's one pass over the pairs
    passes = passes(cache) if passes is not None else [(cache.lengths, make_pair_pack, 2)]
    columns = []
    with reference_mode(model), gathered_once(model):
        for costs, make, width in passes:
            column = torch.zeros((len(cache), width), dtype=torch.float64, device=world.device)
            for indices, writes in sharded_pass(costs, np.arange(len(cache)), world, max_tokens,
                                                sequence_parallel_size):
                pack = make(cache, indices).to(world.device)
                with compute_autocast(model, world.device):
                    logps, _ = sequence_logps(model, pack)  # (width x P,)
                if len(indices) and writes:
                    column[torch.from_numpy(indices).to(world.device)] = logps.double().view(-1, width)
            columns.append(column)
    table = torch.cat(columns, dim=1)
    if dist.is_initialized():
        dist.all_reduce(table)  # each pair was computed by exactly one rank; the others hold zeros there
    reshard(model)  # before the optimizer is built on its parameters (see distributed.reshard)
    return table.cpu().numpy()


def read_table(cache: TokenCache, path: Path) -> np.ndarray | None:
    """The table of `cache` saved at `path`, or None when there is none of its shape."""
    if not path.is_file():
        return None
    table = np.load(path)
    return table if table.shape == (len(cache), 2) else None


def tables_on_disk(objective, caches: list[TokenCache], config, world: World, base_weights: str = "") -> bool:
    """Collective: whether every rank can read the reference table of each of `caches` that `objective` needs
    (True for objectives without a reference): a resume may then build its model from the checkpoint alone, without
    the initial weights a missing table is computed with."""
    if not getattr(objective, "needs_reference", False):
        return True
    key = model_key(config.model_name_or_path, world.device.type, base_weights)
    tag = getattr(objective, "reference_tag", "")
    return on_every_rank(all(read_table(c, reference_file(c, key, tag)) is not None for c in caches), world)


def attach_reference(objective, model: torch.nn.Module, cache: TokenCache, config, world: World) -> None:
    """Give `objective` the reference log-probs of `cache`: read from its file, or computed now and written there.
    Collective; a no-op for objectives without a reference (SimPO, SFT). A model built from a resume's checkpoint
    (model.weights_from_checkpoint) holds trained weights, not the initial ones: it never computes a table."""
    if not getattr(objective, "needs_reference", False) or cache.content_hash in objective.reference:
        return
    path = reference_file(cache, model_key(config.model_name_or_path, world.device.type, model.adapter.base_weights),
                          getattr(objective, "reference_tag", ""))
    table = read_table(cache, path)
    # Every rank must take the same branch (computing is collective): all use the file only if all can read it.
    if on_every_rank(table is not None, world):
        print0(f"reference log-probs: reused {path}")
    elif getattr(model, "weights_from_checkpoint", False):
        raise ModelError(f"{path}: gone since this resume found it, and the model holds the checkpoint's weights, "
                         f"not the initial ones it is computed with; run the same command again")
    else:
        print0(f"reference log-probs: computing {len(cache)} {objective.unit} with the initial model")
        table = compute_reference_logps(model, cache, world, config.max_tokens_per_gpu,
                                        getattr(config, "sequence_parallel_size", 1), objective)
        if cache.writer:  # one writer per copy of the cache folder, as for the token cache
            buffer = io.BytesIO()
            np.save(buffer, table)
            atomic.write_bytes(path, buffer.getvalue())
        print0(f"reference log-probs: wrote {path}")
    objective.reference[cache.content_hash] = table
