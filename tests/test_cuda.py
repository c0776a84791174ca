"""CUDA checks (`pytest -m cuda`; skipped without a GPU): the real kernels against the exact CPU-tested paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_attention import (  # noqa: F401 (cache and trained_qwen2_dir are fixtures)
    BF16_GRAD_REL,
    BF16_PER_TOKEN_MAX,
    BF16_PER_TOKEN_MEAN,
    cache,
    grad_rel,
    own_loss,
    own_token_losses,
    trained_qwen2_dir,
)
from tests.test_families import check_liger_against_plain, liger_against_plain, zoo_dir  # noqa: F401 (a fixture)
from tests.test_train import ROOT, torchrun, write_data

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_varlen_kernel_in_bf16_equals_each_sample_alone(cache, tiny_model_dir, trained_qwen2_dir):  # noqa: F811
    """Per token and per gradient, on a model with trained-size logits: a sample attending to another, or a boundary
    one token off, moves them far outside these bounds (tests/test_attention.py's control shows it on CPU)."""
    from transformers import AutoModelForCausalLM

    from minitrain.training import attention
    from minitrain.training.data import make_pack
    from minitrain.training.model import PackedCausalLM

    model_dir = tiny_model_dir("qwen2")  # GQA
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attention.VARLEN)
    model = PackedCausalLM(lm.to(CUDA))
    assert model.attention_takes_boundaries
    pack = make_pack(cache, np.arange(6)).to(CUDA)
    with torch.no_grad():
        loss = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, cu_seq_lens=pack.cu_seq_lens,
                     max_length=pack.max_length)
        truth = own_loss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cache, np.arange(6))
    assert loss.item() == pytest.approx(truth.item(), rel=2e-2)  # bf16 against fp32, each sample alone

    lm = AutoModelForCausalLM.from_pretrained(trained_qwen2_dir, dtype=torch.bfloat16,
                                              attn_implementation=attention.VARLEN).to(CUDA)
    model = PackedCausalLM(lm)
    per_token = model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, cu_seq_lens=pack.cu_seq_lens,
                      max_length=pack.max_length, per_token=True)
    per_token.float().sum().backward()
    plain = AutoModelForCausalLM.from_pretrained(trained_qwen2_dir, dtype=torch.float32)
    truth_tokens = own_token_losses(plain, cache, np.arange(6))
    truth_tokens.sum().backward()
    diff = (per_token.detach().float().cpu() - truth_tokens.detach()).abs()
    assert diff.max() < BF16_PER_TOKEN_MAX and diff.mean() < BF16_PER_TOKEN_MEAN, diff
    rel = grad_rel({n: p.grad.cpu() for n, p in lm.named_parameters()}, {n: p.grad for n, p in plain.named_parameters()})
    assert rel < BF16_GRAD_REL, rel


def test_liger_kernels_take_the_models_softcap_and_scaling_in_compiled_triton(zoo_dir):  # noqa: F811
    """tests/test_families.py's Liger check (there under Triton's interpreter) with Liger's compiled kernels: Llama,
    Granite's division, Cohere's multiplication and Gemma-2's softcap; loss and every gradient against the model's own
    forward + plain cross-entropy, on models with trained-size logits."""
    archs = ["llama", "gemma2", "granite", "cohere"]
    check_liger_against_plain(liger_against_plain([str(zoo_dir(a)) for a in archs], "cuda"), archs)


