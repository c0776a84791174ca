"""The output folder's contract: full-state checkpoints, Hugging Face exports, the resume point, and tidying.

    <output-dir>/
        training_config.json                the run's flags, resolved
        metrics.jsonl, generations.jsonl    one record per step / per generated validation reply
        token_cache/                        the data's memory-mapped token cache (data.py)
        checkpoints/step_<N>/               full state after N optimizer steps, for an exact resume:
            .metadata, __<rank>_0.distcp        trained weights, optimizer state (torch.distributed.checkpoint, sharded)
            rng_rank<R>.pt                      each rank's random number generator states, as plain tensors
            trainer_state.json                  step, samples seen, LR scheduler state, world size, data fingerprint
            training_config.json                the run's flags
            COMPLETE                            written last
        hf_format/samples_<N>/              Hugging Face exports after N samples (from_pretrained loads them)
            adapter/                            with --lora: PEFT's adapter folder (lora.py; --lora-export)
        hf_format.earlier_run_<K>/          exports of an earlier trajectory, set aside (never deleted)

The contract:
- Every write is atomic (atomic.py). A checkpoint save: every rank writes its shards into `.step_<N>.tmp/`; rank 0
  then writes the small files, `COMPLETE` last, and renames the folder to `step_<N>`. Killed at any moment, a save
  leaves either no `step_<N>` or a complete one; the half-written `.tmp` folder is removed at the next start.
- Resuming replays nothing: the sampler's plan is a pure function of the step, so restoring the step restores the
  data order. The model and optimizer shards are resharded by torch.distributed.checkpoint on load, so a run saved
  on 2 ranks resumes on 1 (or 8). RNG states are restored only on the same world size (they are per rank).
  Loading never unpickles arbitrary objects: RNG states are tensors and numbers (torch.load(weights_only=True)).
- A checkpoint holds what trains. A full fine-tuning one holds every weight (holds_every_weight), so a resume builds
  the model from it alone, reading no weight of the model folder (build_model's checkpoint_weights: load_weights,
  then load(..., weights=False)); LoRA's and QLoRA's hold the adapters, and their frozen base is read from the folder.
- One trajectory per output folder: resuming from step k deletes the checkpoints after k and moves the exports
  after k's samples aside, so neither pruning nor the next restart mistakes another trajectory's state for this
  one's. A first start (or --fresh) sets every earlier export aside.
- `Checkpointer` owns the cadence: the loop calls it after every step and it decides whether this step exports
  (every --min-samples-per-checkpoint samples), writes full state (every --checkpoint-every-minutes by rank 0's
  clock, default 30, so a run launched with export flags alone still resumes exactly after a kill -9 and loses at
  most that much work; every --checkpoint-every-steps steps; on a stop signal) or both; the end of the run always
  has both. An export does not force a full-state save. The newest --keep-last-n-checkpoints (default 2) full-state
  checkpoints are kept; exports are never deleted unless --keep-last-n-exports asks.
- Full-state saves are asynchronous on CUDA by default (--async-save): the state is staged to host memory, the
  write runs in the background on a process group of its own while training goes on, and the save is completed
  (COMPLETE, the rename, pruning) once every rank's write has finished. A kill during it leaves the `.tmp` folder,
  removed at the next start, and the previous checkpoint whole.
"""
import hashlib
import json
import pickle
import random
import re
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitrain import atomic
from minitrain.training import lora
from minitrain.training.distributed import World, checkpoint_group, print0, raise_if_any_rank_failed, reshard
from minitrain.training.lora import LORA_DEFAULTS
from minitrain.training.validation import describe

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d+)")
EXPORT_DIR = re.compile(r"samples_(\d+)")

