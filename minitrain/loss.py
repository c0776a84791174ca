"""Memory-safe cross-entropy through an LM head: logits only at trained positions, never a full (tokens x vocab)
tensor, and one chunk of them at a time.

model.PackedCausalLM calls it with the hidden states of the positions whose next token is trained and the model's own
logit transform (families.py: Granite's scaling, Gemma-2's softcap, ...); it returns the SUM of their cross-entropies. Dividing by the step's count happens in train.py, where the whole step is known.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minitrain.families import LogitTransform

IDENTITY = LogitTransform()  # most families: CE of the head's logits as they are


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum CE(transform(hidden @ weight.T + bias), targets), one chunk of rows at a time, gradients computed in the
    forward. `transform` is the model's own logit transform: times `scale`, then `softcap * tanh(. / softcap)`.

    Only one (chunk_rows x V) block of logits is ever alive. Computing the gradients while that block exists (as
    Liger's fused kernel does) avoids a second logits matmul in the backward: 3 matmuls of the LM head per row, as
    for full logits, instead of 4 with activation checkpointing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, with_grad: bool, scale: float,
                softcap: float | None):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        grad_bias = None
        if with_grad and bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = F.linear(h, weight, bias).float()  # (c, V)
            # The model's own transform, in its order (families.LogitTransform): scale, then cap.
            if scale != 1.0:
                logits = logits * scale
            if softcap is not None:
                capped = torch.tanh(logits / softcap)  # (c, V), kept for the derivative 1 - tanh^2
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not with_grad:
                continue
            # d(sum of CE)/d(logits) = softmax(logits) - one_hot(target), built in place over the logits
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(len(t), device=t.device), t] -= 1.0
            if softcap is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh(x / cap)^2
                dlogits *= capped.square_().neg_().add_(1.0)
            if scale != 1.0:
                dlogits *= scale
            dlogits = dlogits.to(h.dtype)
            grad_hidden[start : start + chunk_rows] = dlogits @ weight  # (c, H)
            grad_weight += dlogits.T @ h  # (V, H), accumulated in fp32
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype),
            (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_ce_sum(hidden, weight, bias, targets, chunk_rows: int = 1024,
                   transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """(N, H) hidden, (V, H) weight, (V,) bias or None, (N,) targets -> sum of cross-entropy of the transformed
    logits, memory-safe."""
    with_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows, with_grad, transform.scale,
                                        transform.softcap)


class HeadCrossEntropy(nn.Module):
    """sum of CE(transform(head(hidden)), targets) through an LM head (nn.Linear): chunked (above), or Liger's fused
    linear cross-entropy on GPUs. Holds no parameters of its own: the head's stay where the model keeps them.

    Liger takes the softcap itself; the scale is folded into its inputs, exactly:
    scale * (h @ W.T + b) = (scale * h) @ W.T + scale * b. It accumulates the head's gradient in fp32
    (`accum_dtype`), as the chunked path does, so bf16 runs on one GPU and on eight agree.
    """

    def __init__(self, use_liger: bool = False, chunk_rows: int = 1024,
                 transform: LogitTransform = IDENTITY):
        super().__init__()
        self.chunk_rows = chunk_rows
        self.transform = transform
        self.liger_loss = None
        if use_liger:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.liger_loss = LigerFusedLinearCrossEntropyLoss(
                reduction="sum", softcap=transform.softcap, accum_dtype=torch.float32
            )

    def forward(self, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states, (N,) targets -> summed cross-entropy."""
        if self.liger_loss is not None:
            scale, bias = self.transform.scale, head.bias
            if scale != 1.0:
                hidden, bias = hidden * scale, None if bias is None else bias * scale
            return self.liger_loss(head.weight, hidden, targets, bias)
        return chunked_ce_sum(hidden, head.weight, head.bias, targets, self.chunk_rows, self.transform)