def test_bf16_training_is_within_bf16_tolerance_of_fp32(tmp_path, tiny_model_dir):
    """bf16 compute on fp32 weights (FSDP2's policy on 2+ GPUs, autocast on one) against fp32 on the CPU. The
    losses agree to bf16's precision; and with a learning rate of 1e-5 each weight's update (Adam's first steps move
    a weight by ~lr) is far below bf16's resolution at these weights (~1e-4 at 0.02): with fp32 master weights the
    update matches the CPU's, with bf16 master weights it would be 0 or a multiple of that resolution."""
    from safetensors.torch import load_file

    data = write_data(tmp_path / "data.jsonl", 8, vocab=700, seed=3)
    args = ["--data-path", str(data), "--model-name-or-path", str(tiny_model_dir("llama")), "--batch-size", "4",
            "--max-tokens-per-gpu", "128", "--max-steps", "3", "--learning-rate", "1e-3"]
    small = [*args[:-1], "1e-5", "--max-steps", "2", "--save-dtype", "float32"]
    losses, updates = {}, {}
    initial = load_file(tiny_model_dir("llama") / "model.safetensors")
    for name in ("cuda", "cpu"):
        for run_args, out in ((args, tmp_path / name), (small, tmp_path / f"{name}_small")):
            if name == "cuda" and torch.cuda.device_count() >= 2:
                run = torchrun(["train.py", *run_args, "--output-dir", str(out), "--fsdp-sharding-strategy",
                                "FULL_SHARD"])
            else:
                env = dict(os.environ, PYTHONPATH=str(ROOT), **({"CUDA_VISIBLE_DEVICES": ""} if name == "cpu" else {}))
                run = subprocess.run([sys.executable, "train.py", *run_args, "--output-dir", str(out)], cwd=ROOT,
                                     env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        final = load_file(tmp_path / f"{name}_small" / "hf_format" / "samples_8" / "model.safetensors")
        updates[name] = torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)])
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=3e-2)
    cuda, cpu = updates["cuda"], updates["cpu"]
    moved = cpu.abs() > 5e-6  # the weights the CPU run moved by about lr or more
    assert moved.float().mean() > 0.5
    close = ((cuda - cpu).abs() <= 0.25 * cpu.abs()) & moved
    assert close.sum() >= 0.9 * moved.sum(), (close.sum().item(), moved.sum().item())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_give_the_single_gpu_gradient(tmp_path, tiny_model_dir):
    from tests.test_train import (
        test_two_ranks_with_skewed_micro_steps_give_the_single_process_gradient as check,
    )

    check(tmp_path, tiny_model_dir)  # the CPU test's worker, on two GPUs with NCCL


def test_qlora_trains_and_its_exports_agree(tmp_path, tiny_model_dir):
    """train.py --lora --qlora on the GPU(s): step 1 is the 4-bit base's own loss (one sample at a time, as
    transformers loads it), the loss falls, and the adapter folder on the 4-bit base gives the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.test_qlora import per_sample_loss

    model_dir = tiny_model_dir("qwen2")
    data = write_data(tmp_path / "data.jsonl", 4, vocab=700, seed=1)
    out = tmp_path / "out"
    args = ["train.py", "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
            "--batch-size", "4", "--max-tokens-per-gpu", "128", "--max-steps", "12", "--learning-rate", "2e-2",
            "--lora", "--qlora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--lora-modules-to-save", "lm_head", "--save-dtype", "float32"]
    if torch.cuda.device_count() >= 2:
        run = torchrun([*args, "--fsdp-sharding-strategy", "FULL_SHARD"])
    else:
        run = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "qlora: " in run.stdout and "4-bit NF4" in run.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    def four_bit_base(compute: torch.dtype):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quantization,
                                                    device_map={"": 0})

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    trained = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        truth = per_sample_loss(four_bit_base(torch.bfloat16), rows, trained, device=CUDA).item()
    # A sanity check only: on this tiny model the 4-bit and full-precision losses differ by ~1e-4 relative, within
    # bf16's noise. What shows the run trained on 4-bit weights is the exports' comparison below.
    assert losses[0] == pytest.approx(truth, rel=2e-2)
    assert losses[-1] < losses[0] * 0.5, losses
    final = out / "hf_format" / "samples_48"
    ids = torch.tensor([rows[0]["input_ids"]], device=CUDA)
    with torch.no_grad():  # fp32 compute everywhere: the adapters are fp32 in the folder, the 4-bit codes the same
        adapter = PeftModel.from_pretrained(four_bit_base(torch.float32), final / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(CUDA).eval()
        original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(CUDA)
        on_original = PeftModel.from_pretrained(original, final / "adapter").eval()
        a, m, o = (x(input_ids=ids).logits for x in (adapter, merged, on_original))
    assert (a - m).abs().max().item() < 1e-4  # the merged model is the 4-bit model + adapters
    assert (o - m).abs().max().item() > 1e-3  # and not the full-precision base + adapters
