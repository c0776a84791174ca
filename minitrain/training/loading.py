"""Per-rank loading: every rank reads only its own slices of the Hugging Face safetensors, straight into its FSDP2
shards; no process ever holds the whole model.

    files = weight_files(model_folder)                 # tensor name in the file -> its .safetensors file
    twin = skeleton(auto, hf_config, attn, adapter)    # what the file does not hold: buffers, LoRA's adapters
    problem = plan_problem(lm, twin, files, adapter)   # None: every tensor has a source; else why not (one line)
    load_shards(lm, twin, files, adapter, device)      # slice reads, cast on the device

Where each tensor of the sharded model comes from:
- the file, by the adapter's name for it (`adapter.file_key`: LoRA's `q_proj.base_layer.weight` is the file's
  `q_proj.weight`); tied weights are one tensor, read once under whichever of their names the file holds; each rank
  reads the rows (FSDP2 shards dim 0; HYBRID_SHARD replicates across nodes) its shard holds, with safetensors' slice
  reads, and casts them to the training dtype on its device;
- else the skeleton: the model built from its config with every parameter a zero-byte placeholder and every buffer
  real, then adapted as the live model is. It gives what from_pretrained computes rather than reads (rotary
  `inv_freq` and the other non-persistent buffers) and what the adapter creates (LoRA's adapters, which depend on
  --seed only: the same values as in one process). A parameter that is in neither (a weight the file lacks, which
  from_pretrained would initialise at random) makes `plan_problem` say so, and build_model falls back to rank 0's
  load and broadcast, as it does for folders without safetensors (GGUF, .bin) and for checkpoints whose names
  transformers converts on load (e.g. per-expert MoE weights fused into one tensor).

A resume whose checkpoint holds every weight reads none of the files: build_model materialises the model
(`materialise`, ties kept), takes its buffers from the skeleton (`copy_buffers`) and its weights from the checkpoint.
"""

import copy
import json
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"


def weight_files(model_name_or_path: str) -> dict[str, Path] | None:
    """{tensor name: file} of a model folder's safetensors (sharded with an index, or one file); None when there is
    none (a hub id, GGUF, PyTorch .bin)."""
    folder = Path(model_name_or_path)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / "model.safetensors")
    return None


