"""Memory-safe causal-LM loss: logits only at trained positions, never a full (tokens x vocab) tensor.

`CausalLMLoss` wraps a Hugging Face causal LM and is what FSDP shards as its root. Its forward runs the decoder on a
packed row, picks the hidden states of the positions whose next token is trained, and returns the SUM of their
cross-entropies. Dividing by the step's trained-token count happens in train.py, where the whole step is known.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (rows, V): the only logits alive at any time
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_ce_sum(hidden, weight, bias, targets, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T + bias, targets), one chunk of rows at a time.

    Each chunk is checkpointed: its logits are freed after the forward and recomputed, one chunk at a time, in the
    backward, so peak memory holds one (chunk_rows x V) block instead of (rows x V).
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        end = start + chunk_rows
        total = total + checkpoint(_chunk_ce_sum, hidden[start:end], weight, bias, targets[start:end], use_reentrant=False)
    return total


class CausalLMLoss(nn.Module):
    def __init__(self, lm: nn.Module, use_liger: bool = False, chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.liger_loss = None
        if use_liger:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def ce_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states, (N,) targets -> summed cross-entropy through the LM head."""
        head = self.lm.get_output_embeddings()
        if self.liger_loss is not None:
            return self.liger_loss(head.weight, hidden, targets, head.bias)
        return chunked_ce_sum(hidden, head.weight, head.bias, targets, self.chunk_rows)

    def forward(self, input_ids, position_ids, positions, targets) -> torch.Tensor:
        # attention_mask=None + position_ids restarting at 0 + no KV cache: transformers builds a block-diagonal
        # mask (or uses flash-attention varlen), so no token attends to another sample of the pack.
        hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden[0]  # (T, H)
        if positions.numel() == 0:
            # Dummy pack or nothing trained: still run the head on one position, times zero, so every parameter gets
            # a (zero) gradient and this rank issues the same FSDP collectives as the others.
            return self.ce_sum(hidden[:1], input_ids[0, :1]) * 0.0
        return self.ce_sum(hidden[positions], targets)  # (N, H) -> scalar
