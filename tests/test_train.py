"""train.py end to end on CPU: exact gradients across world sizes, overfitting, checkpoints, bad input.

The 2-process checks run on the 2 ranks (gloo) of the session's shared torchrun job (tests/two_rank_server.py): the
command-line checks run train.py's main(argv) there, as `torchrun --nproc-per-node 2 train.py ARGV` would less the
launch (which tests/test_resume.py, tests/test_quickstart.py and others still run for real); the gradient check
(`grad_worker`) calls train.py's own functions, so it tests the code that production runs, and compares a 2-rank FSDP2
step with skewed micro-steps against 1 process x 1 micro-step.
"""

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# --standalone: a free rendezvous port, so runs beside other torchrun jobs do not collide
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def write_data(path: Path, num_samples: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_samples):
            n = int(rng.integers(10, 40))
            prompt = int(rng.integers(2, n - 2))
            ids = rng.integers(3, vocab, n).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "len": n}) + "\n")
    return path


# For a test that reads peak resident memory as the memory a run held: glibc's mmap threshold fixed at 64 KiB gives
# every tensor its own mapping, returned when freed, so the peak is what was live, not what the allocator kept (with
# glibc's moving threshold identical runs here differed by up to 0.8 GB; test_loading.py, test_memory.py). MKL keeps
# the work buffers of its matrix products for reuse (about 22 MiB after a 1024-token step of the 156M Llama);
# MKL_DISABLE_FAST_MM returns them too.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}


