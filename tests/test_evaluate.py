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


# ---------------------------------------------------------------------------------------------------------------
# The split, early stopping and trackers (pure)


def test_validation_split_is_exact_disjoint_fixed_and_stable_when_samples_are_appended():
    from evaluate import EvalError, split_validation

    train_idx, val_idx = split_validation(1000, 0.1)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    again = split_validation(1000, 0.1)[1]
    assert np.array_equal(val_idx, again)  # deterministic, and independent of any training seed
    grown = split_validation(1010, 0.1)[1]  # ten samples appended: the held-out set barely moves
    assert len(np.intersect1d(val_idx, grown)) >= 95
    for fraction in (0.0, 0.0004, 0.9996, 1.0):
        with pytest.raises(EvalError, match=f"--validation-split {fraction} of 1000 samples"):
            split_validation(1000, fraction)


def test_early_stopping_stops_after_patience_evaluations_without_a_real_improvement():
    from evaluate import EarlyStopping

    stopper = EarlyStopping(patience=2, min_delta=0.05)
    history = []
    for samples, loss in [(10, 2.0), (20, 1.5), (30, 1.48), (40, 1.3), (50, 1.29), (60, 1.26), (70, 1.0)]:
        improved = stopper.update(loss, samples)
        history.append((samples, improved, stopper.should_stop))
        if stopper.should_stop:
            break
    # 1.48 and 1.29 and 1.26 are within min_delta of the best (1.5, then 1.3): no improvement.
    assert history == [(10, True, False), (20, True, False), (30, False, False), (40, True, False),
                       (50, False, False), (60, False, True)]
    assert (stopper.best_loss, stopper.best_samples) == (1.3, 40)


def test_trackers_log_the_numbers_of_each_record_and_a_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from evaluate import TensorBoardTracker, WandbTracker, tracker_problem

    class Writer:  # the SummaryWriter calls the tracker makes
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def close(self):
            self.calls.append("closed")

    class Run:  # the wandb run calls the tracker makes
        def __init__(self):
            self.calls = []

        def log(self, values, step):
            self.calls.append((values, step))

        def finish(self):
            self.calls.append("finished")

    record = {"step": 3, "loss": 1.5, "validation_loss": 1.7, "sample_lines": [1, 2], "stopped": True}
    writer, run = Writer(), Run()
    for tracker in (TensorBoardTracker(writer), WandbTracker(run)):
        tracker.log(record, step=3)
        tracker.close()
    assert writer.calls == [("step", 3.0, 3), ("loss", 1.5, 3), ("validation_loss", 1.7, 3), "closed"]
    assert run.calls == [({"step": 3.0, "loss": 1.5, "validation_loss": 1.7}, 3), "finished"]

    assert tracker_problem(None) is None
    assert "--tracker 'mlflow' is unknown; use one of wandb, tensorboard" in tracker_problem("mlflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # neither package installed
    for name in ("wandb", "tensorboard"):
        assert tracker_problem(name) == (f"--tracker {name} needs the {name} package, which is not installed; "
                                         f"pip install {name}")


# ---------------------------------------------------------------------------------------------------------------
# plot_run.py


def test_plot_errors_are_one_line_naming_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    import plot_run

    def run(*args) -> tuple[int, str]:
        code = plot_run.main([str(a) for a in args])
        return code, capsys.readouterr().err

    code, err = run(tmp_path)
    assert code == 1 and err == f"plot_run.py: error: {tmp_path / 'metrics.jsonl'}: no such file; pass the " \
                                "--output-dir of a train.py run\n"
    (tmp_path / "metrics.jsonl").write_text('{"samples_seen": 4, "loss": 2.0, "lr": 0.1, "tokens_per_s": 9}\n{"ste\n')
    code, err = run(tmp_path)
    assert code == 1 and err.startswith(f"plot_run.py: error: {tmp_path / 'metrics.jsonl'}:2: not valid JSON")
    assert len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, err = run(tmp_path)
    assert code == 1 and err == "plot_run.py: error: matplotlib is not installed; pip install matplotlib " \
                                "(needed only for plots)\n"
    assert not list(tmp_path.glob("*.png"))


if __name__ == "__main__":
    eval_worker(*sys.argv[1:4])
