"""LoRA, the second model adapter (model.py's seam): low-rank adapters train, the base weights stay frozen.

    --lora [--lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-target-modules all-linear
            --lora-modules-to-save lm_head --lora-init default --lora-export both]

Built with `peft` (its public API: LoraConfig, get_peft_model, PeftModel, get/set_peft_model_state_dict), which
covers everything here under FSDP2, so there is no LoRA layer of our own:

- apply: `get_peft_model` injects the LoRA layers into the Hugging Face model in place, before sharding (on the meta
  device on ranks > 0), so FSDP2 shards each block's base weights and adapters together. The PeftModel wrapper is
  dropped: PackedCausalLM runs the injected model's decoder directly, as for full fine-tuning. The adapters'
  initial values depend only on --seed (a forked RNG), so 1 process and rank 0 of N (whose copy is broadcast into
  the shards) start from the same adapters.
- reward models (--objective reward): peft's task SEQ_CLS, which puts the `score` head in modules_to_save, so the new
  head trains in full (a copy; the original stays frozen) and both exports carry it.
- trainable parameters: the adapters (and --lora-modules-to-save's copies); everything else has requires_grad off,
  so it gets no gradient and no optimizer state, and the full-state checkpoint holds only what trains.
- export_state (collective): the full tensor of every trainable parameter, gathered from its shards on every
  world size, on rank 0. No base weight travels: they are the frozen weights of --model-name-or-path.
- write_export (rank 0): hf_format/samples_<N>/ holds, per --lora-export,
      adapter/   PEFT's adapter folder (adapter_config.json + adapter_model.safetensors), written by
                 PeftModel.save_pretrained on a meta-device twin of the model: `PeftModel.from_pretrained(base,
                 folder)` loads it, and so do the servers that read PEFT's format
      the merged model (config.json, model.safetensors): the base reloaded from --model-name-or-path, the
                 adapters set into it with set_peft_model_state_dict and folded in with merge_and_unload in fp32,
                 then cast to --save-dtype; `AutoModelForCausalLM.from_pretrained(samples_<N>)` (or
                 AutoModelForSeq2SeqLM for T5, BART, ..., AutoModelForSequenceClassification for a reward model)
                 loads it
      plus the tokenizer and the run's flags, as for full fine-tuning.

--qlora (CUDA only) puts the base's linear layers in 4-bit NF4 first: class QLoRA below.

Only --lora-init values that leave the base weights untouched are offered (PiSSA, OLoRA, ... rewrite them, and the
adapter folder would then need a modified base to serve).
"""

import copy
import importlib.util
import logging
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from minitrain import atomic
from minitrain.training import reward
from minitrain.training.adapter import FullFineTuning
from minitrain.training.distributed import World, raise_if_any_rank_failed, reshard
from minitrain.training.export import tied_duplicates, write_hf_files, write_hf_folder_sharded
from minitrain.training.families import ModelError, decoder_blocks

ALL_LINEAR = "all-linear"
# The parts of a name that peft inserts around a base module (loading.py maps them back to the file's names).
ADAPTER_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
PEFT_WRAPPERS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")
EXPORTS = ("adapter", "merged", "both")
# --lora-init -> peft's init_lora_weights. `default` and `gaussian` start B at zero, so step 0 is the base model
# exactly; `random` starts B random too (step 0 differs; for tests of gradients through both factors).
INITS = {"default": True, "gaussian": "gaussian", "random": False}
ADAPTER_DIR = "adapter"