# How each TrainConfig field relates to a resumed run (tests check that every field is classified).
# Held by the optimizer state itself (param groups), so a resumed run cannot take a new value.
FIXED_ON_RESUME = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
# Change what the resumed run computes: refused unless --allow-config-change. The data file is compared by
# content (its fingerprint), not by path, so a moved file resumes.
CHANGE_THE_RUN = (
    "model_name_or_path", "batch_size", "max_tokens_per_gpu", "seed", "num_warmup_steps", "lr_scheduler",
    "max_grad_norm", "validation_split", "loss_reduction", "objective", "dpo_beta", "simpo_beta", "simpo_gamma",
    "preference_sft_weight", "dpo_loss_type", "dpo_label_smoothing", "orpo_lambda",
    "reward_center_coefficient", "teacher_model", "distill_top_k", "distill_alpha", "distill_temperature",
    "kto_beta", "kto_desirable_weight", "kto_undesirable_weight",
    # Which evaluation early stopping and the best export follow: the saved best is of the saved metric.
    "early_stopping_metric",
    "lora_alpha", "lora_dropout", "lora_init", "qlora",
)
# Which parameters train (and so what the checkpoint's model and optimizer state hold): refused even with
# --allow-config-change, as is a change of objective to or from a reward model (a classifier's score head).
SHAPE_THE_PARAMETERS = ("lora", "lora_r", "lora_target_modules", "lora_modules_to_save")
# Decide when the run ends; with a decaying schedule they also set the length of the decay.
STOP_CONDITIONS = ("max_epochs", "max_steps", "max_samples")
# Where and how often to write, how to compute (same math): free to change.
FREE_ON_RESUME = (
    "data_path", "output_dir", "cache_dir", "min_samples_per_checkpoint", "checkpoint_every_steps",
    "checkpoint_every_minutes", "async_save", "keep_last_n_checkpoints",
    "keep_last_n_exports", "fsdp_sharding_strategy", "activation_checkpointing", "use_liger_kernels", "save_dtype",
    "attn_implementation", "compile", "lora_export", "fsdp_shard_group_size", "sequence_parallel_size", "activation_offload",
    "estimate_memory", "world_size", "gpu_memory_gib", "estimate_device",  # --estimate-memory's own (it never trains)
    "distributed_backend", "distributed_timeout_minutes", "resume_from", "fresh", "allow_config_change",
    # Evaluation never changes the training computation; early stopping state is restored from the checkpoint.
    "validation_data_path", "eval_every_samples", "num_eval_generations", "eval_max_new_tokens", "eval_metric",
    "eval_num_beams", "early_stopping_patience", "early_stopping_min_delta", "tracker",
)


# Flags added after checkpoints already existed, with the value that reproduces how those checkpoints were trained:
# a checkpoint without the key resumes as if it had been saved with that value.
ADDED_LATER = {"loss_reduction": "tokens", "objective": "sft", "dpo_beta": 0.1, "simpo_beta": 2.0, "simpo_gamma": 0.5,
               "preference_sft_weight": 0.0, "dpo_loss_type": "sigmoid", "dpo_label_smoothing": 0.0,
               "orpo_lambda": 0.1, "reward_center_coefficient": 0.0, "teacher_model": None, "distill_top_k": 16,
               "distill_alpha": 0.5, "distill_temperature": 1.0, "kto_beta": 0.1,
               "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0, "lora": False, **LORA_DEFAULTS,
               "eval_metric": None, "eval_num_beams": 1,
               "early_stopping_metric": "validation_loss"}

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
    config = {**ADDED_LATER, **config}
    groups = (FIXED_ON_RESUME, SHAPE_THE_PARAMETERS, CHANGE_THE_RUN, STOP_CONDITIONS, ("data_path",))
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
    shaped = [f"{flag(k)} {saved[k]} -> {current[k]}" for k in SHAPE_THE_PARAMETERS if saved[k] != current[k]]
    if saved["objective"] != current["objective"] and "reward" in (saved["objective"], current["objective"]):
        shaped.append(f"--objective {saved['objective']} -> {current['objective']}")
    if shaped:
        problems.append(
            f"{', '.join(shaped)} cannot change on resume (the checkpoint holds another set of trained parameters, "
            f"even with --allow-config-change); start a new run with --fresh, e.g. from an exported hf_format folder"
        )
    changed = [f"{flag(k)} {saved[k]} -> {current[k]}" for k in CHANGE_THE_RUN if saved[k] != current[k]]
    if current["lr_scheduler"] != "constant" or saved["lr_scheduler"] != "constant":
        changed += [f"{flag(k)} {saved[k]} -> {current[k]}" for k in STOP_CONDITIONS if saved[k] != current[k]]
    if saved_data != current_data:
        paths = lambda config: " ".join(config["data_path"]) if isinstance(config["data_path"], list) else (  # noqa: E731
            config["data_path"])
        changed.append(f"the data ({paths(saved)}: {saved_data}) -> ({paths(current)}: {current_data})")
    if changed and not allow_change:
        problems.append(
            f"{'; '.join(changed)}: the resumed run would differ from the one checkpointed; pass the original "
            f"flags, --allow-config-change to resume anyway, or --fresh to start over"
        )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Full state: save and load (collectives: every rank calls them)


