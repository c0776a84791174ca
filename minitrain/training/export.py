"""A Hugging Face model folder from a state dict: what every export writes (full fine-tuning's whole model, LoRA's
merged model), atomically, with the tokenizer and the run's flags beside the weights.

Two writers: `write_hf_folder` (one process holds the whole state dict: one process, or model folders that
loading.py cannot read per rank) and `write_hf_folder_sharded` (collective: every rank writes its shards, cast to
the export's dtype on its device, with torch.distributed.checkpoint's HuggingFaceStorageWriter; the ranks then
consolidate them into Hugging Face's sharded safetensors + model.safetensors.index.json, each rank a share of the
files; no weight passes through one process).
"""

import copy
import shutil
from pathlib import Path

import torch

from minitrain import atomic
from minitrain.training.distributed import World, all_gather, raise_if_any_rank_failed

SHARDS = ".shards"  # each rank's part, inside the temporary export folder until consolidated
MAX_FILE_BYTES = 5 * 2**30  # Hugging Face's customary largest safetensors file


def tied_duplicates(lm) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    seen, duplicates = set(), set()
    for name, param in lm.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(name)
        seen.add(id(param))
    return duplicates


def write_hf_folder(lm, state: dict, tokenizer, dtype: torch.dtype, config: dict, final: Path) -> None:
    """The model's weights in `dtype` (tied weights stored once), its config, the tokenizer and the run's flags,
    written atomically: a crash never leaves a `samples_<N>` folder that looks complete."""
    with atomic.atomic_folder(final) as tmp:
        write_hf_files(lm, state, tokenizer, dtype, config, tmp)


def write_hf_files(lm, state: dict, tokenizer, dtype: torch.dtype, config: dict, folder: Path) -> None:
    """What write_hf_folder writes, into an existing (temporary) folder."""
    tied = tied_duplicates(lm)  # e.g. lm_head.weight == embed_tokens.weight
    state = {k: v.to(dtype) for k, v in state.items() if k not in tied}
    lm.save_pretrained(folder, state_dict=state)
    hf_config = copy.deepcopy(lm.config)
    hf_config.dtype = dtype  # save_pretrained records the fp32 training dtype; the weights are in `dtype`
    hf_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    atomic.write_json(folder / "training_config.json", config)


def write_config_files(lm, tokenizer, dtype: torch.dtype, config: dict, folder: Path) -> None:
    """What save_pretrained writes beside the weights (config.json with the weights' dtype, generation_config.json),
    the tokenizer and the run's flags."""
    hf_config = copy.deepcopy(lm.config)
    hf_config.dtype = dtype
    hf_config.architectures = [type(lm).__name__]
    hf_config.save_pretrained(folder)
    if lm.can_generate() and lm.generation_config is not None:
        lm.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    atomic.write_json(folder / "training_config.json", config)


def file_indices(state: dict, dtype: torch.dtype) -> dict[str, int]:
    """{name: 1-based file number}: the tensors in order, a new file whenever one would pass MAX_FILE_BYTES."""
    indices, index, size = {}, 1, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize  # a DTensor's numel is its global size
        if size and size + nbytes > MAX_FILE_BYTES:
            index, size = index + 1, 0
        indices[name] = index
        size += nbytes
    return indices


def write_hf_folder_sharded(lm, tensors: dict, tokenizer, dtype: torch.dtype, config: dict, final: Path,
                            world: World, rank0_extra=None) -> None:
    """Collective: the export folder `final` from `tensors` ({name in the files: DTensor shard or replicated
    tensor}), written atomically: every rank writes its shards in `dtype`, the ranks consolidate them into the
    standard files (one: model.safetensors), then rank 0 adds the config, tokenizer and flags (and `rank0_extra(folder)`, e.g. LoRA's adapter
    folder) and renames the folder into place. Raises OSError on every rank if any rank fails."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank,
    )
    from torch.distributed.checkpoint.api import CheckpointException

    tmp, error = None, None
    if world.is_main:
        tmp = atomic.temp_path(final)
        try:
            (tmp / SHARDS).mkdir(parents=True)
        except OSError as e:
            error = e
    raise_if_any_rank_failed(error, OSError, f"cannot create a folder beside {final}")
    tmp = all_gather(tmp)[0]
    state = {name: tensor.detach().to(dtype) for name, tensor in tensors.items()}  # cast on the device
    mapping = file_indices(state, dtype)
    try:
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS), fqn_to_index_mapping=mapping, save_distributed=True)
        dcp.save(state, storage_writer=writer)
        del state
        consolidate_safetensors_files_on_every_rank(str(tmp / SHARDS), str(tmp), mapping)
    except (OSError, CheckpointException, RuntimeError, ValueError) as e:
        error = OSError(" ".join(str(e).split())[:300])
    raise_if_any_rank_failed(error, OSError, f"cannot write {final}")
    if world.is_main:
        try:
            shutil.rmtree(tmp / SHARDS)
            if max(mapping.values()) == 1:  # one file: named as save_pretrained names it, no index
                (tmp / "model-00001-of-00001.safetensors").rename(tmp / "model.safetensors")
                (tmp / "model.safetensors.index.json").unlink()
            write_config_files(lm, tokenizer, dtype, config, tmp)
            if rank0_extra is not None:
                rank0_extra(tmp)
            atomic.publish_folder(tmp, final)
        except OSError as e:
            error = e
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    raise_if_any_rank_failed(error, OSError, f"cannot write {final}")
