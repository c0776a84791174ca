"""What causal-LM families do differently, and the start-up probe that proves the trainer's loss is the model's own.

The trainer never runs the Hugging Face causal LM's own forward while training: it runs `lm.base_model` on a
packed row and computes the cross-entropy of the trained positions through the LM head weight (loss.py), so that
no (tokens x vocab) logits tensor is ever built. Whatever the causal LM's forward does between the base model
and the loss must therefore be done here too:

    logit transforms   Granite* divide the logits by `logits_scaling`, Cohere* multiply by `logit_scale`, Gemma 2/3/
                       3n/4 and others cap them (`final_logit_softcapping`): `LogitTransform` below
    router aux loss    Mixtral / Qwen-MoE / OLMoE add `router_aux_loss_coef * load_balancing_loss` when the config
                       sets `output_router_logits`: `RouterAuxLoss` below
    where the blocks   `model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`: `decoder_blocks`
    attention          a kernel the family supports that isolates packed samples: `attention_implementation`
    Liger kernels      each family's own entry point, with the arguments it takes: `liger_kernel_arguments`

A hand-kept table can be wrong or incomplete, so `check_loss_is_the_models_own` runs once at start-up, on the model
as it will train (sharded, with its attention kernel and Liger's loss if asked): a tiny packed probe through the
trainer must give the loss the model's own forward + plain cross-entropy gives, sample by sample, or the run is
refused in one line.
"""

import importlib.util
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ModelError(ValueError):
    """A model this trainer cannot train exactly; the message names the family and what to do."""


def family(config) -> str:
    return getattr(config, "model_type", type(config).__name__)


# ----------------------------------------------------------------------------------------------------------------
# Logit transforms: what the causal LM's forward does to `lm_head(hidden)` before its loss


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * (hidden @ W.T + b) / softcap), in that order (the identity by default)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform on full logits, as the model's forward applies it (tests and the probe's messages)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model type -> (config attribute, "divide" | "multiply"): the families whose forward scales the logits, read from
# transformers 5.24's modeling files. MiniCPM3 divides the hidden states before a bias-free head: the same thing.
LOGIT_SCALES = {
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid",
         "minicpm3"),
        ("logits_scaling", "divide"),
    ),
    "hyperclovax": ("logits_scaling", "multiply"),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), ("logit_scale", "multiply")),
    "falcon_h1": ("lm_head_multiplier", "multiply"),
}
# The softcap attribute, where it is set, is applied by every family that has it (Gemma 2/3/3n/4, VaultGemma,
# NanoChat, Mistral-Large-4, ...); RecurrentGemma names it differently.
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap")


def logit_transform(config) -> LogitTransform:
    """What `config`'s family does to its logits (the start-up probe checks it on the model itself)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if family(config) in LOGIT_SCALES:
        attribute, how = LOGIT_SCALES[family(config)]
        value = float(getattr(text, attribute, 1.0))  # absent: nothing to fold, and the probe has the last word
        scale = 1.0 / value if how == "divide" else value
    softcap = next((getattr(text, a) for a in SOFTCAP_ATTRIBUTES if getattr(text, a, None) is not None), None)
    return LogitTransform(scale, None if softcap is None else float(softcap))


# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-experts: the router's auxiliary (load-balancing) loss


@dataclass(frozen=True)
class RouterAuxLoss:
    """The model's own `loss += router_aux_loss_coef * load_balancing_loss_func(router_logits, experts, top_k, mask)`,
    with the function from the family's own modeling module and the attributes its causal LM reads."""

    coef: float
    num_experts: int
    top_k: int
    function: object  # the family's load_balancing_loss_func

    def __call__(self, router_logits) -> torch.Tensor:
        # attention_mask=None, as in the trainer's packed forward: every token of the row counts, as it does in the
        # model's own forward on that row.
        return self.function(router_logits, self.num_experts, self.top_k, None)


