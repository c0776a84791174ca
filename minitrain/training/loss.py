"""Memory-safe cross-entropy through an LM head: logits only at trained positions, never a full (tokens x vocab)
tensor, and one chunk of them at a time.

model.PackedCausalLM calls it with the hidden states of the positions whose next token is trained and the model's
own logit transform (families.py: Granite's scaling, Gemma-2's softcap, ...); it returns the SUM of their
cross-entropies (or, for DPO/SimPO, each one's; for distillation, each one's CE and KL to a teacher's top-k, see
TopKTeacher). Dividing by the step's count happens in train.py, where the whole step is known.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minitrain.training.families import LogitTransform

IDENTITY = LogitTransform()  # most families: CE of the head's logits as they are


@dataclass
class TopKTeacher:
    """Distillation's targets at the trained positions, and what the loss of each position becomes:

        (1 - alpha) CE + alpha T² KL(q || s),  q_i = exp(l_i / T) / sum_{j in S} exp(l_j / T),
                                               s_i = exp(z_i / T) / sum_{j in S} exp(z_j / T),  i in S

    S the teacher's k likeliest next tokens (`ids`), l their teacher log-probs at T = 1 over the whole vocabulary
    (`logprobs`; renormalised over S at temperature T, the vocabulary's normaliser cancels), z the student's logits
    (its own transform); s is the student's softmax at temperature T renormalised over S, in which the student's
    normaliser over the vocabulary cancels too. T² keeps the KL's gradient on the scale of the CE's as T changes
    (Hinton et al. 2015). `sums` (2,) receives (sum of KL, sum of CE) over the rows, for the metrics."""

    ids: torch.Tensor  # (N, k) long
    logprobs: torch.Tensor  # (N, k) float32
    alpha: float
    temperature: float
    sums: torch.Tensor  # (2,) float32


def _topk_kl(logits: torch.Tensor, teacher: TopKTeacher, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(q || s) of each row of this chunk, (c,); s - q, (c, k): T x d KL / d logits at the teacher's ids)."""
    t = teacher.temperature
    student = logits.gather(1, teacher.ids[rows]) / t  # (c, k)
    log_s = student - student.logsumexp(-1, keepdim=True)
    scaled = teacher.logprobs[rows].float() / t
    log_q = scaled - scaled.logsumexp(-1, keepdim=True)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_s), 0.0).sum(-1)
    return kl, log_s.exp() - q


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum CE(transform(hidden @ weight.T + bias), targets), one chunk of rows at a time, gradients computed in the
    forward. `transform` is the model's own logit transform: times `scale`, then `softcap * tanh(. / softcap)`.

    Only one (chunk_rows x V) block of logits is ever alive. Computing the gradients while that block exists (as
    Liger's fused kernel does) avoids a second logits matmul in the backward: 3 matmuls of the LM head per row, as
    for full logits, instead of 4 with activation checkpointing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights, row_ce_out, chunk_rows: int, with_grad: bool,
                scale: float, softcap: float | None, teacher: TopKTeacher | None = None):
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
            ce = lse - logits.gather(1, t[:, None]).squeeze(1)  # (c,)
            rows = ce
            if teacher is not None:  # distillation: (1 - alpha) CE + alpha T² KL
                a, temp = teacher.alpha, teacher.temperature
                kl, kl_grad = _topk_kl(logits, teacher, slice(start, start + chunk_rows))
                rows = (1 - a) * ce + (a * temp * temp) * kl
                teacher.sums += torch.stack([kl.sum(), ce.sum()]).detach()
            w = None if row_weights is None else row_weights[start : start + chunk_rows]
            total += (rows if w is None else rows * w).sum()
            if row_ce_out is not None:
                row_ce_out[start : start + chunk_rows] = ce
            if not with_grad:
                continue
            # d(sum of w * CE)/d(logits) = w * (softmax(logits) - one_hot(target)), built in place over the logits
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(len(t), device=t.device), t] -= 1.0
            if teacher is not None:  # d(alpha T² KL)/d(logits at the teacher's ids) = alpha T (s - q)
                dlogits.mul_(1 - a).scatter_add_(1, teacher.ids[start : start + chunk_rows], (a * temp) * kl_grad)
            if w is not None:
                dlogits.mul_(w[:, None])
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
            None, None, None, None, None, None, None, None,
        )


def chunked_ce_sum(hidden, weight, bias, targets, chunk_rows: int = 1024, row_weights=None, row_ce_out=None,
                   transform: LogitTransform = IDENTITY, teacher: TopKTeacher | None = None) -> torch.Tensor:
    """(N, H) hidden, (V, H) weight, (V,) bias or None, (N,) targets -> sum of cross-entropy of the transformed
    logits, memory-safe. `row_weights` (N,) float32: the sum of row_weights * CE instead (per-sequence means, see
    objectives.py). `row_ce_out` (N,) float32: filled with each row's CE (no gradient; for per-file metrics).
    `teacher`: each row's loss is distillation's (TopKTeacher) instead of its CE."""
    with_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, row_weights, row_ce_out, chunk_rows, with_grad,
                                        transform.scale, transform.softcap, teacher)


