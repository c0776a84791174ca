"""The process group and everything that depends on it, in one place; every function is a no-op (or the obvious
single-process answer) outside torchrun, so `python train.py` runs the same code as `torchrun train.py`.

    world = init_distributed("auto")     # gpt-fast's maybe_init_dist / nanochat's compute_init
    print0("only rank 0 prints this")
    raise_if_any_rank_failed(error, DataError)   # the one "did any rank fail" agreement
    value = decided_on_rank0(decide, ConfigError)  # rank 0's decide() on every rank (or its error on every rank)
    with compute_autocast(model, world.device): ...
    cleanup_distributed()
    owners = folder_owners(out, world)    # which rank's copy of a folder each rank sees (shared or node-local)
"""

import os
import secrets
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits: its rank among all ranks and on its node, and its device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, local rank, world size, local world size) as torchrun sets them; (0, 0, 1, 1) outside torchrun."""
    env = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
    return env("RANK", 0), env("LOCAL_RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_WORLD_SIZE", 1)


# Waiting for one rank's long work (building the token cache at ~4M tokens/s, a model load, an export to slow
# storage) happens in raise_if_any_rank_failed, on a CPU (gloo) group of its own with this timeout, never in a
# collective of the training group, whose timeout (--distributed-timeout-minutes; NCCL's default is 10 minutes)
# would otherwise kill the first multi-GPU run on a large data set.
PATIENT_TIMEOUT = timedelta(hours=24)
_patient_group = None
_checkpoint_group = None  # background (asynchronous) checkpoint writes: never in the training group's collectives


def init_distributed(backend: str, timeout_minutes: float = 60) -> World:
    """The device (this local rank's GPU, else the CPU) and, under torchrun, the process group (`auto`: nccl on CUDA,
    gloo on CPU) with `timeout_minutes` for its collectives, plus the patient group (see PATIENT_TIMEOUT)."""
    global _patient_group, _checkpoint_group
    rank, local_rank, world_size, local_world_size = world_from_env()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=timeout_minutes))
        _patient_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
        _checkpoint_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return World(rank, local_rank, world_size, local_world_size, device)


def cleanup_distributed() -> None:
    global _patient_group, _checkpoint_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _patient_group = _checkpoint_group = None


def checkpoint_group():
    """The gloo group of background checkpoint writes (None in one process)."""
    return _checkpoint_group


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushed: torchrun interleaves the ranks' output)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def raise_if_any_rank_failed(error: BaseException | None, error_type: type[Exception], what: str = "") -> None:
    """Collective (and barrier): if any rank failed, every rank raises `error_type` with the first rank's message,
    so none waits forever in the next collective. `what` prefixes the message ("cannot write X: ...").

    It runs on the patient group: the ranks that arrive first may wait here for hours on one rank's long work."""
    message = None if error is None else f"{what}: {error}" if what else str(error)
    if not dist.is_initialized():
        if isinstance(error, error_type) and not what:
            raise error
        if message is not None:
            raise error_type(message) from None
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_patient_group)
    failed = [m for m in messages if m is not None]
    if failed:
        raise error_type(failed[0])


def decided_on_rank0(decide, error_type: type[Exception]):
    """Collective on the patient group: rank 0 alone calls decide() and every rank returns its (picklable) value, so
    that a decision that depends on the rank's machine (its free memory, its GPU) is the same on every rank, and is
    paid for once. If decide() raises on rank 0, every rank raises: rank 0 its own exception, the others `error_type`
    with its message, so that each stops with the same line and none waits for a value that never comes.

    The other ranks wait here for as long as decide() takes (PATIENT_TIMEOUT: a 70B model's memory simulation takes
    minutes, past NCCL's default 10). decide() itself runs outside every collective; decide() in one process."""
    if not dist.is_initialized():
        return decide()
    if dist.get_rank() != 0:
        received = [None]
        dist.broadcast_object_list(received, src=0, group=_patient_group)
        value, error = received[0]
        if error is not None:
            raise error_type(error)
        return value
    try:
        value = decide()
    except BaseException as e:
        dist.broadcast_object_list([(None, str(e) or type(e).__name__)], src=0, group=_patient_group)
        raise
    dist.broadcast_object_list([(value, None)], src=0, group=_patient_group)
    return value