def unreadable(model_name_or_path: str) -> str | None:
    """One line naming the first .safetensors file of a model folder that safetensors cannot open (cut short by an
    interrupted download or copy, or not a safetensors file), with the fix; None when every one opens."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(model_name_or_path).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return (f"--model-name-or-path {model_name_or_path}: {path.name} cannot be read "
                    f"({' '.join(str(e).split())[:200]}): the file is damaged or incomplete (an interrupted download "
                    f"or copy?): copy or download it again")
    return None


def file_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def skeleton(auto, hf_config, attn: str, adapter) -> tuple[nn.Module, set[int]]:
    """The model from its config with zero-byte placeholder parameters (a zero expanded to each shape) and real
    buffers, adapted as the live model is; and the ids of the placeholders (the tensors it does not know)."""
    from accelerate import init_empty_weights

    # A copy of the config: from_config records the twin's attention in the config it is given, which the live model
    # shares (--sequence-parallel-size's attention would silently become `attn` again).
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        build = getattr(auto, "from_config", None) or auto._from_config  # an Auto class, or a reward's model class
        twin = build(copy.deepcopy(hf_config), dtype=torch.float32, attn_implementation=attn)
    placeholders: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its placeholder; tied ones stay tied
    for module in twin.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in placeholders:
                    zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    placeholders[id(param)] = nn.Parameter(zero, requires_grad=param.requires_grad)
                module._parameters[name] = placeholders[id(param)]
    with torch.random.fork_rng(devices=[]):  # the adapter seeds its own stream; the run's stays as it was
        twin = adapter.apply(twin)
    return twin, {id(p) for p in placeholders.values()}


def sources(lm: nn.Module, twin: nn.Module, placeholders: set[int], shapes: dict[str, tuple], adapter):
    """[(tensor of lm, file key or None, the twin's tensor or None)], each tensor once, and the names with none."""
    twin_tensors = {**dict(twin.named_parameters(remove_duplicate=False)), **dict(twin.named_buffers())}
    names_of: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in [*lm.named_parameters(remove_duplicate=False), *lm.named_buffers()]:
        names_of.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    plan, missing = [], []
    for key, names in names_of.items():
        tensor = tensors[key]
        in_file = [adapter.file_key(n) for n in names if adapter.file_key(n) in shapes]
        if in_file and shapes[in_file[0]] == tuple(tensor.shape):
            plan.append((tensor, in_file[0], None))
            continue
        known = [twin_tensors[n] for n in names if n in twin_tensors and id(twin_tensors[n]) not in placeholders]
        if known and tuple(known[0].shape) == tuple(tensor.shape):
            plan.append((tensor, None, known[0]))
            continue
        shape = f" (the file's {shapes[in_file[0]]} vs {tuple(tensor.shape)})" if in_file else ""
        missing.append(f"{names[0]}{shape}")
    return plan, missing


def plan_problem(lm: nn.Module, twin: nn.Module, placeholders: set[int], files: dict[str, Path] | None,
                 adapter) -> str | None:
    """Why the shards cannot be read per rank from `files` (None: they can)."""
    if files is None:
        return "no safetensors in the model folder"
    _, missing = sources(lm, twin, placeholders, file_shapes(files), adapter)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"the safetensors do not hold {', '.join(missing[:3])}{more} as the model names them"
    return None


def local_slices(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's part of `tensor` (a DTensor's local shard, or the tensor itself) and where it sits in the whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.data, tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local().data, tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_shards(lm: nn.Module, twin: nn.Module, placeholders: set[int], files: dict[str, Path], adapter,
                device: torch.device) -> None:
    """Fill every shard and buffer of `lm` (materialised, e.g. by to_empty) from `files` and the skeleton."""
    from safetensors import safe_open

    plan, _ = sources(lm, twin, placeholders, file_shapes(files), adapter)
    by_file: dict[Path, list] = {}
    for tensor, key, known in plan:
        local, where = local_slices(tensor)
        if local.numel() == 0:
            continue
        if key is None:
            local.copy_(known[where])
        else:
            by_file.setdefault(files[key], []).append((local, where, key))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for local, where, key in items:
                part = f.get_slice(key)[where]  # only these rows are read
                local.copy_(part.to(device).to(local.dtype))  # cast on the device


def materialise(module: nn.Module, device: torch.device) -> None:
    """module.to_empty(device=device), its tied parameters still one tensor: in one process to_empty gives each name
    of a tied weight a tensor of its own (under FSDP2 the shards stay tied by themselves)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            if id(param) in first:
                ties.append((owner, name, *first[id(param)]))
            else:
                first[id(param)] = (owner, name)
    module.to_empty(device=device)
    for owner, name, tied_owner, tied_name in ties:
        if getattr(owner, name) is not getattr(tied_owner, tied_name):
            setattr(owner, name, getattr(tied_owner, tied_name))


@torch.no_grad()
def copy_buffers(lm: nn.Module, twin: nn.Module) -> list[str]:
    """Every buffer of `lm` (materialised) from its namesake in the skeleton: what from_pretrained computes rather
    than reads (rotary `inv_freq`, ...). Returns the non-persistent buffers the skeleton lacks (nothing else would
    set them; the persistent ones are in a checkpoint's state)."""
    known = dict(twin.named_buffers())
    persistent = set(lm.state_dict())
    lacking = []
    for name, buffer in lm.named_buffers():
        if name in known and known[name].shape == buffer.shape:
            buffer.copy_(known[name])
        elif name not in persistent:
            lacking.append(name)
    return lacking
