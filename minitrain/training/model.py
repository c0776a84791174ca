"""Building the model the same way for every family and every adapter:

    meta device -> adapter.apply -> activation checkpointing -> fully_shard per block and root
    -> each rank reads its shards' slices of the safetensors (loading.py; other formats: rank 0's weights broadcast)
    (a resume from a checkpoint that holds every weight: each rank reads its shards from the checkpoint instead)
    (QLoRA: every rank loads its own 4-bit copy, which FSDP2 leaves whole; it shards the rest; no broadcast)

The model adapter is the seam for *what trains and what an export holds*: `FullFineTuning` here (every weight
trains, an export is the whole model); `LoRA` in lora.py (apply before sharding, adapters train, exports hold PEFT's
adapter folder and the merged model). The objective (objectives.py) never learns which adapter is in use.

`PackedCausalLM` is the module FSDP shards as its root: the Hugging Face causal LM run on one packed row, returning
the summed cross-entropy of the positions whose next token is trained (loss.py computes it through the LM head),
plus the router's auxiliary loss of mixture-of-experts models that ask for it. What differs between families (logit
transforms, where the blocks are, the attention kernel, Liger's entry point) lives in families.py, and so does the
start-up probe build_model runs: the trainer's loss must be the model's own, or the run is refused. A reward run
(--objective reward) builds the family's sequence classifier instead, with reward.PackedRewardModel as its root.
"""

import socket
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from minitrain.training import attention, families, loading, reward, sequence_parallel
from minitrain.training import seq2seq as seq2seq_model
from minitrain.training.adapter import FullFineTuning
from minitrain.training.distributed import World, all_gather, free_memory, print0, raise_if_any_rank_failed, reshard
from minitrain.training.families import (  # train.py catches ModelError imported from here
    ModelError,
    decoder_blocks,
)
from minitrain.training.loss import HeadCrossEntropy, linear_head
from minitrain.training.seq2seq import Seq2SeqLM

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


