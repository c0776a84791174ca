"""QLoRA (lora.QLoRA: LoRA on bitsandbytes' 4-bit NF4 base weights) through train.py's own functions.

train.py offers --qlora on CUDA only (a one-line refusal elsewhere, tests/test_lora.py); bitsandbytes' CPU backend
runs the same quantized layers, so these tests build and train the QLoRA model on CPU by calling the trainer's
functions directly (build_model, forward_backward, setup/loop, save_export), not through validate. The truth is
independent of the trainer: the 4-bit model as transformers and peft load it, one sample at a time, with plain
cross-entropy. tests/test_cuda.py runs `train.py --lora --qlora` end to end on a GPU.
"""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.test_lora import PEFT_PREFIX, SKEWED, lora_flags, peft_reference, per_sample_loss
from tests.test_resume import metrics
from tests.test_train import base_args, write_data

# found, not imported, at collection: importing bitsandbytes costs ~1.8 CPU-s, in every test process that collects
pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")

def nf4():
    """QLoRA's quantization as the trainer asks transformers for it on CPU (NF4, double quantization, fp32 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)


def quantized_reference(model_dir: str, adapters: dict):
    """The 4-bit base as transformers loads it, with peft's LoRA layers set to `adapters` ({name in the Hugging Face
    model: tensor})."""
    return standard_layout(peft_reference(model_dir, adapters, nf4()))


def standard_layout(model):
    """The model with its 4-bit layers kept in the standard layout, as the trainer keeps them (QLoRA.apply): in an
    eval-mode forward without gradients, bitsandbytes >= 0.49 on an AVX512-BF16 CPU would repack them for its bf16
    inference kernel, a different computation (and other bytes) than the one trained."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def logits(lm, input_ids):
    import torch

    with torch.no_grad():
        return standard_layout(lm)(input_ids=input_ids, use_cache=False).logits