class _NoCpuKernelFetch(logging.Filter):
    """peft imports bitsandbytes wherever it is installed, so every --lora run loads it; on a CPU with AVX512-BF16 its
    import tries to load a CPU inference kernel from the Hugging Face hub (0.49: refused before any download, as no
    version is named; 0.50 would download it, and is refused: bitsandbytes_problem) and logs a warning when it cannot.
    minitrain never runs that kernel (QLoRA.apply keeps the standard layout), so the warning says nothing about this
    run: it is dropped, and every other bitsandbytes message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoCpuKernelFetch())

LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "lora_target_modules": None,
                 "lora_modules_to_save": None, "lora_init": "default", "lora_export": "both", "qlora": False}


def build_adapter(config):
    """The model adapter the flags ask for: QLoRA with --lora --qlora, LoRA with --lora, else full fine-tuning."""
    if not config.lora:
        return FullFineTuning()
    return QLoRA(config) if config.qlora else LoRA(config)


def listed(names: list[str] | None) -> list[str]:
    """Module names from the command line: space- and/or comma-separated."""
    return [n for item in names or [] for n in item.split(",") if n]


def task_type(config, hf_config) -> str:
    """peft's task type of the run: SEQ_CLS for a reward model (peft then adds the new `score` head to
    modules_to_save: a trained copy beside the frozen original, saved in the adapter folder and swapped in on merge),
    SEQ_2_SEQ_LM for an encoder-decoder, CAUSAL_LM otherwise."""
    if getattr(config, "objective", "sft") == "reward":
        return "SEQ_CLS"
    return "SEQ_2_SEQ_LM" if getattr(hf_config, "is_encoder_decoder", False) else "CAUSAL_LM"


def lora_config(config):
    from peft import LoraConfig
    from transformers import AutoConfig

    targets = listed(config.lora_target_modules) or [ALL_LINEAR]
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        modules_to_save=listed(config.lora_modules_to_save) or None,
        init_lora_weights=INITS[config.lora_init],
        task_type=task_type(config, AutoConfig.from_pretrained(config.model_name_or_path)),
        base_model_name_or_path=str(config.model_name_or_path),
    )


def inject(lm: nn.Module, peft_config, seed: int):
    """get_peft_model on `lm` (changed in place); the adapters' random init depends on `seed` only. Returns the
    PeftModel wrapper (callers that train keep only `lm`)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft 0.21 asks transformers 5 a deprecated question (is_gradient_checkpointing); nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(lm, copy.deepcopy(peft_config))  # peft resolves all-linear into the config it gets