class PackedCausalLM(nn.Module):
    """A causal LM over packed rows: forward(row) -> sum of CE over the trained positions (see loss.py), with the
    model's own logit transform, + n_trained * coef * router aux loss for MoE models whose config asks for it."""

    def __init__(self, lm: nn.Module, adapter: "FullFineTuning | None" = None, use_liger: bool = False,
                 chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        head = linear_head(lm.get_output_embeddings())
        if not isinstance(head, nn.Linear):
            raise ModelError(f"model type {families.family(lm.config)!r} has no nn.Linear LM head "
                             f"(get_output_embeddings() is {type(head).__name__}); minitrain cannot train it")
        self.head_loss = HeadCrossEntropy(use_liger, chunk_rows, families.logit_transform(lm.config))
        self.router_aux = families.router_aux_loss(lm)
        self.router_aux_sum = None  # sum over the packs trained since the last pop of n_trained * aux loss
        self.adapter = adapter or FullFineTuning()
        self.attention_takes_boundaries = lm.config._attn_implementation in attention.WITH_BOUNDARIES
        # --sequence-parallel-size > 1 (sequence_parallel.py): the ranks of a group share each row, each runs a slice
        self.sequence_parallel: sequence_parallel.SequenceParallel | None = None

    def forward(self, input_ids, position_ids, positions, targets, row_weights=None, row_ce_out=None,
                cu_seq_lens=None, max_length=None, per_token: bool = False, teacher=None,
                top_k: int | None = None) -> torch.Tensor:
        """The summed CE of the trained positions (each weighted by `row_weights` when given; `row_ce_out` receives
        each one's CE for metrics), or with `per_token` each one's CE, (N,) (for objectives that weigh positions
        nonlinearly, e.g. DPO's per-sequence log-probs); with `teacher` (loss.TopKTeacher) the summed distillation
        loss; with `top_k` (a distillation teacher's pass) the (N, k) ids and log-probs of each trained position's k
        likeliest next tokens. Through forward either way, so FSDP's root hooks run."""
        # attention_mask=None + position_ids restarting at 0 + no KV cache: transformers builds a block-diagonal
        # mask (SDPA, eager), so no token attends to another sample of the pack. Variable-length kernels get the
        # samples' boundaries instead (attention.py), computed on the host once per pack.
        extra = {"output_router_logits": True} if self.router_aux is not None else {}
        if self.attention_takes_boundaries and cu_seq_lens is not None:
            extra.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length,
                         max_length_k=max_length)
        num_targets, sp = len(targets), self.sequence_parallel
        if sp is not None:
            # Every rank of the group got the whole row; it runs its contiguous slice, and the attention function
            # attends over the whole row (sequence_parallel.py). Its loss: the trained positions in its slice.
            local = sp.shard(input_ids, position_ids, positions, cu_seq_lens, max_length)
            input_ids, position_ids, positions = local.input_ids, local.position_ids, local.positions
            targets = targets[local.first : local.last]
            row_weights = None if row_weights is None else row_weights[local.first : local.last]
            row_ce_out = None if row_ce_out is None else row_ce_out[local.first : local.last]  # a view: fills it
            extra["sequence_parallel"] = local.row
        out = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        hidden = out.last_hidden_state[0]  # (T, H)
        head = linear_head(self.lm.get_output_embeddings())
        if top_k is not None:
            return self.head_loss.top_k(head, hidden[positions], top_k)
        if positions.numel() == 0:
            # Dummy pack or nothing trained: still run the head on one position, times zero, so every parameter gets
            # a (zero) gradient and this rank issues the same FSDP collectives as the others.
            loss = self.head_loss(head, hidden[:1], input_ids[0, :1]) * 0.0
            if per_token and sp is not None:  # nothing of the row's trained positions in this rank's slice
                return loss.expand(num_targets)
        elif per_token and sp is not None:
            # (N,): this slice's CE where it holds the position, 0 elsewhere; the objective sums it over the group
            ce = self.head_loss.per_row(head, hidden[positions], targets)
            return F.pad(ce, (local.first, num_targets - local.last))
        elif per_token:
            if self.router_aux is not None:
                raise ModelError("preference objectives do not add a mixture-of-experts router's auxiliary loss "
                                 "yet; set the config's output_router_logits to false or use --objective sft")
            return self.head_loss.per_row(head, hidden[positions], targets)  # (N, H) -> (N,)
        else:
            loss = self.head_loss(head, hidden[positions], targets, row_weights, row_ce_out, teacher)  # -> scalar
        if self.router_aux is not None:
            # The model adds coef * aux to its token-mean CE for each forward; weighting each pack's aux by its
            # trained tokens makes the step's loss (sum / step's trained tokens) exactly that for a one-pack step,
            # and the token-weighted mean over packs otherwise.
            weighted = self.router_aux(out.router_logits).float() * positions.numel()
            loss = loss + self.router_aux.coef * weighted
            if torch.is_grad_enabled():
                total = weighted.detach() if self.router_aux_sum is None else self.router_aux_sum + weighted.detach()
                self.router_aux_sum = total
        return loss

    def pop_router_aux_sum(self) -> torch.Tensor | None:
        """Sum of n_trained * router aux loss over the packs trained since the last call (None: no aux loss)."""
        if self.router_aux is None:
            return None
        total = self.router_aux_sum
        self.router_aux_sum = None
        return total if total is not None else torch.zeros((), device=self.lm.device)



# ----------------------------------------------------------------------------------------------------------------
# The model adapter seam



# ----------------------------------------------------------------------------------------------------------------
# Sharding and building


