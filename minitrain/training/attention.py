"""Which attention kernel packed rows use, and minitrain's variable-length kernel for CUDA without extra packages.

A packed row holds several samples; attention must not cross them. transformers isolates them from `position_ids`
restarting at 0: with SDPA by building a dense (1, 1, T, T) boolean mask (which rules out the flash SDPA backend,
expands K/V for GQA and computes all T^2 pairs), with flash-attention-2/3 by rebuilding the sequence boundaries
from `position_ids` in every layer with host syncs. minitrain does neither on CUDA: each pack carries its sequence
boundaries (`cu_seq_lens`, `max_length`), computed once on the host from the plan (Python ints, no device sync),
and passes them to the model, which hands them to the kernel:

    minitrain_varlen   torch.nn.attention.varlen.varlen_attn (FlashAttention inside PyTorch 2.13), registered
                       through transformers' public AttentionInterface; the default on CUDA
    flash_attention_2/3  used instead when the flash-attn package is installed (they take the same boundaries)
    sdpa               the default on CPU (it isolates packed samples, tested); on CUDA only when asked, with a
                       warning, since it builds the dense mask
"""

import importlib.util

import torch
from transformers import AttentionInterface

VARLEN = "minitrain_varlen"
WITH_BOUNDARIES = (VARLEN, "flash_attention_2", "flash_attention_3")  # kernels that take cu_seq_lens
CHOICES = ("auto", VARLEN, "flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention")


def varlen_kernel(query, key, value, cu_seq, max_len: int, scale: float | None, window: tuple[int, int],
                  enable_gqa: bool) -> torch.Tensor:
    """(T, H, D) x (T, H_kv, D) x (T, H_kv, D) -> (T, H, D), causal within each sequence. The CUDA kernel; the CPU
    tests put a per-sequence SDPA in its place to check everything around it."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu_seq, cu_seq, max_len, max_len, scale=scale, window_size=window,
                       enable_gqa=enable_gqa)


class RowBoundariesLost(ValueError):
    """The family's layers drop the model's extra keywords on the way to its attention function (Falcon): the packed
    row's sample boundaries never reach the variable-length kernel."""


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: (1, H, T, D) query/key/value -> ((1, T, H, D), None)."""
    if "cu_seq_lens_q" not in kwargs:  # minitrain's forward passed them (model.py): the layers dropped them
        raise RowBoundariesLost(f"{type(module).__name__} does not hand the model's extra keywords to its attention "
                                f"function, so the packed row's sample boundaries never reach {VARLEN}; pass "
                                f"--attn-implementation sdpa")
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN} runs on one packed row without an attention mask")
    if dropout:
        raise ValueError(f"{VARLEN} has no attention dropout ({dropout}); set it to 0 in the model's config.json "
                         f"(attention_dropout, or attn_pdrop for GPT-2) or pass --attn-implementation sdpa")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{VARLEN} has no logit softcapping; use --attn-implementation eager for this model")
    sliding = getattr(module, "sliding_window", None)
    window = (-1, 0) if sliding is None else (sliding - 1, 0)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    out = varlen_kernel(q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], scaling, window,
                        k.shape[1] != q.shape[1])
    return out[None], None


AttentionInterface.register(VARLEN, varlen_attention)


def choose(asked: str, device: torch.device) -> str:
    """The kernel for --attn-implementation `asked` ("auto": flash-attn when installed, else minitrain_varlen on
    CUDA; sdpa on CPU)."""
    if asked != "auto":
        return asked
    if device.type != "cuda":
        return "sdpa"
    for name, package in (("flash_attention_3", "flash_attn_interface"), ("flash_attention_2", "flash_attn")):
        if importlib.util.find_spec(package) is not None:
            return name
    return VARLEN


def problem(asked: str, cuda: bool) -> str | None:
    """Why --attn-implementation `asked` cannot work here, or None; checked before any weights load."""
    if asked not in CHOICES:
        return f"--attn-implementation {asked!r} is unknown; use one of {', '.join(CHOICES)}"
    if asked in (VARLEN, "flash_attention_2", "flash_attention_3") and not cuda:
        return f"--attn-implementation {asked} needs a CUDA GPU; on CPU use auto (sdpa)"
    packages = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    if asked in packages and importlib.util.find_spec(packages[asked]) is None:
        return f"--attn-implementation {asked} needs the {packages[asked]} package; pip install it or use auto"
    return None