class LoRA(FullFineTuning):
    """Adapters train (peft's LoRA layers), the base stays frozen; an export is PEFT's adapter folder and/or the
    merged model. Loading, sharding and trainable_parameters (what requires grad) are full fine-tuning's."""

    name = "lora"
    checkpoint_holds_weights = False  # the adapters only: a resume reads the frozen base from the model folder

    def __init__(self, config):
        self.config = config
        self.peft_config = lora_config(config)

    def apply(self, lm: nn.Module) -> nn.Module:
        inject(lm, self.peft_config, self.config.seed)
        return lm

    def file_key(self, name: str) -> str:
        """The base model's name for a tensor of the injected one: `q_proj.base_layer.weight` and a modules-to-save
        copy's `lm_head.modules_to_save.default.weight` are the file's `q_proj.weight` and `lm_head.weight`; the
        adapters keep their own names, which no base file holds (loading.py takes them from its skeleton)."""
        return PEFT_WRAPPERS.sub("", name)

    @contextmanager
    def reference_mode(self, model: nn.Module):
        """The base model: every adapter (and every modules-to-save copy) switched off through peft's layer API,
        for DPO's reference log-probs (reference.py)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save copies

        layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        trainable = self.trainable_parameters(model)
        for layer in layers:
            layer.enable_adapters(False)  # peft also sets requires_grad off on the adapters
        try:
            yield
        finally:
            # Under FSDP2 a forward can leave the modules holding their gathered parameters, and peft would switch
            # requires_grad back on for those, not for the shards that train: reshard first, then restore the flags.
            reshard(model)
            for layer in layers:
                layer.enable_adapters(True)
            for param in trainable:
                param.requires_grad_(True)

    def export_state(self, model, world: World) -> dict | None:
        """Collective: {name in the Hugging Face model: full tensor} of every trainable parameter, on rank 0 (CPU);
        None elsewhere. Each DTensor's shards are gathered (full_tensor) in the same order on every rank."""
        return self.export_state_of(model.lm, world)

    def export_state_of(self, lm, world: World) -> dict | None:
        from torch.distributed.tensor import DTensor

        state = {}
        for name, param in lm.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                if world.is_main:
                    state[name] = full.detach().cpu().clone()
        return state if world.is_main else None

    def write_export(self, lm, state: dict, tokenizer, dtype: torch.dtype, config: dict, final: Path) -> None:
        """Rank 0: samples_<N>/ with the adapter folder and/or the merged model (see the module docstring),
        written atomically. Any failure is an OSError, which save_export reports on every rank (none waits)."""

        kind = self.config.lora_export
        with atomic.atomic_folder(final) as tmp:
            try:
                if kind in ("adapter", "both"):
                    self.write_adapter_folder(state, dtype, tmp / ADAPTER_DIR)
                if kind in ("merged", "both"):
                    merged = self.merged_model(state, lm)
                    write_hf_files(merged, merged.state_dict(), tokenizer, dtype, config, tmp)
                else:
                    tokenizer.save_pretrained(tmp)
                    atomic.write_json(tmp / "training_config.json", config)
            except (ValueError, RuntimeError, KeyError) as e:  # from peft or transformers
                raise OSError(f"peft/transformers: {' '.join(str(e).split())[:300]}") from e

    def export_tensors(self, lm: nn.Module) -> dict:
        """The merged model shard by shard: each adapted weight's shard plus its rows of scaling * B @ A (peft's
        get_delta_weight on the DTensors: B's rows are sharded as the weight's, A is gathered whole, r x in), in
        fp32; modules-to-save hold their trained copies; no adapter tensor is in it. Named as the base's files."""
        from peft.tuners.lora import LoraLayer

        deltas = {}
        for name, module in lm.named_modules():
            if isinstance(module, LoraLayer):
                for adapter_name in module.active_adapters:
                    delta = module.get_delta_weight(adapter_name)
                    key = f"{name}.base_layer.weight"
                    deltas[key] = delta if key not in deltas else deltas[key] + delta
        tied = tied_duplicates(lm)
        tensors = {}
        for name, tensor in lm.state_dict().items():
            if name in tied or ".original_module." in name or ADAPTER_TENSOR.search(name):
                continue
            tensors[self.file_key(name)] = tensor + deltas[name] if name in deltas else tensor
        return tensors

    def write_export_sharded(self, lm, tokenizer, dtype: torch.dtype, config: dict, final: Path, world: World) -> None:
        """Collective: samples_<N>/ as write_export writes it, the merged model written by every rank's shards; the
        adapter folder (small) gathered on rank 0."""
        kind = self.config.lora_export
        adapter_state = self.export_state_of(lm, world) if kind in ("adapter", "both") else None
        extra = None if adapter_state is None else (
            lambda folder: self.write_adapter_folder(adapter_state, dtype, folder / ADAPTER_DIR))
        if kind == "adapter":
            error = None
            if world.is_main:
                try:
                    with atomic.atomic_folder(final) as tmp:
                        extra(tmp)
                        tokenizer.save_pretrained(tmp)
                        atomic.write_json(tmp / "training_config.json", config)
                except (OSError, ValueError, RuntimeError) as e:
                    error = OSError(" ".join(str(e).split())[:300])
            raise_if_any_rank_failed(error, OSError, f"cannot write {final}")
            return
        try:
            tensors = self.export_tensors(lm)
        except (ValueError, RuntimeError, KeyError) as e:  # from peft
            raise OSError(f"peft: {' '.join(str(e).split())[:300]}") from e
        write_hf_folder_sharded(lm, tensors, tokenizer, dtype, config, final, world, rank0_extra=extra)

    def peft_twin(self, device: str):
        """A PeftModel with this run's LoRA layout on `device`: "meta" (no memory: a writer of adapter folders) or
        "cpu" (the base weights loaded from --model-name-or-path, fp32). A reward model's score head is new there:
        initialised on a forked RNG (an export draws nothing from the run's stream), its trained copy replaces it, and
        transformers' load report (which the run's own load printed at the start) is not repeated at every export."""
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        path = self.config.model_name_or_path
        auto, hf_config = reward.model_class(self.config, AutoConfig.from_pretrained(path))
        if device == "meta":
            with torch.device("meta"):
                base = reward.from_config(auto, hf_config, dtype=torch.float32)
        else:
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                with torch.random.fork_rng(devices=[]):
                    base = auto.from_pretrained(path, config=hf_config, dtype=torch.float32)
            finally:
                hf_logging.set_verbosity(verbosity)
        return inject(base, self.peft_config, self.config.seed)

    def write_adapter_folder(self, state: dict, dtype: torch.dtype, folder: Path) -> None:
        # PeftModel's own names are "base_model.model." + the Hugging Face model's; save_pretrained maps them to
        # PEFT's file format (adapter name dropped) and writes adapter_config.json.
        peft_state = {f"base_model.model.{k}": v.to(dtype) for k, v in state.items()}
        self.peft_twin("meta").save_pretrained(folder, state_dict=peft_state, save_embedding_layers=False)

    def merged_model(self, state: dict, lm: nn.Module) -> nn.Module:
        """The base from --model-name-or-path with the adapters (fp32) folded in: a plain Hugging Face model."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        twin = self.peft_twin("cpu")
        self.set_base_weights(twin.base_model.model, lm)
        peft_state = get_peft_model_state_dict(
            twin, state_dict={f"base_model.model.{k}": v for k, v in state.items()}, save_embedding_layers=False
        )
        loaded = set_peft_model_state_dict(twin, peft_state)
        if loaded.unexpected_keys:
            raise RuntimeError(f"adapter weights without a place in the model: {loaded.unexpected_keys[:3]}")
        return twin.merge_and_unload()

    def set_base_weights(self, twin: nn.Module, lm: nn.Module) -> None:
        """The twin's frozen base weights are --model-name-or-path's, as the live model's are: nothing to set."""


