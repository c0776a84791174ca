"""Reward models (--objective reward): a Hugging Face XForSequenceClassification with one label, run on packed rows.

`PackedRewardModel` is the module FSDP shards as its root for a reward run (PackedCausalLM's counterpart): the
transformer over one packed row (each sequence its own positions, isolated as in SFT), then the model's own `score`
head read at each sequence's scoring position. That position is the one Hugging Face's own forward reads on the
sequence alone: its last token that is not the config's pad token (the last token when there is none), so an export
loaded with AutoModelForSequenceClassification scores a pair as the live model did.
"""

import numpy as np
import torch
from torch import nn

from minitrain.training import attention, families
from minitrain.training.adapter import FullFineTuning
from minitrain.training.families import ModelError, family


def score_config(hf_config):
    """`hf_config` for a one-label sequence-classification head (a copy; the causal LM's config is left as is)."""
    import copy

    hf_config = copy.deepcopy(hf_config)
    hf_config.num_labels = 1
    return hf_config


def model_class(config, hf_config) -> tuple[type, object]:
    """(The Hugging Face class a run of `config` trains, the config it is built with): the family's one-label
    sequence classifier for --objective reward (a causal LM's folder leaves its `score` head new), else the causal LM
    (or encoder-decoder) Auto class of families.auto_class, with `hf_config` as it is."""
    if getattr(config, "objective", "sft") == "reward":
        return score_class(hf_config), score_config(hf_config)
    return families.auto_class(hf_config), hf_config


def from_config(model_class: type, hf_config, **kwargs) -> nn.Module:
    """`model_class` with fresh weights from `hf_config`: an Auto class's from_config, a model class's _from_config."""
    build = getattr(model_class, "from_config", None) or model_class._from_config
    return build(hf_config, **kwargs)


def score_class(hf_config) -> type:
    """The family's XForSequenceClassification, or a one-line refusal."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(hf_config), None)
    if model_class is None or getattr(hf_config, "is_encoder_decoder", False):
        raise ModelError(f"model type {family(hf_config)!r} has no decoder sequence-classification class in "
                         f"transformers; --objective reward trains causal LMs with a score head")
    return model_class


def scoring_positions(input_ids: np.ndarray, sizes: list[int], pad_token_id: int | None) -> np.ndarray:
    """Each sequence's scoring position in the packed row: its last token that is not `pad_token_id` (as Hugging
    Face's sequence classifiers pick it; the sequence's first token if all are pad), its last with no pad token."""
    ends = np.cumsum(sizes) - 1
    if pad_token_id is None:
        return ends
    starts = ends - np.asarray(sizes) + 1
    out = []
    for start, end in zip(starts, ends):
        real = np.flatnonzero(input_ids[start:end + 1] != pad_token_id)
        out.append(start + (real[-1] if len(real) else 0))
    return np.asarray(out, dtype=np.int64)


def linear_head(head: nn.Module | None) -> nn.Module | None:
    """The layer of a `score` head: the head itself, or under LoRA the original layer inside peft's
    ModulesToSaveWrapper (which runs a trained copy of it and keeps the original frozen)."""
    return getattr(head, "original_module", head)


class PackedRewardModel(nn.Module):
    """A sequence classifier over packed rows: forward(row, scoring positions) -> each sequence's score, (S,)."""

    def __init__(self, lm: nn.Module, adapter: "FullFineTuning | None" = None):
        super().__init__()
        if not isinstance(linear_head(getattr(lm, "score", None)), nn.Linear):
            raise ModelError(f"model type {family(lm.config)!r}: its sequence classifier has no nn.Linear `score` "
                             f"head; --objective reward cannot train it")
        self.lm = lm
        self.adapter = adapter or FullFineTuning()
        self.router_aux = None  # the loop asks every model for a router loss (mixture-of-experts)
        self.attention_takes_boundaries = lm.config._attn_implementation in attention.WITH_BOUNDARIES

    def forward(self, input_ids, position_ids, scoring, cu_seq_lens=None, max_length=None) -> torch.Tensor:
        extra = {}
        if self.attention_takes_boundaries and cu_seq_lens is not None:
            extra.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length,
                         max_length_k=max_length)
        out = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        hidden = out.last_hidden_state[0]  # (T, H)
        # a new tensor, not a view: FSDP2 drops its pre-backward hook on an in-place op applied to a returned view
        return self.lm.score(hidden[scoring]).squeeze(-1).float().clone()  # (S, H) -> (S,)

    def pop_router_aux_sum(self) -> None:
        return None


def check_score_is_the_models_own(model: PackedRewardModel, device: torch.device, pad_token_id: int | None,
                                  vocab_size: int) -> float:
    """The start-up probe of a reward run: two sequences packed in one row must score as the model's own forward
    scores each alone; returns the largest difference, or raises ModelError in one line."""
    generator = torch.Generator().manual_seed(0)
    sizes = [7, 5]
    ids = torch.randint(3, min(vocab_size, 1000), (sum(sizes),), generator=generator)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = 3 if pad_token_id != 3 else 4
    row = ids.numpy()
    scoring = torch.from_numpy(scoring_positions(row, sizes, pad_token_id)).to(device)
    positions = torch.cat([torch.arange(n) for n in sizes])[None].to(device)
    cu = torch.tensor(np.cumsum([0, *sizes]), dtype=torch.int32, device=device)
    from minitrain.training.distributed import compute_autocast, gathered_once, models_own_forward

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute_autocast(model, device), gathered_once(model):
            packed = model(ids[None].to(device), positions, scoring, cu, max(sizes))  # the root's forward first
            with models_own_forward(model):
                own = torch.cat([model.lm(input_ids=seq[None].to(device), use_cache=False).logits.reshape(-1).float()
                                 for seq in ids.split(sizes)])
    finally:
        model.train(was_training)
    error = (packed - own).abs().max().item()
    tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 compute on GPUs, fp32 on CPU
    if not error <= tolerance * max(1.0, own.abs().max().item()):
        raise ModelError(f"model type {family(model.lm.config)!r}: a packed row scores {packed.tolist()}, the model's "
                         f"own forward on each sequence {own.tolist()}; its packed sequences are not isolated")
    return error
