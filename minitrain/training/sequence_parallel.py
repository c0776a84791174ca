"""Sequence parallelism (DeepSpeed-Ulysses): groups of S ranks share each packed row, so a row may hold up to
S x --max-tokens-per-gpu tokens (32k-128k-token samples on GPUs that hold a fraction of that).

    ranks     0 1 | 2 3          world 4, --sequence-parallel-size 2: two data-parallel groups of 2 ranks; the
    groups    g0  | g1           planner packs rows for 2 "ranks" with a budget of 2 x --max-tokens-per-gpu each

Every rank of a group receives the same whole row (input_ids, position_ids restarting per sample, the trained
positions and their targets, shifted over the whole row before any split) and PackedCausalLM.forward keeps a
contiguous 1/S of it: the row is padded to a multiple of S (the padding is a sequence of its own, never trained),
rank k of the group runs tokens [k L, (k + 1) L), L = T / S, with the position_ids of its slice (so RoPE sees the
whole row's positions), and sums the cross-entropy of the trained positions in its slice (the boundary token's label
is the next rank's first token: it was shifted before the split).

Everything in a block is per token except attention. Around attention (registered as `minitrain_ulysses` through
transformers' public AttentionInterface):

    (L, H, D) queries, (L, H_kv, D) keys/values of my tokens, all heads
      -- all-to-all --> (T, H/S, D): every token of the row, my H/S heads (one collective for q, k and v)
      -- attention over the whole row within each sample (the row's boundaries: varlen on CUDA, SDPA with a
         block-diagonal causal mask on CPU) -->
    (T, H/S, D) -- all-to-all --> (L, H, D): my tokens, all heads; then o_proj as usual

Key/value heads: when H_kv is not a multiple of S they are replicated (each f = S / gcd(H_kv, S) times, adjacent), so
every rank holds the key/value heads of its query heads (GQA and MQA work; the replicas' gradients sum back).
Query heads must divide by S.

The loss is exact: each rank's loss is the sum over its trained positions, and the ranks' sums add up to the row's.
Gradients: each all-to-all's backward is the reverse all-to-all, so a rank's loss sends gradient into the other
ranks' key/value projections; after backward the S ranks' parameter gradients sum to the row's gradient. FSDP sums
(and divides by world size) over all ranks, SP ranks included, so train.py's world_size / N scaling stays exact.
Objectives that need a whole sequence's log-prob (DPO, SimPO) sum each rank's part over the group (`sum_over_row`,
whose backward is the same sum), and then every rank of the group holds the same pair losses: each counts 1 / S
of them (objectives.Preference), so the reported sums and the gradient count each pair once.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

ULYSSES = "minitrain_ulysses"


class SequenceParallelError(ValueError):
    """A model or flags that sequence parallelism cannot run; one line naming what works."""


# ----------------------------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group."""

    size: int  # S, ranks sharing a row
    rank: int  # this rank's slice of the row, 0 .. S - 1
    group: object  # the group's ProcessGroup
    varlen: bool = False  # the variable-length kernel off CUDA too: the memory estimate's fake CPU tensors stand
    # for CUDA ones (memory.py), so attention must take the kernel's O(T) memory, not a dense T x T mask

    def shard(self, input_ids, position_ids, positions, cu_seq_lens, max_length) -> "LocalRow":
        return shard_row(self, input_ids, position_ids, positions, cu_seq_lens, max_length)

    def slice_of(self, positions: torch.Tensor, start: int, end: int) -> tuple[int, int]:
        """[first, last): the entries of the sorted trained `positions` (flatnonzero) within [start, end)."""
        bounds = torch.tensor([start, end], device=positions.device, dtype=positions.dtype)
        first, last = torch.searchsorted(positions, bounds).tolist()
        return first, last


@dataclass(frozen=True)
class DataLayout:
    """How the planner sees the ranks: one "rank" per group, each row up to S x --max-tokens-per-gpu tokens.
    Consecutive ranks form a group (one node's fast links)."""

    rank: int  # this rank's data-parallel group
    size: int  # data-parallel groups
    row_tokens: int  # the token budget of one packed row