def all_gather(value) -> list:
    """Collective on the patient group: every rank's picklable `value`, by rank; [value] in one process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_patient_group)
    return values


def node_of_rank() -> str:
    """This process's node as a person finds it: torchrun's node rank (GROUP_RANK) and the host name."""
    return f"node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()})"


MARKER = ".minitrain-visible"


def folder_owners(folder: Path, world: World) -> list[int]:
    """Collective: for every rank, the lowest rank that sees the same folder at `folder` (its path may name a shared
    filesystem, the same on every node, or a node-local disk with one copy per node). Found with marker files, not
    with assumptions about hostnames: in turn, the lowest rank not yet placed writes a random token into its copy
    and every unplaced rank that reads that token back sees the same copy. One round per distinct copy."""
    owners: list[int | None] = [None] * world.world_size
    marker = Path(folder) / MARKER
    while None in owners:
        leader = owners.index(None)
        token, error = None, None
        if world.rank == leader:
            token = secrets.token_hex(16)
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                marker.write_text(token)
            except OSError as e:
                error = e
        raise_if_any_rank_failed(error, OSError, f"cannot write {marker}")
        token = all_gather(token)[leader]
        try:
            sees = owners[world.rank] is None and marker.read_text() == token
        except OSError:
            sees = False
        for rank, seen in enumerate(all_gather(sees)):
            if seen:
                owners[rank] = leader
        owners[leader] = leader  # placed even if its own copy reads back wrong: every round places someone
    return owners


def check_shared_output_dir(folder: Path, world: World, error_type: type[Exception]) -> None:
    """Collective: every rank must see the output folder rank 0 writes to (its checkpoints, the resume point, the
    token cache): a rank writing into a copy of its own would resume from another step, or hang in a collective.
    If any does not, every rank raises `error_type` with one line naming the nodes that cannot see it and the fix."""
    if world.world_size == 1:
        return
    owners = folder_owners(folder, world)
    nodes = all_gather(node_of_rank())
    blind = [rank for rank, owner in enumerate(owners) if owner != 0]
    if blind:
        names = sorted({nodes[r] for r in blind})
        ranks = ", ".join(map(str, blind))
        raise error_type(
            f"--output-dir {folder}: {', '.join(names)} (rank {ranks}) cannot see the folder that rank 0 on "
            f"{nodes[0]} writes to (the marker file {MARKER} there lacks rank 0's token); give every node the same "
            f"shared folder (a network filesystem mounted at the same path) as --output-dir")


def compute_autocast(model: torch.nn.Module, device: torch.device):
    """The one rule for the compute dtype. Under FSDP on CUDA its MixedPrecisionPolicy casts to bf16 (see
    model.shard_model); one unsharded CUDA process gets the same bf16 compute on fp32 weights from autocast. CPU
    computes in fp32."""
    from torch.distributed.fsdp import FSDPModule

    unsharded_cuda = device.type == "cuda" and not isinstance(model, FSDPModule)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=unsharded_cuda)


@contextmanager
def root_unsharded(model: torch.nn.Module):
    """The FSDP2 root's own parameters (embeddings, final norm, LM head) all-gathered while the Hugging Face model
    inside it runs outside the root's forward (generate, the start-up probe's own forward); the blocks gather theirs
    in their hooks. Afterwards every module is back in shards, so training goes on with the memory it had (inside a
    gathered_once that keeps the weights gathered, at its end). Call it after a forward of the root (FSDP2's lazy
    init). A plain module: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        if getattr(model, "_gathered_once", None) != "kept":
            reshard(model)


@contextmanager
def models_own_forward(model: torch.nn.Module):
    """Around a start-up probe's truth, the Hugging Face model's own forward: root_unsharded, and with --compile eager
    (model.compiled_blocks): the trainer's compiled blocks must not stand in for the forward they are checked against
    (and compiling its masked forwards cost a compile of every block, once more per shape). Without --compile nothing
    changes (flex attention stays compiled, as transformers compiles it)."""
    eager = torch.compiler.set_stance("force_eager") if getattr(model, "compiled_blocks", False) else nullcontext()
    with root_unsharded(model), eager:
        yield


@contextmanager
def gathered_once(model: torch.nn.Module):
    """For a no-grad stretch that runs the model many times (the start-up probe's forwards, DPO's and KTO's reference
    pass, distillation's teacher pass, an evaluation: its validation batches and generate's one forward per token):
    where the whole unsharded model takes at most half the memory free on every rank, each FSDP2 module keeps its
    parameters, once gathered, until the stretch ends, so that the model is all-gathered once and not once per
    forward (per generated token); otherwise (a model too large for one device) each block gathers in its forward
    and frees after it, as in training. Afterwards every module is back in shards and reshards after its forward
    again. Collective; nested, the outer one's choice holds. A plain module, or modules that keep their parameters
    after forward anyway (SHARD_GRAD_OP, NO_SHARD): nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if (not isinstance(model, FSDPModule) or getattr(model, "_gathered_once", None)
            or not getattr(model, "reshards_after_forward", False)):
        yield
        return
    keep = whole_model_fits(model)
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if keep else []
    model._gathered_once = "kept" if keep else "declined"
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)
        model._gathered_once = None
        if keep:
            reshard(model)


def whole_model_fits(model: torch.nn.Module) -> bool:
    """Collective: whether the whole model, all-gathered in its compute dtype (bf16 under FSDP's mixed precision on
    CUDA), takes at most half the memory free on every rank (the GPU's, or the machine's shared by its ranks)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not params:
        return False
    device = params[0].device
    need = sum(p.numel() * (2 if device.type == "cuda" else p.element_size()) for p in params)
    fits = torch.tensor([int(need <= free_memory(device, world_from_env()[3]) // 2)], device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    return bool(fits.item())


def free_memory(device: torch.device, local_world_size: int) -> int:
    """Bytes this rank can still allocate: the GPU's free memory and what PyTorch's allocator holds unused, or the
    machine's available memory shared by the ranks on it."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    return available_host_memory() // local_world_size


def available_host_memory() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 module of `model` back in shards. A forward outside backward (no_grad) leaves the modules that
    keep their parameters gathered after forward (SHARD_GRAD_OP, NO_SHARD) unsharded, and then model.parameters()
    are the gathered tensors, not the sharded ones that receive the gradients: an optimizer built then would never
    step. A plain module: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
