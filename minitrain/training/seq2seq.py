"""Encoder-decoder models (T5, FLAN-T5, BART, mBART, Pegasus, Marian, ...): the root module FSDP shards, and the
start-up probe that proves its loss is the model's own.

`Seq2SeqLM` runs the model's encoder on a padded micro-batch of sources (data.make_seq2seq_pack) and its decoder on
the targets shifted right by the model's own `prepare_decoder_input_ids_from_labels` (T5, BART: the decoder start
token first; mBART: the target's last token, its language id), and returns the summed cross-entropy of the target
tokens through the LM head (loss.py: logits only at target positions, one chunk at a time). What the model's own
forward does between the decoder and its loss is done here too:

    T5 family       the decoder output times d_model^-0.5 before a tied head (config.scale_decoder_outputs): folded
                    into the logits as a scale, exactly (the head has no bias)
    BART family     + final_logits_bias (a buffer) on the logits: passed to the loss as the head's bias

Anything else a family does shows in the probe, which refuses the run in one line.
"""

import math

import torch
from torch import nn

from minitrain import IGNORE
from minitrain.training.adapter import FullFineTuning
from minitrain.training.families import (
    LogitTransform,
    ModelError,
    ProbeResult,
    family,
    run_probe,
)
from minitrain.training.loss import HeadCrossEntropy, linear_head


def logit_transform(config) -> LogitTransform:
    """T5's, UMT5's and LongT5's d_model^-0.5 on the decoder output, where their config asks for it (transformers 5
    reads it from the checkpoint's tie_word_embeddings); mT5 and the BART family: none."""
    if getattr(config, "scale_decoder_outputs", False):
        return LogitTransform(scale=config.d_model**-0.5)
    return LogitTransform()


class Seq2SeqLM(nn.Module):
    """An encoder-decoder over padded micro-batches: forward(batch) -> sum of CE over the target tokens."""

    router_aux = None  # no mixture-of-experts aux loss for encoder-decoders (switch_transformers is refused)

    def __init__(self, lm: nn.Module, adapter=None):
        super().__init__()
        self.lm = lm
        if getattr(lm.config, "output_router_logits", False):
            raise ModelError(f"model type {family(lm.config)!r} asks for a router auxiliary loss, which minitrain "
                             f"does not add for encoder-decoder models; set output_router_logits=false")
        head = linear_head(lm.get_output_embeddings())
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ModelError(f"model type {family(lm.config)!r} has no bias-free nn.Linear LM head; minitrain cannot "
                             f"train it")
        self.head_loss = HeadCrossEntropy(False, 1024, logit_transform(lm.config))
        self.adapter = adapter or FullFineTuning()

    def forward(self, input_ids, attention_mask, labels, positions, targets, row_weights=None,
                row_ce_out=None) -> torch.Tensor:
        """The summed CE of the target tokens at `positions` (flat indices into the (B, T) labels), each weighted by
        `row_weights` when given; `row_ce_out` receives each one's CE. No decoder attention mask, as in the model's
        own forward with labels: the decoder is causal, so the padding after a target changes none of its logits."""
        encoded = self.lm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        decoder_input_ids = self.lm.prepare_decoder_input_ids_from_labels(labels=labels)
        decoded = self.lm.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                                        encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = decoded.reshape(-1, decoded.shape[-1])  # (B * T, H)
        head = linear_head(self.lm.get_output_embeddings())
        bias = getattr(self.lm, "final_logits_bias", None)  # BART family: (1, V), added to the logits
        bias = None if bias is None else bias[0].to(hidden.dtype)
        if positions.numel() == 0:  # a dummy pack: every parameter gets a zero gradient, the same collectives run
            return self.head_loss(_WithBias(head, bias), hidden[:1], decoder_input_ids.reshape(-1)[:1]) * 0.0
        return self.head_loss(_WithBias(head, bias), hidden[positions], targets, row_weights, row_ce_out)

    def pop_router_aux_sum(self) -> None:
        return None