def save(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config: dict,
) -> Path:
    """Write `root/step_<step>` atomically; `trainer_state` is JSON (the scheduler's state_dict included)."""
    return finish_save(start_save(root, step, model, optimizer, trainer_state, config, asynchronous=False))


@dataclass
class PendingSave:
    """A full-state save whose shards may still be being written (dcp.async_save's future)."""

    future: object  # concurrent.futures.Future, or None once written (synchronous saves)
    tmp: Path
    final: Path
    trainer_state: dict
    config: dict


def start_save(root: Path, step: int, model, optimizer, trainer_state: dict, config: dict,
               asynchronous: bool) -> PendingSave:
    """Collective: every rank's shards and RNG states into `root/.step_<step>.tmp/`; `asynchronous`: the state is
    staged to host memory now and written in the background (on a process group of its own), so training may change
    the weights meanwhile. finish_save completes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    raise_if_any_rank_failed(error, CheckpointError, f"cannot create {tmp}")
    model_state, optimizer_state = trained_state(model, optimizer)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    trainer_state = json.loads(json.dumps({**trainer_state, "step": step, "world_size": world_size}))  # as of now
    future = None
    try:
        torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
        state = {"model": model_state, "optimizer": optimizer_state}
        with single_process_is_intended():
            if asynchronous:
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=checkpoint_group())
            else:
                dcp.save(state, checkpoint_id=tmp)
        error = None
    except (OSError, CheckpointException) as e:
        error = e
    raise_if_any_rank_failed(error, CheckpointError, f"cannot write checkpoint {tmp}")
    return PendingSave(future, tmp, final, trainer_state, config)


def save_written(pending: PendingSave, device: torch.device) -> bool:
    """Collective: whether every rank's background write has finished (so finish_save will not wait)."""
    done = torch.tensor([pending.future is None or pending.future.done()], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


def finish_save(pending: PendingSave) -> Path:
    """Collective: wait for every rank's shards, then rank 0 writes the small files, COMPLETE last, and renames the
    folder into place."""
    from torch.distributed.checkpoint.api import CheckpointException

    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    if pending.future is not None:
        try:
            pending.future.result()
        except (OSError, CheckpointException, RuntimeError) as e:
            error = e
    raise_if_any_rank_failed(error, CheckpointError, f"cannot write checkpoint {pending.tmp}")
    if rank == 0:
        try:
            complete(pending.tmp, pending.final, pending.trainer_state, pending.config)
        except OSError as e:
            error = e
    raise_if_any_rank_failed(error, CheckpointError, f"cannot complete checkpoint {pending.final}")  # all wait
    return pending.final


def complete(tmp: Path, final: Path, trainer_state: dict, config: dict) -> None:
    """Rank 0, once every shard is in `tmp`: the small files, COMPLETE last, then the rename to `final`."""
    atomic.write_json(tmp / "trainer_state.json", trainer_state)
    atomic.write_json(tmp / "training_config.json", config)
    atomic.write_json(tmp / COMPLETE, {"step": trainer_state["step"]})  # the folder is complete from here on
    # The same step saved before (e.g. by a run resumed from another output folder): move it aside whole before
    # deleting it, so a kill never leaves a `step_<N>` with COMPLETE and some shards gone. The `.tmp` name gets it
    # removed at the next start if the kill comes first.
    replaced = final.with_name(f".{final.name}.replaced.tmp")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    atomic.fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model and optimizer state a full-state checkpoint holds: what trains. Frozen parameters (LoRA's base
    weights) are the model folder's, the same at every step, and so are their other names (a head tied to a frozen
    embedding) and what a module adds to its state dict beside a frozen weight (bitsandbytes' 4-bit quantization
    state, "<weight>.absmax", ...): all are left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    if any(lora.is_4bit(p) for p in model.parameters()):
        # torch's get_state_dict resolves every state-dict key as an attribute path, and bitsandbytes' extra keys
        # ("<weight>.absmax", ...) are no attributes: the same sharded state, its keys named as torch names them.
        model_state = {canonical_key(k): v for k, v in model.state_dict().items()}
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return without_frozen(model, model_state), optimizer_state


