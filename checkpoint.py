"""Full-state checkpoints: everything a run needs to continue exactly where it stopped, on any number of ranks.

    <output-dir>/checkpoints/step_<N>/      N = optimizer steps completed
        .metadata, __<rank>_0.distcp         model and optimizer state, sharded (torch.distributed.checkpoint)
        rng_rank<R>.pt                       each rank's random number generator states
        trainer_state.json                   step, samples seen, LR scheduler state, world size, data fingerprint
        training_config.json                 the run's flags
        COMPLETE                             written last

The contract:
- A save is atomic. Every rank writes its shards into `.step_<N>.tmp/`; rank 0 then writes the small files,
  `COMPLETE` last, and renames the folder to `step_<N>`. Killed at any moment, a save leaves either no `step_<N>`
  or a complete one; the half-written `.tmp` folder is removed at the next start.
- Resuming replays nothing: the sampler's plan is a pure function of the step, so restoring the step restores the
  data order. The model and optimizer shards are resharded by torch.distributed.checkpoint on load, so a run saved
  on 2 ranks resumes on 1 (or 8). RNG states are restored only on the same world size (they are per rank).
- One trajectory per output folder: resuming from step k deletes the checkpoints after k (train.py also moves the
  exports after k aside), so neither pruning nor the next restart mistakes another trajectory's state for this one's.
- Test-only hook: MINITRAIN_TEST_HANG_IN_SAVE=<N> makes every rank stop forever inside the save of step N, after
  the shards are written and before `COMPLETE`, so a test can kill the job in the middle of a save.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d+)")
HANG_IN_SAVE = "MINITRAIN_TEST_HANG_IN_SAVE"

# How each TrainConfig field relates to a resumed run (tests check that every field is classified).
# Held by the optimizer state itself (param groups), so a resumed run cannot take a new value.
FIXED_ON_RESUME = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
# Change what the resumed run computes: refused unless --allow-config-change. The data file is compared by
# content (its fingerprint), not by path, so a moved file resumes.
CHANGE_THE_RUN = (
    "model_name_or_path", "batch_size", "max_tokens_per_gpu", "seed", "num_warmup_steps", "lr_scheduler",
    "max_grad_norm", "validation_split",
)
# Decide when the run ends; with a decaying schedule they also set the length of the decay.
STOP_CONDITIONS = ("max_epochs", "max_steps", "max_samples")
# Where and how often to write, how to compute (same math): free to change.
FREE_ON_RESUME = (
    "data_path", "output_dir", "min_samples_per_checkpoint", "checkpoint_every_steps", "keep_last_n_checkpoints",
    "keep_last_n_exports", "fsdp_sharding_strategy", "activation_checkpointing", "use_liger_kernels", "save_dtype",
    "distributed_backend", "resume_from", "fresh", "allow_config_change",
    # Evaluation never changes the training computation; early stopping state is restored from the checkpoint.
    "validation_data_path", "eval_every_samples", "num_eval_generations", "eval_max_new_tokens",
    "early_stopping_patience", "early_stopping_min_delta", "tracker",
)


# What trainer_state.json must hold for a run to resume from it.
TRAINER_STATE = ("step", "samples_seen", "last_export_samples", "data", "scheduler", "world_size")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or used; raised identically on every rank."""


# ----------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return checkpoint_step(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step_<N>` folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_unfinished(root: Path) -> list[Path]:
    """Delete the `.step_<N>*.tmp` folders of saves that were killed; return them (rank 0 only, before training)."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".step_") and p.name.endswith(".tmp")]
    for path in stale:
        shutil.rmtree(path)
    return stale


def remove_later(root: Path, step: int) -> list[Path]:
    """Delete the complete checkpoints after `step`: resuming from `step` abandons them (rank 0 only, before training).

    Left in place, they would be taken for this run's newest checkpoints by pruning and by the next plain restart.
    """
    later = [p for p in complete_checkpoints(root) if checkpoint_step(p) > step]
    for path in later:
        shutil.rmtree(path)
    return later


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; return what was deleted."""
    old = complete_checkpoints(root)[:-keep]
    for path in old:
        shutil.rmtree(path)
    return old


# ----------------------------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the flags of the run that resumes from it


