"""evaluate.py: exact validation loss (1 and 2 processes), greedy generations, the split, early stopping, trackers.

The 2-process check runs this file as the torchrun script (see `eval_worker`): FSDP2-sharded evaluation through
train.py's own model setup, compared on rank 0 with a direct computation on the unsharded Hugging Face model.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import torchrun, write_data

CAP = 64  # tokens per pack: the validation samples (10..39 tokens) need several packs


def direct_validation_loss(lm, cache, indices) -> float:
    """Token-mean CE of the plain Hugging Face model, one unpacked sample at a time, full logits."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in indices:
            start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
            ids = torch.from_numpy(np.array(cache.input_ids[start:end], dtype=np.int64))[None]
            labels = torch.from_numpy(np.array(cache.labels[start:end], dtype=np.int64))
            logits = lm(input_ids=ids).logits[0].double()  # (T, V)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


def direct_greedy(lm, prompt: np.ndarray, max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence again for every new token, no KV cache, no generate."""
    import torch

    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = lm(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def open_cache(data_path: Path, root: Path):
    from data import build_token_cache, open_token_cache

    build_token_cache(data_path, root / "cache")
    return open_token_cache(root / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Validation loss and generations: 1 process


def test_validation_loss_and_generations_match_a_direct_computation_in_one_process(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    import evaluate
    from loss import CausalLMLoss

    cache = open_cache(write_data(tmp_path / "data.jsonl", 24, vocab=700, seed=3), tmp_path)
    train_idx, val_idx = evaluate.split_validation(len(cache), 0.5)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model = CausalLMLoss(lm).train()
    evaluator = evaluate.build_evaluator(cache, val_idx, CAP, world_size=1, rank=0, num_generations=2,
                                         max_new_tokens=5, eos_token_ids=[])
    assert len(evaluator.packs) > 1  # several packs: the sum really is over packs
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    result = evaluator.run(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training  # training state untouched

    assert result.tokens == int(cache.trained[val_idx].sum())
    assert result.loss == pytest.approx(direct_validation_loss(lm, cache, val_idx), rel=1e-6)
    prompts = evaluator.prompts
    assert [p.index for p in prompts] == list(val_idx[:2])
    for p, reply in zip(prompts, result.replies):
        assert reply == direct_greedy(lm, p.prompt, 5)
        start = int(cache.offsets[p.index])
        first = int(np.flatnonzero(cache.labels[start : int(cache.offsets[p.index + 1])] != -100)[0])
        assert np.array_equal(p.prompt, cache.input_ids[start : start + first])  # everything before the reply


# ---------------------------------------------------------------------------------------------------------------
# Validation loss and generations: 2 processes, FSDP2-sharded


def eval_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import evaluate
    import train

    d = train.init_distributed("auto")
    config = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=2,
                               max_tokens_per_gpu=CAP, fsdp_sharding_strategy="FULL_SHARD")
    cache = train.load_data(config, d, vocab_size=10**6)
    _, val_idx = evaluate.split_validation(len(cache), 0.5)
    model = train.build_model(config, d)
    evaluator = evaluate.build_evaluator(cache, val_idx, CAP, d.world_size, d.rank, num_generations=2,
                                         max_new_tokens=5, eos_token_ids=[])
    result = evaluator.run(model, d.device)
    resharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    # A training forward/backward afterwards: every rank still issues the same collectives.
    packs = [np.arange(2 * d.rank, 2 * d.rank + 2)]
    after = train.forward_backward(model, cache, packs, int(cache.trained[:4].sum()), d.world_size, d.device)
    torch.distributed.all_reduce(after)
    if d.is_main:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        report = {
            "loss": result.loss,
            "direct_loss": direct_validation_loss(lm, cache, val_idx),
            "tokens": result.tokens,
            "val_tokens": int(cache.trained[val_idx].sum()),
            "micro_steps": len(evaluator.packs),
            "replies": result.replies,
            "direct_replies": [direct_greedy(lm, p.prompt, 5) for p in evaluator.prompts],
            "resharded": resharded,
            "training": model.training,
        }
        Path(out_dir, "report.json").write_text(json.dumps(report))
    train.cleanup_distributed()


def test_sharded_validation_loss_and_generations_on_two_ranks_match_a_direct_computation(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", 12, vocab=700, seed=4)
    run = torchrun([__file__, str(tiny_model_dir("llama")), str(data), str(tmp_path / "out")])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["micro_steps"] > 1
    assert report["tokens"] == report["val_tokens"]
    assert report["loss"] == pytest.approx(report["direct_loss"], rel=1e-6)
    assert report["replies"] == report["direct_replies"]
    assert report["resharded"] and report["training"]


if __name__ == "__main__":
    eval_worker(*sys.argv[1:4])