def trained_weights(model: torch.nn.Module) -> dict:
    """The model part of trained_state (no optimizer state, none initialised)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return without_frozen(model, get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))


def without_frozen(model: torch.nn.Module, model_state: dict) -> dict:
    frozen = {canonical_key(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def of_frozen(key: str) -> bool:  # the key itself, or any of its dotted prefixes, is a frozen parameter's name
        parts = key.split(".")
        return any(".".join(parts[:i]) in frozen for i in range(1, len(parts) + 1))

    return {k: v for k, v in model_state.items() if not of_frozen(k)}


def canonical_key(key: str) -> str:
    """A state-dict key without the wrappers' own names (activation checkpointing's, torch.compile's), as
    torch.distributed.checkpoint names it."""
    return key.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def holds_every_weight(path: Path) -> bool:
    """Whether checkpoint `path` holds every weight of its model, so that a resume needs none of the model folder's:
    saved by full fine-tuning, whose checkpoints hold what trains, which is every weight except those a model
    freezes itself (build_model checks those). LoRA's and QLoRA's hold the adapters; their base is the folder's."""
    saved, _ = read_saved_run(path)
    return not saved["lora"] and not saved["qlora"]


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Collective: only the weights of checkpoint `path` into `model` (materialised, as build_model does for a
    resume that reads no weight of the model folder); load(..., weights=False) then restores the rest."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = {"model": trained_weights(model)}
    read_state(path, state, "this model")
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True))


def read_state(path: Path, state: dict, into: str) -> None:
    """dcp.load: fill the tensors of `state` (laid out for THIS world size) from however checkpoint `path` saved
    them; a CheckpointError in one line when it cannot."""
    import torch.distributed.checkpoint as dcp

    try:
        with single_process_is_intended():
            dcp.load(state, checkpoint_id=path)
    except (OSError, RuntimeError, ValueError) as e:  # e.g. another model's shapes
        reason = " ".join(str(e).split())[:500]
        raise CheckpointError(f"cannot load {path} into {into}: {reason}") from None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
         weights: bool = True) -> dict:
    """Restore model (unless `weights` is False: load_weights did), optimizer, LR scheduler and (same world size
    only) RNG states; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    model_state, optimizer_state = trained_state(model, optimizer)  # as saved
    state = {"model": model_state, "optimizer": optimizer_state} if weights else {"optimizer": optimizer_state}
    read_state(path, state, "this model and optimizer")
    # Not strict: the frozen parameters (LoRA's base weights) are not in the checkpoint; dcp.load has already
    # refused a checkpoint that lacks any trained one.
    set_state_dict(model, optimizer, model_state_dict=state.get("model", {}), optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainer_state = read_json(path / "trainer_state.json")
    scheduler.load_state_dict(trainer_state["scheduler"])
    if trainer_state["world_size"] == world_size:
        states, error = None, None
        try:
            states = load_rng_states(path / f"rng_rank{rank}.pt")
        except CheckpointError as e:
            error = e
        raise_if_any_rank_failed(error, CheckpointError)  # every rank stops with the same line
        set_rng_states(states)
    return trainer_state


@contextmanager
def single_process_is_intended():
    """DCP warns on every save and load without a process group; one process (world size 1) is a normal run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# RNG states as tensors and numbers only, so that loading them needs no unpickling of arbitrary objects: a
