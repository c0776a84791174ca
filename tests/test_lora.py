"""LoRA (minitrain/training/lora.py) on CPU: exact at step 0, exact gradients across world sizes, exports that load in peft
and transformers with the live model's logits, exact resume, and bad flags refused before any weights load.

The 2-process checks run under `torchrun --nproc-per-node 2` (gloo): the gradient check runs `lora_worker` in
the session's 2-rank job (tests/two_rank_server.py, like test_train's grad_worker) through train.py's own functions;
the stop/resume check runs train.py's main there, stopped by a signal, and resumes it in this process.
"""

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.test_preference import read_pairs, reward_model_dir, reward_pair_loss, write_pairs
from tests.test_resume import metrics, train_signalled
from tests.test_resume import run_main as run_main_with_output
from tests.test_train import base_args, run_main, write_data

ROOT = Path(__file__).resolve().parent.parent
SKEWED = {0: [[0, 1, 2], [3], [4]], 1: [[5, 6, 7], [], []]}  # rank 1 runs two dummy packs
LOGITS_TOLERANCE = 1e-5  # fp32 exports against the live fp32 model (measured: ~1e-6 and below)


def lora_flags(*extra: str) -> list[str]:
    return ["--lora", "--lora-r", "4", "--lora-alpha", "8", *extra]


def logits(lm, pack):
    import torch

    with torch.no_grad():
        return lm(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False).logits


