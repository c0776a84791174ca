"""KTO (--objective kto): exact loss and gradients on 1 and 2 processes, exact resume, LoRA's reference (the base
model), stage 1's labelled rows.

The truth is written here from TRL's definitions (KTOTrainer, loss_type "kto"): a plain Hugging Face forward of each
sequence alone, full logits, log-softmax; the KL sequence of each sample built here from its own rule (the prompt of
sample i + the completion of the nearest earlier sample, cyclically, whose prompt differs); z = max(0, mean over the
step of the policy's minus the reference's log-prob of the KL sequences), detached; a desirable sample's loss
w_d (1 - σ(β (r - z))), an undesirable one's w_u (1 - σ(β (z - r))), the step's loss their mean.
The 2-process check runs `kto_grad_worker` in the session's 2-rank job (tests/two_rank_server.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_preference import direct_logp, max_rel
from tests.test_train import run_main

VOCAB = 250
SKEWED = {0: [[0, 1, 2], [3], [4]], 1: [[5, 6, 7], [], []]}  # rank 1 runs two dummy packs
BETA, W_D, W_U = 0.5, 1.3, 0.7


def write_kto(path: Path, num_samples: int, seed: int = 0, learnable: bool = False) -> Path:
    """Labelled rows as process_data.py writes them: a prompt (masked) and a completion, `label` true or false.
    Rows 2 and 3 share a prompt, and so do the last row and the first (the KL pairing must skip both runs).

    learnable: desirable completions are always the same few tokens, undesirable ones random."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, int(rng.integers(3, 9))).tolist() for _ in range(num_samples)]
    prompts[3], prompts[-1] = prompts[2], prompts[0]
    with open(path, "w") as f:
        for k, prompt in enumerate(prompts):
            label = bool(k % 3 != 1)  # both kinds, unbalanced
            completion = ([7, 8, 9, 10] if learnable and label
                          else rng.integers(3, VOCAB, int(rng.integers(2, 7))).tolist())
            ids = prompt + completion
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * len(prompt) + completion, "len": len(ids),
                                "label": label}) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The direct implementation


def prompt_length(row: dict) -> int:
    """Where the completion starts: the first token whose label is trained (the first token never is a target)."""
    return next(t for t in range(1, len(row["labels"])) if row["labels"][t] != -100)


def kl_row(rows: list[dict], i: int) -> dict:
    """Sample i's prompt + the completion of the nearest earlier sample (cyclically) with another prompt."""
    p = prompt_length(rows[i])
    for k in range(1, len(rows)):
        j = (i - k) % len(rows)
        q = prompt_length(rows[j])
        if rows[j]["input_ids"][:q] != rows[i]["input_ids"][:p]:
            break
    return {"input_ids": rows[i]["input_ids"][:p] + rows[j]["input_ids"][q:],
            "labels": [-100] * p + rows[j]["labels"][q:]}


def direct_table(lm, rows: list[dict]) -> np.ndarray:
    """The model's log-prob of each sample's own sequence and of its KL sequence."""
    import torch

    with torch.no_grad():
        return np.array([[direct_logp(lm, r["input_ids"], r["labels"])[0].item() for r in (row, kl_row(rows, i))]
                         for i, row in enumerate(rows)])


def direct_kto(lm, rows: list[dict], table: np.ndarray, beta: float = BETA, w_d: float = W_D, w_u: float = W_U):
    """(the mean KTO loss over the rows, with gradient; z; TRL's metrics)."""
    import torch

    with torch.no_grad():
        kl_terms = [direct_logp(lm, *kl_row(rows, i).values())[0].item() - table[i, 1] for i in range(len(rows))]
    z = max(0.0, float(np.mean(kl_terms)))
    losses, rewards, logps = [], {True: [], False: []}, {True: [], False: []}
    for i, row in enumerate(rows):
        logp = direct_logp(lm, row["input_ids"], row["labels"])[0]
        r = logp - table[i, 0]
        if row["label"]:
            losses.append(w_d * (1 - torch.sigmoid(beta * (r - z))))
        else:
            losses.append(w_u * (1 - torch.sigmoid(beta * (z - r))))
        rewards[row["label"]].append(beta * r.item())
        logps[row["label"]].append(logp.item())
    metrics = {"kl": z, "rewards/chosen": np.mean(rewards[True]), "rewards/rejected": np.mean(rewards[False]),
               "logps/chosen": np.mean(logps[True]), "logps/rejected": np.mean(logps[False])}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return torch.stack(losses).mean(), z, metrics


