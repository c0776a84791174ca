"""The model adapter seam: *what trains and what an export holds*. `FullFineTuning` here (every weight trains, an
export is the whole model); `LoRA` and `QLoRA` in lora.py build on it. model.py applies the adapter before sharding;
the objective (objectives.py) never learns which adapter is in use."""

import torch
from torch import nn

from minitrain.training.distributed import World
from minitrain.training.export import tied_duplicates, write_hf_folder, write_hf_folder_sharded


class FullFineTuning:
    """Every parameter trains; an export is the whole model."""

    name = "full"
    base_weights = ""  # as loaded
    loads_on_every_rank = False  # each rank reads its shards' slices of the files (loading.py; build_model)
    # A full-state checkpoint holds what trains: here every weight, so a resume reads none from the model folder
    # (build_model's checkpoint_weights)
    checkpoint_holds_weights = True

    def load_arguments(self, device: torch.device) -> dict:
        """Extra from_pretrained arguments for the base model (QLoRA's quantization): none."""
        return {}

    def unsharded_parameters(self, lm: nn.Module) -> set[nn.Parameter]:
        """Parameters FSDP2 leaves whole on every rank (QLoRA's 4-bit weights): none."""
        return set()

    def apply(self, lm: nn.Module) -> nn.Module:
        """Before sharding (on the meta device for ranks > 0), and on rank 0's full copy whose weights are broadcast
        into the shards: change the module tree, the same way each time; nothing to change here."""
        return lm

    def file_key(self, name: str) -> str:
        """The name in the Hugging Face weight files of the live model's tensor `name` (loading.py): the same."""
        return name

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def export_state(self, model: nn.Module, world: World) -> dict | None:
        """Collective: the full state dict of the Hugging Face model on rank 0 (CPU tensors), None elsewhere."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        if world.world_size > 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model.lm, options=options)
            return state if world.is_main else None
        return {k: v.detach().cpu() for k, v in model.lm.state_dict().items()}

    def write_export(self, lm: nn.Module, state: dict, tokenizer, dtype: torch.dtype, config: dict, final) -> None:
        """Rank 0: the export folder `final` from export_state's `state` (atomic)."""
        write_hf_folder(lm, state, tokenizer, dtype, config, final)

    def export_tensors(self, lm: nn.Module) -> dict:
        """{name in the Hugging Face files: this rank's shard (DTensor) or replicated buffer} of the export, for the
        sharded writer: the whole model, tied weights once."""
        tied = tied_duplicates(lm)
        return {k: v for k, v in lm.state_dict().items() if k not in tied}

    def write_export_sharded(self, lm: nn.Module, tokenizer, dtype: torch.dtype, config: dict, final,
                             world: World) -> None:
        """Collective: the export folder `final`, every rank writing its shards (export.write_hf_folder_sharded)."""
        write_hf_folder_sharded(lm, self.export_tensors(lm), tokenizer, dtype, config, final, world)