class QLoRA(LoRA):
    """LoRA on 4-bit base weights (--qlora): transformers' bitsandbytes integration quantizes every linear layer but
    the LM head to NF4 with double quantization as it loads (QLoRA's recipe), on every rank's own device; peft's LoRA
    layers wrap the 4-bit layers. Offered on CUDA only (train.validate); the CPU backend of bitsandbytes runs the
    same code in the tests.

    - sharding: the 4-bit weights (bitsandbytes' Params4bit, which carry their quantization state) stay whole on every
      rank (fully_shard's ignored_params); FSDP2 shards the rest (embeddings, norms, LM head, adapters) as for LoRA.
      No broadcast from rank 0: every rank loads and quantizes the same file the same way.
    - compute: bf16 on CUDA (bnb_4bit_compute_dtype, and the storage dtype), fp32 on CPU.
    - exports: the adapter folder as for LoRA (it applies to the base checkpoint, 4-bit or not); the merged model is
      the live model's function: its linear layers hold the live model's dequantized 4-bit weights (not the original
      ones) with the adapters folded in, in fp32, cast to --save-dtype.
    """

    name = "qlora"
    loads_on_every_rank = True
    base_weights = "the base's linear layers in 4-bit NF4 (bitsandbytes), whole on every rank"

    def load_arguments(self, device: torch.device) -> dict:
        from transformers import BitsAndBytesConfig

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
        )
        return {"quantization_config": quantization, "device_map": {"": device}}

    def apply(self, lm: nn.Module) -> nn.Module:
        lm = super().apply(lm)
        # bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a 4-bit weight into its CPU inference layout on the
        # first forward in eval mode without gradients (the start-up probe, validation, the DPO reference pass);
        # training forwards then fail (the bias is added in place) and the state dict loses the weight's absmax.
        # Training keeps the standard layout: that choice is the layer's own attribute, set once here.
        for module in lm.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        in_4bit = [n for n, p in lm.named_parameters() if p.requires_grad and is_4bit(p)]
        if in_4bit:  # peft's copy of a 4-bit layer (--lora-modules-to-save) would be packed bytes marked trainable
            raise ModelError(f"--qlora: {in_4bit[0]} is a 4-bit weight and cannot train in full; drop its module from "
                             f"--lora-modules-to-save, or drop --qlora")
        return lm

    def unsharded_parameters(self, lm: nn.Module) -> set[nn.Parameter]:
        return {p for p in lm.parameters() if is_4bit(p)}

    def set_base_weights(self, twin: nn.Module, lm: nn.Module) -> None:
        """The live model's 4-bit weights, dequantized as its forward does, in place of the twin's originals."""
        from bitsandbytes.functional import dequantize_4bit

        weights = dict(twin.named_parameters())
        with torch.no_grad():
            for name, param in lm.named_parameters():
                if is_4bit(param):
                    weights[name].copy_(dequantize_4bit(param.data, param.quant_state).float().cpu())