def data_layout(config, rank: int, world_size: int) -> DataLayout:
    size = max(1, getattr(config, "sequence_parallel_size", 1))
    return DataLayout(rank // size, world_size // size, config.max_tokens_per_gpu * size)


@cache
def _groups(world_size: int, size: int) -> tuple:
    # Every rank creates every group, in the same order (dist.new_group is collective over the world).
    return tuple(dist.new_group(list(range(start, start + size))) for start in range(0, world_size, size))


def init(size: int, rank: int, world_size: int) -> SequenceParallel | None:
    """This rank's group for --sequence-parallel-size `size` (None for 1: today's trainer, bit for bit)."""
    if size <= 1:
        return None
    group = _groups(world_size, size)[rank // size]
    return SequenceParallel(size, rank % size, group)


# ----------------------------------------------------------------------------------------------------------------
# Checks (before weights load)


def head_counts(hf_config) -> tuple[int | None, int | None]:
    """(query heads, key/value heads) of a config, whatever the family calls them."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = next((getattr(text, a) for a in ("num_attention_heads", "n_head", "num_heads")
                  if getattr(text, a, None)), None)
    kv = next((getattr(text, a) for a in ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
               if getattr(text, a, None)), None)
    return heads, kv or heads


def split_sizes(world_size: int, heads: int | None) -> list[int]:
    """The sequence-parallel sizes that divide the ranks and (where known) the attention heads, each rank attending
    over heads / S of them."""
    return [s for s in range(1, world_size + 1) if world_size % s == 0 and (heads is None or heads % s == 0)]


def model_problem(hf_config, size: int, world_size: int) -> str | None:
    """Why --sequence-parallel-size `size` cannot split this model's attention, in one line, or None."""
    if size <= 1:
        return None
    family = getattr(hf_config, "model_type", type(hf_config).__name__)
    flag = f"--sequence-parallel-size {size}"
    if getattr(hf_config, "is_encoder_decoder", False):
        return (f"{flag}: {family} is an encoder-decoder, trained on padded micro-batches; sequence parallelism "
                f"splits packed causal-LM rows: use --sequence-parallel-size 1")
    if getattr(hf_config, "output_router_logits", False):
        return (f"{flag}: {family}'s router auxiliary loss is computed over the whole row, which no rank holds; set "
                f"output_router_logits to false in its config.json or use --sequence-parallel-size 1")
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return (f"{flag}: {family} caps its attention logits (attn_logit_softcapping), which the split attention "
                f"kernels do not; use --sequence-parallel-size 1")
    heads, _ = head_counts(hf_config)
    if heads is None:
        return f"{flag}: cannot find {family}'s number of attention heads; use --sequence-parallel-size 1"
    if heads % size:
        working = split_sizes(world_size, heads)
        return (f"{flag}: {family} has {heads} attention heads, not divisible by {size}; each rank attends over "
                f"heads / S of them: use --sequence-parallel-size {' or '.join(map(str, working))}")
    return None


# ----------------------------------------------------------------------------------------------------------------
# The row: each rank's slice


@dataclass(frozen=True)
class Row:
    """What the attention kernel needs to attend over the whole row: passed to it as the `sequence_parallel` keyword
    of the model's forward (transformers hands extra keywords down to the attention function)."""

    size: int
    group: object
    cu_seq_lens: torch.Tensor  # (samples + 1,) int32, the padded row's boundaries (the padding is a sequence)
    max_length: int
    varlen: bool = False  # SequenceParallel.varlen


@dataclass(frozen=True)
class LocalRow:
    input_ids: torch.Tensor  # (1, L) this rank's tokens
    position_ids: torch.Tensor  # (1, L) their positions in their samples
    positions: torch.Tensor  # (n,) the trained positions in this slice, relative to its start
    first: int  # this rank's trained positions are positions[first:last] of the whole row's
    last: int
    row: Row


def shard_row(sp: SequenceParallel, input_ids, position_ids, positions, cu_seq_lens, max_length) -> LocalRow:
    """The whole row (1, T) -> this rank's contiguous slice of the row padded to a multiple of S."""
    total = input_ids.shape[1]
    pad = -total % sp.size
    device = input_ids.device
    if cu_seq_lens is None:  # the start-up probe: boundaries where position_ids restart
        starts = torch.nonzero(position_ids[0] == 0).flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([total], device=device)]).to(torch.int32)
        max_length = int(cu_seq_lens.diff().max())
    if pad:  # a sequence of its own, never trained: attends only to itself
        input_ids = F.pad(input_ids, (0, pad))
        position_ids = torch.cat([position_ids, torch.arange(pad, device=device)[None]], dim=1)
        cu_seq_lens = torch.cat([cu_seq_lens, (cu_seq_lens[-1:] + pad)])
        max_length = max(max_length, pad)
    local = (total + pad) // sp.size
    start = sp.rank * local
    first, last = sp.slice_of(positions, start, start + local)
    return LocalRow(
        input_ids=input_ids[:, start : start + local],
        position_ids=position_ids[:, start : start + local],
        positions=positions[first:last] - start,
        first=first,
        last=last,
        row=Row(sp.size, sp.group, cu_seq_lens, max_length, sp.varlen),
    )


# ----------------------------------------------------------------------------------------------------------------
# Collectives with gradients


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single over dim 0 in equal chunks; its backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group), None


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) over the group; backward: the sum of the group's gradients (each rank's copy of the result
    feeds its own loss, and every input fed all of them)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _SumOverGroup.apply(grad, ctx.group), None


def sum_over_row(x: torch.Tensor, sp: SequenceParallel | None) -> torch.Tensor:
    """Each rank's partial sums (e.g. log-probs of the row's sequences over its slice) -> the row's, on every rank."""
    return x if sp is None else _SumOverGroup.apply(x, sp.group)