def data_fingerprint(lengths: np.ndarray, trained: np.ndarray, content_hash: str) -> str:
    """Identifies the training data by what the run sees of it: every sample's length and trained tokens, and the
    token cache's hash of the tokens and labels themselves (so data re-tokenized to the same lengths differs)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(trained, dtype=np.int64).tobytes())
    h.update(content_hash.encode())
    return f"{len(lengths)} samples, {int(np.sum(lengths))} tokens, sha256 {h.hexdigest()[:16]}"


def read_saved_run(path: Path) -> tuple[dict, dict]:
    """(training_config.json, trainer_state.json) of a checkpoint, or a CheckpointError saying why it cannot resume."""
    try:
        config, state = read_json(path / "training_config.json"), read_json(path / "trainer_state.json")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot resume from {path}: {' '.join(str(e).split())}; pass another checkpoint or --fresh"
        ) from None
    groups = (FIXED_ON_RESUME, CHANGE_THE_RUN, STOP_CONDITIONS, ("data_path",))
    missing = [k for group in groups for k in group if k not in config]
    missing += [f"trainer_state.json {k!r}" for k in TRAINER_STATE if k not in state]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path}: written by another version of minitrain (no {', '.join(missing)}); "
            f"start over with --fresh"
        )
    return config, state


def config_problems(saved: dict, current: dict, saved_data: str, current_data: str, allow_change: bool) -> list[str]:
    """Why a run with flags `current` must not resume from a checkpoint saved with flags `saved`."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    fixed = [f"{flag(k)} {saved[k]} -> {current[k]}" for k in FIXED_ON_RESUME if saved[k] != current[k]]
    problems = []
    if fixed:
        problems.append(
            f"{', '.join(fixed)} cannot change on resume (the optimizer state holds it); "
            f"start a new run with --fresh, e.g. from an exported hf_format folder"
        )
    changed = [f"{flag(k)} {saved[k]} -> {current[k]}" for k in CHANGE_THE_RUN if saved[k] != current[k]]
    if current["lr_scheduler"] != "constant" or saved["lr_scheduler"] != "constant":
        changed += [f"{flag(k)} {saved[k]} -> {current[k]}" for k in STOP_CONDITIONS if saved[k] != current[k]]
    if saved_data != current_data:
        changed.append(f"the data ({saved['data_path']}: {saved_data}) -> ({current['data_path']}: {current_data})")
    if changed and not allow_change:
        problems.append(
            f"{'; '.join(changed)}: the resumed run would differ from the one checkpointed; pass the original "
            f"flags, --allow-config-change to resume anyway, or --fresh to start over"
        )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Save and load (collectives: every rank calls them)


def save(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config: dict,
) -> Path:
    """Write `root/step_<step>` atomically; `trainer_state` is JSON (the scheduler's state_dict included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    raise_together(error, f"cannot create {tmp}")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with single_process_is_intended():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
        error = None
    except (OSError, CheckpointException) as e:
        error = e
    raise_together(error, f"cannot write checkpoint {tmp}")
    if os.environ.get(HANG_IN_SAVE) == str(step):
        while True:  # test-only: wait to be killed in the middle of a save
            time.sleep(1)
    if rank == 0:
        try:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": world_size})
            write_json(tmp / "training_config.json", config)
            write_json(tmp / COMPLETE, {"step": step})  # last: the folder is complete from here on
            # The same step saved before (e.g. by a run resumed from another output folder): move it aside whole
            # before deleting it, so a kill never leaves a `step_<N>` with COMPLETE and some shards gone. The
            # `.tmp` name gets it removed at the next start if the kill comes first.
            replaced = root / f".step_{step}.replaced.tmp"
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
            tmp.rename(final)
            fsync_dir(root)
            shutil.rmtree(replaced, ignore_errors=True)
        except OSError as e:
            error = e
    raise_together(error, f"cannot complete checkpoint {final}")  # nobody goes on before the rename
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model, optimizer, LR scheduler and (same world size only) RNG states; return the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # get_state_dict gives tensors laid out for THIS world size; dcp.load fills them from however it was saved.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with single_process_is_intended():
            dcp.load(state, checkpoint_id=path)
    except (OSError, RuntimeError, ValueError) as e:  # e.g. another model's shapes
        reason = " ".join(str(e).split())[:500]
        raise CheckpointError(f"cannot load {path} into this model and optimizer: {reason}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    if trainer_state["world_size"] == world_size:
        set_rng_states(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return trainer_state


@contextmanager
def single_process_is_intended():
    """DCP warns on every save and load without a process group; one process (world size 1) is a normal run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, obj) -> None:
    """Write, flush to disk, then rename: a reader never sees half a file, even after a power cut."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def raise_together(error: BaseException | None, what: str) -> None:
    """Collective: if any rank failed, every rank raises CheckpointError, so none waits in the next collective."""
    if not dist.is_initialized():
        if error is not None:
            raise CheckpointError(f"{what}: {error}") from None
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{what}: {error}")
    failed = [m for m in messages if m is not None]
    if failed:
        raise CheckpointError(failed[0])


# ----------------------------------------------------------------------------------------------------------------
# Signals: stop at the next step boundary with a checkpoint instead of dying in the middle of a step


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 only set a flag; `agreed()` at a step boundary tells every rank the same answer.

    A signal may reach one rank (SIGUSR1 sent to a single worker) or all of them at slightly different times; the
    all-reduce makes every rank stop after the same step, so none is left waiting in a collective.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received = 0
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        """Collective: the signal number any rank received (0 = none), the same on every rank."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# ----------------------------------------------------------------------------------------------------------------
# The metrics log of a resumed run


def trim_metrics(path: Path, step: int) -> int:
    """Keep only the records of steps 1..`step`: a killed run may have logged later steps, the last one torn."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    tmp.replace(path)
    return len(lines) - len(kept)
