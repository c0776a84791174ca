"""Offline distillation (--objective distill --teacher-model PATH): the teacher's top-k table, the loss and its
gradients on 1 and 2 processes, resume, refusals.

The truth is written here from the formulas, one sample at a time: a plain Hugging Face forward of the teacher and
the student on each sample alone, full logits; the teacher's top-k by its log-softmax; both distributions at
temperature T over the whole vocabulary, then renormalised over the teacher's top-k ids; per trained token
α T² KL(teacher || student) + (1 - α) CE, the mean over the trained tokens. The 2-process check runs
`distill_grad_worker` in the session's 2-rank job (tests/two_rank_server.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_preference import SKEWED, max_rel
from tests.test_train import write_data

K, ALPHA, T = 8, 0.7, 2.0  # T != 1, so a loss without T² (or without the temperature) is caught
SMALL_BLOCK = 40  # trained tokens per block of the teacher pass: several blocks, each summed over the ranks


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The direct implementation


def trained_logits(lm, row: dict):
    """(the model's logits at the sample's trained positions (float64), their targets): the sample alone."""
    import torch

    logits = lm(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, :-1].double()
    targets = torch.tensor(row["labels"][1:])
    trained = targets != -100
    return logits[trained], targets[trained]


def direct_topk(teacher_dir: Path, rows: list[dict], k: int = K):
    """The teacher's k likeliest next tokens at every trained position, in the data's order: (ids, log-probs at T = 1
    over the whole vocabulary), (trained tokens, k)."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    ids, logprobs = [], []
    with torch.no_grad():
        for row in rows:
            top = torch.log_softmax(trained_logits(lm, row)[0], dim=-1).topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
    return torch.cat(ids).numpy(), torch.cat(logprobs).numpy()