def exported_models(folder: Path, base_dir: Path):
    """(PeftModel of the base + samples_<N>/adapter, the merged samples_<N>), as people load them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, folder / "adapter")
    return adapter, AutoModelForCausalLM.from_pretrained(folder)


PEFT_PREFIX = "base_model.model."


def peft_reference(model_dir: str, adapters: dict, quantization=None, alpha: float = 8):
    """The base as transformers loads it (4-bit when `quantization` is a BitsAndBytesConfig), with peft's own LoRA
    layers (all-linear, r 4, `alpha`, no dropout) set to `adapters` ({name in the trainer's model: tensor})."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": "cpu"}}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **quantized)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear"))
    state = {k.replace(".default.", "."): v for k, v in adapters.items()}
    loaded = set_peft_model_state_dict(peft, {PEFT_PREFIX + k: v for k, v in state.items()})
    assert not loaded.unexpected_keys
    return peft


def per_sample_loss(model, rows: list[dict], denominator: int, device="cpu"):
    """Sum over the samples, one forward each, of the token-summed CE of their trained tokens, / denominator."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor(row["labels"], device=device)
        logits = model(input_ids=ids).logits[0].float()
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
    return total / denominator


# ---------------------------------------------------------------------------------------------------------------
# 2 processes, through train.py's functions: adapter gradients equal one process's, every strategy; exports


def lora_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from transformers import AutoTokenizer

    import train
    from minitrain.training.checkpoint import save_export
    from minitrain.training.data import load_data, make_pack
    from minitrain.training.distributed import (
        World,
        cleanup_distributed,
        init_distributed,
    )
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import (
        SHARDING_STRATEGIES,
        PackedCausalLM,
        build_model,
    )
    from minitrain.training.objectives import SFT

    world = init_distributed("auto")
    # lora-init random: B starts non-zero, so A's gradient is not zero and both factors are compared.
    config = train.TrainConfig(
        data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8, max_tokens_per_gpu=256,
        save_dtype="float32", activation_checkpointing=False, lora=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
        lora_init="random",
    )
    cache = load_data(config, world, vocab_size=10**6)
    step_trained = int(cache.trained[:8].sum())
    report = {}
    if world.is_main:  # reference: one process, one micro-step holding the whole step
        single = World(0, 0, 1, 1, world.device)
        reference = build_model(config, single, build_adapter(config))
        adapters0 = {n: p.detach().clone() for n, p in reference.lm.named_parameters() if p.requires_grad}
        ref_sum = train.forward_backward(reference, SFT(), cache, [np.arange(8)], step_trained, 1, world.device)
        ref_grads = {n: p.grad for n, p in reference.lm.named_parameters() if p.requires_grad}
        report["reference_loss"] = ref_sum.item() / step_trained
        report["reference_norm"] = train.clip_gradients(reference, 0)
        report["reference_shapes"] = {n: list(g.shape) for n, g in ref_grads.items()}
        # The truth, independent of the trainer: transformers + peft's LoRA with the same adapter values, each
        # sample alone, plain cross-entropy.
        truth_model = peft_reference(model_dir, adapters0)
        rows = [json.loads(line) for line in Path(data_path).read_text().splitlines()[:8]]
        truth_loss = per_sample_loss(truth_model, rows, step_trained)
        truth_loss.backward()
        truth = {n.removeprefix(PEFT_PREFIX): p.grad for n, p in truth_model.named_parameters() if p.requires_grad}
        report["truth_loss"] = truth_loss.item()
        report["truth_names"] = sorted(truth) == sorted(ref_grads)
        report["reference_truth_rel"] = max(((ref_grads[n] - g).abs().max() / g.abs().max()).item()
                                            for n, g in truth.items())
        report["truth_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in truth.values()])).item()
    for strategy in SHARDING_STRATEGIES:
        cfg = replace(config, fsdp_sharding_strategy=strategy, activation_checkpointing=strategy == "FULL_SHARD")
        model = build_model(cfg, world, build_adapter(cfg))
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
        local_sum = train.forward_backward(model, SFT(), cache, packs, step_trained, world.world_size, world.device)
        dist.all_reduce(local_sum)
        params = dict(model.lm.named_parameters())
        grads = {n: p.grad.full_tensor() for n, p in params.items() if p.requires_grad}
        frozen_with_grad = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
        norm = train.clip_gradients(model, 0)
        if world.is_main:
            rel = {n: ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items()}
            report[strategy] = {
                "loss": local_sum.item() / step_trained,
                "max_rel": max(rel.values()),
                "truth_max_rel": max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in truth.items()),
                "min_grad": min(g.abs().max().item() for g in ref_grads.values()),
                "names": sorted(grads) == sorted(ref_grads),
                "frozen_with_grad": frozen_with_grad,
                "norm": norm,
            }
    # Exports of the last (FSDP2) model after one optimizer step on its adapters.
    optimizer = torch.optim.SGD(model.adapter.trainable_parameters(model), lr=0.5)
    optimizer.step()
    saved = save_export(model, AutoTokenizer.from_pretrained(model_dir), cfg, world, samples_seen=8)
    live = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    pack = make_pack(cache, np.arange(3))
    with torch.no_grad():
        live_loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets).item()  # through FSDP
    if world.is_main:
        from safetensors.torch import load_file

        unsharded = build_model(cfg, World(0, 0, 1, 1, world.device), build_adapter(cfg))
        unsharded.lm.load_state_dict(live)  # the live weights
        adapter, merged = exported_models(saved, Path(model_dir))
        expected = logits(unsharded.lm, pack)
        report["adapter_logits_diff"] = (logits(adapter, pack) - expected).abs().max().item()
        report["merged_logits_diff"] = (logits(merged, pack) - expected).abs().max().item()
        report["merged_loss_diff"] = abs(
            PackedCausalLM(merged)(pack.input_ids, pack.position_ids, pack.positions, pack.targets).item() - live_loss)
        base = build_model(replace(cfg, lora=False), World(0, 0, 1, 1, world.device))
        report["changed_by_adapters"] = (logits(merged, pack) - logits(base.lm, pack)).abs().max().item()
        file = load_file(saved / "adapter" / "adapter_model.safetensors")
        report["file_shapes"] = {k: list(v.shape) for k, v in file.items()}
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_ranks_give_the_single_process_adapter_gradients_and_whole_exports(tmp_path, tiny_model_dir, two_ranks):
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700)
    run = two_ranks.run(__name__, "lora_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # the 1-process reference is itself checked against transformers + peft + plain cross-entropy
    assert report["truth_names"]
    assert report["reference_loss"] == pytest.approx(report["truth_loss"], rel=1e-6)
    assert report["reference_truth_rel"] < 1e-5
    assert report["reference_norm"] == pytest.approx(report["truth_norm"], rel=1e-5)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
        r = report[strategy]
        assert r["loss"] == pytest.approx(report["truth_loss"], rel=1e-6), strategy
        assert r["truth_max_rel"] < 1e-5, (strategy, r["truth_max_rel"])
        assert r["names"] and not r["frozen_with_grad"], strategy  # only adapters have gradients
        assert r["min_grad"] > 0  # every adapter matrix has a gradient to compare (lora-init random)
        assert r["loss"] == pytest.approx(report["reference_loss"], rel=1e-6), strategy
        assert r["max_rel"] < 1e-5, (strategy, r["max_rel"])
        assert r["norm"] == pytest.approx(report["reference_norm"], rel=1e-5), strategy
    # The adapter file of a 2-rank run holds every adapter whole: the 1-process shapes, one file key each.
    shapes = report["reference_shapes"]
    assert len(report["file_shapes"]) == len(shapes) == 2 * 7 * 2  # A and B, 7 linear layers, 2 blocks
    assert sorted(report["file_shapes"].values()) == sorted(shapes.values())
    assert report["changed_by_adapters"] > 1e-3  # the comparisons below mean something
    assert report["adapter_logits_diff"] < LOGITS_TOLERANCE and report["merged_logits_diff"] < LOGITS_TOLERANCE
    assert report["merged_loss_diff"] < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# One process, in process


def test_lora_flags_parse_with_torchllms_spellings_and_lists():
    import train

    args = ["--data-path", "d", "--model-name-or-path", "m", "--output-dir", "o", "--batch-size", "1",
            "--max-tokens-per-gpu", "8"]
    config = train.parse_args([*args, "--lora", "--lora-rank", "8", "--lora-target-modules", "q_proj", "v_proj,o_proj",
                               "--lora-modules-to-save", "lm_head", "--lora-export", "adapter"])
    assert (config.lora, config.lora_r, config.lora_export) == (True, 8, "adapter")
    from minitrain.training.lora import listed

    assert listed(config.lora_target_modules) == ["q_proj", "v_proj", "o_proj"]
    assert config.lora_modules_to_save == ["lm_head"]
    defaults = train.parse_args(args)
    assert (defaults.lora, defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout) == (False, 16, 32.0, 0.05)
    assert defaults.lora_target_modules is None and defaults.lora_export == "both"


def test_bad_lora_flags_are_one_line_before_any_weights_load(tmp_path, capsys, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    args = base_args(tmp_path, tiny_model_dir("qwen2"), data)
    code, err = run_main([*args, "--lora", "--lora-r", "0", "--lora-dropout", "1.5", "--qlora"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for message in ("--lora-r must be >= 1", "--lora-dropout must be in [0, 1), got 1.5",
                    "--qlora needs a CUDA GPU"):
        assert message in err
    code, err = run_main([*args, "--lora", "--lora-target-modules", "q_proj", "qkv", "--lora-modules-to-save",
                          "lm_head", "head"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--lora-target-modules qkv: no module of qwen2 is named so; its decoder blocks' linear layers are " \
           "down_proj gate_proj k_proj o_proj q_proj up_proj v_proj (or pass all-linear)" in err
    assert "--lora-modules-to-save head: no module of qwen2 is named so" in err
    code, err = run_main([*args, "--lora", "--lora-target-modules", "mlp"], capsys)
    assert code == 2 and "--lora-target-modules mlp: a Qwen2MLP, not a linear, embedding or convolution layer" in err
    code, err = run_main([*args, "--lora-r", "8"], capsys)
    assert code == 2 and "--lora-r need --lora; add --lora or drop them" in err, err
    # The tiny llama ties lm_head to embed_tokens: a trained copy of one would untie them.
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--lora", "--lora-modules-to-save",
                          "lm_head"], capsys)
    assert code == 2 and "--lora-modules-to-save lm_head: its weight is tied" in err, err
    # Adapters on the tied embedding: merged, the change reached the tied head too (the export's logits were not the
    # live model's); all-linear beside a name: peft adapted the name alone; the head: the loss reads its weight
    code, err = run_main([*base_args(tmp_path, tiny_model_dir("llama"), data), "--lora", "--lora-target-modules",
                          "embed_tokens", "q_proj"], capsys)
    assert code == 2 and "--lora-target-modules embed_tokens: its weight is tied to the LM head's" in err, err
    code, err = run_main([*args, "--lora", "--lora-target-modules", "all-linear", "q_proj"], capsys)
    assert code == 2 and "--lora-target-modules all-linear q_proj: all-linear stands alone" in err, err
    code, err = run_main([*args, "--lora", "--lora-target-modules", "lm_head"], capsys)
    assert code == 2 and ("--lora-target-modules lm_head: the LM head is not adapted (the loss reads its weight "
                          "directly); train it in full with --lora-modules-to-save lm_head") in err, err
    assert not (tmp_path / "out").exists()  # nothing happened before validation


def test_step_zero_is_the_base_model_and_only_adapters_train(tiny_model_dir, tmp_path):
    import torch

    import train
    from minitrain.training.data import load_data, make_pack
    from minitrain.training.distributed import World
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import build_model

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    config = train.TrainConfig(str(data), str(tiny_model_dir("llama")), str(tmp_path), batch_size=4,
                               max_tokens_per_gpu=256, lora=True)  # every LoRA default
    pack = make_pack(load_data(config, single, vocab_size=10**6), np.arange(4))
    model = build_model(config, single, build_adapter(config))
    base = build_model(replace(config, lora=False), single)
    model.eval()  # dropout off, to compare logits; step 0 is exact with it on too, since B = 0
    assert torch.equal(logits(model.lm, pack), logits(base.lm, pack))
    trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B of q k v o gate up down in both blocks
    assert all(p.ndim == 2 and 16 in p.shape for n, p in model.lm.named_parameters() if n in trainable)  # r 16


def test_lora_init_gaussian_starts_at_the_base_model_with_peft_s_gaussian_a(tiny_model_dir, tmp_path):
    """--lora-init gaussian (lora.md): B starts at zero, so step 0 is the base model exactly, and A is drawn from
    N(0, 1/r) (peft's "gaussian"), where the default draws it Kaiming-uniform within 1/sqrt(fan_in). With r 4 the
    two differ clearly: a standard deviation of 0.25 against at most 1/8 (fan_in 64) or 1/sqrt(128)."""
    import torch

    import train
    from minitrain.training.data import load_data, make_pack
    from minitrain.training.distributed import World
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import build_model

    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    config = train.TrainConfig(str(data), str(tiny_model_dir("llama")), str(tmp_path), batch_size=4,
                               max_tokens_per_gpu=256, lora=True, lora_r=4)
    pack = make_pack(load_data(config, single, vocab_size=10**6), np.arange(4))
    base = logits(build_model(replace(config, lora=False), single).lm.eval(), pack)
    for init in ("gaussian", "default"):
        model = build_model(replace(config, lora_init=init), single, build_adapter(replace(config, lora_init=init)))
        assert torch.equal(logits(model.lm.eval(), pack), base), init  # B = 0: the base model's logits exactly
        a = {n: p.detach() for n, p in model.lm.named_parameters() if ".lora_A." in n}
        assert len(a) == 7 * 2 and all(not p.detach().any() for n, p in model.lm.named_parameters() if ".lora_B." in n)
        if init == "gaussian":
            values = torch.cat([w.flatten() for w in a.values()])  # 14 matrices, 4,096 draws
            assert values.numel() == 4096 and values.mean().abs() < 0.02
            assert values.std().item() == pytest.approx(1 / 4, rel=0.05)
        else:
            assert all(w.abs().max() <= w.shape[1] ** -0.5 for w in a.values())


def test_lora_alpha_scales_the_adapters_as_peft_does(tiny_model_dir, tmp_path):
    """--lora-alpha 32 with --lora-r 4: the scale alpha / r = 8 (lora.md), so the logits are peft's with the same
    adapter values and alpha 32 (the other LoRA tests use alpha 8, peft's own default, where a trainer that ignored
    the flag would pass); peft's at alpha 8 differ."""
    import torch

    import train
    from minitrain.training.data import load_data, make_pack
    from minitrain.training.distributed import World
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import build_model

    model_dir = tiny_model_dir("llama")
    single = World(0, 0, 1, 1, torch.device("cpu"))
    config = train.TrainConfig(str(write_data(tmp_path / "data.jsonl", 4, vocab=700)), str(model_dir), str(tmp_path),
                               batch_size=4, max_tokens_per_gpu=256, lora=True, lora_r=4, lora_alpha=32.0,
                               lora_dropout=0.0, lora_init="random")  # B non-zero: the scale shows in the logits
    pack = make_pack(load_data(config, single, vocab_size=10**6), np.arange(4))
    model = build_model(config, single, build_adapter(config)).eval()
    adapters = {n: p.detach() for n, p in model.lm.named_parameters() if p.requires_grad}
    ours = logits(model.lm, pack)
    assert torch.allclose(ours, logits(peft_reference(str(model_dir), adapters, alpha=32), pack), atol=1e-5)
    assert not torch.allclose(ours, logits(peft_reference(str(model_dir), adapters, alpha=8), pack), atol=1e-3)


def run_in_process(args: list[str]):
    """train.py's setup() and loop() in this process, returning the Run: its live model stays inspectable."""
    import train
    from minitrain.training.checkpoint import StopSignals
    from minitrain.training.distributed import init_distributed

    config = train.parse_args(args)
    train.validate(config, 1, 1, cuda=False)
    run = train.setup(config, init_distributed("auto"))
    train.loop(run, StopSignals())
    run.log.close()
    return run


def test_loss_falls_and_both_exports_give_the_live_logits(tmp_path, tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.training.data import make_pack

    model_dir = tiny_model_dir("qwen2")  # untied LM head: trained in full beside the adapters
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)
    args = [*base_args(tmp_path, model_dir, data), "--max-steps", "12", "--learning-rate", "2e-2",
            "--save-dtype", "float32", "--no-activation-checkpointing",
            *lora_flags("--lora-modules-to-save", "lm_head", "--lora-dropout", "0")]
    run = run_in_process(args)
    assert "lora: " in capsys.readouterr().out  # the trainable / total parameters line
    records = metrics(tmp_path / "out")
    assert records[-1]["loss"] < records[0]["loss"] * 0.7, [r["loss"] for r in records]
    final = tmp_path / "out" / "hf_format" / "samples_48"
    adapter_files = {"adapter_config.json", "adapter_model.safetensors"}
    assert adapter_files <= {p.name for p in (final / "adapter").iterdir()}
    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["peft_type"]) == (4, 8.0, "LORA")
    assert adapter_config["base_model_name_or_path"] == str(model_dir)
    pack = make_pack(run.cache, np.arange(4))
    run.model.eval()
    expected = logits(run.model.lm, pack)
    adapter, merged = exported_models(final, model_dir)
    assert (logits(adapter, pack) - expected).abs().max().item() < LOGITS_TOLERANCE
    assert (logits(merged, pack) - expected).abs().max().item() < LOGITS_TOLERANCE
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert (logits(base, pack) - expected).abs().max().item() > 1e-2  # the adapters changed the model
    assert not any("lora" in k for k in merged.state_dict())  # a plain model


def test_adapter_only_and_merged_only_exports_in_bf16(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700)
    args = [*base_args(tmp_path, model_dir, data), "--max-steps", "1"]
    run_in_process([*args, *lora_flags("--lora-export", "merged"), "--output-dir", str(tmp_path / "merged")])
    final = tmp_path / "merged" / "hf_format" / "samples_4"
    assert not (final / "adapter").exists()
    assert AutoModelForCausalLM.from_pretrained(final).dtype == torch.bfloat16

    run_in_process([*args, *lora_flags("--lora-export", "adapter")])
    final = tmp_path / "out" / "hf_format" / "samples_4"
    assert not (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = PeftModel.from_pretrained(base, final / "adapter")
    weights = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert weights and all(p.dtype == torch.float32 for p in weights)  # peft loads into the base's dtype
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(final / "adapter" / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_resume_with_dropout_gives_the_uninterrupted_losses(tmp_path, tiny_model_dir, capsys):
    """Same world size: the RNG states are restored, so even the adapters' dropout masks repeat."""
    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 16, vocab=700)

    def args(out: str, steps: int) -> list[str]:
        return ["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(tmp_path / out),
                "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", str(steps), "--learning-rate",
                "1e-2", "--save-dtype", "float32", *lora_flags("--lora-dropout", "0.3", "--lora-export", "adapter")]

    assert run_main(args("reference", 4), capsys)[0] == 0
    assert run_main(args("resumed", 2), capsys)[0] == 0
    code, err = run_main(args("resumed", 4), capsys)
    assert code == 0, err
    expected, got = metrics(tmp_path / "reference"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit
    assert [r["sample_lines"] for r in got] == [r["sample_lines"] for r in expected]
    from safetensors.torch import load_file

    final = "hf_format/samples_16/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "reference" / final), load_file(tmp_path / "resumed" / final)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_checkpoint_from_before_lora_resumes_as_full_fine_tuning(tmp_path):
    import train
    from minitrain.training import checkpoint

    config = train.TrainConfig("d", "m", str(tmp_path), batch_size=4, max_tokens_per_gpu=64)
    old = {k: v for k, v in vars(config).items() if not k.startswith(("lora", "qlora"))}
    saved = tmp_path / "step_2"
    saved.mkdir()
    (saved / "training_config.json").write_text(json.dumps(old))
    state = {"step": 2, "samples_seen": 8, "last_export_samples": 8, "data": "x", "scheduler": {}, "world_size": 1}
    (saved / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoint.check_resumable(saved, vars(config), "x") == 8
    with pytest.raises(checkpoint.CheckpointError, match="--lora False -> True"):
        checkpoint.check_resumable(saved, vars(replace(config, lora=True)), "x")


# ---------------------------------------------------------------------------------------------------------------
# Kill and resume on another world size, through train.py under torchrun


def test_a_two_rank_run_stopped_by_a_signal_resumes_on_one_process_to_the_same_losses(tmp_path, tiny_model_dir,
                                                                                      capsys, two_ranks):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from minitrain.training import checkpoint

    model_dir = tiny_model_dir("llama")
    data = write_data(tmp_path / "data.jsonl", 16, vocab=700)

    def args(out: Path) -> list[str]:  # dropout 0: across world sizes the RNG states are not restored
        return ["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
                "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "4", "--learning-rate", "1e-2",
                "--checkpoint-every-steps", "2", "--save-dtype", "float32", "--fsdp-sharding-strategy", "FULL_SHARD",
                "--no-activation-checkpointing",  # auto's choice here, without a memory-estimate process per rank
                *lora_flags("--lora-dropout", "0", "--lora-export", "adapter")]

    assert run_main(args(tmp_path / "reference"), capsys)[0] == 0  # uninterrupted, one process
    out = tmp_path / "interrupted"
    saves = out / "checkpoints"
    # 2 ranks (the shared job), SIGTERM to rank 1 after step 2: both stop there (killed runs: test_resume.py)
    stopped = train_signalled(two_ranks, args(out), tmp_path / "run1", signal.SIGTERM, after_steps=2)
    assert stopped.returncode == 0 and "stopped by SIGTERM after step 2" in stopped.stdout, stopped.stderr[-3000:]
    assert checkpoint.latest_checkpoint(saves) == saves / "step_2" and [r["step"] for r in metrics(out)] == [1, 2]
    # The full state holds what trains: adapters and their optimizer state, no frozen base weight.
    saved = FileSystemReader(saves / "step_2").read_metadata().state_dict_metadata
    assert any("lora_A" in k for k in saved) and not any("base_layer" in k or "embed_tokens" in k for k in saved)
    code, printed, err = run_main_with_output(args(out), capsys)  # the same command, one process
    assert code == 0, err
    assert f"resumed from {saves / 'step_2'}: step 2, 8 samples seen; saved with world size 2" in printed
    expected, got = metrics(tmp_path / "reference"), metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    final = "hf_format/samples_16/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "reference" / final), load_file(out / final)
    assert a.keys() == b.keys()
    for name in a:  # float32 rounding of reductions in another order, through 4 Adam steps of lr 1e-2
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


# ---------------------------------------------------------------------------------------------------------------
# Reward models (--objective reward --lora): adapters on the base, the new score head a fully trained copy (peft's
# SEQ_CLS modules_to_save); the truth is transformers' one-label sequence classifier with peft's own LoRA layers,
# each sequence scored alone, TRL's loss per pair.


def peft_reward_reference(model_dir, trainable: dict, quantization=None):
    """The one-label sequence classifier as transformers loads it from `model_dir` (4-bit when `quantization` is a
    BitsAndBytesConfig), with peft's LoRA (all-linear, r 4, alpha 8, no dropout, task SEQ_CLS: the score head wrapped
    in a trained copy) whose trainable tensors are set to `trainable` ({name in the trainer's model: tensor}, every
    trainable tensor, the score copy included)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": "cpu"}}
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32,
                                                              **quantized)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="SEQ_CLS"))
    params = dict(peft.named_parameters())
    assert sorted(n for n, p in params.items() if p.requires_grad) == sorted(PEFT_PREFIX + n for n in trainable)
    with torch.no_grad():
        for name, value in trainable.items():
            params[PEFT_PREFIX + name].copy_(value)
    return peft


def scores(lm, pairs: list[dict]) -> list[list[float]]:
    """[[s(chosen), s(rejected)] of each pair]: each sequence alone through the classifier's own forward."""
    import torch

    with torch.no_grad():
        return [[lm(input_ids=torch.tensor([row[f"{side}_input_ids"]])).logits[0, 0].item()
                 for side in ("chosen", "rejected")] for row in pairs]


def reward_lora_config(data, model_dir, out, **overrides):
    import train

    # lora-init random: B starts non-zero, so both factors have a gradient to compare
    flags = {"batch_size": 6, "max_tokens_per_gpu": 128, "activation_checkpointing": False, "objective": "reward",
             "reward_center_coefficient": 0.05, "lora": True, "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
             "lora_init": "random", "save_dtype": "float32"}
    return train.TrainConfig(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(out),
                             **{**flags, **overrides})


def test_reward_lora_loss_and_gradients_equal_peft_on_hugging_faces_classifier_per_pair(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoConfig

    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective

    data = write_pairs(tmp_path / "pairs.jsonl", 6, seed=7)
    pairs = read_pairs(data)
    for k, margin in ((1, 0.75), (4, -0.5)):
        pairs[k]["margin"] = margin
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    pad = pairs[0]["chosen_input_ids"][-1]  # a pad id that ends a sequence: its score is read one token earlier
    model_dir = reward_model_dir(tiny_model_dir("qwen2"), tmp_path / "rm", pad_token_id=pad)
    config = reward_lora_config(data, model_dir, tmp_path / "o")
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    model = build_model(config, single, build_adapter(config))
    objective = build_objective(config, AutoConfig.from_pretrained(model_dir))
    trainable = {n: p.detach().clone() for n, p in model.lm.named_parameters() if p.requires_grad}
    # the adapters, and the score head trained in full (a copy; peft keeps the original frozen beside it)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable if n != "score.modules_to_save.default.weight")
    assert len(trainable) == 2 * 7 * 2 + 1
    truth = peft_reward_reference(model_dir, trainable)
    want_loss = reward_pair_loss(truth, pairs, center=0.05)
    want_loss.backward()
    want = {n.removeprefix(PEFT_PREFIX): p.grad for n, p in truth.named_parameters() if p.requires_grad}
    assert min(g.abs().max().item() for g in want.values()) > 0  # every trainable tensor has a gradient to compare
    for packs in ([np.arange(6)], [np.array([4, 0]), np.array([], int), np.array([5, 1, 2, 3])]):
        model.zero_grad(set_to_none=True)
        sums = train.forward_backward(model, objective, cache, packs, 6, 1, single.device)
        grads = {n: p.grad for n, p in model.lm.named_parameters() if p.grad is not None}
        assert sums[0].item() / 6 == pytest.approx(want_loss.item(), rel=1e-6), packs
        assert sorted(grads) == sorted(want)  # nothing frozen has a gradient
        rel = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in want.items())
        assert rel < 1e-5, (packs, rel)


def test_a_reward_model_with_lora_trains_and_both_exports_score_pairs_as_the_live_model(tmp_path, tiny_model_dir,
                                                                                       capsys):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model_dir = tiny_model_dir("llama")  # a causal LM: the score head is new, and trains in full beside the adapters
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=3, learnable=True)
    held = read_pairs(write_pairs(tmp_path / "held.jsonl", 3, seed=9, learnable=True))
    out = tmp_path / "out"
    run = run_in_process([
        "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
        "--objective", "reward", "--batch-size", "4", "--max-tokens-per-gpu", "64", "--max-steps", "6",
        "--learning-rate", "5e-3", "--validation-data-path", str(tmp_path / "held.jsonl"), "--eval-every-samples",
        "24", "--save-dtype", "float32", *lora_flags("--lora-dropout", "0")])
    records = metrics(out)
    assert records[-1]["loss"] < records[0]["loss"] - 0.1 and records[-1]["accuracy"] == 1.0
    final = out / "hf_format" / "samples_24"
    run.model.eval()
    live = scores(run.model.lm, held)
    head = run.model.lm.score
    assert (head.modules_to_save["default"].weight - head.original_module.weight).abs().max() > 1e-3  # it trained
    # The merged export: a plain one-label sequence classifier that scores each pair as the live model.
    merged = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32)
    assert merged.config.architectures[0].endswith("ForSequenceClassification") and merged.config.num_labels == 1
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    assert np.abs(np.array(scores(merged, held)) - live).max() < LOGITS_TOLERANCE
    margins = [c - r for c, r in live]
    assert records[-1]["validation_margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    base.score.weight.data.copy_(merged.score.weight)  # the trained head alone does not give the live scores:
    assert np.abs(np.array(scores(base, held)) - live).max() > 1e-3  # the adapters changed the base
    # The adapter folder: PEFT's, with the trained score head; on the base (whose score head is new) it scores as
    # the live model.
    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    assert any(".score." in k for k in load_file(final / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, final / "adapter")
    assert np.abs(np.array(scores(adapter, held)) - live).max() < LOGITS_TOLERANCE


def reward_lora_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    """Under torchrun: reward + LoRA on 2 FSDP2 ranks with skewed micro-steps (gradients of the adapters and the
    score copy against peft's per-pair truth), then one step and the export each rank writes its shards of."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import train
    from minitrain.training.checkpoint import save_export
    from minitrain.training.data import load_data
    from minitrain.training.distributed import cleanup_distributed, init_distributed
    from minitrain.training.lora import build_adapter
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective

    world = init_distributed("auto")
    config = reward_lora_config(data_path, model_dir, out_dir, fsdp_sharding_strategy="FULL_SHARD", batch_size=8)
    cache = load_data(config, world, vocab_size=10**6)
    pairs = read_pairs(Path(data_path))
    model = build_model(config, world, build_adapter(config))
    objective = build_objective(config, AutoConfig.from_pretrained(model_dir))
    full = lambda p: p.full_tensor() if isinstance(p, DTensor) else p  # noqa: E731
    trainable = {n: full(p).detach().clone() for n, p in model.lm.named_parameters() if p.requires_grad}
    packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
    sums = train.forward_backward(model, objective, cache, packs, 8, world.world_size, world.device)
    dist.all_reduce(sums)
    grads = {n: full(p.grad) for n, p in model.lm.named_parameters() if p.grad is not None}
    report = {"sharded_export": bool(getattr(model, "sharded_export", False))}
    if world.is_main:
        truth = peft_reward_reference(model_dir, trainable)
        loss = reward_pair_loss(truth, pairs, center=0.05)
        loss.backward()
        want = {n.removeprefix(PEFT_PREFIX): p.grad for n, p in truth.named_parameters() if p.requires_grad}
        report.update(loss=sums[0].item() / 8, want_loss=loss.item(), names=sorted(grads) == sorted(want),
                      max_rel=max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in want.items()))
    torch.optim.SGD(model.adapter.trainable_parameters(model), lr=0.5).step()
    saved = save_export(model, AutoTokenizer.from_pretrained(model_dir), config, world, samples_seen=8)
    pack = objective.pack(cache, np.arange(4))
    p = pack.pairs.pack
    model.eval()
    with torch.no_grad():  # through FSDP, every rank: the live model's scores of the 8 sequences of pairs 0-3
        live = model(p.input_ids, p.position_ids, pack.scoring, p.cu_seq_lens, p.max_length).tolist()
    if world.is_main:
        from peft import PeftModel

        merged = AutoModelForSequenceClassification.from_pretrained(saved, dtype=torch.float32)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base, saved / "adapter")
        flat = lambda s: [x for pair in s for x in pair]  # noqa: E731
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        report.update(merged_diff=float(np.abs(np.subtract(flat(scores(merged, pairs[:4])), live)).max()),
                      adapter_diff=float(np.abs(np.subtract(flat(scores(adapter, pairs[:4])), live)).max()),
                      moved=float(np.abs(np.subtract(flat(scores(base, pairs[:4])), live)).max()))
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_reward_lora_on_two_ranks_gives_the_per_pair_gradients_and_sharded_exports(tmp_path, tiny_model_dir,
                                                                                   two_ranks):
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=2)
    rows = read_pairs(data)
    rows[3]["margin"] = 1.25
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = reward_model_dir(tiny_model_dir("llama"), tmp_path / "rm")  # tied embeddings, score in the file
    run = two_ranks.run(__name__, "reward_lora_worker", [model_dir, data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sharded_export"]  # each rank read its shards, and wrote them
    assert report["names"] and report["loss"] == pytest.approx(report["want_loss"], rel=1e-6)
    assert report["max_rel"] < 1e-5, report["max_rel"]
    assert report["moved"] > 1e-3  # the step changed the scores: the comparisons below mean something
    assert report["merged_diff"] < LOGITS_TOLERANCE and report["adapter_diff"] < LOGITS_TOLERANCE, report


if __name__ == "__main__":
    lora_worker(*sys.argv[1:4])


def test_a_bitsandbytes_outside_the_supported_range_is_refused_without_importing_it(monkeypatch):
    import importlib.metadata
    import sys

    from minitrain.training import lora

    installed = {"version": "0.50.2"}

    def version(name):
        assert name == "bitsandbytes"
        if installed["version"] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed["version"]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    assert lora.bitsandbytes_problem() == (
        "bitsandbytes 0.50.2 is installed; minitrain supports >=0.49,<0.50 (0.50 fetches a kernel from the Hugging "
        "Face hub when peft imports it): pip install 'bitsandbytes>=0.49,<0.50'")
    assert "bitsandbytes" not in sys.modules
    for ok in ("0.49.0", "0.49.2", None):
        installed["version"] = ok
        assert lora.bitsandbytes_problem() is None
    installed["version"] = "0.48.2"
    assert lora.bitsandbytes_problem().startswith("bitsandbytes 0.48.2 is installed; minitrain supports >=0.49,<0.50")


def test_importing_the_lora_stack_is_quiet_and_train_does_not_import_bitsandbytes():
    """peft imports bitsandbytes, whose import on an AVX512-BF16 CPU logs a failed hub-kernel load: a --lora run must
    not print it; a run without --lora must not import bitsandbytes at all."""
    import subprocess
    import sys

    code = ("import sys, train; assert 'bitsandbytes' not in sys.modules, 'train imports bitsandbytes'; "
            "from minitrain.training import lora; import peft; print('bitsandbytes' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "gemm_4bit_forward" not in run.stderr and "kernels-community" not in run.stderr, run.stderr[-2000:]
