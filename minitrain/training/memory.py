"""Memory per GPU of a training run, known before a weight loads.

    python train.py --estimate-memory --model-name-or-path DIR --world-size 64 --gpu-memory-gib 80 \
        --max-tokens-per-gpu 8192 [the run's other flags]

The estimate is not a formula: it is one real training step of the run's own code on fake tensors. From the model's
config.json alone (no weights, no data file), on a fake process group of N ranks (torch's FakeStore):

    model built from its config in FakeTensorMode -> the run's adapter, activation checkpointing (model.assemble)
    -> fully_shard with the run's strategy, mesh and mixed precision (model.shard_model)
    -> AdamW's state created (an optimizer step on zero gradients: as from a run's second step on), then per row:
       a row of T tokens through the run's objective (SFT: every position trained; DPO/SimPO: one pair of two T/2
       sides) -> backward -> the run's optimizer step, under PyTorch's FSDPMemTracker

With --sequence-parallel-size S the row holds S x T tokens and the simulated rank is rank 0 of an S-rank group of the
fake process group: its 1/S of the row, the all-to-alls and the attention over the whole row for H/S heads, as in
the run (sequence_parallel.py). With --activation-offload (CUDA) the checkpointed blocks' saved inputs leave the
device until the backward needs them (offloaded_block_inputs).

The tracker's peak is the estimate, with its parts at that moment: parameters (sharded fp32 masters, gathered bf16
copies, buffers), gradients, optimizer state, activations, temporary buffers (backward, the LM head's chunks) and
communication buffers (all-gather, reduce-scatter). The peak of two row lengths gives the cost of one more token;
the longest row that fits G GiB follows from it (the peak is affine in T: activations and the loss's buffers grow
linearly; on CUDA attention is the variable-length kernel, O(T), never a dense T x T mask).

Fake tensors allocate nothing, so 70B on 64 fake ranks runs on a laptop CPU in about a minute. The fake process
group must be the only one of its process: train.py runs the estimate in a process of its own (run_isolated), on rank 0
alone, whose plan every rank applies (plan_for_run).

What it does not see: the CUDA caching allocator's fragmentation and the CUDA context (~0.5-1 GiB), which is one
reason --max-tokens-per-gpu auto keeps MARGIN of the device free; QLoRA's 4-bit base is modelled from LoRA's step
(the base's block linears counted at 4.5 bits per weight, whole on every rank, instead of sharded fp32).
"""

import contextlib
import copy
import json
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from minitrain.training.sequence_parallel import SequenceParallel

GIB = 2**30
MARGIN = 0.10  # --max-tokens-per-gpu auto: the estimate fits (1 - MARGIN) of the device's memory
ROW_MULTIPLE = 256  # the longest row that fits is rounded down to a multiple of this
QLORA_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # NF4 codes + an fp32 absmax per 64 weights (double quantization saves more)
PARTS = ("parameters", "gradients", "optimizer_state", "activations", "temporary", "communication")
# FSDPMemTracker's categories (torch.distributed._tools.fsdp2_mem_tracker._FSDPRefType values) -> our parts
TRACKER_PARTS = {
    "Sharded Param": "parameters", "Unsharded Param": "parameters", "Buffer": "parameters",
    "Sharded Grad": "gradients", "Unsharded Grad": "gradients", "OptState": "optimizer_state",
    "Activation": "activations", "Inputs": "activations", "Temp": "temporary",
    "All Gather": "communication", "Reduce Scatter": "communication",
}


class EstimateError(ValueError):
    """The estimate cannot be made for these flags (one line, with the fix)."""