def direct_grads(student_dir: Path, teacher_dir: Path, rows: list[dict], alpha: float = ALPHA,
                 temperature: float = T, k: int = K):
    """(the step's loss, its gradients, the mean KL and CE) by the formulas, sample by sample."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    losses, kls, ces = [], [], []
    for row in rows:
        with torch.no_grad():
            teacher_logits = trained_logits(teacher, row)[0]
        ids = torch.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1).indices  # the teacher's top-k
        logits, targets = trained_logits(student, row)
        # each distribution at temperature T over the whole vocabulary, then renormalised over the k ids
        teacher_t = torch.log_softmax(teacher_logits / temperature, dim=-1).gather(1, ids)
        log_q = teacher_t - torch.logsumexp(teacher_t, dim=-1, keepdim=True)
        student_t = torch.log_softmax(logits / temperature, dim=-1).gather(1, ids)
        log_s = student_t - torch.logsumexp(student_t, dim=-1, keepdim=True)
        kl = (log_q.exp() * (log_q - log_s)).sum(-1)
        ce = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        losses.append(alpha * temperature**2 * kl + (1 - alpha) * ce)
        kls.append(kl.detach())
        ces.append(ce.detach())
    loss = torch.cat(losses).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return loss.item(), grads, torch.cat(kls).mean().item(), torch.cat(ces).mean().item()


def distill_config(data: Path, student: Path, teacher: Path, out: Path, **overrides):
    import train

    return train.TrainConfig(data_path=str(data), model_name_or_path=str(student), output_dir=str(out), batch_size=8,
                             max_tokens_per_gpu=128, objective="distill", teacher_model=str(teacher), distill_top_k=K,
                             distill_alpha=ALPHA, distill_temperature=T, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# One process: the table, and train.py's forward_backward == the direct implementation however the step is split


def test_the_table_and_the_loss_and_gradients_equal_the_direct_implementation(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    import train
    from minitrain.training import teacher as teacher_module
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import Distill, build_objective

    student, teacher = tiny_model_dir("qwen2"), tiny_model_dir("llama")  # an untied LM head learns from a tied one
    data = write_data(tmp_path / "data.jsonl", 6, vocab=700, seed=3)
    rows = read_rows(data)
    config = distill_config(data, student, teacher, tmp_path / "o", activation_checkpointing=False)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    objective = build_objective(config)
    assert isinstance(objective, Distill) and (objective.alpha, objective.temperature, objective.top_k) == (ALPHA, T, K)
    monkeypatch.setattr(teacher_module, "BLOCK_BYTES", SMALL_BLOCK * teacher_module.bytes_per_token(K))
    assert len(teacher_module.blocks(cache.trained, SMALL_BLOCK)) > 2
    teacher_module.attach_teachers(objective, [cache], config, single)
    table = objective.tables[cache.content_hash]
    want_ids, want_logprobs = direct_topk(teacher, rows)
    assert table.ids.shape == (int(cache.trained.sum()), K) and table.ids.dtype == np.int32
    np.testing.assert_array_equal(table.ids, want_ids)
    np.testing.assert_allclose(table.logprobs, want_logprobs, rtol=0, atol=1e-5)

    want_loss, want, want_kl, want_ce = direct_grads(student, teacher, rows)
    assert want_kl > 1e-4  # the teacher and the student differ: the KL term is there to be checked
    model = build_model(config, single)
    units = int(cache.trained.sum())
    for packs in ([np.arange(6)], [np.array([4, 0]), np.array([], int), np.array([5, 1, 2, 3])]):
        model.zero_grad(set_to_none=True)
        sums = train.forward_backward(model, objective, cache, packs, units, 1, single.device)
        grads = {n: p.grad for n, p in model.lm.named_parameters()}
        assert sums[0].item() / units == pytest.approx(want_loss, rel=1e-6), packs
        assert sorted(grads) == sorted(want)
        assert max_rel(grads, want) < 1e-5, (packs, max_rel(grads, want))
        assert objective.metrics == ("kl", "ce")
        assert (sums[1:] / units).tolist() == pytest.approx([want_kl, want_ce], rel=1e-5), packs


# ---------------------------------------------------------------------------------------------------------------
# Two processes, skewed micro-steps


def distill_grad_worker(student: str, teacher: str, data_path: str, out_dir: str) -> None:
    """Under torchrun: the table (both ranks compute, in several blocks; rank 0 writes, rank 1 reads it) and the
    gradient on 2 FSDP2 ranks with skewed micro-steps (rank 1 runs two dummy packs)."""
    import torch.distributed as dist

    import train
    from minitrain.training import teacher as teacher_module
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective

    world = init_distributed("auto")
    config = distill_config(Path(data_path), Path(student), Path(teacher), Path(out_dir),
                            fsdp_sharding_strategy="FULL_SHARD")  # + activation checkpointing
    cache = load_data(config, world, vocab_size=10**6)
    objective = build_objective(config)
    block_bytes = teacher_module.BLOCK_BYTES
    teacher_module.BLOCK_BYTES = SMALL_BLOCK * teacher_module.bytes_per_token(K)
    try:
        teacher_module.attach_teachers(objective, [cache], config, world)
    finally:
        teacher_module.BLOCK_BYTES = block_bytes
    table = objective.tables[cache.content_hash]
    model = build_model(config, world)
    packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
    units = int(cache.trained.sum())
    sums = train.forward_backward(model, objective, cache, packs, units, world.world_size, world.device)
    dist.all_reduce(sums)
    grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
    if world.is_main:
        rows = read_rows(Path(data_path))
        want_ids, want_logprobs = direct_topk(Path(teacher), rows)
        want_loss, want, want_kl, want_ce = direct_grads(Path(student), Path(teacher), rows)
        report = {"ids": bool(np.array_equal(table.ids, want_ids)),
                  "logprobs": float(np.abs(table.logprobs - want_logprobs).max()),
                  "blocks": len(teacher_module.blocks(cache.trained, SMALL_BLOCK)),
                  "loss": sums[0].item() / units, "want_loss": want_loss, "max_rel": max_rel(grads, want),
                  "names": sorted(grads) == sorted(want), "metrics": (sums[1:] / units).tolist(),
                  "want_metrics": [want_kl, want_ce]}
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_ranks_with_skewed_micro_steps_give_the_direct_gradient(tmp_path, tiny_model_dir, two_ranks):
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=4)
    run = two_ranks.run(__name__, "distill_grad_worker", [tiny_model_dir("llama"), tiny_model_dir("qwen2"), data,
                                                          tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["blocks"] > 2
    assert report["ids"] and report["logprobs"] < 1e-5
    assert report["names"]
    assert report["loss"] == pytest.approx(report["want_loss"], rel=1e-6)
    assert report["max_rel"] < 1e-5, report["max_rel"]
    assert report["metrics"] == pytest.approx(report["want_metrics"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# train.py as a user runs it: the table is built once, its size printed first; resume reads it and is exact


def distill_args(data: Path, student: Path, teacher: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        *extra, "--data-path", str(data), "--model-name-or-path", str(student), "--output-dir", str(out),
        "--objective", "distill", "--teacher-model", str(teacher), "--distill-top-k", str(K),
        "--distill-alpha", str(ALPHA), "--distill-temperature", str(T), "--batch-size", "4",
        "--max-tokens-per-gpu", "64", "--max-steps", str(steps), "--learning-rate", "1e-2",
        "--save-dtype", "float32", "--no-activation-checkpointing",
    ]


def test_the_table_is_built_once_and_a_resumed_run_reads_it_and_continues_exactly(tmp_path, capsys, tiny_model_dir):
    import train
    from tests.test_resume import metrics, run_main, weights

    student, teacher = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    data = write_data(tmp_path / "data.jsonl", 16, vocab=700, seed=5)
    validation = write_data(tmp_path / "validation.jsonl", 4, vocab=700, seed=6)  # a second cache, a second table
    evaluate = ("--validation-data-path", str(validation), "--eval-every-samples", "8", "--num-eval-generations", "0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, out, err = run_main(distill_args(data, student, teacher, straight, 4, *evaluate), capsys)
    assert code == 0, err[-3000:]
    trained = sum(len([t for t in r["labels"][1:] if t != -100]) for r in read_rows(data))
    size_line = (f"teacher top-k: {K} log-probs (float32) + {K} token ids (int32) = {8 * K} bytes per trained token; "
                 f"{trained:,} trained tokens: ")
    # the sizes first, then the teacher's pass (one load for both caches), then the student: never both in memory
    assert size_line in out and out.index(size_line) < out.index("teacher: loading") < out.index("teacher top-k: wrote")
    assert out.count("bytes per trained token") == 2 and out.count("teacher: loading") == 1
    assert out.rindex("teacher top-k: wrote") < out.index("parameters train")

    code, out, err = run_main(distill_args(data, student, teacher, resumed, 2, *evaluate), capsys)
    assert code == 0, err[-3000:]
    tables = sorted((resumed / "token_cache").glob("*/teacher_topk-*"))
    assert len(tables) == 2
    written = {f: f.stat().st_mtime_ns for table in tables for f in table.iterdir()}
    assert {f.name for f in written} == {"ids.npy", "logprobs.npy", "meta.json"}
    code = train.main(distill_args(data, student, teacher, resumed, 4, *evaluate))  # the same command, 2 more steps
    out = capsys.readouterr().out
    assert code == 0
    assert "resumed from" in out and all(f"teacher top-k: reused {table}" in out for table in tables)
    assert "teacher: loading" not in out and "computing" not in out and "bytes per trained token" not in out
    assert {f: f.stat().st_mtime_ns for f in written} == written

    want, got = metrics(straight), metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["sample_lines"] for r in got] == [r["sample_lines"] for r in want]
    for key in ("loss", "kl", "ce", "validation_loss", "validation_kl", "validation_ce"):
        values = [r[key] for r in want if key in r]
        assert len(values) == (4 if key in ("loss", "kl", "ce") else 2)  # evaluated after steps 2 and 4
        assert [r[key] for r in got if key in r] == pytest.approx(values, rel=1e-6), key
    assert got[-1]["validation_loss"] == pytest.approx(
        ALPHA * T**2 * got[-1]["validation_kl"] + (1 - ALPHA) * got[-1]["validation_ce"], rel=1e-6)
    assert got[0]["loss"] == pytest.approx(ALPHA * T**2 * got[0]["kl"] + (1 - ALPHA) * got[0]["ce"], rel=1e-6)
    final, reference = weights(resumed / "hf_format" / "samples_16"), weights(straight / "hf_format" / "samples_16")
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert (final[name] - tensor).abs().max().item() < 1e-6, name
    halfway = weights(resumed / "hf_format" / "samples_8")["model.norm.weight"]
    assert (reference["model.norm.weight"] - halfway).abs().max().item() > 1e-4  # the comparison means something


def test_another_k_builds_its_own_table_and_another_alpha_or_temperature_reuses_it(tmp_path, capsys, tiny_model_dir):
    """teacher.py: the table is keyed by the teacher's files, k and the device type, not by --distill-alpha or
    --distill-temperature. Runs sharing one --cache-dir: another alpha and temperature reuse the table; another k
    builds a second table of k columns, leaving the first as it was."""
    import numpy as np

    from tests.test_resume import run_main

    student, teacher = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=5)
    cache = tmp_path / "cache"

    def run(name: str, *flags: str) -> str:
        args = distill_args(data, student, teacher, tmp_path / name, 1) + ["--cache-dir", str(cache), *flags]
        code, out, err = run_main(args, capsys)  # the flags after distill_args' own win
        assert code == 0, err[-3000:]
        return out

    assert "teacher top-k: wrote" in run("first")
    (table,) = cache.glob("*/teacher_topk-*")
    written = {f: f.stat().st_mtime_ns for f in table.iterdir()}
    out = run("other_alpha_and_t", "--distill-alpha", "0.3", "--distill-temperature", "1.0")
    assert f"teacher top-k: reused {table}" in out and "teacher: loading" not in out
    out = run("other_k", "--distill-top-k", str(K + 4))
    assert "teacher: loading" in out and "teacher top-k: wrote" in out
    tables = set(cache.glob("*/teacher_topk-*"))
    assert len(tables) == 2 and table in tables
    (other,) = tables - {table}
    assert np.load(other / "ids.npy").shape[1] == K + 4 and np.load(table / "ids.npy").shape[1] == K
    assert {f: f.stat().st_mtime_ns for f in table.iterdir()} == written


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, before any weight loads


def test_a_teacher_with_another_vocabulary_is_refused_in_one_line_before_any_weights_load(
        tmp_path, capsys, tiny_model_dir, tokenizer_dir):
    import shutil

    from tests.test_resume import run_main
    from tests.tiny_models import build_tiny_model

    student = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    other = build_tiny_model("qwen2", tmp_path / "other", tokenizer_dir("llama3"))  # another tokenizer
    padded = tmp_path / "padded"  # the student's tokenizer, but logits over more ids (a padded embedding)
    shutil.copytree(tiny_model_dir("qwen2"), padded)
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    for teacher, message in (
        (other, f"--teacher-model {other}: its tokenizer is not the student's ({student}): "),
        (padded, (f"--teacher-model {padded}: its logits cover {config['vocab_size'] + 64} ids (config.json "
                 f"vocab_size), the student's {config['vocab_size']}; ")),
    ):
        code, out, err = run_main(distill_args(data, student, teacher, tmp_path / "out", 1), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err, err
        assert "start-up probe" not in out and "teacher: loading" not in out  # no weights loaded


def test_what_distillation_does_not_support_is_refused_in_one_line(tmp_path, capsys, tiny_model_dir):
    from tests.test_kto import write_kto
    from tests.test_preference import write_pairs
    from tests.test_resume import run_main

    student, teacher = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    args = distill_args(data, student, teacher, tmp_path / "out", 1)
    without_teacher = [a for i, a in enumerate(args) if "--teacher-model" not in args[max(0, i - 1) : i + 1]]
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    labelled = write_kto(tmp_path / "kto.jsonl", 4)
    second = write_data(tmp_path / "second.jsonl", 4, vocab=700, seed=1)
    for case, message in (
        (without_teacher, "--objective distill needs --teacher-model PATH"),
        ([*args, "--objective", "sft"], "--teacher-model is for --objective distill (this run's is sft)"),
        ([*args, "--lora"], "--objective distill does not support --lora yet; drop it"),
        ([*args, "--loss-reduction", "sequences"], "does not support --loss-reduction sequences yet"),
        ([*args, "--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5"),
        ([*args, "--distill-temperature", "0"], "--distill-temperature must be positive, got 0.0"),
        ([*args, "--teacher-model", str(tmp_path / "none")], f"--teacher-model {tmp_path / 'none'}: no such model"),
        ([*args, "--data-path", str(pairs)], (f"{pairs}: holds preference pairs; --objective distill trains a causal "
                                             f"LM on samples")),
        ([*args, "--data-path", str(labelled)], f"{labelled}: holds labelled (KTO) samples, some undesirable"),
        ([*args, "--data-path", str(data), str(second)], "--objective distill does not support mixtures yet"),
    ):
        code, out, err = run_main(case, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err, (message, err)
        assert "start-up probe" not in out and "teacher: loading" not in out


def test_a_table_its_disk_cannot_hold_is_refused_in_one_line_before_the_teacher_loads(tmp_path, capsys,
                                                                                         tiny_model_dir, monkeypatch):
    """docs/objectives.md: the table's size is printed before it is built, and a disk without room for it stops
    the run in one line naming the size, the free space and the fixes; no teacher weight loads, no table is left."""
    import shutil
    from collections import namedtuple

    from tests.test_resume import run_main

    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=5)
    trained = sum(len([t for t in r["labels"][1:] if t != -100]) for r in read_rows(data))
    size = trained * 8 * K  # K float32 log-probs and K int32 ids per trained token
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - size + 1, size - 1))
    out = tmp_path / "out"
    code, stdout, err = run_main(distill_args(data, tiny_model_dir("llama"), tiny_model_dir("qwen2"), out, 1), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert (f"--objective distill: the teacher's table needs {size / 2**30:.2f} GiB in " in err
            and f"and {(size - 1) / 2**30:.2f} GiB are free; free some space, put the cache on a larger disk "
                "(--cache-dir) or lower --distill-top-k" in err), err
    assert f"{trained:,} trained tokens: " in stdout and "teacher: loading" not in stdout
    assert not list(out.glob("token_cache/*/teacher_topk-*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - size, size))  # room for it exactly
    code, stdout, err = run_main(distill_args(data, tiny_model_dir("llama"), tiny_model_dir("qwen2"), out, 1), capsys)
    assert code == 0 and "teacher top-k: wrote" in stdout, err[-2000:]


def test_a_teacher_weights_file_cut_short_is_one_line_naming_the_teacher_flag(tmp_path, capsys, tiny_model_dir):
    from tests.test_loading import cut_short
    from tests.test_resume import run_main

    student = tiny_model_dir("llama")
    damaged = cut_short(tiny_model_dir("qwen2"), tmp_path / "teacher")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    code, _, err = run_main(distill_args(data, student, damaged, tmp_path / "out", 1), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"train.py: error: --teacher-model {damaged}: model.safetensors cannot be read" in err, err


def teacher_memory_worker(student: str, teacher_dir: str, out: str) -> None:
    """Each rank's peak memory in a real teacher pass: the teacher as teacher.load_teacher builds it (per-rank loading
    of its weights, FSDP2 over both ranks), in reference mode (eval, no gradients), one forward of a row of
    max_tokens_per_gpu tokens taking every next token's top-k (teacher.block_table's call) under FSDPMemTracker on real
    tensors. Rank 0 writes both peaks (bytes) to OUT/teacher_memory.json."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from minitrain.training import memory, teacher
    from minitrain.training.data import make_pack
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.objectives import SFT
    from minitrain.training.reference import reference_mode

    world = init_distributed("gloo")
    config = distill_config(Path(out) / "unused.jsonl", Path(student), Path(teacher_dir), Path(out) / "o",
                            activation_checkpointing=False)
    model = teacher.load_teacher(config, world)
    pack = make_pack(memory.synthetic_cache(SFT(), config.max_tokens_per_gpu), np.array([0]))
    tracker = FSDPMemTracker(model)
    with reference_mode(model), torch.no_grad(), tracker:
        model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, cu_seq_lens=pack.cu_seq_lens,
              max_length=pack.max_length, top_k=config.distill_top_k)
    peak = torch.tensor([next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]], dtype=torch.int64)
    peaks = [torch.zeros_like(peak) for _ in range(world.world_size)]
    torch.distributed.all_gather(peaks, peak)
    if world.is_main:
        (Path(out) / "teacher_memory.json").write_text(json.dumps([int(p) for p in peaks]))
    cleanup_distributed()