def device_mesh(strategy: str, world: World, shard_group_size: int | None = None, device_type: str | None = None):
    """The DeviceMesh of `strategy`: 1-D (world) for FULL_SHARD and SHARD_GRAD_OP; 2-D (replicate, shard) for
    NO_SHARD (world, 1) and HYBRID_SHARD (world / S, S): sharded within groups of S ranks (default: a node's ranks),
    replicated across the groups."""
    from torch.distributed.device_mesh import init_device_mesh

    group = shard_group_size or world.local_world_size
    dims = {
        "NO_SHARD": (world.world_size, 1),
        "HYBRID_SHARD": (world.world_size // group, group),
    }.get(strategy, (world.world_size,))
    names = ("replicate", "shard")[-len(dims):]
    return init_device_mesh(device_type or world.device.type, dims, mesh_dim_names=names)


def shard_model(model: PackedCausalLM, strategy: str, world: World, mesh=None, cuda: bool | None = None) -> None:
    """FSDP2 on every decoder block and on the root (embeddings, final norm, LM head), FSDP1 names mapped:

    FULL_SHARD    1-D mesh, parameters resharded after forward (all-gathered again in backward)
    SHARD_GRAD_OP 1-D mesh, parameters kept unsharded from forward to backward
    NO_SHARD      2-D mesh (world, 1): replicated everywhere, gradients all-reduced (DDP-like)
    HYBRID_SHARD  2-D mesh (world / S, S): sharded within groups of S ranks, replicated across groups (device_mesh)

    `mesh` (default: device_mesh(strategy, world)) and `cuda` (default: the world's device) let the memory estimator
    shard a model for GPUs on fake tensors (memory.py).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else device_mesh(strategy, world)
    # CUDA: bf16 compute on fp32 master weights, gradients reduced in fp32. CPU: everything fp32.
    mp = MixedPrecisionPolicy()
    if (world.device.type == "cuda") if cuda is None else cuda:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    whole = model.adapter.unsharded_parameters(model.lm) or None  # QLoRA's 4-bit weights
    place = partial(placement, shards=mesh.size(mesh.ndim - 1))
    for block in decoder_blocks(model.lm):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=whole,
                    shard_placement_fn=place)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=whole,
                shard_placement_fn=place)
    model.reshards_after_forward = reshard  # distributed.gathered_once turns it off for a no-grad stretch


def placement(param: torch.nn.Parameter, shards: int):
    """Where FSDP2 splits a parameter over `shards` ranks: its first dimension (FSDP2's own choice), unless that has
    fewer rows than ranks and another has more: a fused MoE expert tensor (experts, out, in) split by expert left each
    of 8 experts whole on 8 of 64 ranks (Mixtral-8x7B needed as much memory per GPU on 64 GPUs as on 8), and a
    reward model's (1, hidden) score head whole on rank 0. Then its longest dimension."""
    from torch.distributed.tensor import Shard

    if param.dim() < 2 or param.shape[0] >= shards:
        return None
    longest = max(range(param.dim()), key=lambda d: param.shape[d])
    return Shard(longest) if param.shape[longest] > param.shape[0] else None


# Activations kept for the backward per layer and token, per hidden unit, without checkpointing (fp32; measured on
# SmolLM2-135M on CPU: about 60 bytes).
ACTIVATION_BYTES = 60


def checkpointing_needed(hf_config, tokens_per_rank: int, world: World) -> tuple[bool, str]:
    """Whether a packed row's activations need recomputation: on when they would take more than half the memory
    free to this rank (the GPU's, or the machine's shared by the ranks on it). Checkpointing costs ~25% more compute,
    so it is off when memory allows. A run asks on rank 0 only (memory.plan_for_run): every rank applies its answer."""
    layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", 0)
    if getattr(hf_config, "is_encoder_decoder", False):
        # A padded micro-batch's tokens are split between the stacks (sources through the encoder, targets through the
        # decoder, together within the budget): the deeper stack bounds it.
        decoder = getattr(hf_config, "num_decoder_layers", None) or getattr(hf_config, "decoder_layers", None)
        layers = max(layers, decoder or 0)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", 0)
    need = layers * tokens_per_rank * hidden * ACTIVATION_BYTES
    free = free_memory(world.device, world.local_world_size)
    verdict = need > free // 2
    return verdict, f"activations ~{need / 2**30:.1f} GiB per rank, {free / 2**30:.1f} GiB free"


def build_model(config, world: World, adapter: FullFineTuning | None = None,
                checkpoint_weights=None) -> PackedCausalLM:
    """The training model for `config` (model_name_or_path, use_liger_kernels, activation_checkpointing,
    fsdp_sharding_strategy): FSDP2-sharded on every rank under torchrun, a plain module in one process.

    `checkpoint_weights(model)` (a resume whose checkpoint holds every trained weight) fills the materialised model
    instead of the model folder's weights, which are then not read at all, when the checkpoint holds every weight:
    the adapter trains the whole model and no parameter is frozen (Pegasus' and Marian's sinusoidal positions are).
    `model.weights_from_checkpoint` says whether it did."""
    from transformers import AutoConfig

    adapter = adapter or FullFineTuning()
    hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
    model_class = families.causal_lm_class(hf_config)
    attn = families.attention_implementation(model_class, world.device, config.attn_implementation, hf_config)
    auto = families.auto_class(hf_config)  # AutoModelForCausalLM, or AutoModelForSeq2SeqLM for T5, BART, ...
    scores = getattr(config, "objective", "sft") == "reward"
    if scores:  # the family's XForSequenceClassification, one label; a causal LM's folder leaves `score` new
        auto, hf_config = reward.score_class(hf_config), reward.score_config(hf_config)
    loaded_config = {"config": hf_config} if scores else {}
    seq2seq = hf_config.is_encoder_decoder
    sp_size = getattr(config, "sequence_parallel_size", 1)
    sp_problem = sequence_parallel.model_problem(hf_config, sp_size, world.world_size)
    if sp_problem is not None:
        raise ModelError(sp_problem)
    if seq2seq and attn in attention.WITH_BOUNDARIES:
        raise ModelError(f"--attn-implementation {attn} isolates packed rows; encoder-decoder micro-batches are padded "
                         f"with attention masks: use --attn-implementation auto (sdpa) or eager")

    def load():
        try:
            return auto.from_pretrained(config.model_name_or_path, dtype=torch.float32, attn_implementation=attn,
                                        **loaded_config, **adapter.load_arguments(world.device))
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelError(loading.unreadable(config.model_name_or_path)
                             or f"--model-name-or-path {config.model_name_or_path}: cannot load its weights "
                                f"({' '.join(str(e).split())[:300]})") from None

    def empty():
        with torch.device("meta"):
            return (auto._from_config if scores else auto.from_config)(hf_config, dtype=torch.float32,
                                                                         attn_implementation=attn)

    every_rank = adapter.loads_on_every_rank  # QLoRA: each rank loads and quantizes on its own device
    lm = empty() if checkpoint_weights is not None and adapter.checkpoint_holds_weights else None
    from_checkpoint = lm is not None and every_weight_trains(lm, config.model_name_or_path)
    if every_rank:
        lm, error = None, None
        try:
            lm = load()
        except ModelError as e:
            error = e
        raise_if_any_rank_failed(error, ModelError)  # every rank stops with the same line
    elif world.world_size == 1 and not from_checkpoint:
        lm = load().to(world.device)
    elif lm is None:
        # No rank allocates anything until sharding; then each fills its shards (loading.py).
        lm = empty()
    if config.use_liger_kernels and world.device.type == "cuda":
        apply_liger_model_kernels(lm)
    if sp_size > 1:
        try:
            sequence_parallel.use_on(lm)  # its attention all-to-alls between sequence and heads
        except sequence_parallel.SequenceParallelError as e:
            raise ModelError(str(e)) from None
    # --activation-offload: the inputs each checkpointed block saves for its recompute go to pinned host memory
    # (transformers' save_on_cpu around each block); on CPU they are already there
    offload = getattr(config, "activation_offload", False) and world.device.type == "cuda"
    model = assemble(lm, config, adapter, hf_config, offload)
    lm = model.lm
    if sp_size > 1:
        model.sequence_parallel = sequence_parallel.init(sp_size, world.rank, world.world_size)
    if world.world_size > 1:
        mesh = device_mesh(config.fsdp_sharding_strategy, world, getattr(config, "fsdp_shard_group_size", None))
        shard_model(model, config.fsdp_sharding_strategy, world, mesh)  # every_rank: each keeps its shard of its load
    model.weights_from_checkpoint = from_checkpoint
    if from_checkpoint:
        model.sharded_export = fill_from_checkpoint(model, checkpoint_weights, config, auto, hf_config, attn, world)
    elif world.world_size > 1 and not every_rank:
        model.to_empty(device=world.device)
        # Exports follow the loading: the names that read per rank are the files' names, so each rank writes its
        # shards under them; a folder loaded by rank 0 is exported by rank 0, as before.
        model.sharded_export = load_per_rank(config, lm, auto, hf_config, attn, adapter, world)
        if not model.sharded_export:
            broadcast_from_rank0(lm, load, adapter, world)
    start_up_probe(model, hf_config, attn, scores, world)
    model.train()
    return model


def start_up_probe(model, hf_config, attn: str, scores: bool, world: World) -> None:
    """Collective: refuses, on every rank with the same line, a loss that is not the model's own or packed samples
    that are not isolated (a reward model: scores); prints what it measured."""
    error, seq2seq = None, hf_config.is_encoder_decoder
    try:
        if scores:
            error_of_packing = reward.check_score_is_the_models_own(model, world.device, hf_config.pad_token_id,
                                                                    hf_config.vocab_size)
            probe = None
        elif seq2seq:
            probe = seq2seq_model.check_loss_is_the_models_own(model, world.device)
        else:
            probe = families.check_loss_is_the_models_own(model, world.device, attn)
    except ModelError as e:
        error = e
    if world.world_size > 1:
        raise_if_any_rank_failed(error, ModelError)  # every rank stops together, each with the same line
    elif error is not None:
        raise error
    reshard(model)  # the probe's no-grad forwards leave nothing gathered (root_unsharded already reshards)
    if scores:
        print0(f"start-up probe ({families.family(hf_config)}, {attn}): packed scores vs the model's own per sequence "
               f"{error_of_packing:.1e}")
        return
    packing = "" if seq2seq else f", packed vs per-sample {probe.packing_error:.1e}"
    print0(f"start-up probe ({families.family(hf_config)}, {attn}): trainer loss {probe.trainer_loss:.6f}, the model's "
           f"own {probe.own_loss:.6f}{packing}")


def assemble(lm: nn.Module, config, adapter: FullFineTuning, hf_config, offload: bool = False) -> PackedCausalLM:
    """The training module around the Hugging Face model `lm` (meta, fake or loaded), before sharding: the adapter
    applied, blocks activation-checkpointed and compiled as `config` asks. build_model and the memory estimator
    (memory.py) both build through here."""
    lm = adapter.apply(lm)
    blocks = decoder_blocks(lm)  # the same refusal in one process as under torchrun
    if config.activation_checkpointing:
        if lm.supports_gradient_checkpointing:
            lm.activation_checkpointing_enable(offload=offload)
        unwrapped = [i for i, block in enumerate(blocks) if not getattr(block, "gradient_checkpointing", False)]
        if unwrapped:
            raise ModelError(f"model type {families.family(hf_config)!r}: blocks {unwrapped} are not activation-"
                             f"checkpointed by transformers; pass --no-activation-checkpointing")
    if config.compile:
        for block in blocks:
            block.compile(dynamic=True)  # each block's forward (dynamic: packs change length every micro-step)
    if hf_config.is_encoder_decoder:
        model = Seq2SeqLM(lm, adapter)
    elif getattr(config, "objective", "sft") == "reward":
        model = reward.PackedRewardModel(lm, adapter)
    else:
        model = PackedCausalLM(lm, adapter, config.use_liger_kernels)
    model.compiled_blocks = bool(getattr(config, "compile", False))  # the probe's truth runs them eager
    return model


def every_weight_trains(lm, model_name_or_path: str) -> bool:
    """Whether every parameter of `lm` trains, so that a full fine-tuning checkpoint holds them all (it leaves the
    frozen out); if not, says that the model folder's weights are read."""
    frozen = [name for name, param in lm.named_parameters() if not param.requires_grad]
    if frozen:
        print0(f"note: {', '.join(frozen[:3])} never train, so no checkpoint holds them: they are read from "
               f"{model_name_or_path} with the other weights, which the checkpoint then replaces")
    return not frozen


def load_per_rank(config, lm, auto, hf_config, attn: str, adapter, world: World) -> bool:
    """Collective: each rank fills its own shards from the model folder's safetensors (loading.py); False, with a
    printed note, when they cannot be read that way on some rank (the caller then falls back to rank 0's load)."""
    problem, twin, placeholders, files, damaged = None, None, set(), None, None
    try:
        files = loading.weight_files(config.model_name_or_path)
        twin, placeholders = loading.skeleton(auto, hf_config, attn, adapter)
        problem = loading.plan_problem(lm, twin, placeholders, files, adapter)
    except SafetensorError as e:  # a file cut short or not safetensors: this rank cannot load it, and rank 0's load
        # would fail alike where it sees the same file (a node-local copy may differ: the line names where it was read)
        damaged = (f"{loading.unreadable(config.model_name_or_path) or ' '.join(str(e).split())[:300]} "
                   f"(read on rank {world.rank}, host {socket.gethostname()})")
    except (OSError, ValueError, RuntimeError) as e:
        problem = " ".join(str(e).split())[:300]
    found = all_gather((problem, damaged))
    damaged = next((d for _, d in found if d is not None), None)
    if damaged is not None:
        raise ModelError(damaged)  # on every rank, the first damaged file's line
    problems = [p for p, _ in found if p is not None]
    if problems:
        print0(f"note: --model-name-or-path {config.model_name_or_path}: rank 0 loads the whole model and broadcasts "
               f"it into the shards ({problems[0]})")
        return False
    loading.load_shards(lm, twin, placeholders, files, adapter, world.device)
    read_generation_config(lm, config.model_name_or_path)
    return True


def read_generation_config(lm, model_name_or_path: str) -> None:
    """The model folder's generation_config.json (mBART's forced language, pad and suppressed tokens, ...), as
    from_pretrained would read it, for a model built from its config: every rank decodes its share of the
    validation predictions with it, and exports save it."""
    from transformers import GenerationConfig

    try:
        lm.generation_config = GenerationConfig.from_pretrained(model_name_or_path)
    except OSError:
        pass  # none saved: from_config's, from the model's config


def fill_from_checkpoint(model, checkpoint_weights, config, auto, hf_config, attn: str, world: World) -> bool:
    """Collective: the model (on the meta device) materialised and filled without reading any weight of the model
    folder: the buffers a checkpoint does not hold as from_pretrained computes them (the skeleton's: rotary
    `inv_freq`, ...), then every weight by `checkpoint_weights(model)`. Returns whether exports are written per rank,
    as they would be had the folder's safetensors been read per rank (their headers decide; no weight is read)."""
    lm, adapter = model.lm, model.adapter
    loading.materialise(model, world.device)
    twin, placeholders, error = None, set(), None
    try:
        twin, placeholders = loading.skeleton(auto, hf_config, attn, adapter)
        lacking = loading.copy_buffers(lm, twin)
        if lacking:
            error = ModelError(f"model type {families.family(hf_config)!r}: its buffers {', '.join(lacking[:3])} are "
                               f"neither in the checkpoint nor computed from its config, so this resume cannot build "
                               f"it from the checkpoint alone; please report it")
    except (OSError, ValueError, RuntimeError) as e:
        error = ModelError(f"model type {families.family(hf_config)!r}: cannot build it from its config "
                           f"({' '.join(str(e).split())[:300]})")
    raise_if_any_rank_failed(error, ModelError)  # every rank stops with the same line
    checkpoint_weights(model)
    read_generation_config(lm, config.model_name_or_path)
    print0(f"weights: the checkpoint's; none is read from {config.model_name_or_path}")
    if world.world_size == 1:
        return False
    problem = None
    try:
        problem = loading.plan_problem(lm, twin, placeholders, loading.weight_files(config.model_name_or_path), adapter)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # the export is then gathered by rank 0
        problem = " ".join(str(e).split())[:300]
    return not any(p is not None for p in all_gather(problem))


def broadcast_from_rank0(lm, load, adapter, world: World) -> None:
    """Collective: rank 0 loads the whole model on CPU and its weights are broadcast into every rank's shards (for
    model folders loading.py cannot read per rank: GGUF, .bin, names transformers converts on load)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    full, error = None, None
    if world.is_main:
        try:
            full = adapter.apply(load())  # the module tree of the shards (LoRA layers)
        except ModelError as e:
            error = e
    raise_if_any_rank_failed(error, ModelError)  # the others wait here, not in the broadcast's collective
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(lm, full.state_dict() if world.is_main else {}, options=options)
    # Buffers (e.g. rotary inv_freq) are not in the state dict and were left uninitialised by to_empty.
    reference = dict(full.named_buffers()) if world.is_main else {}
    for name, buffer in lm.named_buffers():
        if world.is_main:
            buffer.copy_(reference[name])
        dist.broadcast(buffer, src=0)
    # Every rank decodes with the checkpoint's own generation config, which from_config on ranks > 0 cannot know.
    generation = [getattr(full, "generation_config", None) if world.is_main else None]  # none: a reward model's
    dist.broadcast_object_list(generation, src=0)
    lm.generation_config = generation[0]
    del full


def apply_liger_model_kernels(lm) -> None:
    """Liger's RMSNorm/RoPE/SwiGLU-or-GeGLU kernels through its public per-architecture entry point, with the
    arguments that entry point takes (families.liger_kernel_arguments), on this instance."""
    apply = families.liger_entry_point(lm.config.model_type)
    if apply is None:
        print0(f"Liger has no kernels for model type {lm.config.model_type!r}; using only its fused cross-entropy")
        return
    apply(**families.liger_kernel_arguments(apply), model=lm)
