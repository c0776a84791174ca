"""Sequence parallelism (minitrain/training/sequence_parallel.py) on CPU with gloo: S = 2 ranks sharing each packed row
against one process holding the whole row.

One job per world size (the session's shared 2-rank job, a 4-rank job for this file: each launch costs seconds of
imports) runs every scenario of `sp_worker` and writes one JSON report that the tests read:

    kernel      the all-to-all attention function == SDPA with the row's block-diagonal mask, outputs and gradients,
                for 2 and 1 key/value heads (1 < S: replicated)
    memory      the peak memory of a real S = 2 step (FSDPMemTracker on real tensors), for the memory estimate
    row         the tiny Llama on a packed row of several samples split between the ranks (one sample straddles the
                split, the row is odd so it is padded): each trained position's CE == the model's own forward on each
                sample alone (no leakage, the boundary token's label included), and the gradient == one process's
    sft, ...    train.forward_backward on FSDP2-sharded models with rows longer than --max-tokens-per-gpu, two optimizer
                steps: per-step loss and gradients == one process's (SFT both reductions, LoRA, DPO, SimPO; every
                sharding strategy), DPO's reference table, validation loss, greedy generation (which runs without
                sequence parallelism)
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.test_preference import write_pairs

LONG = 70  # tokens of the long samples: more than MAX_TOKENS, which one rank holds, at most 2 x MAX_TOKENS
MAX_TOKENS = 48


def write_long_data(path: Path, num_samples: int, vocab: int, seed: int = 0, long: bool = True) -> Path:
    """Samples of 10-40 tokens and, every fourth (with `long`), one of LONG tokens (longer than one rank's budget)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(num_samples):
            n = LONG if long and i % 4 == 1 else int(rng.integers(10, 40))
            prompt = int(rng.integers(2, n // 2))
            ids = rng.integers(3, vocab, n).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "len": n}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The worker (runs under torchrun)


def max_rel(got: dict, want: dict) -> float:
    return max(((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in want.items())


def kernel_scenario(world, sp) -> dict:
    """ulysses_attention on each rank's slice == masked SDPA over the whole row, values and gradients."""
    import torch

    from minitrain.training import sequence_parallel as S

    out = {}
    lengths = [7, 12, 5, 9]  # 33 tokens: padded to 34, rank 0 holds 17 (sample 2 straddles the split)
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    total = int(cu[-1])
    for kv_heads in (2, 1):
        g = torch.Generator().manual_seed(kv_heads)
        q = torch.randn(1, 4, total, 8, generator=g, requires_grad=True)
        k = torch.randn(1, kv_heads, total, 8, generator=g, requires_grad=True)
        v = torch.randn(1, kv_heads, total, 8, generator=g, requires_grad=True)
        weights = torch.randn(1, total, 4, 8, generator=g)
        # the truth: every head over the whole row, causal within each sample
        row = S.Row(1, None, cu, max(lengths))
        want = S.attend(*(t[0].transpose(0, 1) for t in (q, k, v)), row, None, None)[None]  # (1, T, H, D)
        (want * weights).sum().backward()
        want_grads = [t.grad.clone() for t in (q, k, v)]
        # the split: pad to 34, each rank its 17 tokens
        pad = -total % sp.size
        local = (total + pad) // sp.size
        start = sp.rank * local
        padded = [torch.nn.functional.pad(t.detach(), (0, 0, 0, pad)) for t in (q, k, v)]
        mine = [t[:, :, start : start + local].clone().requires_grad_() for t in padded]
        split_row = S.Row(sp.size, sp.group, torch.cat([cu, cu[-1:] + pad]), max(lengths))

        class Module:
            sliding_window = None

        got, _ = S.ulysses_attention(Module(), *mine, None, sequence_parallel=split_row)
        w = torch.nn.functional.pad(weights, (0, 0, 0, 0, 0, pad))[:, start : start + local]
        (got * w).sum().backward()
        real = slice(0, min(local, total - start))
        out[f"kv{kv_heads}_out"] = (got[:, real] - want[:, start : start + local][:, real]).abs().max().item()
        out[f"kv{kv_heads}_grad"] = max(
            (m.grad[:, :, real] - wg[:, :, start : start + local][:, :, real]).abs().max().item()
            for m, wg in zip(mine, want_grads))
    return out


def row_scenario(world, sp, model_dir: str) -> dict:
    """The model on a packed row split between the ranks, without FSDP: per-position CE and gradients."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from minitrain.training import sequence_parallel as S
    from minitrain.training.model import PackedCausalLM

    lengths = [9, 14, 6, 4]  # 33 tokens: the straddling sample holds the boundary token (rank 0's last)
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(3, 500, (n,), generator=g) for n in lengths]
    ids = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = np.cumsum([0, *lengths])
    positions = torch.cat([torch.arange(s, s + n - 1) for s, n in zip(starts, lengths)])  # every next token
    targets = ids[0, positions + 1]
    cu = torch.tensor(starts, dtype=torch.int32)
    weights = torch.rand(len(targets), generator=g)

    def run(split: bool):
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        if split:
            S.use_on(lm)
        model = PackedCausalLM(lm)
        model.sequence_parallel = sp if split else None
        ce = model(ids, pos, positions, targets, cu_seq_lens=cu, max_length=max(lengths), per_token=True)
        ce = S.sum_over_row(ce, model.sequence_parallel)  # each rank holds its slice's positions
        # every rank holds the whole loss: each counts 1 / S of it (as objectives.Preference does)
        ((ce * weights).sum() / (sp.size if split else 1)).backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
        if split:
            for grad in grads.values():
                dist.all_reduce(grad, group=sp.group)  # the row's gradient: the ranks' parts
        return ce.detach(), grads, lm

    ce_plain, grads_plain, lm = run(split=False)
    ce_split, grads_split, _ = run(split=True)
    with torch.no_grad():  # the model's own forward on each sample alone
        alone = torch.cat([torch.nn.functional.cross_entropy(lm(input_ids=s[None], use_cache=False).logits[0, :-1],
                                                             s[1:], reduction="none") for s in samples])
    boundary = int(np.searchsorted(positions.numpy(), 17) - 1)  # rank 0's last token predicts rank 1's first
    return {"ce_vs_alone": (ce_split - alone).abs().max().item(), "ce_vs_plain": (ce_split - ce_plain).abs().max().item(),
            "boundary_position": int(positions[boundary]), "boundary_diff": abs(ce_split[boundary] - alone[boundary]).item(),
            "grad_max_rel": max_rel(grads_split, grads_plain)}


def zoo_scenario(world, sp) -> dict:
    """Every family of the tiny zoo that trains today: refused in one line, or its packed row split between the ranks
    gives each trained position the CE of the model's own forward on its sample alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training import families
    from minitrain.training import sequence_parallel as S
    from minitrain.training.model import PackedCausalLM
    from tests.tiny_models import REFUSED, zoo_configs

    lengths = [9, 14, 6, 4]
    g = torch.Generator().manual_seed(7)
    samples = [torch.randint(3, 200, (n,), generator=g) for n in lengths]
    ids, starts = torch.cat(samples)[None], np.cumsum([0, *lengths])
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    positions = torch.cat([torch.arange(s, s + n - 1) for s, n in zip(starts, lengths)])
    out = {}
    for name, config in zoo_configs(256).items():
        if name in REFUSED:  # refused without sequence parallelism already (the start-up probe)
            continue
        problem = S.model_problem(config, sp.size, world.world_size)
        if problem is not None:
            out[name] = {"refused": problem}
            continue
        torch.manual_seed(0)
        attn = families.attention_implementation(families.causal_lm_class(config), world.device, "auto", config)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        try:
            S.use_on(lm)
        except S.SequenceParallelError as e:
            out[name] = {"refused": str(e)}
            continue
        model = PackedCausalLM(lm).eval()
        model.sequence_parallel = sp
        with torch.no_grad():
            try:
                ce = S.sum_over_row(model(ids, pos, positions, ids[0, positions + 1], per_token=True), sp)
            except S.SequenceParallelError as e:  # found by the start-up probe in a run
                out[name] = {"refused": str(e)}
                continue
            with S.plain_attention(lm):
                alone = torch.cat([  # the model's own logits (its logit transform included)
                    torch.nn.functional.cross_entropy(lm(input_ids=s[None], use_cache=False).logits[0, :-1].float(),
                                                      s[1:], reduction="none")
                    for s in samples])
        out[name] = {"max_diff": (ce - alone).abs().max().item(), "attention": attn}
    return out


def train_steps(config, world, objective, cache, steps: int, reference=None) -> dict:
    """`steps` optimizer steps as train.py runs them; each step's loss, metrics and full gradients (+ at the end the
    validation loss over the whole cache and greedy replies to three prompts)."""
    import torch
    import torch.distributed as dist

    import train
    from minitrain.training import lora
    from minitrain.training.model import build_model
    from minitrain.training.objectives import make_pair_pack, sequence_logps
    from minitrain.training.reference import compute_reference_logps, reference_mode
    from minitrain.training.sequence_parallel import data_layout
    from minitrain.training.validation import generate_replies, plan_validation_set, validation_loss
    from sampler import MultipackPlanner

    model = build_model(config, world, lora.build_adapter(config))
    result = {"steps": []}
    if reference is not None:  # DPO: the reference table by this model, then the same offsets on both sides
        if config.sequence_parallel_size > 1:
            table = compute_reference_logps(model, cache, world, config.max_tokens_per_gpu,
                                            config.sequence_parallel_size)
        else:  # one process beside the others: no collective
            table = np.zeros((len(cache), 2))
            with reference_mode(model), torch.no_grad():
                for i in range(len(cache)):
                    table[i] = sequence_logps(model, make_pair_pack(cache, np.array([i])))[0].double().numpy()
        result["table"] = table
        objective.reference[cache.content_hash] = table + reference
    layout = data_layout(config, world.rank, world.world_size)
    planner = MultipackPlanner(objective.costs(cache), config.batch_size, layout.row_tokens, layout.size, seed=1)
    trainable = [(n, p) for n, p in model.lm.named_parameters() if p.requires_grad]
    # SGD between the steps: AdamW would turn ~1e-9 rounding differences of near-zero gradients into whole
    # learning-rate steps of opposite signs, which no exact method avoids
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    for step in range(steps):
        plan = planner.plan(step)
        indices = np.concatenate([i for micro in plan.micro_batches for i in micro])
        units = objective.step_units(cache, indices)
        source_ce = None if cache.sources is None else torch.zeros(int(cache.sources.max()) + 1)  # a mixture's
        sums = train.forward_backward(model, objective, cache, plan.rank_packs(layout.rank), units, world.world_size,
                                      world.device, source_ce)
        if world.world_size > 1:
            dist.all_reduce(sums)
            if source_ce is not None:
                dist.all_reduce(source_ce)
        if source_ce is not None:
            result.setdefault("source_ce", []).append(source_ce.tolist())
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone() for n, p in trainable}
        result["steps"].append({"loss": sums[0].item() / units, "metrics": (sums[1:] / units).tolist(),
                                "grads": grads, "micro_steps": plan.num_micro_steps,
                                "longest_row": max(int(cache.lengths[np.asarray(p, dtype=np.int64)].sum())
                                                   for micro in plan.micro_batches for p in micro)})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    validation = plan_validation_set(objective, cache, np.arange(len(cache)), layout.row_tokens, layout.size,
                                     layout.rank, 0, 4, [])
    result["validation_loss"] = validation_loss(model, objective, cache, validation.packs, world.device)[0]
    if not cache.pairs:
        prompts = [np.asarray(cache.input_ids[cache.offsets[i] : cache.offsets[i] + 6]) for i in range(3)]
        result["replies"] = generate_replies(model, [prompts], 4, [], world.device)
    return result


def compare(got: dict, want: dict) -> dict:
    return {
        "loss_rel": [abs(g["loss"] / w["loss"] - 1) for g, w in zip(got["steps"], want["steps"])],
        "grad_rel": [max_rel(g["grads"], w["grads"]) for g, w in zip(got["steps"], want["steps"])],
        "metrics_diff": [float(np.max(np.abs(np.subtract(g["metrics"], w["metrics"])), initial=0))
                         for g, w in zip(got["steps"], want["steps"])],
        "names": all(sorted(g["grads"]) == sorted(w["grads"]) for g, w in zip(got["steps"], want["steps"])),
        "validation_rel": abs(got["validation_loss"] / want["validation_loss"] - 1),
        "replies_equal": got.get("replies") == want.get("replies"),
        "longest_row": max(s["longest_row"] for s in got["steps"]),
        "micro_steps": [s["micro_steps"] for s in got["steps"]],
        **({"table_max_diff": float(np.abs(got["table"] - want["table"]).max())} if "table" in got else {}),
        **({"source_ce_rel": float(np.max(np.abs(np.divide(got["source_ce"], want["source_ce"]) - 1)))}
           if "source_ce" in got else {}),
    }


# A Llama whose step's peak is mostly activations (2 layers, a small vocabulary), so that a memory estimate that
# gave each rank the whole row, or missed the split attention's buffers, would be far off
MEMORY_MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 1, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}
MEMORY_TOKENS = 1024  # per rank: rows of 2 x 1024 tokens


def memory_config(model_dir: str):
    import train

    return train.TrainConfig(data_path=["unused"], model_name_or_path=model_dir, output_dir="unused", batch_size=2,
                             max_tokens_per_gpu=MEMORY_TOKENS, activation_checkpointing=False,
                             fsdp_sharding_strategy="FULL_SHARD", sequence_parallel_size=2)


def memory_scenario(world, sp, model_dir: str) -> dict:
    """The peak memory of a real step with S = 2, measured: the run's model (model.assemble, the Ulysses attention,
    FSDP2 over both ranks) with random weights, a warm-up step, then one step of train.py's loop body (forward_backward
    on one row of 2 x MEMORY_TOKENS tokens, every position trained, AdamW) under FSDPMemTracker on real tensors and
    real all-to-alls. Each rank's peak (bytes), for the estimate (fake tensors, a fake process group) to match."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    import train
    from minitrain.training import memory, sequence_parallel
    from minitrain.training.model import assemble, device_mesh, shard_model
    from minitrain.training.objectives import SFT

    config = memory_config(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    sequence_parallel.use_on(lm)
    model = assemble(lm, config, train.lora.build_adapter(config), hf_config)
    model.sequence_parallel = sp
    shard_model(model, config.fsdp_sharding_strategy, world, device_mesh(config.fsdp_sharding_strategy, world))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for buffer in model.lm.buffers():  # rotary inv_freq
            buffer.copy_(1 / (1 + torch.arange(buffer.numel()).reshape(buffer.shape)))
    optimizer, _ = train.build_optimizer(config, model.adapter.trainable_parameters(model), None)
    objective, row = SFT(), 2 * MEMORY_TOKENS
    cache = memory.synthetic_cache(objective, row)
    tracker = FSDPMemTracker(model, optimizer)
    for tracked in (False, True):
        if tracked:
            tracker.reset_mod_stats()
            tracker.__enter__()
        train.forward_backward(model, objective, cache, [np.array([0])], row - 1, world.world_size, world.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker.__exit__(None, None, None)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    return {"peak_bytes": [int(p) for p in all_gather_ints(peak)]}


def all_gather_ints(value: int) -> list:
    import torch
    import torch.distributed as dist

    out = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(value, dtype=torch.int64))
    return [t.item() for t in out]


def sp_worker(model_dir: str, data_path: str, pairs_path: str, out_dir: str, scenarios: str,
              mixture_path: str, memory_model_dir: str = "") -> None:
    import torch

    import train
    from minitrain.training import sequence_parallel
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World, cleanup_distributed, init_distributed
    from minitrain.training.mixture import concat_caches
    from minitrain.training.objectives import DPO, SFT, SimPO

    world = init_distributed("gloo")
    torch.manual_seed(0)
    size = 2
    sp = sequence_parallel.init(size, world.rank, world.world_size)
    single = World(0, 0, 1, 1, world.device)
    report = {}
    if "kernel" in scenarios:
        report["kernel"] = kernel_scenario(world, sp)
    if "row" in scenarios:
        report["row"] = row_scenario(world, sp, model_dir)
    if "zoo" in scenarios:
        report["zoo"] = zoo_scenario(world, sp)
    base = train.TrainConfig(data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8,
                             max_tokens_per_gpu=MAX_TOKENS, save_dtype="float32", activation_checkpointing=False,
                             learning_rate=1e-3, fsdp_sharding_strategy="FULL_SHARD", sequence_parallel_size=size)
    cases = {
        "sft": (SFT(), {}),
        "sft_sequences": (SFT("sequences"), dict(activation_checkpointing=True)),
        "lora": (SFT(), dict(lora=True, lora_dropout=0.0, lora_init="random", fsdp_sharding_strategy="SHARD_GRAD_OP")),
        # every sharding strategy with S > 1: FULL_SHARD above, SHARD_GRAD_OP (LoRA), HYBRID_SHARD, NO_SHARD
        "dpo": (DPO(beta=0.5), dict(data_path=[pairs_path], max_tokens_per_gpu=24,
                                    fsdp_sharding_strategy="HYBRID_SHARD")),
        "simpo": (SimPO(), dict(data_path=[pairs_path], max_tokens_per_gpu=24, activation_checkpointing=True,
                                fsdp_sharding_strategy="NO_SHARD")),
    }
    for name, (objective, changes) in cases.items():
        if name not in scenarios.split(","):
            continue
        config = replace(base, **changes)
        cache = load_data(config, world, vocab_size=10**6)
        if name == "sft":  # a mixture of two files: each file's CE sums (its metrics) too
            cache = concat_caches([cache, load_data(config, world, vocab_size=10**6, path=mixture_path)])
        offsets = np.random.default_rng(3).normal(0, 2, (len(cache), 2)) if name == "dpo" else None
        # One process, the whole row, twice the per-GPU budget: every rank runs it (in step with the others, whose
        # copies only double the validation sums, not their ratio), rank 0 compares.
        whole = replace(config, sequence_parallel_size=1, max_tokens_per_gpu=config.max_tokens_per_gpu * size)
        want = train_steps(whole, single, objective, cache, 2, offsets)
        got = train_steps(config, world, objective, cache, 2, offsets)
        if world.is_main:
            report[name] = compare(got, want)
            report[name]["loss"] = [s["loss"] for s in got["steps"]]
    if "memory" in scenarios:  # last: its random weights draw from the generator the cases above use
        report["memory"] = memory_scenario(world, sp, memory_model_dir)
    if world.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory, tiny_model_dir, two_ranks):
    tmp = tmp_path_factory.mktemp("sp2")
    data = write_long_data(tmp / "data.jsonl", 16, vocab=700)
    pairs = write_pairs(tmp / "pairs.jsonl", 12, seed=2)
    mixture = write_long_data(tmp / "more.jsonl", 8, vocab=700, seed=9)
    out = tmp / "out"
    run = two_ranks.run(__name__, "sp_worker", [tiny_model_dir("llama"), data, pairs, out,
                                                "kernel,row,zoo,sft,sft_sequences,lora,dpo,simpo,memory", mixture,
                                                memory_model_dir(tmp)], timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def memory_model_dir(tmp: Path) -> Path:
    (tmp / "memory_model").mkdir(exist_ok=True)
    (tmp / "memory_model" / "config.json").write_text(json.dumps(MEMORY_MODEL))
    return tmp / "memory_model"


def test_the_all_to_all_attention_equals_attention_over_the_whole_row(two_rank_report):
    kernel = two_rank_report["kernel"]
    for kv in (2, 1):  # 1 key/value head < S = 2: replicated
        assert kernel[f"kv{kv}_out"] < 1e-5 and kernel[f"kv{kv}_grad"] < 1e-5, kernel


def test_a_row_split_between_ranks_isolates_its_samples_and_trains_the_boundary_token(two_rank_report):
    row = two_rank_report["row"]
    assert row["boundary_position"] == 16  # rank 0's last token (17 of the padded 34), trained
    assert row["boundary_diff"] < 1e-5 and row["ce_vs_alone"] < 1e-5 and row["ce_vs_plain"] < 1e-5, row
    assert row["grad_max_rel"] < 1e-5, row


def test_every_family_of_the_zoo_splits_exactly_or_is_refused_in_one_line(two_rank_report):
    zoo = two_rank_report["zoo"]
    refused = {name: r["refused"] for name, r in zoo.items() if "refused" in r}
    assert sorted(refused) == ["falcon", "gemma2", "mixtral", "olmoe", "qwen2_moe"]  # see the messages
    assert "attn_logit_softcapping" in refused["gemma2"] and "extra keywords" in refused["falcon"]
    assert all("\n" not in message and message.endswith("--sequence-parallel-size 1") for message in refused.values())
    split = {name: r["max_diff"] for name, r in zoo.items() if "max_diff" in r}
    assert len(split) == 13 and max(split.values()) < 1e-5, split


def test_the_memory_estimate_with_sequence_parallelism_is_the_measured_peak(two_rank_report, tmp_path):
    """The estimate (memory.py: fake tensors, a fake process group, rank 0's 1/S of the row and the split attention)
    against each rank's peak measured on a real 2-rank S = 2 step (memory_scenario). Neither giving a rank the
    whole row (about +44% here) nor its share without the split attention's buffers (about -28%) passes."""
    from minitrain.training import memory

    config = memory_config(str(memory_model_dir(tmp_path)))
    estimate = memory.estimate(config, 2, None, False, memory.run_optimizer(config), slope=False)
    measured = two_rank_report["memory"]["peak_bytes"]
    assert estimate.sequence_parallel_size == 2 and estimate.max_tokens_per_gpu == MEMORY_TOKENS
    for peak in measured:
        assert estimate.peak_gib * memory.GIB == pytest.approx(peak, rel=0.05), (estimate.peak_gib, measured)


@pytest.mark.parametrize("name", ["sft", "sft_sequences", "lora", "dpo", "simpo"])
def test_two_ranks_sharing_rows_train_as_one_process(two_rank_report, name):
    r = two_rank_report[name]
    assert r["names"], name
    assert max(r["loss_rel"]) < 1e-5 and max(r["grad_rel"]) < 1e-5, (name, r)
    assert max(r["metrics_diff"]) < 1e-4, (name, r)
    assert r["validation_rel"] < 1e-5, (name, r)
    assert r["longest_row"] > (24 if name in ("dpo", "simpo") else MAX_TOKENS)  # rows one GPU's budget cannot hold
    if name == "dpo":
        assert r["table_max_diff"] < 1e-4, r
    if name.startswith("sft"):
        assert r["replies_equal"], r
    if name == "sft":  # a mixture: each file's CE sum
        assert r["source_ce_rel"] < 1e-5, r


def test_four_ranks_in_two_groups_train_as_one_process(tmp_path, tiny_model_dir, four_ranks):
    data = write_long_data(tmp_path / "data.jsonl", 16, vocab=700)
    out = tmp_path / "out"
    run = four_ranks.run(__name__, "sp_worker", [tiny_model_dir("llama"), data, data, out, "sft", data], timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads((out / "report.json").read_text())["sft"]
    assert max(r["loss_rel"]) < 1e-5 and max(r["grad_rel"]) < 1e-5, r
    assert r["validation_rel"] < 1e-5 and r["replies_equal"], r
    assert r["longest_row"] > MAX_TOKENS


def test_hybrid_shard_with_two_replicas_of_two_shards_gives_one_processs_gradient(tmp_path, tiny_model_dir,
                                                                                 four_ranks):
    """HYBRID_SHARD with --fsdp-shard-group-size 2 on 4 ranks (as 2 nodes of 2 GPUs: sharded within each pair,
    replicated across the pairs), in this file's 4-rank job (no other test has 4 ranks): a 2 x 2 mesh, every
    parameter replicated on one dimension and sharded on the other, and the step's loss, gradients (within 1e-6 of
    each tensor's largest) and norm those of one process holding the whole step."""
    from tests.test_train import write_data

    data = write_data(tmp_path / "data.jsonl", 8, vocab=700)
    run = four_ranks.run("tests.test_train", "hybrid_grad_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mesh"] == [[2, 2], ["replicate", "shard"]]
    assert report["placements"] == ["(Replicate(), Shard(dim=0))"], report["placements"]
    r = report["HYBRID_SHARD"]
    assert r["names"] and r["loss"] == pytest.approx(report["reference_loss"], rel=1e-6)
    assert r["max_rel"] < 1e-6 and r["norm"] == pytest.approx(report["reference_norm"], rel=2e-6), r


# ---------------------------------------------------------------------------------------------------------------
# Refusals, before any weights load


def test_flags_and_models_that_cannot_be_split_are_refused_in_one_line(tmp_path, capsys, monkeypatch, tiny_model_dir):
    import transformers as T

    from minitrain.training.sequence_parallel import model_problem
    from tests.test_train import base_args, run_main

    monkeypatch.setenv("WORLD_SIZE", "4")  # validation only: it fails before the process group is created
    data = write_long_data(tmp_path / "data.jsonl", 4, vocab=700)
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--sequence-parallel-size", "3",
                          "--batch-size", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--sequence-parallel-size 3 must divide the 4 ranks and the model's 4 attention heads; use one of 1, 2, " \
           "4" in err
    # the sizes offered divide the heads too (with 9 heads, 2 and 4 were offered, and refused once taken)
    nine = tmp_path / "nine-heads"
    nine.mkdir()
    (nine / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 1000}))
    code, err = run_main(["--estimate-memory", "--model-name-or-path", str(nine), "--world-size", "4",
                          "--sequence-parallel-size", "3", "--max-tokens-per-gpu", "64"], capsys)
    assert code == 2 and "must divide the 4 ranks and the model's 9 attention heads; use one of 1" in err, err
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--sequence-parallel-size", "2",
                          "--batch-size", "1"], capsys)
    assert "--batch-size 1 is smaller than the 2 data-parallel groups" in err
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--sequence-parallel-size", "2",
                          "--compile"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("--compile is not supported with --sequence-parallel-size 2 (untested: the compiled blocks around the "
            "all-to-all attention); drop --compile or use --sequence-parallel-size 1") in err
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--sequence-parallel-size", "2",
                          "--objective", "reward"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--objective reward is not supported with --sequence-parallel-size 2" in err
    # --estimate-memory refuses what the run would (its own check of the flags, before any simulation)
    code, err = run_main(["--estimate-memory", "--estimate-device", "cpu", "--world-size", "4",
                          *base_args(tmp_path, tiny_model_dir("llama"), data), "--sequence-parallel-size", "2",
                          "--objective", "kto"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--objective kto does not support --sequence-parallel-size 2 yet" in err

    heads = T.LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    assert model_problem(heads, 4, 8) == ("--sequence-parallel-size 4: llama has 6 attention heads, not divisible by "
                                          "4; each rank attends over heads / S of them: use --sequence-parallel-size "
                                          "1 or 2")
    assert model_problem(heads, 2, 8) is None and model_problem(heads, 1, 8) is None
    assert model_problem(T.LlamaConfig(num_attention_heads=4, num_key_value_heads=1), 4, 4) is None  # MQA: replicated
    t5 = model_problem(T.T5Config(), 2, 2)
    assert t5.startswith("--sequence-parallel-size 2: t5 is an encoder-decoder") and "\n" not in t5


def test_activation_offload_turns_checkpointing_on_and_refuses_it_off(tmp_path, capsys, tiny_model_dir):
    from tests.test_train import base_args, run_main

    data = write_long_data(tmp_path / "data.jsonl", 4, vocab=700)
    args = [*base_args(tmp_path, tiny_model_dir("llama"), data), "--max-tokens-per-gpu", "80", "--activation-offload"]
    code, err = run_main([*args, "--no-activation-checkpointing"], capsys)
    assert code == 2 and "--activation-offload keeps the checkpointed blocks' inputs in host memory" in err
    code = __import__("train").main(args)
    out = capsys.readouterr().out
    assert code == 0 and "activation checkpointing: on (--activation-offload" in out


def test_a_sample_longer_than_the_row_names_both_flags(tmp_path, capsys, tiny_model_dir):
    from minitrain.training.data import DataError, load_data
    from minitrain.training.distributed import World
    from train import TrainConfig

    import torch

    data = write_long_data(tmp_path / "data.jsonl", 4, vocab=700)
    config = TrainConfig(data_path=str(data), model_name_or_path="m", output_dir=str(tmp_path / "out"), batch_size=4,
                         max_tokens_per_gpu=30, sequence_parallel_size=2)
    with pytest.raises(DataError, match=r"is 70 tokens, longer than --max-tokens-per-gpu 30 x "
                                        r"--sequence-parallel-size 2 = 60 .* raise --max-tokens-per-gpu or "
                                        r"--sequence-parallel-size"):
        load_data(config, World(0, 0, 1, 1, torch.device("cpu")), vocab_size=700)
    load_data(replace(config, max_tokens_per_gpu=35), World(0, 0, 1, 1, torch.device("cpu")), vocab_size=700)


# ---------------------------------------------------------------------------------------------------------------
# The command line: train, stop, resume on another world size with the same S


def cli_args(data: Path, model_dir: Path, out: Path, steps: int) -> list[str]:
    return ["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
            "--batch-size", "8", "--max-tokens-per-gpu", str(MAX_TOKENS), "--sequence-parallel-size", "2",
            "--max-steps", str(steps), "--checkpoint-every-steps", "1", "--learning-rate", "1e-3",
            "--validation-split", "0.25", "--eval-every-samples", "8", "--num-eval-generations", "1",
            "--eval-max-new-tokens", "3", "--save-dtype", "float32"]


def losses(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("validation_loss")) for r in records]


def test_the_command_line_trains_long_rows_and_resumes_on_another_world_size(tmp_path, tiny_model_dir, two_ranks,
                                                                              four_ranks):
    """2 ranks (one group) train 2 steps; 4 ranks (two groups, same S) resume for a third: the same losses as 4
    ranks straight through. Rows longer than --max-tokens-per-gpu train, and validation and generation run.
    train.py's main(argv) runs on the ranks of a 2-rank and a 4-rank job (conftest's TwoRanks.train)."""
    model_dir = tiny_model_dir("llama")
    data = write_long_data(tmp_path / "data.jsonl", 32, vocab=700, seed=3)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    first = two_ranks.train(cli_args(data, model_dir, stopped, 2), tmp_path / "first")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "sequence parallelism: 2 ranks share each row" in first.stdout
    assert "activation checkpointing: off (auto: off, the estimate fits" in first.stdout
    # the 2-rank run plans its memory (auto: checkpointing off); the 4-rank runs are given that choice, without a
    # memory-estimate process each
    again = ["--no-activation-checkpointing"]
    resumed = four_ranks.train([*cli_args(data, model_dir, stopped, 3), *again], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "saved with world size 2" in resumed.stdout
    reference = four_ranks.train([*cli_args(data, model_dir, straight, 3), *again], tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-4000:]
    got, want = losses(stopped), losses(straight)
    assert [s for s, _, _ in got] == [1, 2, 3] == [s for s, _, _ in want]
    for (_, loss, validation), (_, want_loss, want_validation) in zip(got, want):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert validation == pytest.approx(want_validation, rel=1e-5)
    generations = (stopped / "generations.jsonl").read_text().splitlines()
    assert generations  # generation ran, without sequence parallelism


if __name__ == "__main__":
    sp_worker(*sys.argv[1:])


def test_a_run_resumes_with_another_sequence_parallel_size_to_the_same_losses(tmp_path, tiny_model_dir, two_ranks):
    """docs/sequence_parallel.md: a run resumes with another S. 2 ranks train 3 steps without sequence parallelism
    (S = 1: two data-parallel groups); from its step-2 checkpoint, 2 ranks with S = 2 (one group sharing each row)
    train the third: its loss and validation loss are the first run's. The rows fit one rank, so both S train them."""
    data = write_long_data(tmp_path / "data.jsonl", 32, vocab=700, seed=5, long=False)
    model_dir = tiny_model_dir("llama")

    def args(out: Path, steps: int, size: int) -> list[str]:
        flags = cli_args(data, model_dir, out, steps)
        flags[flags.index("--sequence-parallel-size") + 1] = str(size)
        return [*flags, "--no-activation-checkpointing"]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = two_ranks.train(args(straight, 3, 1), tmp_path / "first")
    assert first.returncode == 0 and "sequence parallelism" not in first.stdout, first.stderr[-4000:]
    step_2 = straight / "checkpoints" / "step_2"
    run = two_ranks.train([*args(resumed, 3, 2), "--resume-from", str(step_2)], tmp_path / "second")
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"resumed from {step_2}" in run.stdout, run.stdout[-3000:]
    assert "sequence parallelism: 2 ranks share each row" in run.stdout
    (step, loss, validation), = losses(resumed)
    assert step == 3 and losses(straight)[2] == (3, pytest.approx(loss, rel=1e-5), pytest.approx(validation, rel=1e-5))