def direct_grads(model_dir: Path, rows: list[dict], table: np.ndarray) -> tuple[float, dict, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss, _, metrics = direct_kto(lm, rows, table)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()}, metrics


# ---------------------------------------------------------------------------------------------------------------
# One process: train.py's forward_backward == the direct implementation, however the step is split


def test_kto_loss_gradients_and_metrics_equal_the_direct_per_sample_formulas(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import KTO
    from minitrain.training.reference import attach_reference

    model_dir = tiny_model_dir("qwen2")  # an untied LM head; llama (tied) runs under torchrun below
    data = write_kto(tmp_path / "kto.jsonl", 8)
    rows = read_rows(data)
    config = train.TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(tmp_path / "o"),
                               batch_size=8, max_tokens_per_gpu=64, activation_checkpointing=False, objective="kto")
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    assert cache.unpaired and cache.desirable.tolist() == [r["label"] for r in rows]
    objective = KTO(beta=BETA, desirable_weight=W_D, undesirable_weight=W_U, max_tokens=64)
    objective.check(cache, str(data))
    model = build_model(config, single)
    attach_reference(objective, model, cache, config, single)
    table = objective.reference[cache.content_hash]
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    np.testing.assert_allclose(table, direct_table(lm, rows), rtol=1e-6)  # own and KL sequences, the pairing too
    rng = np.random.default_rng(1)
    # The reference moved away from the policy: r spread over both signs; the KL term > 0, then < 0 (clamped to 0)
    for kl_shift, clamped in ((-2.0, False), (2.0, True)):
        shifted = table + np.stack([rng.normal(0, 3, 8), rng.normal(kl_shift, 1, 8)], axis=1)
        objective.reference[cache.content_hash] = shifted
        want_loss, want, want_metrics = direct_grads(model_dir, rows, shifted)
        assert (want_metrics["kl"] == 0) == clamped and want_metrics["kl"] >= 0
        skewed = [np.array([4, 0]), np.array([], int), np.array([5, 1, 7, 2, 3, 6])]  # with a dummy pack
        for packs in ([skewed] if clamped else [[np.arange(8)], [np.array([k]) for k in range(8)], skewed]):
            model.zero_grad(set_to_none=True)
            sums = train.forward_backward(model, objective, cache, packs, 8, 1, single.device)
            grads = {n: p.grad for n, p in model.lm.named_parameters()}
            assert sums[0].item() / 8 == pytest.approx(want_loss, rel=1e-6), (kl_shift, packs)
            assert sorted(grads) == sorted(want)
            assert max_rel(grads, want) < 1e-5, (kl_shift, packs, max_rel(grads, want))
            got = objective.means(sums[1:].tolist(), 8)
            assert list(got) == list(objective.metrics)  # TRL's names, each reported
            assert got == pytest.approx(want_metrics, rel=1e-5, abs=1e-6), (kl_shift, packs)


def test_a_step_of_one_kind_leaves_the_other_kinds_means_out():
    from minitrain.training.objectives import KTO

    # sums: kl x samples, rewards and logps of chosen and rejected, then the counts of each kind
    assert KTO().means([0.3, 2.0, 0.0, -8.0, 0.0, 2.0, 0.0], 2) == {"kl": 0.15, "rewards/chosen": 1.0,
                                                                     "logps/chosen": -4.0}


