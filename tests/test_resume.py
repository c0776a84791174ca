"""Exact resume and fault tolerance, driven through `train.py` as a user runs it (torchrun, 2 gloo processes, CPU).

One uninterrupted reference run (train.py's main on the 2 ranks of the session's shared job), and one run in the
same configuration that is interrupted three ways and resumed each time by re-running the same command (only the
number of processes changes):

    1. 2 processes (torchrun), killed (SIGKILL) in the middle of the save of step 4 -> step_2 is the newest whole one
    2. 1 process (the test's) resumes from step_2 (2 -> 1), SIGTERM after step 3: stops there with a checkpoint, exit 0
    3. 2 processes (the shared job's) resume (1 -> 2), SIGUSR1 sent to rank 1's process alone after step 4: both
       ranks stop there, exit 0
    4. 1 process (the test's) resumes and finishes

The interrupted run must log the same steps, the same sample lines per step and the same losses as the reference,
and end with the same weights; its model folder loses its weights after run 1, since a resume reads none of them
(the checkpoint holds them all). Incompatible flags, the keep-last-K option and a non-finite loss run in process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from minitrain import atomic
from minitrain.training import checkpoint
from tests.test_train import kill_torchrun, write_data

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
NUM_SAMPLES = 24  # 4 per step: one epoch


def train_args(data: Path, model_dir: Path, out: Path) -> list[str]:
    return [
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
        "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", str(STEPS), "--learning-rate", "1e-3",
        "--num-warmup-steps", "2", "--lr-scheduler", "cosine", "--min-samples-per-checkpoint", "8",
        "--checkpoint-every-steps", "2", "--keep-last-n-checkpoints", "2", "--save-dtype", "float32",
        "--no-activation-checkpointing",  # auto's choice here, without a memory-estimate process per run
    ]


class Job:
    """train.py in its own process group (torchrun with `nproc` workers, or plain python when nproc is None)."""

    def __init__(self, args: list[str], log: Path, nproc: int | None, env: dict | None = None,
                 script: str = "train.py"):
        command = [sys.executable, script, *args]
        if nproc is not None:
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {})),
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended (rc {self.proc.returncode}) too early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_torchrun(self.proc.pid)
            self.proc.wait()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data.jsonl", NUM_SAMPLES, vocab=700)
    return root, data, tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(setup, two_ranks):
    """The uninterrupted run: 2 processes, 6 steps; train.py's main on the session's shared 2-rank job (the
    interrupted runs are the ones launched with torchrun, since they are killed and signalled)."""
    root, data, model_dir = setup
    out = root / "reference"
    run = two_ranks.train(train_args(data, model_dir, out), root / "reference_run")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_reference_run_keeps_the_newest_checkpoints_and_every_export(reference):
    # Full state every 2 steps (exports, every 8 samples = 2 steps, do not add any): steps 2, 4, 6; keep 2.
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_4", "step_6"]
    assert sorted(p.name for p in (reference / "hf_format").iterdir()) == ["samples_16", "samples_24", "samples_8"]
    newest = reference / "checkpoints" / "step_6"
    expected = {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json",
                "training_config.json", checkpoint.COMPLETE}
    assert {p.name for p in newest.iterdir()} == expected
    state = json.loads((newest / "trainer_state.json").read_text())
    assert (state["step"], state["samples_seen"], state["world_size"]) == (6, 24, 2)
    assert state["scheduler"]["last_epoch"] == 6
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    lines = sorted(line for r in records for line in r["sample_lines"])
    assert lines == list(range(1, NUM_SAMPLES + 1))  # one epoch: every sample once


def stopped_in_process(args: list[str], signum: int, capsys, monkeypatch) -> str:
    """train.main(args) in this process, `signum` delivered to it after the first step it runs (the handler has run
    when os.kill returns); its stdout. KeyboardInterrupt (SIGINT not handled) fails the test."""
    agreed, sent = checkpoint.StopSignals.agreed, []

    def signalled_after_the_first_step(self, device):
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return agreed(self, device)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopSignals, "agreed", signalled_after_the_first_step)
        try:
            code, stdout, err = run_main(args, capsys)
        except KeyboardInterrupt:
            pytest.fail(f"{signal.Signals(signum).name} raised KeyboardInterrupt instead of stopping at a step boundary")
    assert code == 0, err[-3000:]
    return stdout


def train_waiting_for_a_signal(after_steps: str, flag: str, out_prefix: str, *argv: str) -> None:
    """On the shared 2-rank job: tests/two_rank_server.py's train_main (train.py's main), except that after the
    AFTER_STEPS-th step this run takes, rank 1 writes its pid to FLAG and waits until a stop signal has reached it, so
    that a test's signal lands after a known step whatever the machine's speed (rank 0 waits for it in the step
    boundary's agreement). Test-only: production code has no such hook."""
    from tests.two_rank_server import train_main

    agreed, steps = checkpoint.StopSignals.agreed, []

    def agreed_after_a_signal(self, device):
        steps.append(1)
        if len(steps) == int(after_steps) and os.environ["RANK"] == "1":
            atomic.write_text(Path(flag), str(os.getpid()))
            while not self.received:
                time.sleep(0.02)
        return agreed(self, device)

    checkpoint.StopSignals.agreed = agreed_after_a_signal
    try:
        train_main(out_prefix, *argv)
    finally:
        checkpoint.StopSignals.agreed = agreed


def train_signalled(two_ranks, args: list[str], out: Path, signum: int, after_steps: int):
    """train.py ARGS on the shared 2-rank job, `signum` sent by this process to rank 1 alone after the run's
    `after_steps`-th step (while rank 1 waits for it): as TwoRanks.train returns it."""
    flag = out / "rank_1_waits"

    def signal_rank_1(job) -> None:
        # rank 1 of this job waits (a flag left by an earlier try names another process); a run that ended first, or
        # a job that died, is reported by TwoRanks as it would be without the signal (the run's own error, a retry)
        deadline = time.monotonic() + 180
        while not (flag.exists() and flag.read_text() == str(job.rank_pids().get(1))):
            if job.request_ended():
                return
            assert time.monotonic() < deadline, "rank 1 never waited for the signal"
            time.sleep(0.05)
        os.kill(int(flag.read_text()), signum)

    out.mkdir(parents=True, exist_ok=True)
    return two_ranks.train(args, out, worker=(__name__, "train_waiting_for_a_signal"), leading=(after_steps, flag),
                           while_running=signal_rank_1)


def test_killed_and_signalled_run_resumes_to_the_reference_exactly(setup, reference, capsys, monkeypatch, two_ranks):
    import shutil

    root, data, model_dir = setup
    out = root / "interrupted"
    model_dir = Path(shutil.copytree(model_dir, root / "interrupted_model"))  # its weights go away after run 1
    args = train_args(data, model_dir, out)
    saves = out / "checkpoints"

    # 1. Killed in the middle of saving step 4: shards written, COMPLETE not yet.
    job = Job(args, root / "run1.log", nproc=2, env={"HANG_IN_SAVE_STEP": "4"},
              script="tests/train_hanging_in_save.py")
    try:
        job.wait_until(lambda: {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in saves.glob(".step_4.tmp/*")})
    finally:
        job.kill()
    assert sorted(p.name for p in saves.iterdir()) == [".step_4.tmp", "step_2"]
    assert checkpoint.latest_checkpoint(saves) == saves / "step_2"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    # Every resume below builds the model from its checkpoint alone: the model folder keeps no weights.
    without_weights(model_dir)

    # 2. The same command, one process (in this one): resumes from step_2 (saved by 2 ranks); SIGTERM, delivered
    #    after its first step, stops it after step 3 with a checkpoint.
    log = stopped_in_process(args, signal.SIGTERM, capsys, monkeypatch)
    assert f"weights: the checkpoint's; none is read from {model_dir}" in log
    assert f"removed {saves / '.step_4.tmp'}, a checkpoint whose save was interrupted" in log
    assert f"resumed from {saves / 'step_2'}: step 2, 8 samples seen; saved with world size 2" in log
    assert "metrics.jsonl: removed 2 lines logged after the checkpoint" in log
    assert "stopped by SIGTERM after step 3" in log
    assert metrics(out)[-1]["step"] == 3 and checkpoint.latest_checkpoint(saves) == saves / "step_3"

    # 3. Two processes again (the session's shared 2-rank job); only rank 1 gets SIGUSR1 (after step 4, while it
    #    waits for it), yet both ranks stop after step 4 and exit 0.
    run = train_signalled(two_ranks, args, root / "run3", signal.SIGUSR1, after_steps=1)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout
    assert f"weights: the checkpoint's; none is read from {model_dir}" in log  # into 2 ranks' shards
    assert f"resumed from {saves / 'step_3'}: step 3" in log
    assert "stopped by SIGUSR1 after step 4" in log
    assert metrics(out)[-1]["step"] == 4 and checkpoint.latest_checkpoint(saves) == saves / "step_4"

    # 4. The same command to the end (one process, this one).
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err[-3000:]
    assert f"resumed from {saves / 'step_4'}: step 4" in stdout

    expected, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # none lost, none repeated
    assert [r["sample_lines"] for r in got] == [r["sample_lines"] for r in expected]
    assert [r["samples_seen"] for r in got] == [r["samples_seen"] for r in expected]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    # Across world sizes the reductions add in another order: equal to float32 rounding, not bit for bit.
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    final, reference_final = weights(out / "hf_format" / "samples_24"), weights(reference / "hf_format" / "samples_24")
    assert final.keys() == reference_final.keys()
    for name, tensor in reference_final.items():
        assert (final[name] - tensor).abs().max().item() < 1e-6, name
    trained = weights(reference / "hf_format" / "samples_8")["model.norm.weight"]
    assert (reference_final["model.norm.weight"] - trained).abs().max().item() > 1e-4  # the comparison means something


# ---------------------------------------------------------------------------------------------------------------
# Refusals and stops, in process (one rank)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    import train

    capsys.readouterr()
    code = train.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_changed_flags_are_refused_before_any_weights_load(setup, reference, capsys, tmp_path):
    root, data, model_dir = setup
    args = train_args(data, model_dir, tmp_path / "out")
    newest = str(reference / "checkpoints" / "step_6")
    changed = [*args, "--resume-from", newest, "--batch-size", "8", "--seed", "7"]
    code, out, err = run_main(changed, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot resume from {newest}: --batch-size 4 -> 8; --seed 42 -> 7: the resumed run would differ" in err
    assert "--allow-config-change to resume anyway, or --fresh to start over" in err
    assert "resumed" not in out

    other_data = write_data(tmp_path / "other.jsonl", NUM_SAMPLES + 1, vocab=700)
    code, _, err = run_main([*train_args(other_data, model_dir, tmp_path / "out"), "--resume-from", newest], capsys)
    assert code == 2 and f"the data ({data}: 24 samples" in err and f"({other_data}: 25 samples" in err, err

    code, _, err = run_main([*changed, "--learning-rate", "1e-2", "--allow-config-change"], capsys)
    assert code == 2 and "--learning-rate 0.001 -> 0.01 cannot change on resume" in err, err
    assert "--batch-size" not in err  # allowed now

    # Allowed: one more step with a larger batch, from the reference's final state.
    allowed = [*changed, "--allow-config-change", "--max-steps", "7", "--lr-scheduler", "constant"]
    code, out, err = run_main(allowed, capsys)
    assert code == 0, err
    assert f"resumed from {newest}: step 6, 24 samples seen; saved with world size 2" in out
    assert [r["step"] for r in metrics(tmp_path / "out")] == [7]

    # The finished run launched again (its own command, from its last checkpoint): nothing to train, said so
    code, out, err = run_main([*train_args(data, model_dir, tmp_path / "again"), "--resume-from", newest], capsys)
    assert code == 0, err
    assert ("nothing to train: the run is at step 6 and its stop condition (--max-steps, --max-epochs or "
            "--max-samples) is step 6; raise it to train on") in out
    assert not (tmp_path / "again" / "metrics.jsonl").exists() or not metrics(tmp_path / "again")


def test_resume_flags_are_checked_with_the_other_flags(setup, capsys, tmp_path):
    root, data, model_dir = setup
    args = [*train_args(data, model_dir, tmp_path / "out"), "--resume-from", str(tmp_path), "--fresh"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--fresh starts over and --resume-from continues a run; pass one of them" in err
    assert f"--resume-from {tmp_path}: not a complete checkpoint" in err


def test_another_runs_checkpoint_resumes_into_a_new_folder_not_over_a_run(setup, reference, capsys, tmp_path):
    """--resume-from a checkpoint of another output folder into one that holds a run of its own deleted that run's
    later checkpoints and kept its earlier ones and log lines: one folder, two runs. Refused; a new folder branches."""
    root, data, model_dir = setup
    theirs = reference / "checkpoints" / "step_4"
    mine = tmp_path / "mine"
    assert run_main(train_args(data, model_dir, mine) + ["--max-steps", "2"], capsys)[0] == 0
    files = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    code, _, err = run_main([*train_args(data, model_dir, mine), "--resume-from", str(theirs)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--resume-from {theirs} is another run's checkpoint and --output-dir {mine} holds a run of its own; " \
           "branch into a new --output-dir" in err
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == files
    code, out, err = run_main([*train_args(data, model_dir, tmp_path / "branch"), "--resume-from", str(theirs)],
                              capsys)
    assert code == 0 and f"resumed from {theirs}: step 4" in out, err


def test_sigint_stops_after_the_step_with_a_checkpoint_and_the_same_command_resumes(setup, capsys, tmp_path,
                                                                                     monkeypatch):
    """Ctrl-C (SIGINT, delivered here to this process after step 1) stops at the step boundary with a full-state
    checkpoint and exit 0, not with a KeyboardInterrupt; running the command again resumes after it."""
    root, data, model_dir = setup
    out = tmp_path / "out"
    args = [*train_args(data, model_dir, out), "--max-steps", "2"]
    handler = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN when started in the background
    stdout = stopped_in_process(args, signal.SIGINT, capsys, monkeypatch)
    assert "stopped by SIGINT after step 1; run the same command again to resume" in stdout
    assert checkpoint.latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_1"
    assert [r["step"] for r in metrics(out)] == [1]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / 'step_1'}: step 1" in stdout
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_fresh_discards_old_state_and_a_non_finite_loss_keeps_the_last_good_checkpoint(setup, capsys, tmp_path):
    root, data, model_dir = setup
    out = tmp_path / "out"
    args = [*train_args(data, model_dir, out), "--checkpoint-every-steps", "1", "--keep-last-n-checkpoints", "5"]
    assert run_main([*args, "--max-steps", "4", "--keep-last-n-exports", "1"], capsys)[0] == 0
    assert [p.name for p in (out / "hf_format").iterdir()] == ["samples_16"]  # samples_8 pruned
    # The first step's update blows the weights up; the second step's loss is not finite.
    blowup = [*args, "--learning-rate", "1e30", "--max-grad-norm", "0", "--lr-scheduler", "constant", "--fresh"]
    code, out_text, err = run_main(blowup, capsys)
    assert code == 2 and "error: step 2: loss" in err and "stopped before the optimizer step" in err, err
    assert "--fresh: removed 4 full-state checkpoints of the earlier run" in out_text
    saves = out / "checkpoints"
    assert [p.name for p in saves.iterdir()] == ["step_1"] and checkpoint.is_complete(saves / "step_1")
    assert json.loads((saves / "step_1" / "trainer_state.json").read_text())["step"] == 1


def test_resuming_an_older_checkpoint_abandons_the_later_ones_and_a_fresh_start_sets_old_exports_aside(
    setup, capsys, tmp_path
):
    root, data, model_dir = setup
    out = tmp_path / "out"
    saves, exports = out / "checkpoints", out / "hf_format"
    args = [*train_args(data, model_dir, out), "--lr-scheduler", "constant", "--checkpoint-every-steps", "1",
            "--keep-last-n-checkpoints", "10"]
    assert run_main(args, capsys)[0] == 0  # 6 steps, a checkpoint at each, exports at 8, 16 and 24 samples
    first = metrics(out)

    # Back to step 2 with nothing to train there (--max-steps 2): said in a line before the folder is tidied, so
    # nothing in it changes (the later checkpoints and exports stayed removed and moved aside when this came last).
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, text, err = run_main([*args, "--resume-from", str(saves / "step_2"), "--max-steps", "2"], capsys)
    assert code == 0, err
    assert (f"nothing to train: the run is at step 2 and its stop condition (--max-steps, --max-epochs or "
            f"--max-samples) is step 2; raise it to train on (nothing in {out} was changed)") in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    # Back to step 2 (8 samples), pruning both kinds: the later steps are another trajectory now.
    rewind = [*args, "--resume-from", str(saves / "step_2"), "--max-steps", "4", "--keep-last-n-checkpoints", "2",
              "--keep-last-n-exports", "1"]
    code, text, err = run_main(rewind, capsys)
    assert code == 0, err
    for step in (3, 4, 5, 6):
        assert f"removed {saves / f'step_{step}'}: this run resumes from {saves / 'step_2'}" in text
    aside = out / "hf_format.earlier_run_1"
    assert f"moved 2 exports of an earlier run (samples_16, samples_24) to {aside}" in text
    assert sorted(p.name for p in saves.iterdir()) == ["step_3", "step_4"]  # this run's own, not steps 5 and 6
    assert sorted(p.name for p in exports.iterdir()) == ["samples_16"]  # written by this run, samples_8 pruned
    assert sorted(p.name for p in aside.iterdir()) == ["samples_16", "samples_24"]

    # A plain restart continues this run; together the runs are the first run's trajectory, step for step.
    code, text, err = run_main(args, capsys)
    assert code == 0 and f"resumed from {saves / 'step_4'}: step 4, 16 samples seen" in text, err
    got = metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["sample_lines"] for r in got] == [r["sample_lines"] for r in first]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in first], rel=1e-6)
    final, earlier = weights(exports / "samples_24"), weights(aside / "samples_24")
    assert all((final[name] - tensor).abs().max().item() < 1e-6 for name, tensor in earlier.items())

    # --fresh: one step, keeping one export; the earlier run's exports must not outrank the new samples_4.
    code, text, err = run_main([*args, "--fresh", "--max-steps", "1", "--keep-last-n-exports", "1"], capsys)
    assert code == 0, err
    assert f"moved 2 exports of an earlier run (samples_16, samples_24) to {out / 'hf_format.earlier_run_2'}" in text
    assert [p.name for p in exports.iterdir()] == ["samples_4"]
    assert [p.name for p in saves.iterdir()] == ["step_1"]


def test_a_checkpoint_without_its_state_files_is_refused_in_one_line(setup, reference, capsys, tmp_path):
    root, data, model_dir = setup
    broken = tmp_path / "step_6"
    broken.mkdir()
    for name in ("training_config.json", checkpoint.COMPLETE):
        (broken / name).write_bytes((reference / "checkpoints" / "step_6" / name).read_bytes())
    args = [*train_args(data, model_dir, tmp_path / "out"), "--resume-from", str(broken)]
    code, _, err = run_main(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot resume from {broken}: " in err and "trainer_state.json" in err and "--fresh" in err

    state = json.loads((reference / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    del state["data"]  # as written before the data fingerprint existed
    (broken / "trainer_state.json").write_text(json.dumps(state))
    code, _, err = run_main(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "written by another version of minitrain (no trainer_state.json 'data'); start over with --fresh" in err


def test_data_with_the_same_lengths_but_other_tokens_is_refused_on_resume(setup, reference, capsys, tmp_path):
    root, data, model_dir = setup
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["input_ids"][0] += 1  # a prompt token (never trained): lengths and trained counts stay the same
    retokenized = tmp_path / "retokenized.jsonl"
    retokenized.write_text("".join(json.dumps(row) + "\n" for row in rows))
    newest = str(reference / "checkpoints" / "step_6")
    code, _, err = run_main([*train_args(retokenized, model_dir, tmp_path / "out"), "--resume-from", newest], capsys)
    assert code == 2 and f"the data ({data}: 24 samples" in err and f"({retokenized}: 24 samples" in err, err


# ---------------------------------------------------------------------------------------------------------------
# Pure parts of checkpoint.py and the tidying of an output folder


def test_every_config_field_says_how_it_behaves_on_resume():
    from train import TrainConfig

    groups = (checkpoint.FIXED_ON_RESUME, checkpoint.SHAPE_THE_PARAMETERS, checkpoint.CHANGE_THE_RUN,
              checkpoint.STOP_CONDITIONS, checkpoint.FREE_ON_RESUME)
    classified = [name for group in groups for name in group]
    assert len(classified) == len(set(classified))  # each field in one group
    assert sorted(classified) == sorted(f.name for f in fields(TrainConfig))


def test_what_trains_cannot_change_on_resume_even_when_changes_are_allowed():
    """--allow-config-change resumed into a crash (a missing or mis-shaped key) where the set of trained parameters
    changed: LoRA on or off, its rank, targets or saved modules, a reward model's score head."""
    from train import TrainConfig

    base = vars(TrainConfig("d", "m", "o", batch_size=4, max_tokens_per_gpu=64, lora=True))
    for change in ({"lora": False}, {"lora_r": 8}, {"lora_target_modules": ["q_proj"]},
                   {"lora_modules_to_save": ["lm_head"]}, {"objective": "reward"}):
        problems = checkpoint.config_problems(base, {**base, **change}, "x", "x", allow_change=True)
        assert len(problems) == 1 and "cannot change on resume (the checkpoint holds another set of trained " \
                                      "parameters, even with --allow-config-change)" in problems[0], (change, problems)
    for change in ({"lora_alpha": 8.0}, {"objective": "dpo"}):  # the same parameters: allowed when asked for
        assert checkpoint.config_problems(base, {**base, **change}, "x", "x", allow_change=True) == []


def test_stop_conditions_may_grow_only_under_a_constant_schedule():
    from train import TrainConfig

    base = vars(TrainConfig("d", "m", "o", batch_size=4, max_tokens_per_gpu=64, max_steps=10))
    longer = {**base, "max_steps": 20}
    assert checkpoint.config_problems(base, longer, "x", "x", allow_change=False) == []
    cosine, cosine_longer = {**base, "lr_scheduler": "cosine"}, {**longer, "lr_scheduler": "cosine"}
    [problem] = checkpoint.config_problems(cosine, cosine_longer, "x", "x", allow_change=False)
    assert problem.startswith("--max-steps 10 -> 20: the resumed run would differ")
    assert checkpoint.config_problems(cosine, cosine_longer, "x", "x", allow_change=True) == []


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    for step in (2, 10, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / checkpoint.COMPLETE).write_text("{}")
    (tmp_path / "step_12").mkdir()  # no COMPLETE: not a checkpoint
    (tmp_path / ".step_14.tmp").mkdir()  # a killed save
    (tmp_path / "notes").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_10"  # by number, not by name
    assert checkpoint.remove_unfinished(tmp_path) == [tmp_path / ".step_14.tmp"]
    assert checkpoint.prune(tmp_path, keep=2) == [tmp_path / "step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_10", "step_12", "step_4"]
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None


def test_trim_metrics_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert checkpoint.trim_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_pruning_exports_never_deletes_the_one_just_written(tmp_path):
    for samples in (8, 16, 24, 40):
        (tmp_path / f"samples_{samples}").mkdir()
    (tmp_path / "notes").mkdir()
    # samples_40 is not this run's (it is later than what was just written): left alone, never preferred.
    assert checkpoint.prune_exports(tmp_path, keep=1, written=tmp_path / "samples_16") == [tmp_path / "samples_8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "samples_16", "samples_24", "samples_40"]


def test_a_first_start_sets_aside_exports_already_in_the_folder(tmp_path, capsys):
    out = tmp_path / "out"
    for name in ("samples_8", "samples_16", "notes"):
        (out / "hf_format" / name).mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    checkpoint.tidy_output_dir(str(out), False, None, 0)  # no checkpoint to resume: a new run
    aside = out / "hf_format.earlier_run_1"
    assert f"moved 2 exports of an earlier run (samples_8, samples_16) to {aside}: this run starts over" in (
        capsys.readouterr().out
    )
    assert sorted(p.name for p in aside.iterdir()) == ["samples_16", "samples_8"]
    assert [p.name for p in (out / "hf_format").iterdir()] == ["notes"]  # not an export: not ours to move
    assert not (out / "metrics.jsonl").exists()


def test_resuming_removes_only_the_later_checkpoints(tmp_path):
    for step in (1, 2, 3, 5):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / checkpoint.COMPLETE).write_text("{}")
    assert checkpoint.remove_later(tmp_path, 2) == [tmp_path / "step_3", tmp_path / "step_5"]
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_2"


def test_saving_a_step_that_exists_replaces_it_whole(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"samples_seen": 4, "last_export_samples": 4, "data": "x", "scheduler": scheduler.state_dict()}
    with torch.no_grad():
        model.weight.fill_(1.0)
    checkpoint.save(tmp_path, 3, model, optimizer, state, {"run": "earlier"})
    with torch.no_grad():
        model.weight.fill_(2.0)
    path = checkpoint.save(tmp_path, 3, model, optimizer, state, {"run": "this"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]  # nothing left aside
    assert checkpoint.read_json(path / "training_config.json") == {"run": "this"}
    with torch.no_grad():
        model.weight.fill_(0.0)
    checkpoint.load(path, model, optimizer, scheduler)
    assert model.weight.eq(2.0).all()
    # Killed between moving the old folder aside and deleting it: the next start removes the leftover.
    (tmp_path / ".step_3.replaced.tmp").mkdir()
    assert checkpoint.remove_unfinished(tmp_path) == [tmp_path / ".step_3.replaced.tmp"]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tiny_training_state():
    import torch

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"samples_seen": 4, "last_export_samples": 4, "data": "x", "scheduler": scheduler.state_dict()}
    return model, optimizer, scheduler, state


def draws():
    """One draw of each random stream a run uses."""
    import random

    import numpy as np
    import torch

    return torch.rand(3), np.random.standard_normal(3), random.random()


def assert_resumed_streams(path, model, optimizer, scheduler, expected):
    import random

    import numpy as np
    import torch

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint.load(path, model, optimizer, scheduler)
    restored = draws()
    assert torch.equal(expected[0], restored[0]) and np.array_equal(expected[1], restored[1])
    assert expected[2] == restored[2]


def test_rng_states_round_trip_as_plain_tensors_and_a_tampered_file_is_refused_unrun(tmp_path):
    import random

    import numpy as np
    import torch

    model, optimizer, scheduler, state = tiny_training_state()
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    path = checkpoint.save(tmp_path, 1, model, optimizer, state, {"run": "this"})
    assert_resumed_streams(path, model, optimizer, scheduler, draws())

    marker = tmp_path / "code_ran"
    torch.save({"torch": _RunsCodeWhenUnpickled(marker)}, path / "rng_rank0.pt")
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt: not a random-number-generator state file"):
        checkpoint.load(path, model, optimizer, scheduler)
    assert not marker.exists()


def test_rng_states_of_an_earlier_version_still_resume(tmp_path):
    """Checkpoints written before RNG states were saved as tensors pickled numpy's state tuple: still loaded, with
    weights_only=True and numpy's array types allowed, nothing else."""
    import random

    import numpy as np
    import torch

    model, optimizer, scheduler, state = tiny_training_state()
    path = checkpoint.save(tmp_path, 1, model, optimizer, state, {"run": "this"})
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               path / "rng_rank0.pt")  # as the earlier version wrote it
    assert_resumed_streams(path, model, optimizer, scheduler, draws())


def test_running_a_finished_run_again_rewrites_nothing(setup, tmp_path, capsys):
    root, data, model_dir = setup
    args = [*train_args(data, model_dir, tmp_path / "out"), "--max-steps", "2", "--checkpoint-every-steps", "1"]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    saves = tmp_path / "out" / "checkpoints"
    before = {p.name: (p / checkpoint.COMPLETE).stat().st_mtime_ns for p in saves.iterdir()}
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert "nothing to train: the run is at step 2" in out and "saved" not in out  # so nothing to save
    assert "parameters train" not in out  # stopped before the model was built, its weights read
    assert {p.name: (p / checkpoint.COMPLETE).stat().st_mtime_ns for p in saves.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------
# A resume reads no weight of the model folder: a full fine-tuning checkpoint holds them all


def without_weights(model_dir: Path) -> Path:
    """Move the folder's *.safetensors away (beside it); its config, generation config and tokenizer stay."""
    away = model_dir.with_name(model_dir.name + ".weights")
    away.mkdir()
    for path in model_dir.glob("*.safetensors*"):
        path.rename(away / path.name)
    assert not list(model_dir.glob("*.safetensors*")) and (model_dir / "config.json").is_file()
    return away


def no_weights_case(case: str, root: Path, data: Path, model_dir: Path, tokenizer_dir) -> tuple[Path, Path, list]:
    """(model folder, data, extra flags) of a case: SFT on the tied Llama; a reward model from the same causal LM
    folder (its `score` head is not in the folder: from_pretrained initialises it); BART (final_logits_bias, a
    persistent buffer) on seq2seq rows."""
    import shutil

    from tests.test_preference import write_pairs
    from tests.test_seq2seq import write_rows
    from tests.tiny_models import build_tiny_seq2seq

    if case == "bart":
        model = build_tiny_seq2seq("bart", root, tokenizer_dir("chatml"))
        return model, write_rows(root / "rows.jsonl", NUM_SAMPLES, vocab=700), []
    model = Path(shutil.copytree(model_dir, root / "model"))
    if case == "reward":
        return model, write_pairs(root / "pairs.jsonl", NUM_SAMPLES), ["--objective", "reward"]
    return model, data, []


@pytest.mark.parametrize("case", ["sft", "reward", "bart"])
def test_a_resume_reads_no_weight_of_the_model_folder_and_continues_bit_for_bit(setup, capsys, tmp_path,
                                                                               tokenizer_dir, case):
    """A full fine-tuning checkpoint holds every weight, so a resume builds the model from it alone: the model
    folder's safetensors may be gone. The buffers it does not hold (rotary inv_freq) are computed from the config as
    from_pretrained computes them, tied weights stay tied: the resumed step's loss and gradient norm equal the
    uninterrupted run's bit for bit (the checkpoint's weights through the model's forward), and so does the export
    after it, file for file (its update used the restored optimizer state; the tokenizer and config files still come
    from the model folder)."""
    _, data, model_dir = setup
    model, data, extra = no_weights_case(case, tmp_path, data, model_dir, tokenizer_dir)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    steps = ["--max-steps", "2", "--checkpoint-every-steps", "1", "--no-activation-checkpointing", *extra]
    code, _, err = run_main([*train_args(data, model, whole), *steps], capsys)
    assert code == 0, err[-3000:]
    without_weights(model)
    args = [*train_args(data, model, resumed), *steps, "--resume-from", str(whole / "checkpoints" / "step_1")]
    code, out, err = run_main(args, capsys)
    assert code == 0, err[-3000:]
    assert f"weights: the checkpoint's; none is read from {model}" in out
    expected, got = metrics(whole)[1:], metrics(resumed)
    assert [r["step"] for r in got] == [2]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in expected]
    exported, reference_export = resumed / "hf_format" / "samples_8", whole / "hf_format" / "samples_8"
    names = sorted(p.name for p in reference_export.iterdir())
    assert sorted(p.name for p in exported.iterdir()) == names and "tokenizer.json" in names
    for name in names:
        if name != "training_config.json":  # the run's flags: another --output-dir and --resume-from
            assert (exported / name).read_bytes() == (reference_export / name).read_bytes(), name


def test_a_model_whose_weights_do_not_all_train_reads_them_from_its_folder_on_resume(tmp_path, tokenizer_dir,
                                                                                   capsys):
    """Marian's sinusoidal position tables never train, so no checkpoint holds them: the resume's model is loaded
    from the folder as on a first start (the checkpoint then replaces what trains), and says why."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from minitrain.training.adapter import FullFineTuning
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from tests.test_seq2seq import config_for
    from tests.tiny_models import seq2seq_zoo

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    folder = tmp_path / "marian"
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(seq2seq_zoo(len(tokenizer))["marian"]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    filled = []  # what the checkpoint would have filled
    config = config_for(folder, tmp_path / "unused.jsonl", tmp_path / "out")
    model = build_model(config, World(0, 0, 1, 1, torch.device("cpu")), FullFineTuning(), filled.append)
    assert not filled and not model.weights_from_checkpoint
    assert f"note: model.encoder.embed_positions.weight, model.decoder.embed_positions.weight never train, so no " \
           f"checkpoint holds them: they are read from {folder}" in capsys.readouterr().out
    own = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for name, tensor in model.lm.state_dict().items():
        assert torch.equal(tensor, own[name]), name