# checkpoint folder from someone else cannot run code here.


def rng_states() -> dict:
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


# What checkpoints of earlier versions pickled besides tensors: numpy's state tuple. Only these data types are
# allowed, never arbitrary code.
LEGACY_RNG_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def load_rng_states(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(list(LEGACY_RNG_GLOBALS)):
            return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; resume from another checkpoint or start over with --fresh") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())[:300]  # torch colours its message
        raise CheckpointError(
            f"{path}: not a random-number-generator state file of minitrain, so it is not loaded (it may have been "
            f"tampered with: {reason}); resume from another checkpoint or start over with --fresh"
        ) from None


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    numpy, python = states["numpy"], states["python"]
    if isinstance(numpy, dict):
        numpy = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)  # a tuple as np.random.get_state() gives it: an earlier version's checkpoint
    if isinstance(python, dict):
        python = (python["version"], tuple(python["state"].tolist()), python["gauss_next"])
    random.setstate(python)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face exports: hf_format/samples_<N>/


def export_samples(path: Path) -> int | None:
    """N for an `hf_format/samples_<N>` folder, else None."""
    match = EXPORT_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def exports_after(hf_dir: Path, samples: int) -> list[Path]:
    """The samples_<N> folders with N > `samples`, oldest first."""
    if not hf_dir.is_dir():
        return []
    found = [p for p in hf_dir.iterdir() if export_samples(p) is not None and export_samples(p) > samples]
    return sorted(found, key=export_samples)


def prune_exports(hf_dir: Path, keep: int, written: Path) -> list[Path]:
    """Delete all but the newest `keep` samples_<N> folders up to `written`, the export just written (always kept)."""
    exports = [p for p in exports_after(hf_dir, -1) if export_samples(p) <= export_samples(written)]
    old = exports[:-keep]
    for path in old:
        shutil.rmtree(path)
    return old



def set_aside_exports(out: Path, samples: int, reason: str) -> None:
    """Move the exports after `samples` (another run's) to a new <out>/hf_format.earlier_run_<K>: they are models
    someone may want, so they are kept, but never mixed with (or pruned in favour of) this run's own."""
    later = exports_after(out / "hf_format", samples)
    if not later:
        return
    k = 1
    while (out / f"hf_format.earlier_run_{k}").exists():
        k += 1
    aside = out / f"hf_format.earlier_run_{k}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    print0(f"moved {len(later)} exports of an earlier run ({', '.join(p.name for p in later)}) to {aside}: "
           f"{reason}; delete them if not needed")


# ----------------------------------------------------------------------------------------------------------------
# Where a run continues from, and the output folder made consistent with it


def find_resume_point(output_dir: str, resume_from: str | None, fresh: bool) -> Path | None:
    """The checkpoint this run continues from: --resume-from, else the newest complete one in --output-dir."""
    if fresh:
        return None
    if resume_from is not None:
        return Path(resume_from)
    return latest_checkpoint(checkpoint_root(output_dir))


def check_resumable(path: Path, config: dict, data: str) -> int:
    """Refuse, before any weights load, a resume whose flags or data would make a different run; return the
    checkpoint's samples seen."""
    saved_config, saved_state = read_saved_run(path)
    problems = config_problems(saved_config, config, saved_state["data"], data, config["allow_config_change"])
    if problems:
        raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
    return saved_state["samples_seen"]