def test_the_teacher_pass_estimate_is_the_measured_peak_of_a_real_two_rank_teacher_pass(tmp_path, tiny_model_dir,
                                                                                          two_ranks):
    """memory.simulate_teacher_pass (fake tensors, a fake process group) against the peak of a real teacher pass on
    2 ranks (teacher_memory_worker, in the session's 2-rank job; the forward only, so without the table block's
    buffers, which the estimate of a run adds). Without no_grad the simulation gives 2.7 MB."""
    from minitrain.training import memory

    student, teacher_dir = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    run = two_ranks.run(__name__, "teacher_memory_worker", [student, teacher_dir, tmp_path])
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads((tmp_path / "teacher_memory.json").read_text())
    config = distill_config(tmp_path / "unused.jsonl", student, teacher_dir, tmp_path / "o",
                            activation_checkpointing=False)
    simulated = memory.simulate_teacher_pass(config, config.max_tokens_per_gpu, 2, False, block_rows=0)
    print(f"teacher pass: simulated {simulated:,.0f} bytes, measured {measured}")
    for peak in measured:
        assert simulated == pytest.approx(peak, rel=0.02), (simulated, measured)


def test_the_estimate_stops_a_run_whose_teacher_pass_does_not_fit_though_its_step_does(tmp_path, capsys):
    """--estimate-memory for distillation from config.json files alone: a 2-block Llama of the 156M's shapes (hidden
    1024) as the teacher of a 2-block Llama of hidden 256, one vocabulary of 32k, on 2 GPUs. The step needs ~0.35
    GiB, the teacher's pass ~1.0 GiB (its embedding and LM head gathered, and a whole table block's buffers, 0.25
    GiB): on 0.9 GiB the run does not fit, the line naming the teacher's pass and what would help, each with its own
    estimate (a warning in a run: the pass runs only when its table is not on disk yet); on 1.5 GiB it fits."""
    from minitrain.training import memory
    from tests.test_memory import LLAMA_156M, SMALL, estimate_memory, write_config

    student = write_config(tmp_path / "student", {**SMALL, "vocab_size": 32000})
    teacher = write_config(tmp_path / "teacher", {**LLAMA_156M, "num_hidden_layers": 2})
    args = ["--model-name-or-path", str(student), "--objective", "distill", "--teacher-model", str(teacher),
            "--world-size", "2", "--max-tokens-per-gpu", "1024", "--estimate-device", "cpu",
            "--activation-checkpointing"]
    import train

    config = train.parse_args(["--estimate-memory", *args])
    truth = memory.simulate_teacher_pass(config, 1024, 2, False) / memory.GIB
    forward = memory.simulate_teacher_pass(config, 1024, 2, False, block_rows=0) / memory.GIB
    assert truth - forward == pytest.approx(256 / 1024, abs=1e-3)  # a whole block: 256 MiB of table
    tight, text = estimate_memory([*args, "--gpu-memory-gib", "0.9"], capsys)
    assert tight["teacher_pass_gib"] == round(truth, 3) and tight["peak_gib"] < 0.9 < truth, (tight, truth)
    assert f"the teacher's top-k pass, before the student is built: {truth:.1f} GiB per GPU" in text
    assert "does NOT fit (the teacher's pass) in 0.9 GiB; longest row whose step fits: " in text
    assert (f"the teacher's top-k pass (run before training when its table is not on disk yet) needs an estimated "
            f"{truth:.2f} GiB per GPU (FULL_SHARD, 1024 tokens per GPU, 2 GPUs) > the device's 0.9 GiB") in text
    assert "would fit or help: --max-tokens-per-gpu 512: " in text and "; 4 GPUs: " in text
    assert "this run will not fit" not in text  # the step fits
    roomy, text = estimate_memory([*args, "--gpu-memory-gib", "1.5"], capsys)
    assert roomy["teacher_pass_gib"] == round(truth, 3) and "fits in 1.5 GiB" in text and "needs an" not in text


def test_the_memory_estimate_runs_a_distillation_step(tmp_path, tiny_model_dir, monkeypatch):
    """The estimate (run at start-up on CUDA, or when checkpointing is auto) simulates a step of the objective on fake
    tensors, a stand-in teacher table included: the student trains (AdamW's state is the student's, counted in the
    test), the teacher is not in the step."""
    from minitrain.training import memory
    from tests.test_memory import adamw_state_bytes, simulated_parts

    data = tmp_path / "unused.jsonl"
    student, teacher = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    config = distill_config(data, student, teacher, tmp_path / "o", activation_checkpointing=False)
    steps = simulated_parts(monkeypatch)
    estimate = memory.estimate(config, 2, None, False, memory.run_optimizer(config), slope=False)
    assert estimate.objective == "distill" and estimate.peak_gib > 0 and len(steps) == 1
    assert steps[0]["optimizer_state"] == adamw_state_bytes(student, 2) != adamw_state_bytes(teacher, 2)
