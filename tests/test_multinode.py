"""Two nodes on one machine: two torchrun agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1) form
one 2-rank job, as two hosts would.

    1. Sharing one --output-dir, they train the same steps with the same losses as one node with 2 processes; killed
       with SIGKILL (both agents and their workers) during an asynchronous save, the same two commands resume
       exactly from the previous checkpoint, with the model folder's weights gone (built from the checkpoint alone).
    2. Each node given its own --output-dir (as when a path names a node-local disk): every rank stops at start in
       one line naming the node that cannot see rank 0's folder, instead of hanging or aborting in a collective.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minitrain.training import checkpoint
from tests.test_resume import metrics, without_weights
from tests.test_train import kill_torchrun, write_data

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def train_args(data: Path, model_dir: Path, out: Path) -> list[str]:
    return [
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
        "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", str(STEPS), "--learning-rate", "1e-3",
        "--num-warmup-steps", "2", "--lr-scheduler", "cosine", "--min-samples-per-checkpoint", "8",
        "--checkpoint-every-steps", "2", "--save-dtype", "float32",
        "--no-activation-checkpointing",  # auto's choice here, without a memory-estimate process per rank
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One torchrun agent of a 2-node job, in its own process group."""

    def __init__(self, node_rank: int, port: int, run_id: str, args: list[str], log: Path, env: dict | None = None,
                 script: str = "train.py"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", run_id, script, *args]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {})),
            )

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_torchrun(self.proc.pid)
            self.proc.wait()


def two_nodes(tag: str, root: Path, args: list[list[str]], **kwargs) -> list[Node]:
    port, run_id = free_port(), f"{tag}-{os.getpid()}-{time.monotonic_ns()}"
    return [Node(n, port, run_id, args[n], root / f"{tag}.node{n}.log", **kwargs) for n in (0, 1)]


def finish(nodes: list[Node], timeout: float = 240) -> list[int]:
    try:
        return [node.proc.wait(timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("multinode")
    data = write_data(root / "data.jsonl", 4 * STEPS, vocab=700)
    return root, data, tiny_model_dir("llama")


def test_two_nodes_match_one_node_and_resume_exactly_after_both_are_killed(setup, two_ranks):
    root, data, model_dir = setup
    reference = root / "reference"  # one node, 2 ranks: train.py's main on the session's shared 2-rank job
    run = two_ranks.train(train_args(data, model_dir, reference), root / "reference_run")
    assert run.returncode == 0, run.stderr[-3000:]

    out = root / "shared"
    model_dir = Path(shutil.copytree(model_dir, root / "shared_model"))  # its weights go away after run 1
    args = [*train_args(data, model_dir, out), "--async-save"]  # full state written in the background (CUDA's default)
    saves = out / "checkpoints"
    # Killed as the save of step 4 is under way (its background write started, COMPLETE not yet written; rank 0 would
    # stop forever before writing it): kill -9 of both agents and their workers.
    nodes = two_nodes("run1", root, [args, args], env={"HANG_IN_SAVE_STEP": "4"},
                      script="tests/train_hanging_in_save.py")
    try:
        deadline = time.monotonic() + 240
        while not {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in saves.glob(".step_4.tmp/*")}:
            for node in nodes:
                assert node.proc.poll() is None, node.text()[-3000:]
            assert time.monotonic() < deadline, nodes[0].text()[-3000:]
            time.sleep(0.05)
    finally:
        for node in nodes:
            node.kill()
    assert checkpoint.latest_checkpoint(saves) == saves / "step_2"  # whole, beside the unfinished .step_4.tmp
    assert (saves / ".step_4.tmp").is_dir()
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4

    # The resume builds the model from the checkpoint alone, on both nodes: the model folder keeps no weights.
    without_weights(model_dir)
    nodes = two_nodes("run2", root, [args, args])
    codes = finish(nodes)
    logs = "".join(node.text() for node in nodes)
    assert codes == [0, 0], logs[-3000:]
    assert f"resumed from {saves / 'step_2'}: step 2, 8 samples seen" in logs
    assert f"weights: the checkpoint's; none is read from {model_dir}" in logs

    expected, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["sample_lines"] for r in got] == [r["sample_lines"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # same world size, same reductions: exact
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in expected]


def test_nodes_with_their_own_output_folders_stop_at_start_in_one_line(setup):
    root, data, model_dir = setup
    outs = [root / "node0_only", root / "node1_only"]
    nodes = two_nodes("apart", root, [train_args(data, model_dir, out) for out in outs])
    started = time.monotonic()
    codes = finish(nodes, timeout=180)
    assert codes[0] != 0 and codes[1] != 0
    assert time.monotonic() - started < 120  # no collective timeout was waited out
    for node in nodes:
        errors = [line for line in node.text().splitlines() if "train.py: error:" in line]
        assert len(errors) == 1, node.text()[-3000:]
        assert "cannot see the folder that rank 0" in errors[0] and "node " in errors[0], errors[0]
        assert "--output-dir" in errors[0] and "shared folder" in errors[0]
    # nothing was trained or tokenized into either folder
    assert not any((out / "checkpoints").exists() for out in outs)
    assert not any((out / "token_cache").exists() for out in outs)
