"""The process group's timeout and the patient agreement: ranks that wait for one rank's long work (a token cache
build, a model load, an export) wait in raise_if_any_rank_failed on a group of their own, never in a collective of
the training group, whose timeout would kill the run (NCCL's default is 10 minutes)."""

import json
import sys
import time

from tests.test_train import torchrun


def patient_worker(out: str) -> None:
    import torch.distributed as dist

    from minitrain.training.distributed import (
        cleanup_distributed,
        init_distributed,
        raise_if_any_rank_failed,
    )

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