@dataclass
class Estimate:
    """The peak memory per GPU of one training step and its parts (GiB), for `max_tokens_per_gpu` tokens a row."""

    peak_gib: float
    parts: dict
    world_size: int
    max_tokens_per_gpu: int
    longest_row_that_fits: int | None  # None: no device memory given, or not even a 1-token row fits
    gpu_memory_gib: float | None
    gib_per_token: float  # the peak's growth per token of the row
    strategy: str
    activation_checkpointing: bool
    adapter: str
    objective: str
    sequence_parallel_size: int = 1  # S ranks share each row of S x max_tokens_per_gpu tokens
    activation_offload: bool = False  # the checkpointed blocks' inputs in host memory (CUDA)
    # distillation: the peak of the teacher's top-k pass, which runs before the student is built (never with it)
    teacher_pass_gib: float | None = None
    longest_row_checked: bool = False  # longest_row_that_fits was searched for (a row's peak alone does not say)

    @property
    def step_fits(self) -> bool:
        return self.gpu_memory_gib is None or self.peak_gib <= self.gpu_memory_gib

    @property
    def fits(self) -> bool:
        """The training step fits, and so does the teacher's pass where there is one."""
        return self.step_fits and (self.gpu_memory_gib is None or self.teacher_pass_gib is None
                                   or self.teacher_pass_gib <= self.gpu_memory_gib)

    def longest_row(self, budget_gib: float) -> int | None:
        """The longest row (a multiple of ROW_MULTIPLE, or what is left under it) whose peak fits `budget_gib`."""
        if self.gib_per_token <= 0:
            return None if self.peak_gib > budget_gib else self.max_tokens_per_gpu
        tokens = self.max_tokens_per_gpu + (budget_gib - self.peak_gib) / self.gib_per_token
        if tokens < 1:
            return None
        return int(tokens) // ROW_MULTIPLE * ROW_MULTIPLE or int(tokens)

    def rows(self, tokens_per_gpu: int) -> str:
        """`tokens_per_gpu` as the row it makes: with S > 1, "T tokens per GPU (rows of S x T = R tokens)"."""
        S = self.sequence_parallel_size
        return f"{tokens_per_gpu} tokens per GPU" + (f" (rows of {S} x {tokens_per_gpu} = {S * tokens_per_gpu} "
                                                     f"tokens)" if S > 1 else "")

    def describe(self) -> str:
        width = max(map(len, PARTS))
        offload = ", offloaded to host" if self.activation_offload and self.activation_checkpointing else ""
        split = f", sequence parallel over {self.sequence_parallel_size}" if self.sequence_parallel_size > 1 else ""
        what = (f"{self.adapter}, {self.objective}, {self.strategy}, activation checkpointing "
                f"{'on' if self.activation_checkpointing else 'off'}{offload}, {self.world_size} GPUs{split}, "
                f"{self.rows(self.max_tokens_per_gpu)}")
        lines = [f"estimated peak per GPU: {self.peak_gib:.1f} GiB ({what})"]
        lines += [f"  {name:<{width}} {self.parts[name]:8.2f} GiB" for name in PARTS]
        if self.teacher_pass_gib is not None:
            lines.append(f"the teacher's top-k pass, before the student is built: {self.teacher_pass_gib:.1f} GiB per "
                         f"GPU at its peak")
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit" + (" (the teacher's pass)" if self.step_fits else "")
            line = f"{verdict} in {round(self.gpu_memory_gib, 1):g} GiB"
            if self.longest_row_checked:  # else unknown: one row was simulated (auto checkpointing's check)
                longest = self.longest_row_that_fits
                row = "longest row whose step fits" if self.step_fits and not self.fits else "longest row that fits"
                line += (f"; {row}: {self.rows(longest) if longest is not None else 'none'} "
                         f"({self.gib_per_token * 1024:.3f} GiB per 1k tokens per GPU)")
            lines.append(line)
        return "\n".join(lines)

    def json_line(self) -> str:
        return json.dumps({"peak_gib": round(self.peak_gib, 3), "parts": {k: round(v, 3) for k, v in
                           self.parts.items()}, "world_size": self.world_size,
                           "max_tokens_per_gpu": self.max_tokens_per_gpu,
                           "longest_row_that_fits": self.longest_row_that_fits,
                           "gpu_memory_gib": self.gpu_memory_gib, "fsdp_sharding_strategy": self.strategy,
                           "activation_checkpointing": self.activation_checkpointing, "adapter": self.adapter,
                           "objective": self.objective, "sequence_parallel_size": self.sequence_parallel_size,
                           "activation_offload": self.activation_offload,
                           **({"teacher_pass_gib": round(self.teacher_pass_gib, 3)}
                              if self.teacher_pass_gib is not None else {})})


# ----------------------------------------------------------------------------------------------------------------
# The simulated step


def synthetic_cache(objective, tokens: int):
    """A one-row stand-in for the token cache: one sample of `tokens` tokens, every next token trained (SFT's worst
    case for the LM head), or one preference pair of two halves (DPO/SimPO); DPO's reference log-probs are zeros, a
    distillation teacher's table a uniform top-k."""
    ids = np.ones(tokens, dtype=np.int64)
    half = max(1, tokens // 2)
    cache = types.SimpleNamespace(offsets=np.array([0, tokens]), input_ids=ids, labels=ids.copy(),
                                  trained=np.array([tokens - 1]), chosen_lengths=np.array([half]),
                                  desirable=np.array([True]),  # KTO: one sample (its KL pass is a no-grad forward)
                                  content_hash=f"memory-estimate-{tokens}", sources=None)
    if getattr(objective, "needs_reference", False):
        objective.reference[cache.content_hash] = np.zeros((1, 2))
    if getattr(objective, "needs_teacher", False):
        from minitrain.training.objectives import TeacherTable

        objective.tables[cache.content_hash] = TeacherTable.synthetic(tokens - 1, objective.top_k)
    return cache


# What a simulated step cannot depend on: where the run reads and writes, how long it runs, its schedule, its
# evaluation, its seed (fake tensors hold no values), and the flags given separately. Every other field (those added
# later too) is part of a simulation's key.
NOT_IN_THE_STEP = frozenset({
    "data_path", "output_dir", "cache_dir", "resume_from", "fresh", "allow_config_change", "batch_size", "max_epochs",
    "max_steps", "max_samples", "min_samples_per_checkpoint", "checkpoint_every_steps", "checkpoint_every_minutes",
    "async_save", "keep_last_n_checkpoints", "keep_last_n_exports", "learning_rate", "num_warmup_steps",
    "lr_scheduler", "seed", "save_dtype", "lora_export", "distributed_timeout_minutes", "validation_data_path",
    "validation_split", "eval_every_samples", "num_eval_generations", "eval_max_new_tokens", "eval_metric",
    "eval_num_beams", "early_stopping_patience", "early_stopping_metric", "early_stopping_min_delta", "tracker",
    "estimate_memory", "world_size", "gpu_memory_gib", "estimate_device",
})
SIMULATED: dict = {}  # a simulation's key -> its result: a process that plans the same step again reads it here


@dataclass(frozen=True)
class RunOptimizer:
    """The run's own optimizer for a list of params (AdamW over fp32 masters, as optim.build_optimizer makes it for
    `config`): a simulation with it is known by `config` alone, so it is simulated once per process."""

    config: object

    def __call__(self, params):
        from minitrain.training.optim import build_optimizer

        return build_optimizer(self.config, params, None)[0]


def run_optimizer(config) -> RunOptimizer:
    return RunOptimizer(config)


def simulation_key(config, rows, world_size, cuda, make_optimizer, shard_group_size, local_world_size):
    """What simulate's result is a function of (the model's config.json as loaded, every field of the run's config
    and of its optimizer's that can change the step, the rows, the world), or None when the optimizer is not the
    run's own (a caller's function: never reused)."""
    from dataclasses import fields

    from transformers import AutoConfig

    if not isinstance(make_optimizer, RunOptimizer):
        return None

    def step_fields(c) -> str:
        return repr([(f.name, getattr(c, f.name)) for f in fields(c) if f.name not in NOT_IN_THE_STEP])

    return (AutoConfig.from_pretrained(config.model_name_or_path).to_json_string(), step_fields(config),
            step_fields(make_optimizer.config), tuple(rows), world_size, cuda, shard_group_size, local_world_size)


def simulate(config, rows: list[int], world_size: int, cuda: bool, make_optimizer,
             shard_group_size: int | None = None, local_world_size: int | None = None) -> list[tuple[int, dict]]:
    """simulate_step's result, read from SIMULATED when this process simulated the same step before (tests and
    --max-tokens-per-gpu auto plan the same step again; a simulation takes seconds, more for big models)."""
    key = simulation_key(config, rows, world_size, cuda, make_optimizer, shard_group_size, local_world_size)
    if key is None or key not in SIMULATED:
        result = simulate_step(config, rows, world_size, cuda, make_optimizer, shard_group_size, local_world_size)
        if key is None:
            return result
        SIMULATED[key] = result
    return copy.deepcopy(SIMULATED[key])


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group of `world_size` ranks (this process rank 0) for a simulation, removed after it. Refuses a
    process that has a process group of its own (a run's: the estimate runs in a process of its own there)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise EstimateError("the memory estimate needs a process of its own (it runs a fake process group)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def simulate_step(config, rows: list[int], world_size: int, cuda: bool, make_optimizer,
                  shard_group_size: int | None = None, local_world_size: int | None = None) -> list[tuple[int, dict]]:
    """[(tokens per GPU, {part: bytes at the peak, "peak": bytes})] for each `rows` entry (tokens per GPU): one
    training step of the run `config` describes, on `world_size` fake ranks (cuda: bf16 compute on fp32 masters, as
    on GPUs; else fp32), once AdamW's state exists (create_optimizer_state). With --sequence-parallel-size S the
    row holds S x the tokens, split between the S ranks of a group as in the run (sequence_parallel.py: each rank its
    1/S of the row, the all-to-alls around attention, every rank attending over the whole row for H/S heads); rank
    0's peak is the estimate. `make_optimizer(params)` builds the run's optimizer. Needs a process without a process
    group; leaves it without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from transformers import AutoConfig

    from minitrain.training import lora
    from minitrain.training.distributed import World
    from minitrain.training.model import device_mesh, shard_model
    from minitrain.training.objectives import build_objective

    hf_config = AutoConfig.from_pretrained(config.model_name_or_path)
    if hf_config.is_encoder_decoder:
        raise EstimateError(f"--estimate-memory covers causal LMs; {hf_config.model_type} is an encoder-decoder")
    split = max(1, getattr(config, "sequence_parallel_size", 1))
    adapter = lora.build_adapter(config)
    if adapter.name == "qlora":
        adapter = lora.LoRA(config)  # on fake tensors as LoRA; its base is re-counted in 4-bit (qlora_parameters)
    objective = build_objective(config, hf_config)
    # Liger's kernels and torch.compile do not run on fake tensors; the step runs eager (compile only saves memory)
    run = replace(config, use_liger_kernels=False, compile=False)
    # --activation-offload: on CUDA only, as in the run (on CPU the activations already live in host memory)
    offload = bool(getattr(config, "activation_offload", False) and config.activation_checkpointing and cuda)
    world = World(0, 0, world_size, local_world_size or min(world_size, 8), torch.device("cpu"))
    with fake_process_group(world_size):
        mesh = device_mesh(config.fsdp_sharding_strategy, world, shard_group_size, "cpu")  # before the fake mode
        model = simulated_model(run, hf_config, adapter, cuda, world_size, split)
        # One rank unsharded runs without FSDP; FSDP over one rank holds the same weights, plus the gathered bf16
        # copies autocast would make.
        shard_model(model, config.fsdp_sharding_strategy, world, mesh, cuda)
        indices = np.array([0])
        caches = [synthetic_cache(objective, tokens * split) for tokens in rows]  # S ranks share a row
        trained = [host_positions(objective, c, indices) if split > 1 else None for c in caches]
        with FakeTensorMode(allow_non_fake_inputs=True), offloaded_block_inputs(model, offload):
            model.to_empty(device="cpu")
            model.train()
            optimizer = make_optimizer(adapter.trainable_parameters(model))
            tracker = FSDPMemTracker(model, optimizer)
            create_optimizer_state(optimizer)
            results = []
            for tokens, cache, positions in zip(rows, caches, trained):
                pack = objective.pack(cache, indices)
                if split > 1:
                    model.sequence_parallel = replace(model.sequence_parallel, trained=positions)
                tracker.reset_mod_stats()  # each tracked step on its own
                with tracker, quiet_module_tracking():
                    step(model, objective, pack, cache, indices, optimizer)
                snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
                parts = dict.fromkeys(PARTS, 0)
                for kind, part in TRACKER_PARTS.items():
                    parts[part] += snapshot.get(kind, 0)
                parts["peak"] = snapshot["Total"]
                if getattr(config, "lora", False) and getattr(config, "qlora", False):
                    parts = qlora_parameters(parts, model, world_size)
                results.append((tokens, parts))
            return results


def simulate_teacher_pass(config, tokens: int, world_size: int, cuda: bool, shard_group_size: int | None = None,
                          local_world_size: int | None = None, block_rows: int | None = None) -> float:
    """Rank 0's peak bytes in distillation's teacher pass (teacher.py), which runs before the student is built: the
    teacher (--teacher-model) built as teacher.load_teacher builds it (a student with every training option that
    changes nothing in a forward off: FSDP2-sharded fp32 masters, bf16 compute on CUDA), in eval mode, one forward
    of a row of `tokens` tokens, every next token's top-k taken (the chunked head of loss.py), no gradients, no
    optimizer, beside the device buffers of the table block it fills (block_table's (rows, k) int32 ids and float32
    log-probs; `block_rows` rows, by default a whole block of teacher.BLOCK_BYTES, the most a block holds). Needs a
    process without a process group; leaves it without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from transformers import AutoConfig

    from minitrain.training.adapter import FullFineTuning
    from minitrain.training.data import make_pack
    from minitrain.training.distributed import World
    from minitrain.training.model import device_mesh, shard_model
    from minitrain.training.objectives import SFT
    from minitrain.training.teacher import BLOCK_BYTES, bytes_per_token

    k = config.distill_top_k
    block_rows = BLOCK_BYTES // bytes_per_token(k) if block_rows is None else block_rows
    hf_config = AutoConfig.from_pretrained(config.teacher_model)
    as_student = replace(config, model_name_or_path=config.teacher_model, objective="sft", lora=False, qlora=False,
                         activation_checkpointing=False, activation_offload=False, compile=False,
                         sequence_parallel_size=1, use_liger_kernels=False, max_tokens_per_gpu=tokens)
    world = World(0, 0, world_size, local_world_size or min(world_size, 8), torch.device("cpu"))
    with fake_process_group(world_size):
        mesh = device_mesh(as_student.fsdp_sharding_strategy, world, shard_group_size, "cpu")
        model = simulated_model(as_student, hf_config, FullFineTuning(), cuda, world_size, 1)
        shard_model(model, as_student.fsdp_sharding_strategy, world, mesh, cuda)
        pack = make_pack(synthetic_cache(SFT(), tokens), np.array([0]))
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            model.eval()
            tracker = FSDPMemTracker(model)
            with tracker, quiet_module_tracking(), torch.no_grad():
                block = [torch.zeros((block_rows, k), dtype=dtype) for dtype in (torch.int32, torch.float32)]
                model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, cu_seq_lens=pack.cu_seq_lens,
                      max_length=pack.max_length, top_k=k)
                del block
            return float(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])


