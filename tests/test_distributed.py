"""The process group's timeout and the patient agreement: ranks that wait for one rank's long work (a token cache
build, a model load, an export) wait in raise_if_any_rank_failed on a group of their own, never in a collective of
the training group, whose timeout would kill the run (NCCL's default is 10 minutes)."""

import json
import sys
import time

from tests.test_train import torchrun


def align_ranks() -> None:
    """Wait, on torchrun's own store (a patient one), until both ranks are here: under load one rank's start-up took
    over 0.6 s longer than the other's, and gloo's connection of the two timed out inside init_process_group."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    store.set(f"aligned/{os.environ['RANK']}", "1")
    store.wait([f"aligned/{rank}" for rank in range(int(os.environ["WORLD_SIZE"]))])


def patient_worker(out: str) -> None:
    import torch.distributed as dist

    from minitrain.training.distributed import (
        cleanup_distributed,
        init_distributed,
        raise_if_any_rank_failed,
    )

    align_ranks()  # a rank arriving 0.6 s after the other would time out in the group's own set-up
    world = init_distributed("gloo", timeout_minutes=0.01)  # 0.6 s for the training group's collectives
    report = {}
    start = time.monotonic()
    if world.rank == 0:
        time.sleep(1.8)  # long rank-0-only work, 3x the timeout
    raise_if_any_rank_failed(None, RuntimeError)
    report["patient_wait_s"] = time.monotonic() - start
    if world.rank == 1:  # the same wait in a collective of the training group times out: the timeout is set
        start = time.monotonic()
        try:
            dist.barrier()
            report["barrier"] = "passed"
        except RuntimeError:
            report["barrier"] = "timed out"
        report["barrier_s"] = time.monotonic() - start
    else:
        time.sleep(1.5)  # rank 1's barrier times out meanwhile
    raise_if_any_rank_failed(None, RuntimeError)
    with open(f"{out}.{world.rank}", "w") as f:
        json.dump(report, f)
    cleanup_distributed()


def test_waiting_for_one_ranks_long_work_outlasts_the_process_group_timeout(tmp_path):
    out = tmp_path / "report"
    run = torchrun([__file__, str(out)], timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads(open(f"{out}.{r}").read()) for r in (0, 1))
    assert rank0["patient_wait_s"] > 1.6 and rank1["patient_wait_s"] > 1.6  # waited 1.8 s past a 0.6 s timeout
    assert rank1["barrier"] == "timed out" and 0.4 < rank1["barrier_s"] < 1.5


if __name__ == "__main__":
    patient_worker(sys.argv[1])


# ---------------------------------------------------------------------------------------------------------------
# The memory plan (memory.plan_for_run): rank 0 decides, every rank trains with its decision


def plan_worker(out_prefix: str, gib_rank0: str, gib_rank1: str, *argv: str) -> None:
    """train.py's main on this rank of the shared job, this rank reading its own memory figure (GiB: rank 0's, rank
    1's, as ranks on nodes with different free memory or GPUs would): what the run trained with (the config after
    train.start resolved it) and the estimate processes this rank started, to OUT_PREFIX.plan.<rank>.json."""
    import os
    from pathlib import Path

    import train
    from minitrain.training import memory
    from tests.two_rank_server import train_main

    rank = os.environ["RANK"]
    gib = (gib_rank0, gib_rank1)[int(rank)]
    seen, isolated = {}, []
    start, device_memory_gib, run_isolated = train.start, memory.device_memory_gib, memory.run_isolated

    def recorded_start(config, world):
        resolved = start(config, world)
        seen.update(activation_checkpointing=config.activation_checkpointing,
                    max_tokens_per_gpu=config.max_tokens_per_gpu)
        return resolved

    def counted(function, *args):
        isolated.append(function.__name__)
        if gib == "fails":  # this rank's plan fails as an estimate that fits nothing does (seconds of simulations)
            raise memory.EstimateError("--max-tokens-per-gpu auto: not even one token fits (this rank's plan)")
        return run_isolated(function, *args)

    train.start, memory.run_isolated = recorded_start, counted
    memory.device_memory_gib = lambda device, local_world_size: 1.0 if gib == "fails" else float(gib)
    try:
        train_main(out_prefix, *argv)
    finally:
        train.start, memory.device_memory_gib, memory.run_isolated = start, device_memory_gib, run_isolated
    Path(f"{out_prefix}.plan.{rank}.json").write_text(json.dumps({"seen": seen, "isolated": isolated}))


def plan_run(two_ranks, tmp_path, gib: tuple, argv: list[str], timeout: float = 240):
    """plan_worker on the shared 2-rank job: (the run, [rank 0's main output, rank 1's], [each rank's plan record])."""
    from pathlib import Path

    prefix = tmp_path / "main"
    run = two_ranks.run(__name__, "plan_worker", [prefix, *map(str, gib), *argv], timeout=timeout)
    if run.returncode != 0:
        return run, None, None
    mains = [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in (0, 1)]
    plans = [json.loads(Path(f"{prefix}.plan.{rank}.json").read_text()) for rank in (0, 1)]
    return run, mains, plans


def test_every_rank_trains_with_rank_0s_memory_plan_and_one_estimate_process_runs(tmp_path, tiny_model_dir,
                                                                                     two_ranks):
    """Auto activation checkpointing on two ranks that read different memory figures: rank 0's fits the step with
    checkpointing on but not off, rank 1's (1000 GiB) fits it off. Both train with rank 0's choice (on), and only
    rank 0 starts an estimate process."""
    from dataclasses import replace

    import train
    from minitrain.training import memory
    from tests.test_train import base_args, write_data

    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)
    argv = base_args(tmp_path, model_dir, data)  # 64 tokens per GPU, one step; checkpointing auto
    config = train.parse_args([*argv, "--estimate-memory", "--estimate-device", "cpu"])
    off, on = (memory.estimate(replace(config, activation_checkpointing=c), 2, None, False, memory.run_optimizer(config),
                               None, 2, slope=False).peak_gib for c in (False, True))
    assert on < off
    gib0 = (on + off) / 2 / (1 - memory.MARGIN)  # the budget lies between the peaks: checkpointing on
    run, mains, plans = plan_run(two_ranks, tmp_path, (gib0, 1000.0), argv)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [m["code"] for m in mains] == [0, 0], mains[0]["stderr"][-2000:] + mains[1]["stderr"][-2000:]
    assert "activation checkpointing: on (auto: on, the estimate with it off is" in mains[0]["stdout"]
    assert [p["seen"] for p in plans] == [{"activation_checkpointing": True, "max_tokens_per_gpu": 64}] * 2
    assert [p["isolated"] for p in plans] == [["plan_run"], []]  # one estimate process per job, on rank 0


def test_a_memory_plan_that_fails_on_rank_0_stops_every_rank_with_its_line(tmp_path, tiny_model_dir, two_ranks):
    """--max-tokens-per-gpu auto where rank 0's plan fails (not even one token fits; rank 1's memory would hold
    plenty): both ranks stop at once with rank 0's one line, no traceback, and rank 1 does not wait for rank 0 (as it
    would, in the next collective, had it planned its own run). That line itself, from a real estimate, is
    test_memory's."""
    from tests.test_train import base_args, write_data

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)
    argv = [*base_args(tmp_path, tiny_model_dir("llama"), data), "--max-tokens-per-gpu", "auto",
            "--activation-checkpointing"]
    run, mains, plans = plan_run(two_ranks, tmp_path, ("fails", 1000.0), argv, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [m["code"] for m in mains] == [2, 2]
    line = "train.py: error: --max-tokens-per-gpu auto: not even one token fits (this rank's plan)"
    for rank in (0, 1):
        lines = mains[rank]["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"[rank {rank}] {line}"), mains[rank]["stderr"]
    assert lines[0].split(": error: ")[1] == mains[0]["stderr"].strip().split(": error: ")[1]  # the same line
    assert [p["isolated"] for p in plans] == [["plan_run"], []]
    assert not (tmp_path / "out").exists()  # stopped before anything was written