def tidy_output_dir(output_dir: str, fresh: bool, resume: Path | None, resumed_samples: int) -> None:
    """Rank 0, once every rank has chosen where to resume: drop killed saves, another trajectory's checkpoints, set
    its exports aside, and drop later log lines.

    What this run does not continue is another trajectory: with no checkpoint to resume (a first start or --fresh),
    everything already in the folder; resuming from step k, every checkpoint after k and every export after k's
    samples. Left in place, pruning and the next restart would take them for this run's own.
    """
    out = Path(output_dir)
    root = checkpoint_root(out)
    metrics, generations = out / METRICS, out / GENERATIONS
    for path in remove_unfinished(root):
        print0(f"removed {path}, a checkpoint whose save was interrupted")
    if fresh and root.exists():
        old = complete_checkpoints(root)
        shutil.rmtree(root)
        print0(f"--fresh: removed {len(old)} full-state checkpoints of the earlier run in {root}")
    if resume is None:
        set_aside_exports(out, -1, "this run starts over")
        metrics.unlink(missing_ok=True)  # a new run in an old output folder starts new logs
        generations.unlink(missing_ok=True)
        return
    step = checkpoint_step(resume)
    for path in remove_later(root, step):
        print0(f"removed {path}: this run resumes from {resume}, so its later checkpoints are another run's")
    set_aside_exports(out, resumed_samples, f"this run resumes from {resume} at {resumed_samples} samples")
    dropped = trim_metrics(metrics, step)
    if dropped:
        print0(f"{metrics}: removed {dropped} lines logged after the checkpoint (those steps run again)")
    trim_metrics(generations, step)


# ----------------------------------------------------------------------------------------------------------------
# The cadence of saves, owned here: the training loop calls after_step() and finish(), nothing else


METRICS, GENERATIONS = "metrics.jsonl", "generations.jsonl"


@dataclass
class RunState:
    """The counters a full-state checkpoint restores (trainer_state.json, with the scheduler and world size)."""

    data: str  # the data fingerprint: a resumed run must see the same data
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0
    last_export_samples: int = 0
    validation: dict | None = field(default=None)  # the validator's state (early stopping, best export)
    source_samples: list[int] | None = None  # a mixture's samples seen, per file

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("validation", "source_samples")}


