"""validation.py: exact validation loss (1 and 2 processes), greedy generations, the split, early stopping, trackers.

The 2-process check runs `eval_worker` in the session's 2-rank job (tests/two_rank_server.py): FSDP2-sharded evaluation through
train.py's own model setup, compared on rank 0 with a direct computation on the unsharded Hugging Face model.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import write_data

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
    from minitrain.training.data import build_token_cache, open_token_cache

    build_token_cache(data_path, root / "cache")
    return open_token_cache(root / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Validation loss and generations: 1 process


def test_validation_loss_and_generations_match_a_direct_computation_in_one_process(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training import validation
    from minitrain.training.model import PackedCausalLM
    from minitrain.training.objectives import SFT

    cache = open_cache(write_data(tmp_path / "data.jsonl", 24, vocab=700, seed=3), tmp_path)
    train_idx, val_idx = validation.split_validation(len(cache), 0.5)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model = PackedCausalLM(lm).train()
    evaluator = validation.plan_validation_set(SFT(), cache, val_idx, CAP, world_size=1, rank=0,
                                               num_generations=2, max_new_tokens=5, eos_token_ids=[])
    assert len(evaluator.packs) > 1  # several packs: the sum really is over packs
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    result = evaluator.evaluate(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training  # training state untouched

    assert result.tokens == int(cache.trained[val_idx].sum())
    assert result.loss == pytest.approx(direct_validation_loss(lm, cache, val_idx), rel=1e-6)
    prompts = evaluator.prompts
    assert [p.index for p in prompts] == list(val_idx[:2])
    for p, reply in zip(prompts, result.replies, strict=True):  # two prompts, two replies
        assert reply == direct_greedy(lm, p.prompt, 5)
        start = int(cache.offsets[p.index])
        first = int(np.flatnonzero(cache.labels[start : int(cache.offsets[p.index + 1])] != -100)[0])
        assert np.array_equal(p.prompt, cache.input_ids[start : start + first])  # everything before the reply


# ---------------------------------------------------------------------------------------------------------------
# Validation loss and generations: 2 processes, FSDP2-sharded


def eval_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import train
    from minitrain.training import distributed, validation
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.model import build_model, decoder_blocks
    from minitrain.training.objectives import SFT

    d = init_distributed("auto")
    config = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=2,
                               max_tokens_per_gpu=CAP, fsdp_sharding_strategy="FULL_SHARD")
    cache = load_data(config, d, vocab_size=10**6)
    _, val_idx = validation.split_validation(len(cache), 0.5)
    model = build_model(config, d)
    evaluator = validation.plan_validation_set(SFT(), cache, val_idx, CAP, d.world_size, d.rank, num_generations=2,
                                               max_new_tokens=5, eos_token_ids=[])
    # Whether the first block's weights were back in shards when each forward reached the final norm, and the root's
    # (embeddings, norm, head) when the root's forward returned
    first, seen, root_seen = decoder_blocks(model.lm)[0], [], []
    model.lm.model.norm.register_forward_pre_hook(lambda *_: seen.append(isinstance(next(first.parameters()), DTensor)))
    model.register_forward_hook(lambda *_: root_seen.append(isinstance(model.lm.model.embed_tokens.weight, DTensor)))
    result = evaluator.evaluate(model, d.device)  # the whole model fits in this machine's memory: gathered once
    gathered_once, seen[:] = list(seen), []
    free_memory = distributed.free_memory
    if d.rank == 0:  # nothing fits on rank 0 alone: every rank gathers each block in its forward
        distributed.free_memory = lambda device, local_world_size: 0
    try:
        blockwise = evaluator.evaluate(model, d.device)
    finally:
        distributed.free_memory = free_memory
    per_forward, seen[:], root_seen[:] = list(seen), [], []
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    # A training forward/backward afterwards: every rank still issues the same collectives, and reshards each
    # module after its forward again.
    packs = [np.arange(2 * d.rank, 2 * d.rank + 2)]
    after = train.forward_backward(model, SFT(), cache, packs, int(cache.trained[:4].sum()), d.world_size, d.device)
    torch.distributed.all_reduce(after)
    views = [None] * d.world_size
    torch.distributed.all_gather_object(views, [gathered_once, per_forward, seen, root_seen])
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
            "blockwise": [blockwise.loss, blockwise.replies],
            "ranks": views,
        }
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_sharded_validation_loss_and_generations_on_two_ranks_match_a_direct_computation(tmp_path, tiny_model_dir,
                                                                                           two_ranks):
    data = write_data(tmp_path / "data.jsonl", 12, vocab=700, seed=4)
    run = two_ranks.run(__name__, "eval_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["micro_steps"] > 1
    assert report["tokens"] == report["val_tokens"]
    assert report["loss"] == pytest.approx(report["direct_loss"], rel=1e-6)
    assert report["replies"] == report["direct_replies"]
    assert report["resharded"] and report["training"]
    # Where the whole model fits, an evaluation all-gathers it once: no forward (validation batch or generated token)
    # reshards a block. Where it does not (on rank 0 only: every rank takes the choice of the one shortest of memory),
    # every forward gathers and reshards each block, with the same results. The training forward after either reshards
    # after each block and after the root again.
    forwards = report["micro_steps"] + 2 * 5
    for gathered_once, per_forward, training_block, training_root in report["ranks"]:
        assert len(gathered_once) == len(per_forward) == forwards
        assert not any(gathered_once) and all(per_forward)
        assert training_block == [True] and training_root == [True]
    assert report["blockwise"] == [report["loss"], report["replies"]]


# ---------------------------------------------------------------------------------------------------------------
# train.py with evaluation: the same trajectory, the records, the generations, the picture


def dropout_model(tiny_dir: Path, out: Path) -> Path:
    """The tiny Llama with attention dropout: evaluation left in eval mode, or drawing from the training's random
    stream, would change the training losses after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.attention_dropout = 0.2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def train_in_process(args: list[str], capsys) -> tuple[list[dict], str]:
    import train

    capsys.readouterr()
    code = train.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = Path(args[args.index("--output-dir") + 1])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], captured.out