def torchrun(args: list[str], timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group, so a timeout kills its workers too (no orphans holding the CPU); `env`:
    variables added to this process's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [*TORCHRUN, *args]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_torchrun(proc.pid)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun_workers(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of a torchrun's workers (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        ranks = [e[len(b"RANK="):] for e in environ if e.startswith(b"RANK=")]
        if ppid == torchrun_pid and ranks:
            found[int(ranks[0])] = int(stat.parent.name)
    return found


def kill_torchrun(torchrun_pid: int) -> None:
    """SIGKILL torchrun (started with start_new_session) and its workers, which sit in process groups of their own."""
    workers = torchrun_workers(torchrun_pid)
    os.killpg(torchrun_pid, signal.SIGKILL)
    for pid in workers.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Gradient of one optimizer step: 1 process x 1 micro-step == 2 processes x skewed micro-steps, every strategy.

SKEWED = {0: [[0, 1, 2], [3], [4]], 1: [[5, 6, 7], [], []]}  # rank 1 runs two dummy packs


def reference_step(config, cache, step_trained: int, device, report: dict):
    """One process, one micro-step holding the step's 8 samples: (the model, its gradients); its loss and gradient
    norm go into `report`."""
    import train
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import SFT

    reference = build_model(config, World(0, 0, 1, 1, device))
    ref_sum = train.forward_backward(reference, SFT(), cache, [np.arange(8)], step_trained, 1, device)
    report["reference_loss"] = ref_sum.item() / step_trained
    grads = {n: p.grad for n, p in reference.lm.named_parameters()}
    report["reference_norm"] = train.clip_gradients(reference, 0)
    return reference, grads


def sharded_step(config, world, cache, packs: list, step_trained: int, ref_grads: dict | None):
    """The same step on every rank of `world`, this rank's micro-steps `packs`: (the model, on the rank with
    `ref_grads` its loss, largest relative gradient difference per tensor, gradient norm, same names)."""
    import torch.distributed as dist

    import train
    from minitrain.training.model import build_model
    from minitrain.training.objectives import SFT

    model = build_model(config, world)
    packs = [np.asarray(p, dtype=np.int64) for p in packs]
    local_sum = train.forward_backward(model, SFT(), cache, packs, step_trained, world.world_size, world.device)
    dist.all_reduce(local_sum)
    grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
    norm = train.clip_gradients(model, 0)
    if ref_grads is None:
        return model, None
    rel = {n: ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items()}
    return model, {"loss": local_sum.item() / step_trained, "max_rel": max(rel.values()),
                   "names": sorted(grads) == sorted(ref_grads), "norm": norm}


SKEWED_4 = {0: [[0, 1], [2]], 1: [[3], []], 2: [[4, 5, 6], []], 3: [[7], []]}  # 4 ranks, dummy packs on three


def hybrid_grad_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    """HYBRID_SHARD on 4 ranks with --fsdp-shard-group-size 2 (2 replicas x 2 shards, as 2 nodes of 2 GPUs): the
    mesh and each parameter's placements, and the step's loss, gradients and norm against one process's."""
    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed

    d = init_distributed("auto")
    config = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8,
                               max_tokens_per_gpu=256, save_dtype="float32", activation_checkpointing=False,
                               fsdp_sharding_strategy="HYBRID_SHARD", fsdp_shard_group_size=2)
    cache = load_data(config, d, vocab_size=10**6)
    step_trained = int(cache.trained[:8].sum())
    report = {}
    ref_grads = reference_step(config, cache, step_trained, d.device, report)[1] if d.is_main else None
    model, report["HYBRID_SHARD"] = sharded_step(config, d, cache, SKEWED_4[d.rank], step_trained, ref_grads)
    if d.is_main:
        weight = next(model.lm.parameters())
        report["mesh"] = [list(weight.device_mesh.shape), list(weight.device_mesh.mesh_dim_names)]
        report["placements"] = sorted({str(p.placements) for p in model.lm.parameters()})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def grad_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train
    from minitrain.training.checkpoint import save_export
    from minitrain.training.data import load_data, make_pack
    from minitrain.training.distributed import (
        cleanup_distributed,
        init_distributed,
    )
    from minitrain.training.model import (
        SHARDING_STRATEGIES,
        PackedCausalLM,
        build_model,
    )
    from minitrain.training.objectives import SFT

    d = init_distributed("auto")
    config = train.TrainConfig(
        data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8, max_tokens_per_gpu=256,
        save_dtype="float32", activation_checkpointing=False,
    )
    cache = load_data(config, d, vocab_size=10**6)
    step_trained = int(cache.trained[:8].sum())
    report = {}
    if d.is_main:  # reference: one process, one micro-step holding the whole step
        reference, ref_grads = reference_step(config, cache, step_trained, d.device, report)
    for strategy in SHARDING_STRATEGIES:
        cfg = replace(config, fsdp_sharding_strategy=strategy, activation_checkpointing=strategy == "FULL_SHARD")
        model, entry = sharded_step(cfg, d, cache, SKEWED[d.rank], step_trained, ref_grads if d.is_main else None)
        report[strategy] = entry
    # Checkpoint of the last model after one optimizer step: reload it and compare with the trained model.
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    saved = save_export(model, tokenizer, cfg, d, samples_seen=8)
    full = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    pack = make_pack(cache, np.arange(3))
    with torch.no_grad():
        trained_loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets)  # through FSDP
    if d.is_main:
        reloaded = AutoModelForCausalLM.from_pretrained(saved)
        trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trained.load_state_dict(full)
        with torch.no_grad():
            kwargs = dict(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False)
            report["logits_max_diff"] = (reloaded(**kwargs).logits - trained(**kwargs).logits).abs().max().item()
            report["weights_changed"] = (trained.model.norm.weight - reference.lm.model.norm.weight).abs().max().item()
            reloaded_loss = PackedCausalLM(reloaded)(pack.input_ids, pack.position_ids, pack.positions, pack.targets)
        report["loss_diff"] = abs(reloaded_loss.item() - trained_loss.item())
        report["reloaded_dtype"] = str(reloaded.dtype)

    # --loss-reduction sequences: the mean over the step's 8 samples of each sample's token mean, on 2 ranks with
    # skewed micro-steps, against the model's own forward + plain cross-entropy one sample at a time.
    sharded = build_model(replace(config, fsdp_sharding_strategy="FULL_SHARD"), d)
    packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[d.rank]]
    local_sum = train.forward_backward(sharded, SFT("sequences"), cache, packs, 8, d.world_size, d.device)
    dist.all_reduce(local_sum)
    grads = {n: p.grad.full_tensor() for n, p in sharded.lm.named_parameters()}
    if d.is_main:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        truth = 0.0
        for i in range(8):
            start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
            ids = torch.from_numpy(cache.input_ids[start:end].astype(np.int64))[None]
            labels = torch.from_numpy(cache.labels[start:end].astype(np.int64))
            logits = lm(input_ids=ids, use_cache=False).logits[0, :-1]
            truth = truth + torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100) / 8
        truth.backward()
        rel = {n: ((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in lm.named_parameters()}
        report["sequences"] = {"loss": local_sum.item() / 8, "truth": truth.item(), "max_rel": max(rel.values()),
                               "names": sorted(rel) == sorted(grads)}
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_ranks_with_skewed_micro_steps_give_the_single_process_gradient(tmp_path, tiny_model_dir, two_ranks):
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700)
    run = two_ranks.run(__name__, "grad_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
        r = report[strategy]
        assert r["names"], strategy
        assert r["loss"] == pytest.approx(report["reference_loss"], rel=1e-6), strategy
        # the README's figure: within 1e-6 of each tensor's largest gradient (5.7e-7 measured)
        assert r["max_rel"] < 1e-6, (strategy, r["max_rel"])
        assert r["norm"] == pytest.approx(report["reference_norm"], rel=2e-6), strategy
    assert report["weights_changed"] > 1e-3  # the optimizer step happened, so the comparison below means something
    assert report["logits_max_diff"] < 1e-5 and report["loss_diff"] < 1e-4
    assert report["reloaded_dtype"] == "torch.float32"
    sequences = report["sequences"]
    assert sequences["names"] and sequences["loss"] == pytest.approx(sequences["truth"], rel=1e-6)
    assert sequences["max_rel"] < 1e-6, sequences["max_rel"]


# ---------------------------------------------------------------------------------------------------------------
# The command line as a user runs it


def test_torchrun_overfits_logs_every_step_and_saves_loadable_checkpoints(tmp_path, tiny_model_dir, two_ranks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("qwen2")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)
    out = tmp_path / "out"
    args = [
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
        "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "30", "--learning-rate", "1e-2",
        "--num-warmup-steps", "3", "--lr-scheduler", "cosine", "--min-samples-per-checkpoint", "50",
        "--fsdp-sharding-strategy", "FULL_SHARD", "--save-dtype", "bfloat16", "--no-activation-checkpointing",
    ]
    run = two_ranks.train(args, tmp_path)  # train.py's main on both ranks of the shared torchrun job
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["samples_seen"] for r in records] == [4 * s for s in range(1, 31)]
    assert records[-1]["loss"] < records[0]["loss"] / 20  # overfits 4 samples (about 6.6 -> 0.07)
    assert records[0]["lr"] == pytest.approx(1e-2 / 3) and records[-1]["lr"] < 1e-4  # warmup, then cosine to ~0
    expected_keys = {"epoch", "grad_norm", "tokens", "trained_tokens", "micro_steps", "packing_utilisation",
                     "tokens_per_s", "peak_memory_gb", "step_time_s", "elapsed_s"}
    assert expected_keys <= set(records[0])
    assert all(0 < r["packing_utilisation"] <= 1 for r in records)
    # Every 50 samples (at 52, 100) and at the end (120); nothing half-written left beside them.
    hf = out / "hf_format"
    assert sorted(p.name for p in hf.iterdir()) == ["samples_100", "samples_120", "samples_52"]
    assert json.loads((out / "training_config.json").read_text())["max_steps"] == 30
    final = hf / "samples_120"
    files = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training_config.json"}
    assert files <= {p.name for p in final.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(final)
    assert str(model.dtype) == "torch.bfloat16"
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert "step 30 |" in run.stdout


def test_a_checkpoint_that_fails_mid_write_leaves_no_folder(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train
    from minitrain.training.checkpoint import CheckpointError, save_export
    from minitrain.training.distributed import World
    from minitrain.training.model import PackedCausalLM

    class FullDisk:  # the tokenizer is written after the weights: fail there
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    model_dir = tiny_model_dir("llama")
    model = PackedCausalLM(AutoModelForCausalLM.from_pretrained(model_dir))
    config = train.TrainConfig("d", str(model_dir), str(tmp_path), batch_size=1, max_tokens_per_gpu=8)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="could not write checkpoint .*samples_8: .*No space left"):
        save_export(model, FullDisk(), config, single, samples_seen=8)
    assert list((tmp_path / "hf_format").iterdir()) == []
    saved = save_export(model, AutoTokenizer.from_pretrained(model_dir), config, single, samples_seen=8)
    assert [p.name for p in (tmp_path / "hf_format").iterdir()] == ["samples_8"] and saved.name == "samples_8"


# ---------------------------------------------------------------------------------------------------------------
# Schedule and stop conditions (pure functions)


def test_importing_train_leaves_the_collector_on_and_the_imports_out_of_its_collections():
    """train.py pauses the garbage collector while torch and transformers load, then freezes what they allocated (see
    its imports): collection must be on again afterwards, or every cycle a run makes would stay in memory."""
    import gc

    import train  # noqa: F401 (imported by other tests in this process already, or here: either way it ran)

    assert gc.isenabled()
    assert gc.get_freeze_count() > 100_000  # torch and transformers' objects (~1M)


def test_lr_warms_up_linearly_then_follows_the_schedule_to_zero():
    from train import lr_multiplier

    assert [lr_multiplier(s, 4, 14, "constant") for s in (0, 1, 3, 4, 13, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert [lr_multiplier(s, 4, 14, "linear") for s in (3, 4, 9, 14)] == [1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(9, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(14, 4, 14, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(0, 0, 10, "linear") == 1.0  # no warmup: full rate on the first step


def test_total_steps_is_the_first_stop_condition_reached():
    from sampler import MultipackPlanner
    from train import TrainConfig, count_total_steps

    planner = MultipackPlanner(np.full(10, 5), batch_size=4, max_tokens_per_rank=64, world_size=2)  # 3 steps/epoch
    config = lambda **stop: TrainConfig("d", "m", "o", batch_size=4, max_tokens_per_gpu=64, **stop)  # noqa: E731
    assert count_total_steps(config(), planner) is None  # until stopped
    assert count_total_steps(config(max_epochs=2), planner) == 6
    assert count_total_steps(config(max_steps=5), planner) == 5
    assert count_total_steps(config(max_samples=10), planner) == 3  # steps of 4, 4, 2 samples
    assert count_total_steps(config(max_samples=13), planner) == 4  # 4 + 4 + 2, then 4 more: 14 >= 13
    assert count_total_steps(config(max_samples=13, max_epochs=1), planner) == 3


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, before any weights load


def run_main(args: list[str], capsys) -> tuple[int, str]:
    import train

    capsys.readouterr()  # drop what fixtures printed (e.g. building a tiny model)
    code = train.main(args)
    return code, capsys.readouterr().err


def base_args(tmp_path, model_dir, data) -> list[str]:
    return ["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(tmp_path / "out"),
            "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "1"]


def test_every_flag_problem_is_reported_together(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # validation only: it fails before the process group is created
    code, err = run_main([
        "--data-path", str(tmp_path / "missing.jsonl"), "--model-name-or-path", str(tmp_path / "no-model"),
        "--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--max-tokens-per-gpu", "64",
        "--fsdp-sharding-strategy", "ZERO3", "--distributed-backend", "nccl", "--lr-scheduler", "cosine",
        "--use-liger-kernels", "--loss-reduction", "sequences",
    ], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    for message in (
        "missing.jsonl: no such file", "no-model: no such model folder", "--batch-size 2 is smaller than the 4 ranks",
        "'ZERO3' is unknown", "nccl needs CUDA", "--lr-scheduler cosine decays over the whole run",
        # Liger's fused loss gives only the sum: with it a sequence mean would silently be a token mean
        "--loss-reduction sequences weighs each token by its sample and runs on the chunked loss; drop "
        "--use-liger-kernels or use --loss-reduction tokens", "--use-liger-kernels needs a GPU",
    ):
        assert message in err
    assert not (tmp_path / "out").exists()  # nothing happened before validation


def test_an_objectives_own_flags_given_for_another_objective_are_one_line(tmp_path, capsys):
    """--dpo-beta with the default --objective sft (the user forgot --objective dpo) would train SFT and ignore it:
    every such flag is named in one line, before anything loads."""
    args = ["--data-path", str(tmp_path / "d.jsonl"), "--model-name-or-path", str(tmp_path / "m"),
            "--output-dir", str(tmp_path / "out"), "--batch-size", "4", "--max-tokens-per-gpu", "64"]
    for flags, named in (
        (["--dpo-beta", "0.5", "--simpo-gamma", "2", "--kto-beta", "0.3", "--distill-top-k", "4"],
         "--dpo-beta, --simpo-gamma, --kto-beta, --distill-top-k would be ignored by --objective sft: drop them or "
         "pass the objective they are for"),
        (["--objective", "dpo", "--dpo-beta", "0.5", "--orpo-lambda", "0.2", "--reward-center-coefficient", "0.01"],
         "--orpo-lambda, --reward-center-coefficient would be ignored by --objective dpo"),
        (["--objective", "kto", "--kto-desirable-weight", "2", "--preference-sft-weight", "0.1"],
         "--preference-sft-weight would be ignored by --objective kto"),
        (["--objective", "orpo", "--loss-reduction", "sequences"],  # a pair's loss: no token mean to reweigh
         "--loss-reduction would be ignored by --objective orpo"),
        (["--objective", "reward", "--num-eval-generations", "1"],  # it printed 0 generations per evaluation
         "--num-eval-generations 1: a reward model does not generate"),
    ):
        code, err = run_main([*args, *flags], capsys)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    code, err = run_main([*args, "--objective", "simpo", "--simpo-beta", "2.5", "--simpo-gamma", "1",
                          "--preference-sft-weight", "0.1"], capsys)
    assert "would be ignored" not in err, err  # SimPO's own flags (the run stops on the missing files)


def test_what_argparse_refuses_is_one_line_too_on_every_rank(tmp_path, capsys, monkeypatch):
    """An unknown flag, a value not among the choices or of the wrong type, a required flag missing: one line naming
    it and --help, exit code 2 (argparse alone prints the whole usage first: 66 lines), with the rank under torchrun."""
    args = base_args(tmp_path, tmp_path / "no-model", tmp_path / "missing.jsonl")
    cases = [
        ([*args, "--logging-level", "INFO"], "unrecognized arguments: --logging-level INFO"),
        ([*args, "--lr-scheduler", "sideways"], "argument --lr-scheduler: invalid choice: 'sideways' (choose from"),
        ([*args, "--batch-size", "four"], "argument --batch-size: invalid int value: 'four'"),
        (args[2:], "the following arguments are required: --data-path"),
    ]
    for argv, message in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: "), err
        assert message in err and err.endswith("; see train.py --help\n"), err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, err = run_main(cases[0][0], capsys)
    assert code == 2 and err.startswith("[rank 1] train.py: error: unrecognized arguments: --logging-level") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_mini_trainers_readme_commands_parse_unchanged_and_its_other_flags_are_one_line(tmp_path, capsys):
    """The README promise: mini_trainer's README commands for both stages (its Readme.md, 2026) run here as written,
    each flag meaning what it means there; a flag of its that minitrain does not have is refused in one line."""
    import process_data
    import train

    stage_1 = ["--input-file", "data_with_messages_format.jsonl", "--output-file", "tokenized_data.jsonl",
               "--model-name-or-path", "Qwen/Qwen2.5-1.5B-instruct", "--max-sample-num-tokens", "32768"]
    config = process_data.parse_args(stage_1)
    assert (str(config.input_file), str(config.output_file), config.model_name_or_path,
            config.max_sample_num_tokens) == ("data_with_messages_format.jsonl", "tokenized_data.jsonl",
                                              "Qwen/Qwen2.5-1.5B-instruct", 32768)
    stage_2 = ["--output-dir", "./experiment_checkpoints_loggin_etc/", "--data-path", "./tokenized_data.jsonl",
               "--model-name-or-path", "Qwen/Qwen2.5-1.5B-instruct", "--min-samples-per-checkpoint", "10000",
               "--num-warmup-steps", "20", "--max-tokens-per-gpu", "60000", "--batch-size", "128",
               "--use-liger-kernels", "--seed", "893", "--fsdp-sharding-strategy", "FULL_SHARD",
               "--learning-rate", "6e-6"]
    config = train.parse_args(stage_2)
    assert (config.output_dir, config.data_path, config.model_name_or_path, config.min_samples_per_checkpoint,
            config.num_warmup_steps, config.max_tokens_per_gpu, config.batch_size, config.use_liger_kernels,
            config.seed, config.fsdp_sharding_strategy, config.learning_rate) == (
        "./experiment_checkpoints_loggin_etc/", ["./tokenized_data.jsonl"], "Qwen/Qwen2.5-1.5B-instruct", 10000, 20,
        60000, 128, True, 893, "FULL_SHARD", 6e-6)
    for extra, message in ((["--orthogonal-subspace-learning"], "unrecognized arguments"),
                           (["--lr-scheduler", "constant_with_warmup"], "invalid choice: 'constant_with_warmup'")):
        code, err = run_main([*stage_2, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_loss_reduction_sequences_from_the_command_line_is_the_mean_of_each_samples_mean(tmp_path, capsys,
                                                                                          tiny_model_dir):
    """--loss-reduction sequences through train.py's command line on a causal LM: step 1's logged loss is the mean
    over its samples of each sample's token-mean cross-entropy, from the model's own forward one sample at a time
    (the samples train 8-36 tokens each, so the token mean differs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=4)
    code, err = run_main([*base_args(tmp_path, model_dir, data), "--loss-reduction", "sequences",
                          "--save-dtype", "float32", "--no-activation-checkpointing"], capsys)
    assert code == 0, err[-2000:]
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sums, counts = [], []
    for line in first["sample_lines"]:
        row = rows[line - 1]
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, :-1]
        sums.append(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item())
        counts.append(int((labels != -100).sum()))
    assert len(counts) == 4 and len(set(counts)) > 1, counts
    assert first["loss"] == pytest.approx(np.mean([s / n for s, n in zip(sums, counts)]), rel=1e-6)
    assert first["loss"] != pytest.approx(sum(sums) / sum(counts), rel=1e-3)  # not the token mean


def test_an_output_dir_that_is_a_file_under_a_file_or_the_model_folder_is_one_line(tmp_path, capsys, tiny_model_dir):
    """Before anything loads: a file (the data file too) or a path under one (a traceback from mkdir before), the
    model's own folder, whose config and training_config.json the run would write over, and an empty path."""
    import shutil

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in [data, tmp_path / "notes.txt", *model.iterdir()]}
    for out, message in (
        (tmp_path / "notes.txt", f"--output-dir {tmp_path / 'notes.txt'}: is a file, not a folder; name a folder"),
        (data, f"--output-dir {data}: is a file, not a folder"),
        (tmp_path / "notes.txt" / "run", f"--output-dir {tmp_path / 'notes.txt' / 'run'}: {tmp_path / 'notes.txt'} is "
                                         f"a file, so no folder can be made under it; name a folder elsewhere"),
        (model / ".", f"--output-dir {model / '.'}: is the model's folder (--model-name-or-path), whose files the run "
                      f"would write over; name another folder"),
        ("", "--output-dir is empty; name a folder"),  # an unset variable: it trained into the current folder
    ):
        args = base_args(tmp_path, model, data)
        code, err = run_main([*args, "--output-dir", str(out), "--seed", str(2**64)], capsys)  # the last one wins
        assert "--seed must be in [0, 2^63), got 18446744073709551616" in err, err  # torch.manual_seed's traceback
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in [data, tmp_path / "notes.txt", *model.iterdir()]} == before


def test_model_folder_without_tokenizer_is_a_clear_error(tmp_path, capsys, tiny_model_dir):
    model_dir = tmp_path / "no-tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((tiny_model_dir("llama") / name).read_bytes())
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    code, err = run_main(base_args(tmp_path, model_dir, data), capsys)
    assert code == 2 and f"--model-name-or-path {model_dir}: cannot load its config and tokenizer" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [5, 6, 7]}, "data.jsonl:2: row has no 'labels' field"),
    ({"input_ids": [5, 6, 7], "labels": [5, 6]}, "data.jsonl:2: 3 input_ids but 2 labels"),
    ({"input_ids": list(range(3, 103)), "labels": list(range(3, 103))},
     "data.jsonl:2: sample is 100 tokens, longer than --max-tokens-per-gpu 64"),
    ({"input_ids": [5, 6, 5000], "labels": [5, 6, 5000]}, "token id 5000 is outside the model's vocabulary"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, tiny_model_dir, row, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}) + "\n" + json.dumps(row) + "\n")
    code, err = run_main(base_args(tmp_path, tiny_model_dir("llama"), data), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "hf_format").exists()


def test_non_finite_loss_stops_before_the_optimizer_step_naming_it(tmp_path, capsys, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    args = base_args(tmp_path, tiny_model_dir("llama"), data)
    args[args.index("--max-steps") + 1] = "5"
    # The first step's update blows the weights up; the second step's loss or gradient is not finite.
    code, err = run_main([*args, "--learning-rate", "1e30", "--max-grad-norm", "0"], capsys)
    error = [line for line in err.splitlines() if "train.py: error:" in line]
    assert code == 2 and len(error) == 1 and "nan" in error[0], err
    assert re.search(r"error: step 2: loss \S+, gradient norm \S+; stopped before the optimizer step", error[0])
    records = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1  # only the step that finished is logged
    assert not (tmp_path / "out" / "hf_format").exists()


def test_bad_data_under_torchrun_stops_every_rank_cleanly(tmp_path, tiny_model_dir, two_ranks):
    data = tmp_path / "data.jsonl"
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # checkpointing given: no memory-estimate process per rank (auto: other 2-rank CLI runs), not what this tests
    run = two_ranks.train([*base_args(tmp_path, tiny_model_dir("llama"), data), "--no-activation-checkpointing"],
                          tmp_path, timeout=120)
    assert run.returncode == 2  # main's own error exit on both ranks (an exception out of main fails the worker)
    for rank in (0, 1):
        assert f"[rank {rank}] train.py: error: {data}:2: row has no 'labels' field" in run.stderr
    assert 'train.py", line' not in run.stderr  # no traceback from our processes (torchrun prints its own summary)


if __name__ == "__main__":
    grad_worker(*sys.argv[1:4])


def test_the_chat_template_saved_beside_the_data_goes_into_every_export(tmp_path, capsys, tiny_model_dir):
    from transformers import AutoTokenizer

    import train

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "data.jsonl.chat_template.jinja").write_text(template)  # as process_data.py writes it
    out = tmp_path / "out"
    assert train.main(["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")),
                       "--output-dir", str(out), "--batch-size", "4", "--max-tokens-per-gpu", "256",
                       "--max-steps", "1", "--save-dtype", "float32"]) == 0, capsys.readouterr().err
    exported = AutoTokenizer.from_pretrained(out / "hf_format" / "samples_4")
    assert exported.chat_template == template
    assert AutoTokenizer.from_pretrained(tiny_model_dir("llama")).chat_template != template  # not the model's own


def test_the_saved_template_is_read_as_utf8_checked_against_the_validation_file_and_keeps_named_ones(tmp_path):
    """Found by a hunt: the sidecar (written as UTF-8) was read in the locale's encoding; a validation file rendered
    with another template was evaluated without a word (its loss measures another format and picks the best
    checkpoint); a tokenizer with several named templates (Hermes' default and tool_use, which transformers picks
    when given tools) was exported with one, whatever the data used."""
    import train
    from minitrain.training.config import ConfigError

    template = "{% for m in messages %}Réponds — {{ m['content'] }}{% endfor %}"
    data, valid = tmp_path / "data.jsonl", tmp_path / "valid.jsonl"
    (tmp_path / "data.jsonl.chat_template.jinja").write_bytes(template.encode())  # process_data.py writes UTF-8
    original = Path.read_text
    with pytest.MonkeyPatch.context() as patch:  # a locale that is not UTF-8: the default encoding is ASCII
        patch.setattr(Path, "read_text", lambda self, encoding="ascii", errors=None: original(self, encoding, errors))
        assert train.chat_template_of([str(data)], None) == template
    (tmp_path / "valid.jsonl.chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ConfigError, match=r"^--data-path and --validation-data-path: .* were rendered with different "
                                          r"chat templates"):
        train.chat_template_of([str(data)], str(valid))
    (tmp_path / "valid.jsonl.chat_template.jinja").write_bytes(template.encode())
    assert train.chat_template_of([str(data)], str(valid)) == template
    named = {"default": "{{ 'd' }}", "tool_use": "{{ 't' }}"}
    assert train.exported_templates(named, named["default"]) == named  # the data used one of them: all kept
    assert train.exported_templates(named, template) == {"default": template, "tool_use": named["tool_use"]}
    assert train.exported_templates("{{ 'own' }}", template) == template


def test_two_optimizer_steps_are_adamw_on_matrices_only_with_clipping_computed_here(tmp_path, capsys, tiny_model_dir):
    """The update the README promises, against torch.optim.AdamW on parameter groups built here (weight decay on
    matrices only), the gradient of each step computed here (each sample alone, plain cross-entropy, mean over the
    step's trained tokens) and clipped here. Two steps, so that the betas matter (one step of Adam is lr x
    g / (|g| + eps) whatever they are), an epsilon near the gradients' size and a clip that bites, so that the
    clipping changes the update."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=5)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lr, wd, betas, eps, clip = 1e-2, 0.1, (0.8, 0.9), 1e-4, 0.5
    code, err = run_main([
        *base_args(tmp_path, model_dir, data)[:-1], "2", "--batch-size", "2", "--learning-rate", str(lr),
        "--weight-decay", str(wd), "--adam-beta1", str(betas[0]), "--adam-beta2", str(betas[1]),
        "--adam-epsilon", str(eps), "--max-grad-norm", str(clip), "--lr-scheduler", "constant",
        "--save-dtype", "float32", "--no-activation-checkpointing",
    ], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = {n: p.detach().clone() for n, p in lm.named_parameters()}
    params = dict(lm.named_parameters())
    matrices = [p for p in params.values() if p.ndim >= 2]
    others = [p for p in params.values() if p.ndim < 2]
    assert matrices and others  # norms stay out of the decay
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}],
                                  lr=lr, betas=betas, eps=eps, foreach=False)
    for record in records:
        lm.zero_grad(set_to_none=True)
        step_rows = [rows[line - 1] for line in record["sample_lines"]]
        trained = sum(sum(label != -100 for label in row["labels"][1:]) for row in step_rows)
        loss = sum(F.cross_entropy(lm(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, :-1],
                                   torch.tensor(row["labels"][1:]), ignore_index=-100, reduction="sum")
                   for row in step_rows) / trained
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values()])).item()
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert norm > 2 * clip  # the clip bites
        for p in params.values():
            p.grad.mul_(clip / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
        optimizer.step()
    trained_weights = load_file(tmp_path / "out" / "hf_format" / "samples_4" / "model.safetensors")
    worst = 0.0
    for name, p in params.items():
        moved = (p.detach() - initial[name]).abs().max().item()
        assert moved > 1e-4, name  # every parameter took the two updates
        worst = max(worst, (trained_weights[name] - p.detach()).abs().max().item() / moved)
    assert worst < 1e-3, worst  # the trainer's weights are this update's, to float32 rounding of the gradients


def test_max_grad_norm_clips_to_its_value_and_0_leaves_the_gradients_and_logs_their_norm(tiny_model_dir):
    """--max-grad-norm (train.clip_gradients): the norm returned is the global L2 norm of every gradient (computed
    here from the gradients), 0 leaves the gradients as they are, and a limit of half the norm halves every one."""
    import torch
    from transformers import AutoModelForCausalLM

    import train

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    ids = torch.randint(3, 700, (1, 24), generator=torch.Generator().manual_seed(0))
    lm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert train.clip_gradients(lm, 0) == pytest.approx(norm, rel=1e-6)
    assert all(torch.equal(p.grad, grads[n]) for n, p in lm.named_parameters())  # 0: no clipping
    assert train.clip_gradients(lm, norm / 2) == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    assert all(torch.allclose(p.grad, grads[n] / 2, rtol=1e-5, atol=0) for n, p in lm.named_parameters())
