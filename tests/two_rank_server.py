"""One 2-rank torchrun job that runs the tests' 2-rank workers one after another, so that each check pays for its own
work and not for two more interpreters importing torch and transformers and joining a process group.

    torchrun --nproc-per-node 2 tests/two_rank_server.py REQUEST_DIR

Both ranks watch REQUEST_DIR for request_<n>.json ({"module", "worker", "args"}), run `module.worker(*args)` on the
one process group made here (the workers' init_distributed returns it and their cleanup_distributed is a barrier),
then write status_<n>.<rank> ("ok" or the traceback). A worker that fails leaves the job in an unknown state: the
job ends and the next request starts a fresh one (tests/conftest.py's `two_ranks` fixture). request_stop ends it.
"""

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from minitrain import atomic  # noqa: E402
from minitrain.training import distributed  # noqa: E402


def serve(requests: Path) -> None:
    world = distributed.init_distributed("auto")
    distributed.init_distributed = lambda backend="auto", timeout_minutes=60: world
    distributed.cleanup_distributed = dist.barrier
    n = 0
    while not (requests / "request_stop").exists():
        request = requests / f"request_{n}.json"
        if not request.exists():
            time.sleep(0.02)
            continue
        job = json.loads(request.read_text())
        status = "ok"
        try:
            getattr(importlib.import_module(job["module"]), job["worker"])(*job["args"])
        except BaseException:  # noqa: BLE001 (reported to the test, then this job ends)
            status = traceback.format_exc()
        # written whole, then renamed into place: the test reads it as soon as it exists
        atomic.write_text(requests / f"status_{n}.{world.rank}", status)
        if status != "ok":
            sys.exit(1)
        n += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))


def train_main(out_prefix: str, *argv: str) -> None:
    """train.py's main(argv) on this rank, as `torchrun --nproc-per-node 2 train.py ARGV` runs it less the launch (two
    interpreters importing torch and transformers, a rendezvous): its exit code, stdout and stderr go to
    OUT_PREFIX.<rank>.json (conftest's TwoRanks.train). An exception main lets out fails the worker at once, as it
    would end the process: main's cleanup is not the barrier the other workers' is (that rank would wait there while
    the others wait in a collective of the run), so this rank exits and torchrun stops the job."""
    import contextlib
    import io
    import os

    import train

    out, err = io.StringIO(), io.StringIO()
    train.cleanup_distributed = lambda: None  # the barrier comes below, once main has returned
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = train.main(list(argv))
            except SystemExit as e:  # what sys.exit(main()) and argparse's own exit give the process
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        train.cleanup_distributed = distributed.cleanup_distributed
        print(out.getvalue() + err.getvalue(), file=sys.stderr, flush=True)  # the job's log, as torchrun's would
    dist.barrier()
    Path(f"{out_prefix}.{os.environ['RANK']}.json").write_text(
        json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