def test_evaluation_leaves_the_training_losses_unchanged_stops_early_and_is_logged_saved_and_plotted(
    tmp_path, capsys, tiny_model_dir
):
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.tools import plot_run

    model = dropout_model(tiny_model_dir("llama"), tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl", 16, vocab=700, seed=5)
    validation = write_data(tmp_path / "validation.jsonl", 6, vocab=700, seed=6)
    common = ["--data-path", str(data), "--model-name-or-path", str(model), "--batch-size", "4",
              "--max-tokens-per-gpu", "64", "--max-steps", "6", "--learning-rate", "1e-3", "--save-dtype", "float32",
              "--min-samples-per-checkpoint", "12", "--no-activation-checkpointing"]
    plain, _ = train_in_process([*common, "--output-dir", str(tmp_path / "plain")], capsys)
    out = tmp_path / "evaluated"
    # min delta 100: only the first evaluation improves, so patience 2 stops at the third.
    evaluated, stdout = train_in_process([
        *common, "--output-dir", str(out), "--validation-data-path", str(validation), "--eval-every-samples", "8",
        "--num-eval-generations", "2", "--eval-max-new-tokens", "4",
        "--early-stopping-patience", "2", "--early-stopping-min-delta", "100",
    ], capsys)

    assert all("validation_loss" not in r for r in plain)  # nothing asked, nothing done
    # Evaluated after 8 samples (every 8), 12 (an export) and 16 (every 8): the third stops the run.
    assert [(r["step"], "validation_loss" in r) for r in evaluated] == [(1, False), (2, True), (3, True), (4, True)]
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain[:4]]  # bit for bit, dropout on
    assert "early stopping after step 4" in stdout
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_12", "samples_16"]

    # The logged figure is the exact validation loss of the checkpoint exported at that point.
    cache = open_cache(validation, tmp_path)
    final = AutoModelForCausalLM.from_pretrained(out / "hf_format" / "samples_16", dtype=torch.float32)
    direct = direct_validation_loss(final, cache, np.arange(len(cache)))
    assert evaluated[-1]["validation_loss"] == pytest.approx(direct, rel=1e-5)
    assert evaluated[-1]["validation_tokens"] == int(cache.trained.sum())
    best = min(("samples_12", evaluated[2]["validation_loss"]), ("samples_16", evaluated[3]["validation_loss"]),
               key=lambda c: c[1])[0]
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("validation: ") and f"best checkpoint {out / 'hf_format' / best} " in summary
    assert f"| val loss {evaluated[1]['validation_loss']:.4f}" in stdout  # on the step line

    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [2, 2, 3, 3, 4, 4]
    assert all(g["prompt"] and g["reply"] and g["data_line"] in (1, 2) for g in generations)

    assert plot_run.main([str(out)]) == 0
    png = (out / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_validation_split_is_never_trained_on_and_is_evaluated_at_the_end(tmp_path, capsys, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training import validation

    data = write_data(tmp_path / "data.jsonl", 20, vocab=700, seed=7)
    out = tmp_path / "out"
    records, stdout = train_in_process([
        "--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("qwen2")), "--output-dir", str(out),
        "--batch-size", "5", "--max-tokens-per-gpu", "64", "--max-epochs", "2", "--learning-rate", "1e-3",
        "--save-dtype", "float32", "--validation-split", "0.25", "--num-eval-generations", "0",
    ], capsys)
    cache = open_cache(data, tmp_path)
    _, held_out = validation.split_validation(20, 0.25)
    held_out_lines = set(cache.lines[held_out].tolist())
    trained_lines = [line for r in records for line in r["sample_lines"]]
    assert sorted(trained_lines) == sorted(2 * list(set(range(1, 21)) - held_out_lines))  # 2 epochs of the other 15
    assert [r["step"] for r in records if "validation_loss" in r] == [6]  # no --eval-every-samples: at the end
    final = AutoModelForCausalLM.from_pretrained(out / "hf_format" / "samples_30", dtype=torch.float32)
    assert records[-1]["validation_loss"] == pytest.approx(direct_validation_loss(final, cache, held_out), rel=1e-5)
    assert "15 samples" in stdout and "validation: 5 samples" in stdout
    assert not (out / "generations.jsonl").exists()


def test_torchrun_evaluates_exactly_generates_and_stops_early_on_two_ranks(tmp_path, tiny_model_dir, two_ranks):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitrain.training import validation

    data = write_data(tmp_path / "data.jsonl", 12, vocab=700, seed=8)
    out = tmp_path / "out"
    run = two_ranks.train([  # train.py's main on both ranks of the shared torchrun job
        "--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")),
        "--output-dir", str(out), "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "5",
        "--learning-rate", "1e-2", "--fsdp-sharding-strategy", "FULL_SHARD", "--save-dtype", "float32",
        "--validation-split", "0.34", "--eval-every-samples", "4", "--num-eval-generations", "2",
        "--eval-max-new-tokens", "4", "--early-stopping-patience", "1", "--early-stopping-min-delta", "100",
        "--no-activation-checkpointing",  # what auto gives here, without a memory-estimate process per rank
    ], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [1, 2]  # the second evaluation stops the run
    assert "early stopping after step 2" in run.stdout

    cache = open_cache(data, tmp_path)
    _, held_out = validation.split_validation(len(cache), 0.34)
    final_dir = out / "hf_format" / "samples_8"
    final = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32)
    assert records[-1]["validation_loss"] == pytest.approx(direct_validation_loss(final, cache, held_out), rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    prompts = validation.generation_prompts(cache, held_out, 2)
    assert len(prompts) == 2 and [g["step"] for g in generations] == [1, 1, 2, 2]  # 2 prompts at each evaluation
    for prompt, generation in zip(prompts, generations[2:], strict=True):
        tokens = direct_greedy(final, prompt.prompt, 4)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
        assert generation["reply"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert f"best checkpoint {out / 'hf_format'}" in run.stdout


def test_a_resumed_run_keeps_counting_towards_early_stopping(tmp_path, capsys, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", 16, vocab=700, seed=9)
    args = ["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")), "--output-dir",
            str(tmp_path / "out"), "--batch-size", "4", "--max-tokens-per-gpu", "64", "--learning-rate", "1e-3",
            "--validation-split", "0.25", "--eval-every-samples", "4", "--num-eval-generations", "0",
            "--early-stopping-patience", "2", "--early-stopping-min-delta", "100"]
    first, stdout = train_in_process([*args, "--max-steps", "2"], capsys)  # best, then 1 without improvement
    assert len(first) == 2 and "early stopping" not in stdout
    # Resumed from step 2: the evaluation after step 3 is the second without improvement. A fresh count would
    # take step 3 as a new best and go on to step 5.
    resumed, stdout = train_in_process([*args, "--max-steps", "5"], capsys)
    assert "resumed from" in stdout and "early stopping after step 3" in stdout
    assert [r["step"] for r in resumed] == [1, 2, 3]


def test_every_evaluation_flag_problem_is_reported_together(tmp_path, capsys):
    import train

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    capsys.readouterr()
    code = train.main([
        "--data-path", str(data), "--model-name-or-path", str(tmp_path), "--output-dir", str(tmp_path / "out"),
        "--batch-size", "4", "--max-tokens-per-gpu", "64", "--validation-split", "1.5",
        "--validation-data-path", str(tmp_path / "missing.jsonl"), "--eval-every-samples", "0",
        "--num-eval-generations", "-1", "--early-stopping-min-delta", "-0.1", "--tracker", "comet",
    ])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    for message in (
        "--validation-data-path and --validation-split each give a validation set; pass one of them",
        "missing.jsonl: no such file", "--validation-split is the fraction of samples held out, in (0, 1); got 1.5",
        "--eval-every-samples must be >= 1, got 0", "--num-eval-generations must be >= 0, got -1",
        "--early-stopping-min-delta must be >= 0, got -0.1", "--tracker 'comet' is unknown",
    ):
        assert message in err
    capsys.readouterr()
    code = train.main(["--data-path", str(data), "--model-name-or-path", str(tmp_path), "--output-dir",
                       str(tmp_path / "out"), "--batch-size", "4", "--max-tokens-per-gpu", "64",
                       "--eval-every-samples", "8", "--early-stopping-patience", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--eval-every-samples and --early-stopping-patience need a validation set; pass " \
                         "--validation-data-path or --validation-split" in err
    assert not (tmp_path / "out").exists()
    # the evaluation's other flags too: without a validation set they would be ignored, not refused
    code = train.main(["--data-path", str(data), "--model-name-or-path", str(tmp_path), "--output-dir",
                       str(tmp_path / "out"), "--batch-size", "4", "--max-tokens-per-gpu", "64",
                       "--num-eval-generations", "5", "--eval-num-beams", "4", "--eval-max-new-tokens", "7",
                       "--early-stopping-min-delta", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and ("--num-eval-generations and --eval-max-new-tokens and --eval-num-beams and "
                          "--early-stopping-min-delta need a validation set") in err, err


# ---------------------------------------------------------------------------------------------------------------
# The split, early stopping and trackers (pure)


def test_validation_split_is_exact_disjoint_fixed_and_stable_when_samples_are_appended():
    from minitrain.training.validation import ValidationError, split_validation

    train_idx, val_idx = split_validation(1000, 0.1)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    again = split_validation(1000, 0.1)[1]
    assert np.array_equal(val_idx, again)  # deterministic, and independent of any training seed
    grown = split_validation(1010, 0.1)[1]  # ten samples appended: the held-out set barely moves
    assert len(np.intersect1d(val_idx, grown)) >= 95
    for fraction in (0.0, 0.0004, 0.9996, 1.0):
        with pytest.raises(ValidationError, match=f"--validation-split {fraction} of 1000 samples"):
            split_validation(1000, fraction)
    with pytest.raises(ValidationError) as e:  # it said "choose a fraction between 1 and 0"
        split_validation(1, 0.5)
    assert str(e.value) == ("--validation-split 0.5: the data has 1 sample, and training and validation each need "
                            "one; pass --validation-data-path or more data")


def test_early_stopping_stops_after_patience_evaluations_without_a_real_improvement():
    from minitrain.training.validation import EarlyStopping

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

    from minitrain.training.run_log import (
        TensorBoardTracker,
        WandbTracker,
        tracker_problem,
    )

    class Writer:  # the SummaryWriter calls the tracker makes
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            self.calls.append("flushed")

        def close(self):
            self.calls.append("closed")

    class Run:  # the wandb run calls the tracker makes
        def __init__(self):
            self.calls = []

        def log(self, values, step):
            self.calls.append((values, step))

        def finish(self, exit_code=0):
            self.calls.append("finished" if exit_code == 0 else "failed")

    record = {"step": 3, "loss": 1.5, "validation_loss": 1.7, "sample_lines": [1, 2], "stopped": True}
    writer, run = Writer(), Run()
    for tracker in (TensorBoardTracker(writer), WandbTracker(run)):
        tracker.log(record, step=3)
        tracker.close()
    assert writer.calls == [("step", 3.0, 3), ("loss", 1.5, 3), ("validation_loss", 1.7, 3), "flushed",
                            "closed"]
    assert run.calls == [({"step": 3.0, "loss": 1.5, "validation_loss": 1.7}, 3), "finished"]

    assert tracker_problem(None) is None
    assert "--tracker 'comet' is unknown; use one of wandb, tensorboard, mlflow" in tracker_problem("comet")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no package installed
    for name in ("wandb", "tensorboard", "mlflow"):
        assert tracker_problem(name) == (f"--tracker {name} needs the {name} package, which is not installed; "
                                         f"pip install {name}")


# ---------------------------------------------------------------------------------------------------------------
# plot_run.py


def test_plot_errors_are_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    from minitrain.tools import plot_run

    def run(*args) -> tuple[int, str]:
        code = plot_run.main([str(a) for a in args])
        return code, capsys.readouterr().err

    code, err = run(tmp_path)
    assert code == 2 and err == f"plot_run.py: error: {tmp_path / 'metrics.jsonl'}: no such file; pass the " \
                                "--output-dir of a train.py run\n"
    (tmp_path / "metrics.jsonl").write_text('{"samples_seen": 4, "loss": 2.0, "lr": 0.1, "tokens_per_s": 9}\n{"ste\n')
    code, err = run(tmp_path)
    assert code == 2 and err.startswith(f"plot_run.py: error: {tmp_path / 'metrics.jsonl'}:2: not valid JSON")
    assert len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


if __name__ == "__main__":
    eval_worker(*sys.argv[1:4])


def test_mlflow_tracker_logs_every_step_to_a_local_file_store(tmp_path, capsys, monkeypatch, tiny_model_dir):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "minitrain-test")
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=2)
    records, _ = train_in_process([
        "--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")), "--output-dir",
        str(tmp_path / "out"), "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "2",
        "--tracker", "mlflow", "--save-dtype", "float32",
    ], capsys)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("minitrain-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["batch_size"] == "4"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert mlflow.active_run() is None