def is_4bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (Params4bit: packed values + its quantization state)."""
    if "bitsandbytes" not in sys.modules:  # nothing is quantized, and bitsandbytes need not be installed
        return False
    from bitsandbytes.nn import Params4bit

    return isinstance(param, Params4bit)


def logical_numel(param: torch.Tensor) -> int:
    """The number of weights a parameter holds: a 4-bit weight packs several into each stored element."""
    return param.quant_state.shape.numel() if is_4bit(param) else param.numel()


# ----------------------------------------------------------------------------------------------------------------
# Flags: every problem found before any weights load (train.validate collects them with the others)


def flag_problems(config, cuda: bool, model_ok: bool) -> list[str]:
    """The --lora* flags' problems. With `model_ok` (the model folder has a config), target modules and modules to
    save are checked against the model's module tree, built on the meta device (no weights read)."""
    if not config.lora:
        given = [f"--{k.replace('_', '-')}" for k, v in LORA_DEFAULTS.items() if getattr(config, k) != v]
        return [f"{', '.join(given)} need --lora; add --lora or drop them"] if given else []
    problems = []
    if config.lora_r < 1:
        problems.append(f"--lora-r must be >= 1 (the adapters' rank), got {config.lora_r}")
    if not config.lora_alpha > 0:
        problems.append(f"--lora-alpha must be positive (the adapters scale by alpha / r), got {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    if config.lora_init not in INITS:
        problems.append(f"--lora-init {config.lora_init!r} is unknown; use one of {', '.join(INITS)}")
    if config.lora_export not in EXPORTS:
        problems.append(f"--lora-export {config.lora_export!r} is unknown; use one of {', '.join(EXPORTS)}")
    if config.qlora and not cuda:
        problems.append("--qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels) and none is visible; drop --qlora "
                        "to train LoRA on full-precision base weights")
    elif config.qlora and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--qlora needs bitsandbytes, which is not installed: pip install -r requirements.txt")
    if bitsandbytes := bitsandbytes_problem():
        problems.append(bitsandbytes)
    if config.qlora and config.compile:
        problems.append("--compile with --qlora: torch.compile of bitsandbytes' 4-bit layers is not tested by "
                        "minitrain; drop --compile")
    if model_ok and not problems:
        problems += module_problems(config)
    return problems


BITSANDBYTES = ("0.49", "0.50")  # the supported releases: >= the first, < the second


def bitsandbytes_problem() -> str | None:
    """An installed bitsandbytes outside the supported range, read from its metadata without importing it. peft
    imports bitsandbytes wherever it is installed, so every --lora run loads it; from 0.50 that import fetches a CPU
    kernel from the Hugging Face hub (on CPUs with AVX512-BF16), a network attempt no run here needs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        return None
    release = tuple(int(part) for part in installed.split("+")[0].split(".")[:2] if part.isdigit())
    low, high = (tuple(int(part) for part in bound.split(".")) for bound in BITSANDBYTES)
    if low <= release < high:
        return None
    return (f"bitsandbytes {installed} is installed; minitrain supports >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
            f"(0.50 fetches a kernel from the Hugging Face hub when peft imports it): pip install "
            f"'bitsandbytes>={BITSANDBYTES[0]},<{BITSANDBYTES[1]}'")


def module_problems(config) -> list[str]:
    """Unknown --lora-target-modules / --lora-modules-to-save names, and whatever else peft refuses, on a meta-device
    copy of the model (the same module tree training builds)."""
    from transformers import AutoConfig

    auto, hf_config = reward.model_class(config, AutoConfig.from_pretrained(config.model_name_or_path))
    with torch.device("meta"):
        lm = reward.from_config(auto, hf_config)
    names = [name for name, _ in lm.named_modules()]
    matches = lambda key: [n for n in names if n == key or n.endswith("." + key)]  # noqa: E731  (peft's rule)
    problems = []
    try:
        blocks = decoder_blocks(lm)
    except ModelError as e:
        return [str(e)]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)})
    unknown = [t for t in listed(config.lora_target_modules) if t != ALL_LINEAR and not matches(t)]
    if unknown:
        problems.append(
            f"--lora-target-modules {' '.join(unknown)}: no module of {lm.config.model_type} is named so; "
            f"its decoder blocks' linear layers are {' '.join(linear)} (or pass {ALL_LINEAR})"
        )
    targets = listed(config.lora_target_modules)
    if ALL_LINEAR in targets and len(targets) > 1:  # peft took the other names alone and all-linear as a name
        problems.append(f"--lora-target-modules {' '.join(targets)}: {ALL_LINEAR} stands alone (it is every linear "
                        f"layer of the blocks); pass {ALL_LINEAR}, or the names without it")
    modules = dict(lm.named_modules())
    head = lm.get_output_embeddings()
    on_head = [t for t in targets if t != ALL_LINEAR and any(modules[n] is head for n in matches(t))]
    if on_head:  # the loss takes the head's own weight (chunked or fused cross-entropy), never an adapted forward
        problems.append(f"--lora-target-modules {' '.join(on_head)}: the LM head is not adapted (the loss reads its "
                        f"weight directly); train it in full with --lora-modules-to-save {' '.join(on_head)}")
    tied = tied_modules(lm)
    tied_targets = [t for t in targets if t not in on_head and any(n in tied for n in matches(t))]
    if tied_targets:  # merged, the adapter's change would reach the tied LM head too: not the live model
        problems.append(f"--lora-target-modules {' '.join(tied_targets)}: its weight is tied to the LM head's "
                        f"(tie_word_embeddings), and the merged export would change both; drop it")
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    not_layers = [t for t in listed(config.lora_target_modules) if t != ALL_LINEAR and matches(t)
                  and not any(isinstance(modules[n], adaptable) for n in matches(t))]
    if not_layers:
        kinds = sorted({type(modules[n]).__name__ for t in not_layers for n in matches(t)})
        problems.append(
            f"--lora-target-modules {' '.join(not_layers)}: a {'/'.join(kinds)}, not a linear, embedding or "
            f"convolution layer that LoRA adapts; name its layers instead, e.g. {' '.join(linear)}"
        )
    missing = [m for m in listed(config.lora_modules_to_save) if not matches(m)]
    if missing:
        top = " ".join(n for n, _ in lm.named_children()) + " " + " ".join(n for n, _ in lm.base_model.named_children())
        problems.append(f"--lora-modules-to-save {' '.join(missing)}: no module of {lm.config.model_type} is named "
                        f"so; e.g. {top}")
    if config.qlora:
        # transformers keeps the LM head (a reward model's score head) in full precision
        head = lm.get_output_embeddings() if lm.get_output_embeddings() is not None else getattr(lm, "score", None)
        four_bit = [m for m in listed(config.lora_modules_to_save) for n in matches(m)
                    if any(isinstance(x, nn.Linear) and x is not head for x in modules[n].modules())]
        if four_bit:
            problems.append(f"--lora-modules-to-save {' '.join(dict.fromkeys(four_bit))}: --qlora stores its linear "
                            f"layers in 4-bit, which cannot train in full; drop it, or drop --qlora")
    tied_saved = [m for m in listed(config.lora_modules_to_save) if any(n in tied for n in matches(m))]
    if tied_saved:
        problems.append(f"--lora-modules-to-save {' '.join(tied_saved)}: its weight is tied to another module's "
                        f"(tie_word_embeddings), and a trained copy would untie them in the export; drop it")
    if not problems:
        try:
            inject(lm, lora_config(config), config.seed)
        except (ValueError, TypeError, NotImplementedError) as e:
            reason = " ".join(str(e).split())[:300]
            fix = "; pass --lora-dropout 0" if "lora_dropout" in reason else ""  # fused MoE experts (Mixtral)
            problems.append(f"peft cannot apply LoRA with these --lora flags: {reason}{fix}")
    return problems


def tied_modules(lm: nn.Module) -> set[str]:
    """Modules whose weight is the same tensor as another module's."""
    owners: dict[int, list[str]] = {}
    for name, module in lm.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return {n for group in owners.values() if len(group) > 1 for n in group}