def router_aux_loss(lm: nn.Module) -> RouterAuxLoss | None:
    """The router aux loss when the config asks for it (`output_router_logits`), None otherwise."""
    if not getattr(lm.config, "output_router_logits", False):
        return None
    function = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    missing = [a for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef") if not hasattr(lm, a)]
    if function is None or missing:
        raise ModelError(
            f"model type {family(lm.config)!r} asks for a router auxiliary loss (output_router_logits=True) in a "
            f"form minitrain does not know; set output_router_logits=false in its config.json to train without it"
        )
    return RouterAuxLoss(float(lm.router_aux_loss_coef), int(lm.num_experts), int(lm.num_experts_per_tok), function)


# ----------------------------------------------------------------------------------------------------------------
# Where a family keeps its blocks


# Relative to `lm.base_model`: Llama/Qwen/Mistral/Gemma/Phi/OLMo/Granite/Cohere/Mixtral `model.layers`, GPT-2/GPT-J/
# Falcon/BLOOM `transformer.h`, GPT-NeoX `gpt_neox.layers`, OPT `model.decoder.layers`, MPT `transformer.blocks`.
BLOCK_LAYOUTS = ("layers", "h", "decoder.layers", "blocks")


# Encoder-decoders: relative to their encoder and decoder stacks, T5 `block`, BART/mBART/Pegasus/Marian `layers`.
STACK_LAYOUTS = ("block", "layers")


def decoder_blocks(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one (and activation checkpointing wraps); for an encoder-decoder,
    the encoder's blocks and then the decoder's."""
    if getattr(lm.config, "is_encoder_decoder", False):
        stacks = [lm.get_encoder(), lm.get_decoder()]
        found = [next((getattr(s, n) for n in STACK_LAYOUTS if isinstance(getattr(s, n, None), nn.ModuleList)), None)
                 for s in stacks]
        if any(f is None or len(f) == 0 for f in found) or any(s is lm for s in stacks):
            raise ModelError(f"model type {family(lm.config)!r} keeps its encoder or decoder blocks in none of the "
                             f"layouts minitrain knows (encoder/decoder .{', .'.join(STACK_LAYOUTS)}); train another "
                             f"family or add its layout to minitrain/training/families.py")
        return [*found[0], *found[1]]
    for path in BLOCK_LAYOUTS:
        found = lm.base_model
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    prefix = lm.base_model_prefix or "model"
    raise ModelError(
        f"model type {family(lm.config)!r} keeps its blocks in none of the layouts minitrain knows "
        f"({', '.join(f'{prefix}.{p}' for p in BLOCK_LAYOUTS)}); train another family or add its layout to "
        f"minitrain/training/families.py"
    )


# ----------------------------------------------------------------------------------------------------------------
# Attention kernel and Liger kernels per family


def attention_implementation(model_class: type, device: torch.device, asked: str = "auto", hf_config=None) -> str:
    """--attn-implementation `asked`, or for "auto" the fastest kernel the family supports that isolates packed
    samples: on CUDA flash-attention when installed, else minitrain's variable-length kernel (attention.py; for
    families with transformers' flash-attention code path and no attention softcapping); SDPA or flex with a
    block-diagonal mask from position_ids; eager with the same mask. Gemma-2 (and BLOOM) have no SDPA: flex on
    GPUs, eager on CPU. The probe checks the result."""
    from minitrain.training import attention

    if asked != "auto":
        return asked
    if getattr(hf_config, "is_encoder_decoder", False):  # padded micro-batches with attention masks
        return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    cuda = device.type == "cuda"
    if cuda and getattr(model_class, "_supports_flash_attn", False):
        for name, package in (("flash_attention_3", "flash_attn_interface"), ("flash_attention_2", "flash_attn")):
            if importlib.util.find_spec(package) is not None:
                return name
        if getattr(hf_config, "attn_logit_softcapping", None) is None:
            return attention.VARLEN
    if getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    if cuda and getattr(model_class, "_supports_flex_attn", False):
        return "flex_attention"
    return "eager"


def causal_lm_class(hf_config) -> type:
    """The model's class: its causal LM, or for an encoder-decoder (T5, BART, ...) its seq2seq LM."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    seq2seq = getattr(hf_config, "is_encoder_decoder", False)
    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING
    model_class = mapping.get(type(hf_config), None)
    if model_class is None:
        kind = "sequence-to-sequence LM" if seq2seq else "causal-LM"
        raise ModelError(f"model type {family(hf_config)!r} has no {kind} class in transformers; minitrain trains "
                         f"causal LMs and encoder-decoder text-to-text models")
    return model_class


def auto_class(hf_config) -> type:
    """AutoModelForSeq2SeqLM for an encoder-decoder, AutoModelForCausalLM otherwise."""
    import transformers

    seq2seq = getattr(hf_config, "is_encoder_decoder", False)
    return transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM


# Everything Liger's model patches can replace, minus the losses (the trainer computes its own, see loss.py).
# Gemma's entry points take `geglu`, the others `swiglu`; some take `layer_norm`: each gets only what it accepts.
LIGER_KERNELS = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True,
                     cross_entropy=False, fused_linear_cross_entropy=False)


def liger_entry_point(model_type: str):
    """Liger's public `apply_liger_kernel_to_<model type>`, or None when it has none for this family."""
    import liger_kernel.transformers as liger

    return getattr(liger, f"apply_liger_kernel_to_{model_type}", None)


def liger_kernel_arguments(entry_point) -> dict:
    """The keyword arguments `entry_point` takes, out of LIGER_KERNELS (model= is added by the caller)."""
    import inspect

    accepted = inspect.signature(entry_point).parameters
    return {k: v for k, v in LIGER_KERNELS.items() if k in accepted}


# ----------------------------------------------------------------------------------------------------------------
# The start-up probe

PROBE_LENGTHS = (9, 14, 6)  # three samples packed in one row, position_ids restarting at 0 for each


@dataclass(frozen=True)
class ProbeResult:
    trainer_loss: float  # the trainer's loss on the packed probe (per trained token, router aux loss included)
    own_loss: float  # the model's own forward, one sample at a time, + plain cross-entropy (+ its aux loss)
    packing_error: float  # max over tokens |CE packed - CE alone|, both from the model's own forward
    tolerance: float


def probe_row(vocab_size: int, device: torch.device):
    """(samples, input_ids, position_ids, positions, targets) of the probe: every next token trained."""
    g = torch.Generator().manual_seed(1234)
    samples = [torch.randint(0, vocab_size, (n,), generator=g).to(device) for n in PROBE_LENGTHS]
    ids = torch.cat(samples)[None]  # (1, T)
    pos = torch.cat([torch.arange(n, device=device) for n in PROBE_LENGTHS])[None]  # (1, T)
    starts = [sum(PROBE_LENGTHS[:i]) for i in range(len(PROBE_LENGTHS))]
    positions = torch.cat([torch.arange(s, s + n - 1, device=device) for s, n in zip(starts, PROBE_LENGTHS)])
    return samples, ids, pos, positions, ids[0, positions + 1]


@torch.no_grad()
def probe(model: nn.Module, device: torch.device) -> ProbeResult:
    """Run the probe on `model` (a PackedCausalLM, FSDP-sharded or not; collective under FSDP: every rank runs it)."""
    from minitrain.training.distributed import compute_autocast, gathered_once, models_own_forward
    from minitrain.training.sequence_parallel import plain_attention, sum_over_row

    lm = model.lm
    samples, ids, pos, positions, targets = probe_row(lm.config.vocab_size, device)
    was_training = model.training
    model.eval()  # no dropout, no router jitter: both sides deterministic
    try:
        with compute_autocast(model, device), gathered_once(model):
            # The root's first forward must be the root's own (FSDP2's lazy init); then its parameters (embeddings,
            # final norm, head) are all-gathered for the Hugging Face forward inside it.
            trainer_sum = model(ids, pos, positions, targets).float()
            # sequence parallelism: each rank of the group summed its slice of the row
            trainer_sum = sum_over_row(trainer_sum, getattr(model, "sequence_parallel", None))
            with models_own_forward(model), plain_attention(lm):  # the model's own forward: no row split
                packed = lm(input_ids=ids, position_ids=pos, use_cache=False)
                packed_ce = F.cross_entropy(packed.logits[0, positions].float(), targets, reduction="none")
                alone_ce = []
                for s in samples:
                    logits = lm(input_ids=s[None], position_ids=torch.arange(len(s), device=device)[None],
                                use_cache=False).logits[0]
                    alone_ce.append(F.cross_entropy(logits[:-1].float(), s[1:], reduction="none"))
                alone_ce = torch.cat(alone_ce)
                aux = getattr(packed, "aux_loss", None) if model.router_aux is not None else None
    finally:
        model.train(was_training)
    n = len(targets)
    own = alone_ce.mean().item() + (0.0 if aux is None else model.router_aux.coef * float(aux))
    # Relative: fp32 on CPU agrees to ~1e-6; bf16 compute on GPUs (autocast or FSDP's mixed precision) has ~3
    # significant digits, and the trainer's head computes in fp32 where the model's may not.
    low_precision = device.type == "cuda" or next(lm.parameters()).dtype != torch.float32
    tolerance = 2e-2 if low_precision else 1e-4
    return ProbeResult(trainer_sum.item() / n, own, (packed_ce - alone_ce).abs().max().item(), tolerance)


def run_probe(probe_fn, model: nn.Module, device: torch.device, what: str) -> ProbeResult:
    """probe_fn(model, device), or a ModelError in one line naming the family when the probe itself fails."""
    from minitrain.training.attention import RowBoundariesLost
    from minitrain.training.sequence_parallel import SequenceParallelError

    try:
        return probe_fn(model, device)
    except (SequenceParallelError, RowBoundariesLost) as e:  # attention that cannot get the row's boundaries
        raise ModelError(f"model type {family(model.lm.config)!r}: {e}") from None
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ModelError(f"model type {family(model.lm.config)!r}: the start-up probe ({what}) failed: "
                         f"{type(e).__name__}: {reason}; minitrain cannot train this family") from None


def check_loss_is_the_models_own(model: nn.Module, device: torch.device, attention: str) -> ProbeResult:
    """Refuse (ModelError, one line) a model whose packed samples are not isolated, or whose loss through the
    trainer is not the loss its own forward gives. Collective under FSDP."""
    name = family(model.lm.config)
    result = run_probe(probe, model, device, "a packed forward through the trainer and through the model itself")
    scale = max(1.0, abs(result.own_loss))
    if not result.packing_error <= result.tolerance * scale:
        raise ModelError(
            f"model type {name!r} with attn_implementation {attention!r} does not isolate packed samples: its own "
            f"forward on a packed probe differs from each sample alone by up to {result.packing_error:.4g} per "
            f"token (its attention ignores position_ids restarting per sample, so samples would attend to each "
            f"other); minitrain refuses to train it: pick a family listed as tested in the README"
        )
    split = getattr(model, "sequence_parallel", None)
    if split is not None and not math.isclose(result.trainer_loss, result.own_loss, rel_tol=result.tolerance):
        raise ModelError(
            f"model type {name!r}: on a packed probe split between {split.size} ranks (--sequence-parallel-size) the "
            f"trainer's loss is {result.trainer_loss:.6f} but the model's own forward gives {result.own_loss:.6f}; its "
            f"layers mix tokens outside attention, so its rows cannot be split: use --sequence-parallel-size 1"
        )
    if not math.isclose(result.trainer_loss, result.own_loss, rel_tol=result.tolerance):
        raise ModelError(
            f"model type {name!r}: on a packed probe the trainer's loss is {result.trainer_loss:.6f} but the "
            f"model's own forward + cross-entropy gives {result.own_loss:.6f}; its head or loss does something "
            f"minitrain does not reproduce (a logit transform it does not know?): add it to minitrain/training/families.py "
            f"or pick a family listed as tested in the README"
        )
    return result

