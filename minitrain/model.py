"""Building the model the same way for every family and every adapter:

    meta device (ranks > 0) -> adapter.apply -> activation checkpointing -> fully_shard per block and root
    -> rank 0's weights broadcast into the shards

The model adapter is the seam for *what trains and what an export holds*: `FullFineTuning` here (every weight
trains, an export is the whole model); `LoRA` in lora.py (apply before sharding, adapters train, exports hold PEFT's
adapter folder and the merged model). The objective (objectives.py) never learns which adapter is in use.

`PackedCausalLM` is the module FSDP shards as its root: the Hugging Face causal LM run on one packed row, returning
the summed cross-entropy of the positions whose next token is trained (loss.py computes it through the LM head).
"""

import torch
import torch.distributed as dist
from torch import nn

from minitrain.distributed import World, print0
from minitrain.loss import HeadCrossEntropy

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


class ModelError(ValueError):
    """A model this trainer cannot train exactly; the message names the family and what to do."""


class PackedCausalLM(nn.Module):
    """A causal LM over packed rows: forward(row) -> sum of CE over the trained positions (see loss.py)."""

    def __init__(self, lm: nn.Module, adapter: "FullFineTuning | None" = None, use_liger: bool = False,
                 chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        self.head_loss = HeadCrossEntropy(use_liger, chunk_rows)
        self.adapter = adapter or FullFineTuning()

    def forward(self, input_ids, position_ids, positions, targets) -> torch.Tensor:
        # attention_mask=None + position_ids restarting at 0 + no KV cache: transformers builds a block-diagonal
        # mask (or uses flash-attention varlen), so no token attends to another sample of the pack.
        hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden[0]  # (T, H)
        head = self.lm.get_output_embeddings()
        if positions.numel() == 0:
            # Dummy pack or nothing trained: still run the head on one position, times zero, so every parameter gets
            # a (zero) gradient and this rank issues the same FSDP collectives as the others.
            return self.head_loss(head, hidden[:1], input_ids[0, :1]) * 0.0
        return self.head_loss(head, hidden[positions], targets)  # (N, H) -> scalar


# ----------------------------------------------------------------------------------------------------------------
# The model adapter seam


class FullFineTuning:
    """Every parameter trains; an export is the whole model."""

    name = "full"

    def apply(self, lm: nn.Module) -> nn.Module:
        """Before sharding (on the meta device for ranks > 0), and on rank 0's full copy whose weights are broadcast
        into the shards: change the module tree, the same way each time; nothing to change here."""
        return lm

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def export_state(self, model: PackedCausalLM, world: World) -> dict | None:
        """Collective: the full state dict of the Hugging Face model on rank 0 (CPU tensors), None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if world.world_size > 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model.lm, options=options)
            return state if world.is_main else None
        return {k: v.detach().cpu() for k, v in model.lm.state_dict().items()}

    def write_export(self, lm: nn.Module, state: dict, tokenizer, dtype: torch.dtype, config: dict, final) -> None:
        """Rank 0: the export folder `final` from export_state's `state` (atomic)."""
        from minitrain.checkpoint import write_hf_folder

        write_hf_folder(lm, state, tokenizer, dtype, config, final)


def export_state(model: PackedCausalLM, world: World) -> dict | None:
    return model.adapter.export_state(model, world)


# ----------------------------------------------------------------------------------------------------------------
# Where a family keeps its blocks


def decoder_blocks(lm: nn.Module) -> nn.ModuleList:
    """The transformer blocks FSDP shards one by one (and activation checkpointing wraps)."""
    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"model type {lm.config.model_type!r} has no decoder `layers` list to shard")
    return layers


# ----------------------------------------------------------------------------------------------------------------
# Sharding and building


def shard_model(model: PackedCausalLM, strategy: str, world: World) -> None:
    """FSDP2 on every decoder block and on the root (embeddings, final norm, LM head), FSDP1 names mapped:

    FULL_SHARD    1-D mesh, parameters resharded after forward (all-gathered again in backward)
    SHARD_GRAD_OP 1-D mesh, parameters kept unsharded from forward to backward
    NO_SHARD      2-D mesh (world, 1): replicated everywhere, gradients all-reduced (DDP-like)
    HYBRID_SHARD  2-D mesh (nodes, ranks per node): sharded within a node, replicated across nodes
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dims = {
        "NO_SHARD": (world.world_size, 1),
        "HYBRID_SHARD": (world.world_size // world.local_world_size, world.local_world_size),
    }.get(strategy, (world.world_size,))
    names = ("replicate", "shard")[-len(dims):]
    mesh = init_device_mesh(world.device.type, dims, mesh_dim_names=names)
    # CUDA: bf16 compute on fp32 master weights, gradients reduced in fp32. CPU: everything fp32.
    mp = MixedPrecisionPolicy()
    if world.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    for block in decoder_blocks(model.lm):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(config, world: World, adapter: FullFineTuning | None = None) -> PackedCausalLM:
    """The training model for `config` (model_name_or_path, use_liger_kernels, activation_checkpointing,
    fsdp_sharding_strategy): FSDP2-sharded on every rank under torchrun, a plain module in one process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = adapter or FullFineTuning()
    attn = attention_implementation(world.device)

    def load():
        return AutoModelForCausalLM.from_pretrained(
            config.model_name_or_path, dtype=torch.float32, attn_implementation=attn
        )

    if world.world_size == 1:
        lm = load().to(world.device)
    else:
        # Only rank 0 ever holds the full model, on CPU; the others allocate nothing until sharding.
        hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn)
    if config.use_liger_kernels and world.device.type == "cuda":
        apply_liger_model_kernels(lm)
    lm = adapter.apply(lm)
    if config.activation_checkpointing:
        lm.activation_checkpointing_enable()
    model = PackedCausalLM(lm, adapter, config.use_liger_kernels)
    if world.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        shard_model(model, config.fsdp_sharding_strategy, world)
        model.to_empty(device=world.device)
        full = adapter.apply(load()) if world.is_main else None  # the module tree of the shards (LoRA layers)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(lm, full.state_dict() if world.is_main else {}, options=options)
        # Buffers (e.g. rotary inv_freq) are not in the state dict and were left uninitialised by to_empty.
        reference = dict(full.named_buffers()) if world.is_main else {}
        for name, buffer in lm.named_buffers():
            if world.is_main:
                buffer.copy_(reference[name])
            dist.broadcast(buffer, src=0)
        if world.is_main:
            lm.generation_config = full.generation_config
        del full
    model.train()
    return model


def apply_liger_model_kernels(lm) -> None:
    """Liger's RMSNorm/RoPE/SwiGLU kernels through its public per-architecture entry point, on this instance."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{lm.config.model_type}", None)
    if apply is None:
        print0(f"Liger has no kernels for model type {lm.config.model_type!r}; using only its fused cross-entropy")
        return
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm)