def with_teacher_pass(plan_: "Plan", config, world_size: int, cuda: bool, shard_group_size=None,
                      local_world_size=None) -> "Plan":
    """`plan_` with its estimate's teacher_pass_gib at the plan's row, for distillation with a teacher; else as is."""
    if getattr(config, "objective", "sft") != "distill" or not getattr(config, "teacher_model", None):
        return plan_
    if not (Path(config.teacher_model) / "config.json").is_file():
        return plan_  # nothing to simulate: the run stops at teacher.check_teacher, which says why
    try:
        peak = simulate_teacher_pass(config, plan_.max_tokens_per_gpu, world_size, cuda, shard_group_size,
                                     local_world_size)
    except EstimateError:
        raise
    except Exception as e:  # noqa: BLE001 (a teacher whose forward fake tensors cannot run: the step's plan stands)
        print(f"note: the memory estimate cannot simulate the teacher's pass ({' '.join(str(e).split())[:200]}); its "
              f"memory is not checked", flush=True)
        return plan_
    return replace(plan_, estimate=replace(plan_.estimate, teacher_pass_gib=peak / GIB))


def host_positions(objective, cache, indices) -> np.ndarray:
    """The trained positions of `cache`'s row as the objective packs it, on the host (a rank of a sequence-parallel
    group reads its share of them; fake tensors hold no values)."""
    pack = objective.pack(cache, indices)
    return getattr(pack, "pack", pack).positions.numpy()


