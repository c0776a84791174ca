"""One job of 2 (or N) ranks that runs the tests' multi-rank workers one after another, so that each check pays for its
own work and not for more interpreters importing torch and transformers and joining a process group.

    python tests/two_rank_server.py --nproc 2 REQUEST_DIR

This process (the launcher) imports torch, transformers and train.py once, then forks the ranks, each with the
environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
MASTER_PORT: all that minitrain and torch's env:// rendezvous read), so they start with those imports made: a torchrun
job imported them once per rank, ~4 CPU-s each, and its agent another 1. As torchrun does, the launcher hosts the
rendezvous store, waits for the ranks and ends the others when one fails; a rank dies with it. It writes {rank: pid}
to REQUEST_DIR/pids.json. Unlike fresh interpreters, the ranks share the launcher's hash seed (str hashes and set
order); numpy's global generator is reseeded in each. The tests that are about the launch itself (the quickstart,
two nodes, live memory, the process group's timeout) use torchrun.

Every rank watches REQUEST_DIR for request_<n>.json ({"module", "worker", "args"}), runs `module.worker(*args)` on
the one process group made here (the workers' init_distributed returns it and their cleanup_distributed is a
barrier), then writes status_<n>.<rank> ("ok" or the traceback). A worker that fails leaves the job in an unknown
state: the job ends and the next request starts a fresh one (tests/conftest.py's TwoRanks). request_stop ends it.
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
    train = sys.modules.get("train")  # imported by the launcher, with the names it took from distributed
    if train is not None:
        train.init_distributed, train.cleanup_distributed = distributed.init_distributed, dist.barrier
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


def launch(nproc: int, requests: Path) -> int:
    """Fork `nproc` ranks that serve REQUESTS; wait for them; if one fails (or this process fails), kill the others.
    The exit code: 0 when every rank ended well."""
    import os
    import signal

    import train  # noqa: F401 (imported once here, for every rank: torch, transformers, minitrain)

    launcher, pids, ports = os.getpid(), {}, {}
    try:
        for rank in range(nproc):
            read_port, ports[rank] = os.pipe()
            pid = os.fork()
            if pid == 0:  # a rank: it never returns into this loop
                code = 1
                try:
                    code = rank_main(rank, nproc, read_port, launcher, requests)
                finally:
                    os._exit(code)
            os.close(read_port)
            pids[rank] = pid
        # The rendezvous store, hosted here as torchrun's agent hosts it: bound before any rank needs it (a port
        # picked free and bound later by rank 0 could be taken meanwhile)
        store = dist.TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False)
        for rank, pipe in ports.items():
            os.write(pipe, f"{store.port}\n".encode())
            os.close(pipe)
        atomic.write_text(requests / "pids.json", json.dumps(pids))
        failed = False
        while pids:
            pid, status = os.wait()
            pids = {r: p for r, p in pids.items() if p != pid}
            if os.waitstatus_to_exitcode(status) != 0 and not failed:
                failed = True
                for other in pids.values():
                    os.kill(other, signal.SIGKILL)
        return 1 if failed else 0
    finally:
        for pid in pids.values():  # left only if this process fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def rank_main(rank: int, nproc: int, read_port: int, launcher: int, requests: Path) -> int:
    """A forked rank: torchrun's environment for it (the store's port read from the launcher), then serve. Its exit
    code."""
    import ctypes
    import os
    import signal

    import numpy as np

    code = 1
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the launcher, never orphaned
        if os.getppid() != launcher:
            return 1
        np.random.seed()  # numpy's global generator, fresh per rank as in a new interpreter (Python's random is)
        with os.fdopen(read_port) as pipe:
            port = pipe.readline().strip()  # a line: later ranks hold copies of the earlier ranks' write ends
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          TORCHELASTIC_USE_AGENT_STORE="True")
        serve(requests)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (the log shows it, as a torchrun worker's would)
        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    assert sys.argv[1] == "--nproc", __doc__
    sys.exit(launch(int(sys.argv[2]), Path(sys.argv[3])))


def train_main(out_prefix: str, *argv: str) -> None:
    """train.py's main(argv) on this rank, as `torchrun --nproc-per-node 2 train.py ARGV` runs it less the launch (two
    interpreters importing torch and transformers, a rendezvous): its exit code, stdout and stderr go to
    OUT_PREFIX.<rank>.json (conftest's TwoRanks.train). An exception main lets out fails the worker at once, as it
    would end the process: main's cleanup is not the barrier the other workers' is (that rank would wait there while
    the others wait in a collective of the run), so this rank exits and the launcher stops the job."""
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