class Checkpointer:
    """Writes the run's exports and full-state checkpoints when they are due. Collective: every rank calls it."""

    def __init__(self, config, world: World, model, optimizer, scheduler, tokenizer, validator, state: RunState):
        self.config, self.world = config, world
        self.model, self.optimizer, self.scheduler, self.tokenizer = model, optimizer, scheduler, tokenizer
        self.validator = validator
        self.last_full_state_step = state.step  # a resumed run's step is saved already: finish() does not redo it
        self.last_full_state_time = time.monotonic()
        self.asynchronous = config.async_save if config.async_save is not None else world.device.type == "cuda"
        self.pending: PendingSave | None = None  # a background save not yet completed

    def export_due(self, state: RunState) -> bool:
        """Whether this step's samples crossed a multiple of --min-samples-per-checkpoint since the last export."""
        every = self.config.min_samples_per_checkpoint
        return every is not None and state.samples_seen // every > state.last_export_samples // every

    def after_step(self, state: RunState, signum: int, last_step: bool) -> bool:
        """Save what this step calls for; True when a stop signal ends the run here (after the last step the run
        ends normally anyway)."""
        if self.pending is not None and save_written(self.pending, self.world.device):
            self.complete_pending()
        if self.export_due(state):
            self.export(state)
        stop_now = bool(signum) and not last_step
        every = self.config.checkpoint_every_steps
        if stop_now or (every is not None and state.step % every == 0) or self.minutes_due():
            self.save_full_state(state)
        if stop_now:
            self.complete_pending()
        return stop_now

    def minutes_due(self) -> bool:
        """Collective: whether --checkpoint-every-minutes have passed since the last full-state save, by rank 0's
        clock (the ranks' clocks could disagree at the boundary, and every rank must take part in the save)."""
        minutes = self.config.checkpoint_every_minutes
        if not minutes:
            return False
        due = torch.tensor([time.monotonic() - self.last_full_state_time >= 60 * minutes], device=self.world.device)
        if dist.is_initialized():
            dist.broadcast(due, src=0)
        return bool(due.item())

    def finish(self, state: RunState) -> None:
        """At the end of the run: an export of the final weights and a full-state checkpoint, unless just written."""
        if state.samples_seen != state.last_export_samples:
            self.export(state)
        if state.step != self.last_full_state_step:
            self.save_full_state(state)
        self.complete_pending()

    def export(self, state: RunState) -> Path:
        """hf_format/samples_<N>/ (the model adapter's export_state says what it holds); noted as the best export so far when
        the validation loss of this step is the lowest."""
        path = save_export(self.model, self.tokenizer, self.config, self.world, state.samples_seen)
        print0(f"saved {path}")
        state.last_export_samples = state.samples_seen
        if self.validator is not None:
            if self.validator.export_saved(path, state.samples_seen):
                v = self.validator
                print0(f"best checkpoint so far: {path} ({describe(v.metric, v.best_export_value)})")
        return path

    def save_full_state(self, state: RunState) -> Path:
        """checkpoints/step_<N>/, then pruned to --keep-last-n-checkpoints."""
        root = checkpoint_root(self.config.output_dir)
        if self.validator is not None:
            state.validation = self.validator.state_dict()
        trainer_state = {**state.to_json(), "scheduler": self.scheduler.state_dict()}
        self.complete_pending()  # one save at a time
        self.pending = start_save(root, state.step, self.model, self.optimizer, trainer_state, asdict(self.config),
                                  self.asynchronous)
        self.last_full_state_step, self.last_full_state_time = state.step, time.monotonic()
        if not self.asynchronous:
            self.complete_pending()
        return self.pending.final if self.pending is not None else root / f"step_{state.step}"

    def complete_pending(self) -> None:
        """Collective: complete the save under way (waiting for its writes), then prune to --keep-last-n-checkpoints:
        the older checkpoints go only once the newer one is whole."""
        if self.pending is None:
            return
        path = finish_save(self.pending)
        self.pending = None
        keep = self.config.keep_last_n_checkpoints
        if self.world.is_main and keep is not None:
            for old in prune(path.parent, keep):
                print0(f"removed {old} (--keep-last-n-checkpoints {keep})")
        print0(f"saved {path}")


def save_export(model, tokenizer, config, world: World, samples_seen: int) -> Path:
    """Write <output-dir>/hf_format/samples_<N>/. Collective: every rank takes part in gathering the full state dict
    (the model adapter says what an export holds); only rank 0 writes."""
    final = Path(config.output_dir) / "hf_format" / f"samples_{samples_seen}"
    dtype = getattr(torch, config.save_dtype)
    error = None
    if getattr(model, "sharded_export", False):  # every rank writes its shards (export.write_hf_folder_sharded)
        reshard(model)
        try:
            model.adapter.write_export_sharded(model.lm, tokenizer, dtype, asdict(config), final, world)
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {final}: {e}") from None
        state = None
    else:
        state = model.adapter.export_state(model, world)
    if world.is_main:
        try:
            if state is not None:
                model.adapter.write_export(model.lm, state, tokenizer, dtype, asdict(config), final)
            if config.keep_last_n_exports is not None:
                for old in prune_exports(final.parent, config.keep_last_n_exports, final):
                    print0(f"removed {old} (--keep-last-n-exports {config.keep_last_n_exports})")
        except OSError as e:
            error = e
    raise_if_any_rank_failed(error, CheckpointError, f"could not write checkpoint {final}")  # all wait for it
    return final


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
    atomic.write_text(path, "".join(kept))
    return len(lines) - len(kept)