def simulated_model(run, hf_config, adapter, cuda: bool, world_size: int, split: int):
    """The run's training module on the meta device, as on ranks > 0 of a run: built from the config, its attention
    the run's (split S ways by heads with sequence parallelism), adapted and checkpointed (model.assemble). Call with
    the fake process group initialized (a sequence-parallel group is one of its groups)."""
    import torch.distributed as dist

    from minitrain.training import attention, families, reward, sequence_parallel
    from minitrain.training.model import assemble

    problem = sequence_parallel.model_problem(hf_config, split, world_size)
    if problem is not None:
        raise EstimateError(problem)
    device = torch.device("cuda" if cuda else "cpu")
    attn = families.attention_implementation(families.causal_lm_class(hf_config), device, run.attn_implementation,
                                             hf_config)
    if attn in attention.WITH_BOUNDARIES:
        # flash-attn's kernels and PyTorch's varlen kernel keep O(T) memory alike; varlen_attn has a fake-tensor
        # implementation (and a name without "flash", which transformers would try to fetch from the hub)
        attn = attention.VARLEN
    with torch.device("meta"):
        auto, built_config = reward.model_class(run, hf_config)  # a reward model: the score head, no LM head
        lm = reward.from_config(auto, built_config, dtype=torch.float32, attn_implementation=attn)
    if split > 1:
        try:
            sequence_parallel.use_on(lm)
        except sequence_parallel.SequenceParallelError as e:
            raise EstimateError(str(e)) from None
    model = assemble(lm, run, adapter, hf_config)  # offload is simulated by offloaded_block_inputs
    if split > 1:  # rank 0's group: ranks 0 .. S-1 (a group of its own, never the run's cached groups)
        group = dist.new_group(list(range(split)))
        model.sequence_parallel = KnownRowSplit(split, 0, group, varlen=cuda)
    return model


@dataclass(frozen=True)
class KnownRowSplit(SequenceParallel):
    """Rank 0 of a sequence-parallel group on fake tensors, which hold no values to find its share of the row's
    trained positions in: the synthetic row's positions, known on the host (`trained`, set for each row)."""

    trained: np.ndarray | None = field(default=None, compare=False)

    def slice_of(self, positions, start: int, end: int) -> tuple[int, int]:
        first, last = np.searchsorted(self.trained, [start, end])
        return int(first), int(last)


@contextlib.contextmanager
def offloaded_block_inputs(model, offload: bool):
    """--activation-offload on fake tensors. In the run, transformers wraps each checkpointed block's checkpoint
    call in save_on_cpu: what the block saves for its recompute (its inputs: hidden states, RoPE's cos and sin)
    is copied to host memory and freed on the GPU, and copied back when the backward recomputes the block. The
    simulation's tensors all live on one fake device, so the same saved tensors are kept as their shapes only
    (host memory is not the GPU's) and allocated again when the backward unpacks them: the same saved-tensor
    hooks, around the same call (a block's forward hooks run outside its checkpoint)."""
    if not offload:
        yield
        return
    from minitrain.training.model import decoder_blocks

    def pack(tensor):
        return tensor.size(), tensor.stride(), tensor.dtype, tensor.device

    def unpack(saved):
        size, stride, dtype, device = saved
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    entered = []

    def enter(module, args, kwargs):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        hooks.__enter__()
        entered.append(hooks)

    def leave(module, args, kwargs, output):
        entered.pop().__exit__(None, None, None)

    handles = []
    for block in decoder_blocks(model.lm):
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def quiet_module_tracking():
    """torch's module tracker (under FSDPMemTracker) warns "The module hierarchy tracking maybe be messed up" when a
    module starts while one of the same name is still running (seen: modules named `Func` inside each block's
    attention). It files memory by module, which the estimate does not read (only the totals). The warning, printed
    before anything else, made a run that stops on a bad data row say two lines instead of one; torch also replaces
    warnings.formatwarning as it warns. FSDP2's "returned a view tensor" (OPT's blocks, on the fake tensors) is the
    real run's to give, if it reaches a step: a family the start-up probe refuses gave it before its one line. All
    are kept to this step."""
    import warnings

    formatwarning = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        try:
            yield
        finally:
            warnings.formatwarning = formatwarning