def qlora_worker(model_dir: str, data_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train
    from minitrain.training import checkpoint
    from minitrain.training.checkpoint import save_export
    from minitrain.training.data import load_data
    from minitrain.training.distributed import (
        cleanup_distributed,
        init_distributed,
        root_unsharded,
    )
    from minitrain.training.lora import build_adapter, is_4bit
    from minitrain.training.model import build_model
    from minitrain.training.objectives import SFT

    world = init_distributed("auto")
    config = train.TrainConfig(
        data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=8, max_tokens_per_gpu=256,
        save_dtype="float32", activation_checkpointing=False, lora=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
        lora_init="random", qlora=True,  # lora-init random: A's gradient is not zero, so both factors are compared
    )
    cache = load_data(config, world, vocab_size=10**6)
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines()[:8]]
    step_trained = int(cache.trained[:8].sum())
    report = {"step_trained": step_trained}
    for strategy in ("FULL_SHARD", "NO_SHARD"):
        cfg = replace(config, fsdp_sharding_strategy=strategy, activation_checkpointing=strategy == "FULL_SHARD")
        model = build_model(cfg, world, build_adapter(cfg))
        params = dict(model.lm.named_parameters())
        four_bit = {n: p for n, p in params.items() if is_4bit(p)}
        # Whole on every rank (not sharded), the same bytes everywhere.
        checksum = torch.stack([p.data.view(torch.uint8).long().sum() for p in four_bit.values()])  # of the bytes
        sums = [torch.zeros_like(checksum) for _ in range(world.world_size)]
        dist.all_gather(sums, checksum)
        adapters0 = {n: p.full_tensor().detach().clone() for n, p in params.items() if p.requires_grad}
        packs = [np.asarray(p, dtype=np.int64) for p in SKEWED[world.rank]]
        local_sum = train.forward_backward(model, SFT(), cache, packs, step_trained, world.world_size, world.device)
        dist.all_reduce(local_sum)
        grads = {n: p.grad.full_tensor() for n, p in params.items() if p.requires_grad}
        if world.is_main:
            reference = quantized_reference(model_dir, adapters0)
            # The bytes as transformers quantized them, read before any forward: bitsandbytes >= 0.49 repacks them
            # for its CPU inference kernel in an eval-mode forward on AVX512-BF16 CPUs (the trainer keeps them).
            ref_four_bit = {n.removeprefix(PEFT_PREFIX): p.data.clone()
                            for n, p in reference.named_parameters() if is_4bit(p)}
            loss = per_sample_loss(reference, rows, step_trained)
            loss.backward()
            truth = {n.removeprefix(PEFT_PREFIX): p.grad for n, p in reference.named_parameters() if p.requires_grad}
            report[strategy] = {
                "four_bit": len(four_bit),
                "four_bit_whole": all(not isinstance(p, DTensor) for p in four_bit.values()),
                "same_on_ranks": all(torch.equal(s, sums[0]) for s in sums),
                "checksum": int(checksum.sum()),
                "same_as_transformers": sorted(four_bit) == sorted(ref_four_bit) and all(
                    torch.equal(p.data.view(torch.uint8), ref_four_bit[n].view(torch.uint8))
                    for n, p in four_bit.items()),
                "adapters_sharded": all(isinstance(params[n], DTensor) for n in grads),
                "frozen_with_grad": [n for n, p in params.items() if not p.requires_grad and p.grad is not None],
                "names": sorted(grads) == sorted(truth),
                "loss": local_sum.item() / step_trained,
                "truth_loss": loss.item(),
                "max_rel": max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in truth.items()),
                "min_grad": min(g.abs().max().item() for g in truth.values()),
            }
    # Exports of the last (FULL_SHARD... NO_SHARD) model after one optimizer step on its adapters.
    optimizer = torch.optim.SGD(model.adapter.trainable_parameters(model), lr=0.5)
    optimizer.step()
    saved = save_export(model, AutoTokenizer.from_pretrained(model_dir), cfg, world, samples_seen=8)
    # A full-state checkpoint of the 2 ranks, restored into a freshly built model: the stepped adapters come back.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer_state = {"samples_seen": 8, "last_export_samples": 8, "data": "x", "scheduler": scheduler.state_dict()}
    full_state = checkpoint.save(Path(out_dir, "checkpoints"), 1, model, optimizer, trainer_state, {})
    fresh = build_model(cfg, world, build_adapter(cfg))
    fresh_optimizer = torch.optim.SGD(fresh.adapter.trainable_parameters(fresh), lr=0.5)
    checkpoint.load(full_state, fresh, fresh_optimizer, torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1))
    restored = {n: p.full_tensor() for n, p in fresh.lm.named_parameters() if p.requires_grad}
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad(), root_unsharded(model):  # the live model's logits (collective: the blocks all-gather)
        live = model.lm(input_ids=ids, use_cache=False).logits
    adapters = {n: p.full_tensor().detach() for n, p in model.lm.named_parameters() if p.requires_grad}
    if world.is_main:
        from peft import PeftModel

        adapter = PeftModel.from_pretrained(quantized_reference(model_dir, adapters0).base_model.model,
                                            saved / "adapter")  # the 4-bit base as people load it, + the folder
        merged = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                             saved / "adapter")
        report["adapter_logits_diff"] = (logits(adapter, ids) - live).abs().max().item()
        report["merged_logits_diff"] = (logits(merged, ids) - live).abs().max().item()
        report["original_base_diff"] = (logits(original, ids) - live).abs().max().item()
        stepped = quantized_reference(model_dir, adapters)  # transformers + peft with the live adapters
        report["stepped_from_reference"] = (logits(stepped, ids) - live).abs().max().item()
        report["merged_is_plain"] = not any("lora" in k or "absmax" in k for k in merged.state_dict())
        from torch.distributed.checkpoint import FileSystemReader

        report["restored"] = sorted(restored) == sorted(adapters) and all(
            torch.equal(restored[n], adapters[n]) for n in adapters)
        report["changed_by_step"] = all(not torch.equal(adapters[n], adapters0[n]) for n in adapters)
        keys = FileSystemReader(full_state).read_metadata().state_dict_metadata
        report["checkpoint_model_keys"] = sorted(k for k in keys if k.startswith("model."))
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_rank_qlora_gradients_are_the_4bit_models_own_and_exports_give_the_live_logits(tmp_path, tiny_model_dir,
                                                                                            two_ranks):
    data = write_data(tmp_path / "data.jsonl", 8, vocab=700)
    run = two_ranks.run(__name__, "qlora_worker", [tiny_model_dir("llama"), data, tmp_path / "out"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for strategy in ("FULL_SHARD", "NO_SHARD"):
        r = report[strategy]
        assert r["four_bit"] == 7 * 2  # q k v o gate up down of both blocks; the (tied) LM head stays fp32
        assert r["four_bit_whole"] and r["same_on_ranks"] and r["same_as_transformers"], r
        assert r["checksum"] > 0
        assert r["adapters_sharded"] and r["names"] and not r["frozen_with_grad"], r
        assert r["min_grad"] > 0
        assert r["loss"] == pytest.approx(r["truth_loss"], rel=1e-5), strategy
        assert r["max_rel"] < 1e-5, (strategy, r["max_rel"])
    # The adapter folder on the 4-bit base, and the merged fp32 model (dequantized weights + adapters), are the live
    # model; the same adapters on the original full-precision base are not (the 4-bit error), so these checks bite.
    assert report["adapter_logits_diff"] < 1e-5 and report["stepped_from_reference"] < 1e-5
    assert report["merged_logits_diff"] < 1e-5
    assert report["original_base_diff"] > 1e-3
    assert report["merged_is_plain"]
    # The full-state checkpoint holds the adapters and nothing of the frozen 4-bit weights (nor their quantization
    # state); restored on 2 ranks into a fresh model, the stepped adapters come back bit for bit.
    assert report["restored"] and report["changed_by_step"]
    keys = report["checkpoint_model_keys"]
    assert len(keys) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:4]


def test_reward_qlora_is_the_4bit_classifiers_own_loss_and_its_exports_score_as_the_live_model(tmp_path,
                                                                                                 tiny_model_dir):
    """--objective reward --lora --qlora on one process: the adapters on the 4-bit base and the score head (kept in
    full precision by transformers) trained in full; loss and gradients against transformers' 4-bit classifier with
    peft's layers, per pair; then one step, and both exports score as the live model."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import train
    from minitrain.training.checkpoint import save_export
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.lora import build_adapter, is_4bit
    from minitrain.training.model import build_model
    from minitrain.training.objectives import build_objective
    from tests.test_lora import peft_reward_reference, reward_lora_config, scores
    from tests.test_preference import read_pairs, reward_model_dir, reward_pair_loss, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", 6, seed=7)
    pairs = read_pairs(data)
    model_dir = reward_model_dir(tiny_model_dir("llama"), tmp_path / "rm")
    config = reward_lora_config(data, model_dir, tmp_path / "o", qlora=True)
    single = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, single, vocab_size=10**6)
    model = build_model(config, single, build_adapter(config))
    objective = build_objective(config, AutoConfig.from_pretrained(model_dir))
    params = dict(model.lm.named_parameters())
    assert sum(is_4bit(p) for p in params.values()) == 7 * 2  # the blocks' linear layers; the score head is not
    trainable = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable
    truth = standard_layout(peft_reward_reference(model_dir, trainable, nf4()))
    want_loss = reward_pair_loss(truth, pairs, center=0.05)
    want_loss.backward()
    want = {n.removeprefix(PEFT_PREFIX): p.grad for n, p in truth.named_parameters() if p.requires_grad}
    packs = [np.array([4, 0]), np.array([], int), np.array([5, 1, 2, 3])]
    sums = train.forward_backward(model, objective, cache, packs, 6, 1, single.device)
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert sums[0].item() / 6 == pytest.approx(want_loss.item(), rel=1e-5)
    assert sorted(grads) == sorted(want)
    assert max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in want.items()) < 1e-5
    torch.optim.SGD(model.adapter.trainable_parameters(model), lr=0.5).step()
    saved = save_export(model, AutoTokenizer.from_pretrained(model_dir), config, single, samples_seen=6)
    model.eval()
    live = np.array(scores(standard_layout(model.lm), pairs))
    merged = AutoModelForSequenceClassification.from_pretrained(saved, dtype=torch.float32)  # plain fp32
    adapter = PeftModel.from_pretrained(standard_layout(
        AutoModelForSequenceClassification.from_pretrained(model_dir, quantization_config=nf4(),
                                                           device_map={"": "cpu"}, dtype=torch.float32)),
        saved / "adapter")
    original = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    assert not any("lora" in k or "absmax" in k for k in merged.state_dict())
    assert np.abs(np.array(scores(merged, pairs)) - live).max() < 1e-5
    assert np.abs(np.array(scores(standard_layout(adapter), pairs)) - live).max() < 1e-5
    assert np.abs(np.array(scores(original, pairs)) - live).max() > 1e-3  # the checks above mean something


# ---------------------------------------------------------------------------------------------------------------
# One process: train.py's setup() and loop() with --qlora


def run_qlora(args: list[str]):
    """train.py's setup() and loop() in this process (validate would refuse --qlora without CUDA)."""
    import train
    from minitrain.training.checkpoint import StopSignals
    from minitrain.training.distributed import init_distributed

    run = train.setup(train.parse_args([*args, "--qlora"]), init_distributed("auto"))
    train.loop(run, StopSignals())
    run.log.close()
    return run


def test_qlora_loss_falls_and_resume_gives_the_uninterrupted_losses(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("qwen2")  # untied LM head: trained in full beside the adapters (it stays fp32)
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)

    def args(out: str, steps: int) -> list[str]:
        return [*base_args(tmp_path, model_dir, data), "--output-dir", str(tmp_path / out), "--max-steps",
                str(steps), "--learning-rate", "2e-2", "--save-dtype", "float32", "--no-activation-checkpointing",
                *lora_flags("--lora-modules-to-save", "lm_head", "--lora-dropout", "0.2", "--lora-export", "adapter")]

    run_qlora(args("reference", 12))
    printed = capsys.readouterr().out
    assert "qlora: " in printed and "4-bit" in printed, printed[-2000:]
    records = metrics(tmp_path / "reference")
    assert records[-1]["loss"] < records[0]["loss"] * 0.5, [r["loss"] for r in records]
    run_qlora(args("resumed", 5))
    run_qlora(args("resumed", 12))
    assert "resumed from" in capsys.readouterr().out
    got = metrics(tmp_path / "resumed")
    assert [r["loss"] for r in got] == [r["loss"] for r in records]  # bit for bit, dropout masks included
    final = "hf_format/samples_48/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "reference" / final), load_file(tmp_path / "resumed" / final)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_qlora_flag_problems_on_a_cuda_machine(monkeypatch):
    import importlib.util

    import train
    from minitrain.training import lora

    config = train.TrainConfig("d", "m", "o", batch_size=1, max_tokens_per_gpu=8, lora=True, qlora=True)
    assert lora.flag_problems(config, cuda=True, model_ok=False) == []
    compiled = lora.flag_problems(replace(config, compile=True), cuda=True, model_ok=False)
    assert compiled == ["--compile with --qlora: torch.compile of bitsandbytes' 4-bit layers is not tested by "
                        "minitrain; drop --compile"]
    assert lora.flag_problems(replace(config, lora=False), cuda=True, model_ok=False) == [
        "--qlora need --lora; add --lora or drop them"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    assert lora.flag_problems(config, cuda=True, model_ok=False) == [
        "--qlora needs bitsandbytes, which is not installed: pip install -r requirements.txt"]


def test_a_4bit_layer_cannot_be_a_module_to_save(tmp_path, tiny_model_dir):
    """peft's full copy of a 4-bit layer would be packed bytes marked trainable (no gradient, a corrupt adapter file):
    refused from the flags on a meta-device model, and again by QLoRA.apply on the loaded one."""
    import torch

    import train
    from minitrain.training import lora
    from minitrain.training.distributed import World
    from minitrain.training.model import ModelError, build_model

    model_dir = tiny_model_dir("qwen2")
    config = train.TrainConfig(str(write_data(tmp_path / "d.jsonl", 4, vocab=700)), str(model_dir), str(tmp_path),
                               batch_size=4, max_tokens_per_gpu=64, lora=True, qlora=True,
                               lora_target_modules=["q_proj"], lora_modules_to_save=["o_proj", "lm_head"])
    assert lora.module_problems(config) == [
        "--lora-modules-to-save o_proj: --qlora stores its linear layers in 4-bit, which cannot train in full; drop "
        "it, or drop --qlora"]
    assert lora.module_problems(replace(config, lora_modules_to_save=["lm_head"])) == []  # the head stays fp32
    with pytest.raises(ModelError, match=r"--qlora: model\.layers\.0\.self_attn\.o_proj\.modules_to_save\.default"
                                         r"\.weight is a 4-bit weight and cannot train in full"):
        build_model(config, World(0, 0, 1, 1, torch.device("cpu")), lora.build_adapter(config))


if __name__ == "__main__":
    qlora_worker(*sys.argv[1:4])