def to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(L, H, D) my tokens, all heads -> (S L, H / S, D) the row's tokens, my heads."""
    tokens, heads, dim = x.shape
    chunks = x.reshape(tokens, size, heads // size, dim).transpose(0, 1)  # (S, L, H/S, D): chunk j goes to rank j
    return _AllToAll.apply(chunks, group).reshape(size * tokens, heads // size, dim)  # chunk i came from rank i


def to_tokens(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(S L, h, D) the row's tokens, my heads -> (L, S h, D) my tokens, all heads."""
    total, heads, dim = x.shape
    back = _AllToAll.apply(x.reshape(size, total // size, heads, dim), group)  # (S, L, h, D): chunk j = rank j's heads
    return back.transpose(0, 1).reshape(total // size, size * heads, dim)


# ----------------------------------------------------------------------------------------------------------------
# The attention function


def attend(query, key, value, row: Row, scale: float | None, window: int | None) -> torch.Tensor:
    """(T, h, D) x (T, h_kv, D) x (T, h_kv, D) -> (T, h, D), causal within each sequence of the row: PyTorch's
    variable-length kernel on CUDA (or where the row asks for it); on CPU, SDPA with the row's block-diagonal causal
    mask."""
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda or row.varlen:
        from minitrain.training.attention import varlen_kernel

        return varlen_kernel(query, key, value, row.cu_seq_lens, row.max_length, scale,
                             (-1, 0) if window is None else (window - 1, 0), gqa)
    total = query.shape[0]
    index = torch.arange(total, device=query.device)
    # (T,) each token's sequence: the boundaries at or before it (no data-dependent shape, so the memory estimate's
    # fake tensors run it too)
    sequence = torch.searchsorted(row.cu_seq_lens[1:].to(index.dtype), index, right=True)
    mask = (sequence[:, None] == sequence[None, :]) & (index[:, None] >= index[None, :])  # (T, T)
    if window is not None:
        mask &= index[:, None] - index[None, :] < window
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))  # (1, h, T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def ulysses_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature, on this rank's slice: (1, H, L, D) query, (1, H_kv, L, D) key and
    value -> ((1, L, H, D), None), attending over the whole row (see the module doc)."""
    row = kwargs.get("sequence_parallel")
    if row is None:  # minitrain's forward passed it: the family's layers drop extra keywords on the way
        raise SequenceParallelError(
            f"--sequence-parallel-size: {type(module).__name__} does not hand the model's extra keywords to its "
            f"attention function, so the row's boundaries never reach it and its rows cannot be split; use "
            f"--sequence-parallel-size 1")
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"{ULYSSES} runs on one packed row without an attention mask")
    if dropout:
        raise ValueError(f"{ULYSSES} has no attention dropout; set the model's attention_dropout to 0")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{ULYSSES} has no attention logit softcapping; use --sequence-parallel-size 1")
    size = row.size
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, D)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads % size:  # fewer (or indivisible) key/value heads: adjacent replicas keep GQA's grouping per rank
        copies = size // math.gcd(kv_heads, size)
        k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
        kv_heads *= copies
    # One all-to-all for q, k and v: each rank's chunk holds its query heads, then its key and value heads.
    local = q.shape[0]
    stacked = torch.cat([t.reshape(local, size, -1, t.shape[-1]) for t in (q, k, v)], dim=2).flatten(1, 2)
    mine = to_heads(stacked, size, row.group)  # (T, (H + 2 H_kv) / S, D)
    q, k, v = mine.split([heads // size, kv_heads // size, kv_heads // size], dim=1)
    sliding = getattr(module, "sliding_window", None)
    out = attend(q, k, v, row, scaling, sliding)  # (T, H/S, D)
    return to_tokens(out, size, row.group)[None], None  # (1, L, H, D)


AttentionInterface.register(ULYSSES, ulysses_attention)


def use_on(lm) -> None:
    """Route `lm`'s attention through the Ulysses function (before it is sharded); a family that does not go through
    transformers' AttentionInterface is refused in one line."""
    lm.set_attn_implementation(ULYSSES)
    if lm.config._attn_implementation != ULYSSES:
        raise SequenceParallelError(
            f"--sequence-parallel-size: model type {getattr(lm.config, 'model_type', '?')!r} does not route its "
            f"attention through transformers' AttentionInterface, so it cannot be split by heads; use "
            f"--sequence-parallel-size 1")


@contextmanager
def plain_attention(lm):
    """`lm` with an attention that needs no split row (generate, the start-up probe's own forward): sdpa, or eager for
    families without it; the Ulysses function is put back afterwards."""
    if lm.config._attn_implementation != ULYSSES:
        yield
        return
    lm.set_attn_implementation("sdpa" if getattr(lm, "_supports_sdpa", False) else "eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(ULYSSES)