def create_optimizer_state(optimizer) -> None:
    """AdamW's state, as a run's first step leaves it for every later one: an optimizer step on zero gradients, then
    the gradients freed. Only the state persists from a run's first step to its second (the forward's and backward's
    buffers are freed by then), so a simulated step after this one is a run's second step, at the cost of an optimizer
    step rather than a whole training step (under fake tensors a step's cost is per operation, not per token)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step(model, objective, pack, cache, indices, optimizer) -> None:
    """One micro-step and the optimizer step, as train.py's loop runs them (its gradient clipping is left out: its
    buffers are a few bytes per parameter tensor)."""
    loss_sum, _ = objective.loss_sum(model, pack, cache, indices)
    loss_sum.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def qlora_parameters(parts: dict, model, world_size: int) -> dict:
    """QLoRA from LoRA's step: the frozen linear weights of the blocks move from fp32 shards to 4-bit copies whole
    on every rank (the gathered bf16 copies LoRA's step holds stand in for the ones QLoRA dequantizes)."""
    from minitrain.training.model import decoder_blocks

    frozen = sum(p.numel() for block in decoder_blocks(model.lm) for name, p in block.named_parameters()
                 if not p.requires_grad and p.ndim >= 2 and "base_layer" in name)
    change = frozen * QLORA_BYTES_PER_WEIGHT - frozen * 4 / world_size
    return {**parts, "parameters": parts["parameters"] + change, "peak": parts["peak"] + change}


def estimate(config, world_size: int, gpu_memory_gib: float | None, cuda: bool, make_optimizer,
             shard_group_size: int | None = None, local_world_size: int | None = None,
             slope: bool = True) -> Estimate:
    """The Estimate for `config` (its max_tokens_per_gpu, an int) on `world_size` GPUs of `gpu_memory_gib` each.
    With `slope`, a second row (twice as long) gives the cost of a token and so the longest row that fits."""
    tokens = int(config.max_tokens_per_gpu)
    rows = [tokens, 2 * tokens] if slope else [tokens]
    measured = simulate(config, rows, world_size, cuda, make_optimizer, shard_group_size, local_world_size)
    (t1, first), *rest = measured
    per_token = 0.0
    if rest:
        (t2, second), = rest
        per_token = max(0.0, (second["peak"] - first["peak"]) / (t2 - t1)) / GIB
    result = Estimate(
        peak_gib=first["peak"] / GIB, parts={k: first[k] / GIB for k in PARTS}, world_size=world_size,
        max_tokens_per_gpu=tokens, longest_row_that_fits=None, gpu_memory_gib=gpu_memory_gib,
        gib_per_token=per_token, strategy=config.fsdp_sharding_strategy,
        activation_checkpointing=bool(config.activation_checkpointing),
        adapter="qlora" if config.lora and config.qlora else "lora" if config.lora else "full",
        objective=config.objective, sequence_parallel_size=max(1, getattr(config, "sequence_parallel_size", 1)),
        activation_offload=bool(getattr(config, "activation_offload", False) and config.activation_checkpointing
                                and cuda),
    )
    if gpu_memory_gib is not None and rest:
        result.longest_row_that_fits = checked_longest_row(result, config, (t2, second["peak"] / GIB), world_size,
                                                           cuda, make_optimizer, shard_group_size, local_world_size)
        result.longest_row_checked = True
    return result


def checked_longest_row(result: Estimate, config, measured: tuple[int, float], world_size: int, cuda: bool,
                        make_optimizer, shard_group_size, local_world_size) -> int | None:
    """The longest row that fits, every answer simulated: the peak is affine in the row only within one phase of the
    step (a short row's peak may be the optimizer step's, which no row changes, so two short rows can give too low a
    cost per token, or none). From the two rows measured, a candidate is extrapolated (or, with no measurable cost, a
    row 8 times longer is tried), simulated, and the next candidate interpolated between the longest row that fit and
    the shortest that did not (at most 3 more simulations); a candidate next to a row that did not fit is moved one
    step (1/50) below it, so a budget just under a simulated row does not end the search at a much shorter row.
    Returns the longest simulated row that fit, or None."""
    budget = result.gpu_memory_gib
    known = sorted([(result.max_tokens_per_gpu, result.peak_gib), measured])

    def towards_budget(a, b) -> int | None:  # the secant through two (tokens, GiB) points, where it meets the budget
        slope = (b[1] - a[1]) / (b[0] - a[0])
        if slope <= 0:
            return None
        return int(a[0] + (budget - a[1]) / slope) // ROW_MULTIPLE * ROW_MULTIPLE

    def next_candidate() -> int | None:
        fitting = [k for k in known if k[1] <= budget]
        failing = [k for k in known if k[1] > budget]
        if fitting and failing:
            return towards_budget(fitting[-1], failing[0])
        if fitting:  # everything fits: further out along the last two points, or 8x out where they are level
            return towards_budget(known[-2], known[-1]) or 8 * known[-1][0]
        return towards_budget(known[0], known[1])  # nothing fits: below the shortest

    def near(candidate: int) -> list:  # the simulated rows too close to `candidate` to tell apart
        return [(t, peak) for t, peak in known if abs(candidate - t) < max(ROW_MULTIPLE, t // 50)]

    for _ in range(3):
        candidate = next_candidate()
        if candidate is not None and near(candidate) and any(peak > budget for _, peak in near(candidate)):
            # next to a row that did not fit (the budget sits just under it): one step below that row instead
            failed = min(t for t, peak in near(candidate) if peak > budget)
            candidate = (failed - max(ROW_MULTIPLE, failed // 50)) // ROW_MULTIPLE * ROW_MULTIPLE
        if candidate is None or candidate < 1 or near(candidate):
            break
        # the run at that row (its --max-tokens-per-gpu too: KTO's step reads it), as plan() then estimates it
        (tokens, stats), = simulate(replace(config, max_tokens_per_gpu=candidate), [candidate], world_size, cuda,
                                    make_optimizer, shard_group_size, local_world_size)
        known = sorted([*known, (tokens, stats["peak"] / GIB)])
    fitting = [t for t, peak in known if peak <= budget]
    return fitting[-1] if fitting else None


def fixes(config, estimate_now: Estimate, cuda: bool, make_optimizer, shard_group_size=None,
          local_world_size=None) -> list[tuple[str, Estimate]]:
    """What would make a run that does not fit fit, each with its own estimate: FULL_SHARD, activation
    checkpointing, a shorter row, activation offload (CUDA), LoRA, twice the GPUs (the changes this run has not made
    already)."""
    G, N = estimate_now.gpu_memory_gib, estimate_now.world_size
    tried = []
    if config.fsdp_sharding_strategy != "FULL_SHARD":
        tried.append(("--fsdp-sharding-strategy FULL_SHARD", replace(config, fsdp_sharding_strategy="FULL_SHARD"), N))
    if not config.activation_checkpointing:
        tried.append(("--activation-checkpointing", replace(config, activation_checkpointing=True), N))
    if cuda and config.activation_checkpointing and not getattr(config, "activation_offload", False):
        tried.append(("--activation-offload", replace(config, activation_offload=True), N))
    if not config.lora:
        tried.append(("--lora", replace(config, lora=True), N))
    tried.append((f"{2 * N} GPUs", config, 2 * N))
    found = []
    for label, changed, world_size in tried:
        try:
            found.append((label, estimate(changed, world_size, G, cuda, make_optimizer, shard_group_size,
                                          local_world_size, slope=False)))
        except Exception:  # noqa: BLE001 (a fix this model cannot take, e.g. peft's LoRA on fused MoE experts with
            continue  # dropout: not offered; the estimate of the run as asked stands)
    longest = estimate_now.longest_row_that_fits
    if longest:
        shorter = replace(estimate_now, max_tokens_per_gpu=longest,
                          peak_gib=estimate_now.peak_gib - (estimate_now.max_tokens_per_gpu - longest)
                          * estimate_now.gib_per_token)
        found.insert(0, (f"--max-tokens-per-gpu {longest}", shorter))
    return found


def fixes_line(found: list[tuple[str, Estimate]]) -> str:
    return "; ".join(f"{label}: {e.peak_gib:.1f} GiB{'' if e.fits else ' (still too much)'}" for label, e in found)


# ----------------------------------------------------------------------------------------------------------------
# In a process of its own


def run_isolated(function, *args):
    """function(*args) in a fresh (spawned) process: the fake process group and fake tensors never meet the run's
    own process group. `function` must be importable (a module-level function), its result picklable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def device_memory_gib(device: torch.device, local_world_size: int) -> float:
    """What one rank may use: its GPU's total memory, or on CPU the machine's available memory shared by its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    from minitrain.training.distributed import available_host_memory

    return available_host_memory() / local_world_size / GIB


# ----------------------------------------------------------------------------------------------------------------
# What a run decides from the estimate

AUTO_PROBE_TOKENS = 4096  # --max-tokens-per-gpu auto: the row the cost of a token is measured from


@dataclass
class Plan:
    """A run's memory decisions: activation checkpointing and the token budget (each with why), the estimate at
    them, and, when it does not fit, the changes that would (each with its estimate)."""

    estimate: Estimate
    activation_checkpointing: bool
    checkpointing_why: str
    max_tokens_per_gpu: int
    tokens_why: str
    fixes: list


def plan(config, world_size: int, gpu_memory_gib: float, cuda: bool, make_optimizer,
         shard_group_size: int | None = None, local_world_size: int | None = None, with_fixes: bool = True) -> Plan:
    """Resolve `config`'s activation_checkpointing None (auto) and max_tokens_per_gpu "auto" from the estimate:

    - checkpointing auto: off when the step's peak with it off (weights, gradients, optimizer state, activations,
      buffers) fits (1 - MARGIN) of the device's memory (with auto tokens: fits a row of AUTO_PROBE_TOKENS); else on
    - tokens auto: the longest row whose estimated peak fits (1 - MARGIN) of the device's memory
    """
    G = gpu_memory_gib
    budget = G * (1 - MARGIN)
    auto_tokens = config.max_tokens_per_gpu == "auto"
    row = AUTO_PROBE_TOKENS if auto_tokens else int(config.max_tokens_per_gpu)

    def at(tokens: int, checkpointing: bool, slope: bool = True) -> Estimate:
        changed = replace(config, max_tokens_per_gpu=tokens, activation_checkpointing=checkpointing)
        # auto tokens: the longest row is searched below, against the budget; estimate's own search (against the
        # whole memory, up to 3 simulations of the longest rows) would be thrown away
        return replace(estimate(changed, world_size, None if auto_tokens else G, cuda, make_optimizer,
                                shard_group_size, local_world_size, slope), gpu_memory_gib=G)

    checkpointing, why = config.activation_checkpointing, "asked for"
    if checkpointing is None:
        off = at(row, False, slope=auto_tokens)  # the peak at the asked row decides; no need for a token's cost
        fits_off = (off.longest_row(budget) or 0) >= row if auto_tokens else off.peak_gib <= budget
        if fits_off:
            result, checkpointing = off, False
            why = f"auto: off, the estimate fits ({off.peak_gib:.1f} GiB at {row} tokens, of {G:.1f} GiB)"
        else:
            result, checkpointing = at(row, True), True
            why = (f"auto: on, the estimate with it off is {off.peak_gib:.1f} GiB at {row} tokens, more than "
                   f"{1 - MARGIN:.0%} of {G:.1f} GiB; with it on {result.peak_gib:.1f} GiB")
    else:
        result = at(row, checkpointing)
    tokens, tokens_why = row, "asked for"
    if auto_tokens:  # checked by simulation, as --estimate-memory's longest row is
        t = result.max_tokens_per_gpu
        longest = checked_longest_row(replace(result, gpu_memory_gib=budget),
                                      replace(config, max_tokens_per_gpu=t, activation_checkpointing=checkpointing),
                                      (2 * t, result.peak_gib + t * result.gib_per_token), world_size, cuda,
                                      make_optimizer, shard_group_size, local_world_size)
        if longest is None:
            raise EstimateError(f"--max-tokens-per-gpu auto: not even one token fits {1 - MARGIN:.0%} of {G:.1f} GiB "
                                f"(estimate {result.peak_gib:.1f} GiB at {row} tokens); "
                                + fixes_line(fixes(replace(config, max_tokens_per_gpu=row,
                                                           activation_checkpointing=checkpointing), result, cuda,
                                                   make_optimizer, shard_group_size, local_world_size)))
        # the estimate at the row found, which the search simulated (read back). Not searched again for the longest
        # row against the whole memory (a row twice as long, the longest simulation of all, and up to 3 more):
        # --estimate-memory does that for its report, a run does not need it
        tokens = longest
        result = at(tokens, checkpointing, slope=False)
        tokens_why = (f"auto: the longest row whose estimate fits {1 - MARGIN:.0%} of {G:.1f} GiB "
                      f"({MARGIN:.0%} kept free for what the estimate does not see)")
    found = []
    if with_fixes and not result.fits:
        run = replace(config, max_tokens_per_gpu=tokens, activation_checkpointing=checkpointing)
        found = fixes(run, result, cuda, make_optimizer, shard_group_size, local_world_size)
    return Plan(result, checkpointing, why, tokens, tokens_why, found)


def does_not_fit(plan_: Plan) -> str:
    """The one line a run whose step will not fit stops with."""
    e = plan_.estimate
    return (f"this run will not fit: estimated peak {e.peak_gib:.1f} GiB per GPU ({e.strategy}, activation "
            f"checkpointing {'on' if e.activation_checkpointing else 'off'}, {e.max_tokens_per_gpu} tokens per GPU, "
            f"{e.adapter}, {e.world_size} GPUs) > the device's {e.gpu_memory_gib:.1f} GiB; would fit or help: "
            f"{fixes_line(plan_.fixes)}")


def teacher_pass_warning(plan_: Plan) -> str:
    """The one line for a run whose step fits but whose teacher pass does not. A warning, not a refusal: the pass
    runs only when the teacher's table is not on disk yet (a resumed run, or another alpha or temperature on the same
    data, reads it), which the plan, made before the data is read, cannot tell."""
    e = plan_.estimate
    return (f"the teacher's top-k pass (run before training when its table is not on disk yet) needs an estimated "
            f"{e.teacher_pass_gib:.2f} GiB per GPU ({e.strategy}, {e.max_tokens_per_gpu} tokens per GPU, "
            f"{e.world_size} GPUs) > the device's {e.gpu_memory_gib:g} GiB (its fp32 weights are sharded over the "
            f"GPUs; its activations and logits grow with the row); would fit or help: "
            + "; ".join(f"{label}: {f.teacher_pass_gib:.2f} GiB"
                        f"{'' if f.teacher_pass_gib <= e.gpu_memory_gib else ' (still too much)'}"
                        for label, f in plan_.fixes))


# ----------------------------------------------------------------------------------------------------------------
# What train.py asks: the plan of a run before any weight loads, and --estimate-memory


def plan_run(config, world_size: int, local_world_size: int, gpu_memory_gib: float, cuda: bool) -> Plan:
    """plan() with the run's optimizer, and distillation's teacher pass; module-level so that it can run in a process
    of its own."""
    group = config.fsdp_shard_group_size
    found = plan(config, world_size, gpu_memory_gib, cuda, run_optimizer(config), group, local_world_size)
    return teacher_pass_fixes(with_teacher_pass(found, config, world_size, cuda, group, local_world_size), config,
                              cuda, group, local_world_size)


def teacher_pass_fixes(plan_: Plan, config, cuda: bool, shard_group_size=None, local_world_size=None) -> Plan:
    """A plan whose step fits but whose teacher pass does not, with what would help, each with the teacher pass's
    estimate there: half the row (its activations and logits), twice the GPUs (its weights' shards)."""
    e = plan_.estimate
    if e.fits or not e.step_fits:
        return plan_
    found = []
    for label, tokens, world_size in ((f"--max-tokens-per-gpu {e.max_tokens_per_gpu // 2}", e.max_tokens_per_gpu // 2,
                                       e.world_size), (f"{2 * e.world_size} GPUs", e.max_tokens_per_gpu,
                                                       2 * e.world_size)):
        if tokens < 1:
            continue
        peak = simulate_teacher_pass(config, tokens, world_size, cuda, shard_group_size, local_world_size)
        found.append((label, replace(e, max_tokens_per_gpu=tokens, world_size=world_size, teacher_pass_gib=peak / GIB)))
    return replace(plan_, fixes=found)


def plan_for_run(config, world, hf_config) -> str:
    """Before any weight loads: on CUDA, or when activation checkpointing or --max-tokens-per-gpu is auto, estimate a
    step's peak memory per device; set the auto values in `config` (so they are printed and saved); on CUDA, stop a
    run that will not fit, in one line with the fixes. Returns why checkpointing is on or off.

    Under torchrun rank 0 alone decides (decide_for_run, with rank 0's memory figure: its GPU, or its node's available
    memory shared by the node's ranks, and rank 0's view of the resume point) and every rank applies its values
    (distributed.decided_on_rank0): ranks that read different memory figures would otherwise pack different rows and
    disagree in the collectives, and one estimate process runs per job, not one per rank. If rank 0's plan fails,
    every rank stops with its one line."""
    from minitrain.training.config import ConfigError
    from minitrain.training.distributed import decided_on_rank0

    decided = decided_on_rank0(lambda: decide_for_run(config, world, hf_config), ConfigError)
    config.activation_checkpointing, config.max_tokens_per_gpu, why = decided
    return why


def decide_for_run(config, world, hf_config) -> tuple:
    """plan_for_run's decision on this rank, printed here: (activation checkpointing, max tokens per GPU, why
    checkpointing is on or off); `config` is left as it is. Raises ConfigError for a run that cannot go on."""
    from minitrain.training import checkpoint
    from minitrain.training.config import ConfigError
    from minitrain.training.distributed import print0
    from minitrain.training.model import checkpointing_needed

    config = replace(config)  # the decision is returned, applied by every rank
    auto_tokens = config.max_tokens_per_gpu == "auto"
    if auto_tokens:  # a resumed run keeps the budget its checkpoint was trained with
        resume = checkpoint.find_resume_point(config.output_dir, config.resume_from, config.fresh)
        saved = checkpoint.read_json(resume / "training_config.json") if resume is not None else {}
        if isinstance(saved.get("max_tokens_per_gpu"), int):
            config.max_tokens_per_gpu = saved["max_tokens_per_gpu"]
            print0(f"--max-tokens-per-gpu auto: {config.max_tokens_per_gpu}, as saved in {resume}")
            auto_tokens = False
    cuda = world.device.type == "cuda"
    if not (cuda or auto_tokens or config.activation_checkpointing is None):
        return config.activation_checkpointing, config.max_tokens_per_gpu, "asked for"
    if hf_config.is_encoder_decoder:  # the estimator covers causal LMs
        if auto_tokens:
            raise ConfigError(f"--max-tokens-per-gpu auto: the memory estimate covers causal LMs, not "
                              f"{hf_config.model_type}; give a number")
        why = "asked for"
        if config.activation_checkpointing is None:
            config.activation_checkpointing, why = checkpointing_needed(hf_config, config.max_tokens_per_gpu, world)
        return config.activation_checkpointing, config.max_tokens_per_gpu, why
    gib = device_memory_gib(world.device, world.local_world_size)
    args = (config, world.world_size, world.local_world_size, gib, cuda)
    try:  # the estimate's fake process group must be alone in its process: under torchrun, a process of its own
        found = run_isolated(plan_run, *args) if torch.distributed.is_initialized() else plan_run(*args)
    except EstimateError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 (a model whose step fake tensors cannot run: e.g. MoE grouped_mm on CPU)
        why = cannot_simulate(hf_config.model_type, e)
        if auto_tokens:
            raise ConfigError(f"--max-tokens-per-gpu auto: {why}; give a number") from None
        print0(f"note: {why}; the run goes on without it")
        checkpointing_why = "asked for"
        if config.activation_checkpointing is None:
            config.activation_checkpointing, checkpointing_why = checkpointing_needed(
                hf_config, config.max_tokens_per_gpu, world)
        return config.activation_checkpointing, config.max_tokens_per_gpu, checkpointing_why
    config.activation_checkpointing, config.max_tokens_per_gpu = found.activation_checkpointing, found.max_tokens_per_gpu
    print0(found.estimate.describe())
    if auto_tokens:
        print0(f"--max-tokens-per-gpu {config.max_tokens_per_gpu} ({found.tokens_why})")
    if cuda and not found.estimate.step_fits:
        raise ConfigError(does_not_fit(found))
    if cuda and not found.estimate.fits:
        print0(f"warning: {teacher_pass_warning(found)}")
    return config.activation_checkpointing, config.max_tokens_per_gpu, found.checkpointing_why


def cannot_simulate(model_type: str, error: Exception) -> str:
    """The one-line reason a simulation failed (a run goes on without it; --estimate-memory stops)."""
    reason = " ".join(str(error).split())[:200]
    return f"the memory estimate cannot simulate {model_type} ({type(error).__name__}: {reason})"


def estimate_main(config) -> int:
    """--estimate-memory: the run's peak memory per GPU on --world-size GPUs of --gpu-memory-gib, its parts and the
    longest row that fits; the last line is JSON."""
    import time

    from minitrain.training.config import (
        ConfigError,
        model_path_problems,
        objective_problems,
        sequence_parallel_problems,
        shard_group_problems,
    )
    from minitrain.training.distributed import world_from_env
    from minitrain.training.model import SHARDING_STRATEGIES

    problems = model_path_problems(config.model_name_or_path)
    cuda = config.estimate_device == "cuda"
    if config.world_size is not None and config.world_size < 1:
        problems.append(f"--world-size must be at least 1, got {config.world_size}")
    if config.gpu_memory_gib is not None and not config.gpu_memory_gib > 0:
        problems.append(f"--gpu-memory-gib must be positive, got {config.gpu_memory_gib}")
    if isinstance(config.max_tokens_per_gpu, int) and config.max_tokens_per_gpu < 1:
        problems.append(f"--max-tokens-per-gpu must be positive (or auto), got {config.max_tokens_per_gpu}")
    world_size = max(config.world_size or world_from_env()[2], 1)
    gib = config.gpu_memory_gib
    if gib is None and cuda and torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GIB
    if gib is None and config.max_tokens_per_gpu == "auto":
        problems.append("--max-tokens-per-gpu auto needs --gpu-memory-gib (no GPU here to read it from)")
    if config.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
        problems.append(f"--fsdp-sharding-strategy {config.fsdp_sharding_strategy!r} is unknown; use one of "
                        f"{', '.join(SHARDING_STRATEGIES)}")
    problems += shard_group_problems(config, world_size, min(world_size, 8), nodes_assumed=True)
    problems += sequence_parallel_problems(config, world_size) + objective_problems(config)
    if config.max_tokens_per_gpu is None:
        problems.append("--max-tokens-per-gpu: give the row length to estimate (or auto)")
    if config.lora and not problems:  # what peft refuses, with its fix, before a simulation fails on it
        from minitrain.training import lora

        problems += lora.module_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    started = time.perf_counter()
    group, local = config.fsdp_shard_group_size, min(world_size, 8)
    try:
        if gib is None:  # no verdict: the estimate at the asked row, and the cost of a token
            run = replace(config, activation_checkpointing=bool(config.activation_checkpointing))
            result = estimate(run, world_size, None, cuda, run_optimizer(config), group, local)
            found = with_teacher_pass(Plan(result, result.activation_checkpointing, "asked for",
                                           result.max_tokens_per_gpu, "asked for", []), config, world_size, cuda,
                                      group, local)
        else:
            found = plan_run(config, world_size, local, gib, cuda)
            if found.estimate.longest_row_that_fits is None and found.estimate.fits:  # decided from one row: the
                run = replace(config, max_tokens_per_gpu=found.max_tokens_per_gpu,  # longest row needs the cost
                              activation_checkpointing=found.activation_checkpointing)  # of a token too
                found = replace(found, estimate=replace(
                    estimate(run, world_size, gib, cuda, run_optimizer(config), group, local),
                    teacher_pass_gib=found.estimate.teacher_pass_gib))
    except EstimateError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 (a step fake tensors cannot run here: Gemma-2's flex attention on CPU, ...)
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(config.model_name_or_path).model_type
        raise ConfigError(f"--estimate-memory: {cannot_simulate(model_type, e)}; size the run yourself "
                          f"(--max-tokens-per-gpu N, --activation-checkpointing or --no-activation-checkpointing)"
                          ) from None
    print(f"activation checkpointing: {'on' if found.activation_checkpointing else 'off'} ({found.checkpointing_why})")
    print(f"--max-tokens-per-gpu {found.max_tokens_per_gpu} ({found.tokens_why})")
    print(found.estimate.describe())
    if found.fixes:
        print(does_not_fit(found) if not found.estimate.step_fits else teacher_pass_warning(found))
    print(f"(estimated in {time.perf_counter() - started:.0f} s on fake tensors, {world_size} fake ranks)")
    print(found.estimate.json_line(), flush=True)
    return 0