class _WithBias:
    """The head's weight with the family's logit bias (BART's final_logits_bias) as its bias, for loss.py."""

    def __init__(self, head: nn.Linear, bias: torch.Tensor | None):
        self.weight, self.bias = head.weight, bias


# ----------------------------------------------------------------------------------------------------------------
# The start-up probe: a padded micro-batch through the trainer vs the model's own forward, one sample at a time

PROBE_SHAPES = ((7, 5), (12, 9), (4, 3))  # (source, target) tokens of the probe's samples


@torch.no_grad()
def probe(model: Seq2SeqLM, device: torch.device) -> ProbeResult:
    """Collective under FSDP (every rank runs it): the trainer's mean CE on a padded probe batch, and the model's own
    `loss` (its forward with `labels`, plain CE) of each sample alone, token-weighted."""
    from minitrain.training.distributed import compute_autocast, gathered_once, models_own_forward

    lm = model.lm
    config = lm.config
    g = torch.Generator().manual_seed(1234)
    # ids above the special tokens, so no sample holds a pad (the model's own loss would see none either)
    low = min(config.vocab_size - 1, 8)
    samples = [(torch.randint(low, config.vocab_size, (s,), generator=g), torch.randint(low, config.vocab_size, (t,),
                generator=g)) for s, t in PROBE_SHAPES]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    batch, s_max, t_max = len(samples), max(s for s, _ in PROBE_SHAPES), max(t for _, t in PROBE_SHAPES)
    ids = torch.full((batch, s_max), pad, dtype=torch.long)
    mask = torch.zeros((batch, s_max), dtype=torch.long)
    labels = torch.full((batch, t_max), IGNORE, dtype=torch.long)
    for row, (source, target) in enumerate(samples):
        ids[row, : len(source)], mask[row, : len(source)], labels[row, : len(target)] = source, 1, target
    flat = torch.nonzero(labels.reshape(-1) != IGNORE)[:, 0]
    tensors = [t.to(device) for t in (ids, mask, labels, flat, labels.reshape(-1)[flat])]
    was_training = model.training
    model.eval()
    try:
        with compute_autocast(model, device), gathered_once(model):
            trainer_sum = model(*tensors).float()  # the root's own forward first (FSDP2's lazy init)
            with models_own_forward(model):
                # the model's own loss (its mean CE over the sample's target tokens), one sample at a time
                own = sum(lm(input_ids=source[None].to(device), labels=target[None].to(device), use_cache=False)
                          .loss.float().item() * len(target) for source, target in samples)
    finally:
        model.train(was_training)
    low_precision = device.type == "cuda" or next(lm.parameters()).dtype != torch.float32
    n = sum(t for _, t in PROBE_SHAPES)
    return ProbeResult(trainer_sum.item() / n, own / n, 0.0, 2e-2 if low_precision else 1e-4)


def check_loss_is_the_models_own(model: Seq2SeqLM, device: torch.device) -> ProbeResult:
    """Refuse (ModelError, one line) an encoder-decoder whose loss through the trainer, on a padded micro-batch, is
    not what its own forward gives each sample alone. Collective under FSDP."""
    name = family(model.lm.config)
    if model.lm.config.pad_token_id is None:
        raise ModelError(f"model type {name!r}: its config has no pad_token_id, which pads the sources and targets "
                         f"of a micro-batch (and which its own loss needs); set pad_token_id in config.json")
    result = run_probe(probe, model, device, "a padded batch through the trainer and each sample through the model "
                                             "itself")
    if not math.isclose(result.trainer_loss, result.own_loss, rel_tol=result.tolerance):
        raise ModelError(
            f"model type {name!r}: on a padded probe batch the trainer's loss is {result.trainer_loss:.6f} but the "
            f"model's own forward, one sample at a time, gives {result.own_loss:.6f}; its head, loss or padding does "
            f"something minitrain does not reproduce: add it to minitrain/training/seq2seq.py or pick a tested family (README)"
        )
    return result
