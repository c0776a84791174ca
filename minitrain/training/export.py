"""A Hugging Face model folder from a state dict: what every export writes (full fine-tuning's whole model, LoRA's
merged model), atomically, with the tokenizer and the run's flags beside the weights."""

import copy
from pathlib import Path

import torch

from minitrain import atomic


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