def kto_grad_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    """Under torchrun: the reference table and KTO's loss and gradient on 2 FSDP2 ranks with skewed micro-steps, with
    FULL_SHARD and with SHARD_GRAD_OP (which keeps the modules gathered after the no-grad KL pass)."""
    from dataclasses import replace

    import torch.distributed as dist

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.model import build_model
    from minitrain.training.objectives import KTO
    from minitrain.training.reference import attach_reference

    world = init_distributed("auto")
    config = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8,
                               max_tokens_per_gpu=64, objective="kto")
    cache = load_data(config, world, vocab_size=10**6)
    rows = read_rows(Path(data_path))
    rng = np.random.default_rng(1)  # KL terms around 1.5 that differ: each rank's own mean is not the step's
    offsets = np.stack([rng.normal(0, 3, 8), rng.normal(-1.5, 1.0, 8)], axis=1)
    report = {}
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        model = build_model(replace(config, fsdp_sharding_strategy=strategy), world)
        objective = KTO(beta=BETA, desirable_weight=W_D, undesirable_weight=W_U)
        attach_reference(objective, model, cache, config, world)  # both ranks compute half of each column
        table = objective.reference[cache.content_hash]
        objective.reference[cache.content_hash] = table + offsets
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
        sums = train.forward_backward(model, objective, cache, packs, 8, world.world_size, world.device)
        dist.all_reduce(sums)
        grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        if world.is_main:
            import torch
            from transformers import AutoModelForCausalLM

            if not report:
                lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                report["table_max_rel"] = float(np.max(np.abs(table / direct_table(lm, rows) - 1)))
                want_loss, want, want_metrics = direct_grads(Path(model_dir), rows, table + offsets)
                report.update(want_loss=want_loss, want_metrics=want_metrics)
            report[strategy] = {"loss": sums[0].item() / 8, "max_rel": max_rel(grads, want),
                                "names": sorted(grads) == sorted(want),
                                "metrics": objective.means(sums[1:].tolist(), 8)}
    if world.is_main:
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_ranks_with_skewed_micro_steps_give_the_direct_loss_and_gradient(tmp_path, tiny_model_dir, two_ranks):
    data = write_kto(tmp_path / "kto.jsonl", 8, seed=2)
    run = two_ranks.run(__name__, "kto_grad_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["table_max_rel"] < 1e-6
    assert report["want_metrics"]["kl"] > 0.5  # the KL term is live (the reference's KL column was moved down)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        r = report[strategy]
        assert r["names"], strategy
        assert r["loss"] == pytest.approx(report["want_loss"], rel=1e-6), strategy
        assert r["max_rel"] < 1e-5, (strategy, r["max_rel"])
        assert r["metrics"] == pytest.approx(report["want_metrics"], rel=1e-5, abs=1e-6), strategy


# ---------------------------------------------------------------------------------------------------------------
# train.py as a user runs it: it learns, and a stopped run resumes to the uninterrupted one exactly


def kto_args(data: Path, model_dir: Path, out: Path, steps: int) -> list[str]:
    return [
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
        "--objective", "kto", "--kto-beta", "0.5", "--kto-desirable-weight", "1.3", "--kto-undesirable-weight",
        "0.7", "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", str(steps), "--learning-rate",
        "5e-3", "--validation-split", "0.25", "--eval-every-samples", "8", "--num-eval-generations", "0",
        "--save-dtype", "float32", "--no-activation-checkpointing",
    ]


def test_kto_trains_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys, tiny_model_dir):
    import torch

    import train
    from tests.test_resume import weights

    model_dir = tiny_model_dir("llama")
    data = write_kto(tmp_path / "kto.jsonl", 12, seed=3, learnable=True)  # 9 train, 3 validation
    code, err = run_main(kto_args(data, model_dir, tmp_path / "whole", 6), capsys)
    assert code == 0, err
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    first, last = whole[0], whole[-1]
    # Policy == reference before the first update: every r and z are 0 (up to float32 rounding: the reference packs
    # the sequences otherwise), every sample's loss its weight x σ(0)
    assert abs(first["kl"]) < 1e-6 and abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    labels = [r["label"] for r in read_rows(data)]
    weights_of_step = [1.3 if labels[line - 1] else 0.7 for line in first["sample_lines"]]
    assert len(weights_of_step) == 4 and first["loss"] == pytest.approx(0.5 * np.mean(weights_of_step), rel=1e-5)
    # It learns to prefer the desirable completions (a step of one kind leaves the other kind's means out: the
    # held-out set, which has both, shows the margin)
    evaluations = [r for r in whole if "validation_loss" in r]
    assert len(evaluations) == 3 and last["loss"] < first["loss"]
    assert evaluations[-1]["validation_rewards/margins"] > evaluations[0]["validation_rewards/margins"] + 1.0
    assert evaluations[-1]["validation_loss"] < evaluations[0]["validation_loss"]
    assert evaluations[-1]["validation_kl"] > 0
    tables = list((tmp_path / "whole" / "token_cache").glob("*/reference_logps-kto-*.npy"))
    assert len(tables) == 1 and np.load(tables[0]).shape == (12, 2)

    out = tmp_path / "stopped"
    assert run_main(kto_args(data, model_dir, out, 3), capsys)[0] == 0
    capsys.readouterr()
    assert train.main(kto_args(data, model_dir, out, 6)) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "reference log-probs: reused" in stdout and "computing" not in stdout
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm", "sample_lines"]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(whole, resumed):
        assert {k: b.get(k) for k in keys} == {k: a.get(k) for k in keys}, a["step"]
    export = f"samples_{whole[-1]['samples_seen']}"  # the final one (9 training samples: steps of 4, 4, 1)
    final_whole, final_resumed = (weights(p / "hf_format" / export) for p in (tmp_path / "whole", out))
    assert final_whole.keys() == final_resumed.keys()
    assert all(torch.equal(final_whole[n], final_resumed[n]) for n in final_whole)