@torch.no_grad()
def chunked_topk_logprobs(hidden, weight, bias, k: int, chunk_rows: int = 1024,
                          transform: LogitTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) hidden -> the k likeliest next tokens of each row by the transformed logits: (N, k) ids (long) and
    their log-probs over the whole vocabulary (float32), one (chunk_rows x V) block of logits at a time (a
    distillation teacher's table, see teacher.py)."""
    ids = torch.empty((hidden.shape[0], k), dtype=torch.long, device=hidden.device)
    logprobs = torch.empty((hidden.shape[0], k), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = _transformed(F.linear(hidden[start : start + chunk_rows], weight, bias).float(), transform.scale,
                              transform.softcap)[0]
        top = logits.topk(k, dim=-1)
        ids[start : start + chunk_rows] = top.indices
        logprobs[start : start + chunk_rows] = top.values - logits.logsumexp(-1, keepdim=True)
    return ids, logprobs


class _LinearCrossEntropyPerRow(torch.autograd.Function):
    """CE(hidden @ weight.T + bias, targets) of every row, (N,), one chunk of rows at a time.

    For objectives that weigh each row's CE differently (DPO/SimPO sum them per sequence and pass the sums through a
    non-linear loss): the incoming gradient is one number per row, known only in backward. So the forward keeps only
    each row's logsumexp, and the backward recomputes each chunk's logits: 4 matmuls of the LM head per row instead
    of 3, and still never more than one (chunk_rows x V) block of logits alive.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, scale: float, softcap: float | None):
        ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(ce)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = _transformed(F.linear(h, weight, bias).float(), scale, softcap)[0]  # (c, V)
            lse[start : start + chunk_rows] = torch.logsumexp(logits, dim=-1)
            ce[start : start + chunk_rows] = lse[start : start + chunk_rows] - logits.gather(1, t[:, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.scale, ctx.softcap = chunk_rows, scale, softcap
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        step = ctx.chunk_rows
        for start in range(0, hidden.shape[0], step):
            h, t = hidden[start : start + step], targets[start : start + step]
            # d(CE_r)/d(logits_r) = softmax(logits_r) - one_hot(t_r), times the row's incoming gradient, through the
            # model's own logit transform
            logits, capped = _transformed(F.linear(h, weight, bias).float(), ctx.scale, ctx.softcap)
            dlogits = logits.sub_(lse[start : start + step, None]).exp_()
            dlogits[torch.arange(len(t), device=t.device), t] -= 1.0
            dlogits *= grad_ce[start : start + step, None].float()
            if capped is not None:
                dlogits *= capped.square_().neg_().add_(1.0)
            if ctx.scale != 1.0:
                dlogits *= ctx.scale
            dlogits = dlogits.to(h.dtype)
            grad_hidden[start : start + step] = dlogits @ weight  # (c, H)
            grad_weight += dlogits.T @ h  # (V, H), accumulated in fp32
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )


def _transformed(logits: torch.Tensor, scale: float, softcap: float | None):
    """(the model's own transform of the logits, tanh(x / cap) for the softcap's derivative or None)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def chunked_ce_per_row(hidden, weight, bias, targets, chunk_rows: int = 1024,
                       transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """(N, H) hidden, (V, H) weight, (V,) bias or None, (N,) targets -> (N,) cross-entropy of each row."""
    return _LinearCrossEntropyPerRow.apply(hidden, weight, bias, targets, chunk_rows, transform.scale,
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

    def forward(self, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, row_weights=None,
                row_ce_out=None, teacher: TopKTeacher | None = None) -> torch.Tensor:
        """(N, H) hidden states, (N,) targets -> summed cross-entropy (weighted by `row_weights` when given);
        `row_ce_out` receives each row's CE (not with Liger, whose kernel gives only the sum: left NaN). With
        `teacher`, distillation's loss (TopKTeacher), always on the chunked kernel: Liger's fused cross-entropy
        keeps no logits to read the teacher's ids from."""
        if self.liger_loss is not None and teacher is None:
            assert row_weights is None, "train.py refuses --loss-reduction sequences with --use-liger-kernels"
            if row_ce_out is not None:
                row_ce_out.fill_(float("nan"))
            scale, bias = self.transform.scale, head.bias
            if scale != 1.0:
                hidden, bias = hidden * scale, None if bias is None else bias * scale
            return self.liger_loss(head.weight, hidden, targets, bias)
        return chunked_ce_sum(hidden, head.weight, head.bias, targets, self.chunk_rows, row_weights, row_ce_out,
                              self.transform, teacher)

    def top_k(self, head: nn.Linear, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) hidden states -> (N, k) ids and log-probs of each row's k likeliest next tokens (no gradient)."""
        return chunked_topk_logprobs(hidden, head.weight, head.bias, k, self.chunk_rows, self.transform)

    def per_row(self, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states, (N,) targets -> (N,) cross-entropy of each row (always the chunked kernel: Liger's
        fused one computes its gradients in the forward, for a summed loss only)."""
        return chunked_ce_per_row(hidden, head.weight, head.bias, targets, self.chunk_rows, self.transform)


def linear_head(head: nn.Module) -> nn.Module:
    """The nn.Linear that computes the logits: the head itself, or, when LoRA trains a copy of it
    (--lora-modules-to-save lm_head: peft's ModulesToSaveWrapper), the active copy (the original with adapters off)."""
    original = getattr(head, "original_module", None)
    if isinstance(head, nn.Linear) or original is None:
        return head
    if getattr(head, "disable_adapters", False):
        return original
    return head.modules_to_save[head.active_adapters[0]]