def test_kto_with_lora_takes_the_base_model_as_its_reference_for_both_sequences(tmp_path, capsys, tiny_model_dir):
    """With LoRA the reference is the base model, adapters off (reference.py's hook, as for DPO): with adapters that
    start away from zero (--lora-init random) the table of each sample's own and KL sequence must still be the base
    model's own log-probs (direct_table, computed here), while the policy's first rewards are already off zero."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    data = write_kto(tmp_path / "kto.jsonl", 8, seed=5, learnable=True)
    out = tmp_path / "out"
    args = [*kto_args(data, model_dir, out, 2), "--lora", "--lora-init", "random", "--lora-r", "4"]
    code, err = run_main(args, capsys)
    assert code == 0, err
    [table] = list((out / "token_cache").glob("*/reference_logps-kto-*.npy"))
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    np.testing.assert_allclose(np.load(table), direct_table(lm, read_rows(data)), rtol=1e-5, atol=1e-5)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert max(abs(first["rewards/chosen"]), abs(first["rewards/rejected"])) > 1e-3, first  # adapters on: not 0
    export = f"samples_{json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])['samples_seen']}"
    assert (out / "hf_format" / export / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Refusals and bad rows: one line, naming the file and line


def test_kto_refuses_what_it_cannot_train_in_one_line(tmp_path, capsys, tiny_model_dir):
    from minitrain.training.config import ConfigError, TrainConfig, validate
    from tests.test_preference import write_pairs
    from tests.test_train import base_args

    model_dir = tiny_model_dir("llama")
    data = write_kto(tmp_path / "kto.jsonl", 4)
    code, err = run_main(base_args(tmp_path, model_dir, data), capsys)
    assert code == 2 and "holds labelled (KTO) samples, desirable or not, which --objective sft cannot" in err, err
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    code, err = run_main([*base_args(tmp_path, model_dir, pairs), "--objective", "kto"], capsys)
    assert code == 2 and "holds preference pairs; --objective kto needs" in err and len(err.splitlines()) == 1, err
    code, err = run_main([*base_args(tmp_path, model_dir, data), "--objective", "dpo"], capsys)
    assert code == 2 and "holds labelled (KTO) samples, not preference pairs" in err, err
    other = write_kto(tmp_path / "other.jsonl", 4, seed=1)
    code, err = run_main([*base_args(tmp_path, model_dir, data), "--objective", "kto", "--data-path", str(data),
                          str(other)], capsys)
    assert code == 2 and "mixtures of labelled (KTO) samples are not supported yet" in err, err
    same = tmp_path / "same.jsonl"
    row = read_rows(data)[0]
    same.write_text((json.dumps(row) + "\n") * 3)
    code, err = run_main([*base_args(tmp_path, model_dir, same), "--objective", "kto"], capsys)
    assert code == 2 and "all 3 samples share one prompt" in err and len(err.splitlines()) == 1, err
    long = tmp_path / "long.jsonl"
    rows = read_rows(data)
    rows[1] = {**rows[1], "input_ids": rows[1]["input_ids"][:1] + [5] * 63, "labels": [-100] + [5] * 63, "len": 64}
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))  # its completion after row 3's prompt: too long
    code, err = run_main([*base_args(tmp_path, model_dir, long), "--objective", "kto"], capsys)
    assert code == 2 and f"{long}:3: KTO's KL sequence of this sample (its prompt + the completion of line 2)" in err
    config = TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(tmp_path / "o"),
                         batch_size=4, max_tokens_per_gpu=64, objective="kto", sequence_parallel_size=2,
                         kto_undesirable_weight=-1.0, preference_sft_weight=0.5)
    with pytest.raises(ConfigError) as e:
        validate(config, 2, 2, False)
    message = str(e.value)
    assert "--objective kto does not support --sequence-parallel-size 2 yet" in message
    assert "--kto-undesirable-weight must be >= 0, got -1.0" in message and "kto has no SFT term" in message


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "len": 3}, "kto.jsonl:2: a row without a 'label' field"),
    ({"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "len": 3, "label": "yes"},
     "kto.jsonl:2: 'label' must be true or false, got 'yes'"),
    ({"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "len": 3, "label": 1},
     "kto.jsonl:2: 'label' must be true or false, got 1"),
    ({"input_ids": [5, 6, 7], "labels": [-100, 6, 8], "len": 3, "label": True},
     "kto.jsonl:2: labels[2] = 8 but input_ids[2] = 7"),
])
def test_bad_labelled_rows_stop_stage_2_naming_file_and_line(tmp_path, capsys, tiny_model_dir, row, message):
    from tests.test_train import base_args

    data = tmp_path / "kto.jsonl"
    good = read_rows(write_kto(data, 4))
    data.write_text("".join(json.dumps(r) + "\n" for r in [good[0], row, *good[1:]]))
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--objective", "kto"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_labelled_row_whose_completion_trains_nothing_is_dropped_and_counted(tmp_path):
    from minitrain.training.data import build_token_cache, cache_dir_for, open_token_cache

    data = tmp_path / "kto.jsonl"
    rows = read_rows(write_kto(data, 5))
    rows[1]["labels"] = [-100] * len(rows[1]["labels"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache_dir = cache_dir_for(data, tmp_path / "cache")
    build_token_cache(data, cache_dir)
    cache = open_token_cache(cache_dir)
    assert len(cache) == 4 and cache.skipped_lines == (2,) and cache.lines.tolist() == [1, 3, 4, 5]
    assert cache.desirable.tolist() == [rows[k]["label"] for k in (0, 2, 3, 4)]
    assert cache.prompt_lengths.tolist() == [prompt_length(rows[k]) for k in (0, 2, 3, 4)]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: process_data.py on labelled rows

SYSTEM, USER = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}
GOOD, BAD = {"role": "assistant", "content": "It is 4."}, {"role": "assistant", "content": "Five, probably."}


def stage1(capsys, tmp_path, tokenizer, input_file, *flags):
    from tests.test_process_data import run_main as process_main

    return process_main(capsys, tmp_path, tokenizer, input_file, *flags)


def test_each_labelled_row_form_gives_one_sample_with_only_the_completion_trained(capsys, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from tests.test_formats import write_csv
    from tests.test_process_data import write_lines

    tok_dir = tokenizer_dir("chatml")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [
        {"prompt": USER["content"], "completion": GOOD["content"], "label": True},  # TRL's text form
        {"prompt": [SYSTEM, USER], "completion": [BAD], "label": False},  # TRL's conversational form
        {"messages": [SYSTEM, USER, GOOD, USER, BAD], "label": False},  # an earlier reply: part of the prompt
    ]
    data = write_lines(tmp_path / "in.jsonl", rows)
    code, stdout, err, out = stage1(capsys, tmp_path, tok_dir, data)
    assert code == 0, err
    assert "unpaired (detected from line 1)" in stdout and "desirable)" in stdout and "undesirable)" in stdout
    written = [json.loads(line) for line in out.read_text().splitlines()]
    conversations = [[USER, GOOD], [SYSTEM, USER, BAD], rows[2]["messages"]]
    for row, messages, label in zip(written, conversations, (True, False, False)):
        want = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert row["input_ids"] == list(want) and row["label"] is label and row["len"] == len(want)
        trained = [i for i, x in zip(row["input_ids"], row["labels"]) if x != -100]
        assert tok.decode(trained) == messages[-1]["content"] + "<|im_end|>"  # the completion alone
        assert row["num_loss_counted_tokens"] == len(trained)
    csv = tmp_path / "in.csv"
    write_csv(csv, [{"prompt": "Hi", "completion": "Hello.", "label": "TRUE"},
                    {"prompt": "Hi", "completion": "Go away.", "label": "false"}])
    code, _, err, out = stage1(capsys, tmp_path, tok_dir, csv)
    assert code == 0, err
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == [True, False]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "completion": "Yes."}, "in.jsonl:2: no `label` field"),
    ({"prompt": "Hi", "completion": "Yes.", "label": "yes"}, "in.jsonl:2: `label` must be true or false, got 'yes'"),
    ({"prompt": "Hi", "completion": "Yes.", "label": None}, "in.jsonl:2: `label` must be true or false, got None"),
    ({"prompt": "Hi", "completion": None, "label": True},
     "in.jsonl:2: `completion` must be a list of messages or a string, got null"),
    ({"prompt": "Hi", "label": True}, "in.jsonl:2: no `completion` field (nor `messages`)"),
    ({"messages": [USER, {"role": "wizard", "content": "x"}], "label": True},
     "in.jsonl:2: messages[1] has unknown role 'wizard'"),
])
def test_bad_labelled_rows_stop_stage_1_naming_file_and_line(capsys, tmp_path, tokenizer_dir, row, message):
    from tests.test_process_data import write_lines

    good = {"prompt": "Hi", "completion": "Hello.", "label": True}
    data = write_lines(tmp_path / "in.jsonl", [good, row])
    code, _, err, out = stage1(capsys, tmp_path, tokenizer_dir("chatml"), data, "--input-format", "unpaired")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_label_beside_pair_or_text_columns_is_refused_not_trained_as_a_pair(capsys, tmp_path, tokenizer_dir):
    """{"source", "target", "label": false} was read as a pair: its undesirable reply trained as SFT data, the label
    dropped without a word; so with text and with named columns."""
    from tests.test_process_data import write_lines

    for row, flags, seen in (({"source": "Hi", "target": "bad", "label": False}, (), "pairs (source/target)"),
                             ({"text": "bad text", "label": False}, (), "text (text)"),
                             ({"q": "Hi", "a": "bad", "label": False}, ("--source-column", "q", "--target-column", "a"),
                              "pairs (q/a)")):
        data = write_lines(tmp_path / "in.jsonl", [row])
        code, _, err, out = stage1(capsys, tmp_path, tokenizer_dir("chatml"), data, *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"in.jsonl:1: a `label` beside {seen}: labelled (KTO) rows are `prompt`/`completion` or `messages` " \
               "with a `label`" in err and not out.exists(), err


def test_empty_completions_are_dropped_and_counted_with_their_line(capsys, tmp_path, tokenizer_dir):
    from tests.test_process_data import write_lines

    rows = [{"prompt": "Hi", "completion": "Hello.", "label": True},
            {"prompt": "Hi", "completion": "", "label": False},  # 2
            {"messages": [USER, {"role": "assistant", "content": ""}], "label": True},  # 3
            {"messages": [USER], "label": True}]  # 4: no completion at all
    data = write_lines(tmp_path / "in.jsonl", rows)
    code, stdout, err, out = stage1(capsys, tmp_path, tokenizer_dir("chatml"), data)
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 1
    assert f"dropped {data}:2: empty completion: `completion` is empty" in stdout
    assert f"dropped {data}:3: empty completion: the final assistant turn is empty" in stdout
    assert f"dropped {data}:4: the last message is not an assistant turn" in stdout
    assert "dropped 3 samples" in stdout


if __name__ == "__main__":
    kto_grad_worker(*sys.argv[1:4])
