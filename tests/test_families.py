"""Exact on every causal-LM family in the zoo (tests/tiny_models.py), or a one-line refusal.

The truth is computed here, never by the code under test: the Hugging Face model's own forward, one sample at a
time, and plain F.cross_entropy (+ the model's own router aux loss for mixture-of-experts models). The trainer side
is train.py's own functions (build_model with its start-up probe, forward_backward). Zoo models have LM heads
scaled to trained-size logits, where Granite's scaling, Cohere's logit_scale and Gemma's softcap show.

The 2-process FSDP2 gradients of one model per block layout run in the session's shared 2-rank torchrun job.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_train import write_data
from tests import liger_interpreter
from tests.tiny_models import REFUSED, ZOO, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED = tuple(a for a in ZOO if a not in REFUSED)
TRANSFORMED = ("gemma2", "gemma3", "granite", "cohere")  # the trainer's loss was 1.7x-16x the model's before
MOE = ("mixtral", "qwen2_moe", "olmoe")
LAYOUTS = {  # family -> where its blocks are; the first of each layout runs in the 2-process gradient job
    "llama": "model.layers", "mixtral": "model.layers", "gpt2": "transformer.h", "falcon": "transformer.h",
    "bloom": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
}
SAMPLES = 6


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory, tokenizer_dir):
    """Factory: zoo_dir("gemma2") -> HF folder of the tiny zoo model (trained-size logits, chatml tokenizer)."""
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root, tokenizer_dir("chatml"), trained_logits=True)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def zoo_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("zoo_data") / "data.jsonl", SAMPLES, vocab=700, seed=3)


def own_model(model_dir):
    """The Hugging Face model itself, eval mode, with the attention kernel the trainer picks on CPU."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
    )

    from minitrain.training.families import attention_implementation

    config = AutoConfig.from_pretrained(model_dir)
    attn = attention_implementation(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], torch.device("cpu"))
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def rows(data_path):
    return [json.loads(line) for line in Path(data_path).read_text().splitlines()]


@torch.no_grad()
def own_step_loss(model_dir, data_path) -> tuple[float, float | None]:
    """The model's own loss of one step holding every sample in one pack: its forward one sample at a time + plain
    cross-entropy over the trained tokens, / trained tokens, + coef x its own aux loss of the packed row (MoE)."""
    lm = own_model(model_dir)
    ce, n, ids_all = 0.0, 0, []
    for row in rows(data_path):
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        logits = lm(input_ids=ids[None], use_cache=False).logits[0].float()
        ce += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        n += int((labels[1:] != -100).sum())
        ids_all.append(ids)
    if not getattr(lm.config, "output_router_logits", False):
        return ce / n, None
    ids = torch.cat(ids_all)[None]
    pos = torch.cat([torch.arange(len(i)) for i in ids_all])[None]
    aux = lm(input_ids=ids, position_ids=pos, use_cache=False).aux_loss.item()
    return ce / n + lm.router_aux_loss_coef * aux, aux


def trainer_step_loss(model_dir, data_path, out_dir, activation_checkpointing=True):
    """train.py's own step-1 loss (one process, one micro-step) and the router aux loss it reports."""
    import train
    from minitrain.training.data import load_data
    from minitrain.training.distributed import World
    from minitrain.training.model import build_model
    from minitrain.training.objectives import SFT

    config = train.TrainConfig(
        data_path=str(data_path), model_name_or_path=str(model_dir), output_dir=str(out_dir), batch_size=SAMPLES,
        max_tokens_per_gpu=512, activation_checkpointing=activation_checkpointing,
    )
    world = World(0, 0, 1, 1, torch.device("cpu"))
    cache = load_data(config, world, vocab_size=10**6)
    model = build_model(config, world)
    units = int(cache.trained.sum())
    loss_sum = train.forward_backward(model, SFT(), cache, [np.arange(SAMPLES)], units, 1, world.device)
    aux = model.pop_router_aux_sum()
    return model, loss_sum.item() / units, None if aux is None else aux.item() / units


# ---------------------------------------------------------------------------------------------------------------
# The loss is the model's own


@pytest.mark.parametrize("arch", ACCEPTED)
def test_step_one_loss_is_the_models_own(arch, zoo_dir, zoo_data, tmp_path):
    model_dir = zoo_dir(arch)
    truth, truth_aux = own_step_loss(model_dir, zoo_data)
    model, loss, aux = trainer_step_loss(model_dir, zoo_data, tmp_path)
    assert loss == pytest.approx(truth, rel=1e-5), (arch, loss / truth)
    if arch in MOE:
        assert aux == pytest.approx(truth_aux, rel=1e-5) and aux > 0
    else:
        assert aux is None
    # Production's configuration: every block activation-checkpointed, every parameter with a gradient.
    from minitrain.training.families import decoder_blocks

    assert all(block.gradient_checkpointing for block in decoder_blocks(model.lm))
    assert all(p.grad is not None for p in model.parameters())


def test_the_zoo_transforms_logits_enough_to_matter(zoo_dir):
    """Without the transform the loss would differ: what the test above guards is not a rounding error."""
    from minitrain.training.families import logit_transform

    for arch in TRANSFORMED:
        lm = own_model(zoo_dir(arch))
        transform = logit_transform(lm.config)
        ids = torch.randint(0, lm.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            own = lm(input_ids=ids, use_cache=False).logits[0, :-1]
            raw = lm.get_output_embeddings()(lm.base_model(input_ids=ids, use_cache=False).last_hidden_state)[0, :-1]
        torch.testing.assert_close(transform(raw), own, rtol=1e-5, atol=1e-4)
        ratio = (F.cross_entropy(raw, ids[0, 1:]) / F.cross_entropy(own, ids[0, 1:])).item()
        assert not 0.8 < ratio < 1.25, (arch, ratio)


@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.125, None), (16.0, None), (1.0, 30.0), (4.0, 5.0)])
def test_chunked_ce_with_a_logit_transform_equals_autograd_in_value_and_gradient(scale, softcap):
    from minitrain.training.families import LogitTransform
    from minitrain.training.loss import chunked_ce_sum

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    # Model-sized logits after the transform (std ~12, where a softcap of 5 or 30 bends them), as in a trained model
    weight = (torch.randn(50, 16, generator=g) * 3 / scale).requires_grad_()
    bias = (torch.randn(50, generator=g) / scale).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    transform = LogitTransform(scale, softcap)
    plain = F.cross_entropy(transform(hidden @ weight.T + bias), targets, reduction="sum")
    expected = torch.autograd.grad(plain, (hidden, weight, bias))
    chunked = chunked_ce_sum(hidden, weight, bias, targets, chunk_rows=8, transform=transform)
    got = torch.autograd.grad(chunked, (hidden, weight, bias))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    for a, b in zip(got, expected):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("arch", ACCEPTED)
def test_packed_forward_equals_per_sample_forward(arch, zoo_dir):
    lm = own_model(zoo_dir(arch))
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(0, lm.config.vocab_size, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([lm(input_ids=s[None], use_cache=False).logits[0] for s in samples])
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5 * alone.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, no traceback


def run_main(args: list[str], capsys) -> tuple[int, str]:
    import train

    capsys.readouterr()
    code = train.main(args)
    return code, capsys.readouterr().err


def main_args(model_dir, data, out) -> list[str]:
    return ["--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(out),
            "--batch-size", "2", "--max-tokens-per-gpu", "512", "--max-steps", "1"]


@pytest.mark.parametrize("arch", REFUSED)
def test_a_family_that_does_not_isolate_packed_samples_is_refused_in_one_line(arch, zoo_dir, zoo_data, tmp_path,
                                                                             capsys):
    code, err = run_main(main_args(zoo_dir(arch), zoo_data, tmp_path / "out"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"model type {arch!r} with attn_implementation" in err and "does not isolate packed samples" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_refused_family_stops_every_rank_under_torchrun_with_its_line(zoo_dir, zoo_data, tmp_path, two_ranks):
    # checkpointing given: no memory-estimate process per rank (auto: other 2-rank CLI runs), not what this tests
    args = [*main_args(zoo_dir("opt"), zoo_data, tmp_path / "out"), "--no-activation-checkpointing"]
    run = two_ranks.train(args, tmp_path, timeout=240)
    assert run.returncode == 2  # main's own error exit on both ranks (an exception out of main fails the worker)
    for rank in (0, 1):
        assert f"[rank {rank}] train.py: error: model type 'opt' with attn_implementation" in run.stderr, run.stderr
    assert 'train.py", line' not in run.stderr  # no traceback from our processes (torchrun prints its own summary)


def scaled_llama_dir(tmp_path, tokenizer_dir) -> Path:
    """A family minitrain has never heard of, whose forward multiplies its logits by 3."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    class ScaledLlamaConfig(LlamaConfig):
        model_type = "scaled_llama"

    class ScaledLlamaForCausalLM(LlamaForCausalLM):
        config_class = ScaledLlamaConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    AutoConfig.register("scaled_llama", ScaledLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(ScaledLlamaConfig, ScaledLlamaForCausalLM, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("chatml"))
    torch.manual_seed(0)
    config = ScaledLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=len(tokenizer))
    path = tmp_path / "scaled_llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_start_up_probe_refuses_a_logit_transform_it_does_not_know(tmp_path, tokenizer_dir, zoo_data, capsys):
    """No table knows 'scaled_llama': only the probe stands between it and training on a different loss (without
    the probe this run trains and exits 0)."""
    model_dir = scaled_llama_dir(tmp_path, tokenizer_dir)
    code, err = run_main(main_args(model_dir, zoo_data, tmp_path / "out"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model type 'scaled_llama': on a packed probe the trainer's loss is" in err
    assert "but the model's own forward + cross-entropy gives" in err and "minitrain/training/families.py" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_varlen_attention_on_a_family_whose_layers_drop_the_row_boundaries_is_refused_by_the_probe(zoo_dir):
    """Falcon's layers do not hand the model's extra keywords (the pack's cu_seq_lens) to the attention function: on
    CUDA minitrain's variable-length kernel (auto without flash-attn) would get no sample boundaries. The start-up
    probe stops it in one line with the fix, not a KeyError traceback (the check runs before the kernel, so on CPU)."""
    from transformers import AutoModelForCausalLM

    from minitrain.training import attention, families
    from minitrain.training.families import ModelError
    from minitrain.training.model import PackedCausalLM

    lm = AutoModelForCausalLM.from_pretrained(zoo_dir("falcon"), dtype=torch.float32,
                                              attn_implementation=attention.VARLEN)
    with pytest.raises(ModelError) as e:
        families.check_loss_is_the_models_own(PackedCausalLM(lm), torch.device("cpu"), attention.VARLEN)
    assert str(e.value) == (
        "model type 'falcon': FalconAttention does not hand the model's extra keywords to its attention function, so "
        "the packed row's sample boundaries never reach minitrain_varlen; pass --attn-implementation sdpa")


def test_estimate_memory_of_a_step_fake_tensors_cannot_run_here_is_one_line(tmp_path, capsys, monkeypatch):
    """--estimate-memory plans for GPUs from a config.json on any machine. Where the simulated step cannot run here
    (Gemma-2's flex attention has no backward on CPU; Falcon's layers drop the row's boundaries), one line names the
    model type and the reason, instead of a traceback; Falcon with the fix the line gives is estimated, AdamW's state
    in its step being that of Falcon's parameters."""
    import train
    from tests.test_memory import adamw_state_bytes, simulated_parts
    from tests.tiny_models import zoo_configs

    configs = zoo_configs(256)
    for arch, cls, reason in (
            ("gemma2", "Gemma2ForCausalLM", "(NotImplementedError: FlexAttention does not support backward on CPU."),
            ("falcon", "FalconForCausalLM", "(RowBoundariesLost: FalconAttention does not hand the model's extra")):
        config = configs[arch]
        config.architectures = [cls]
        config.save_pretrained(tmp_path / arch)
        capsys.readouterr()
        code = train.main(["--estimate-memory", "--model-name-or-path", str(tmp_path / arch), "--world-size", "2",
                           "--max-tokens-per-gpu", "256"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"train.py: error: --estimate-memory: the memory estimate cannot simulate {arch} "
                                   f"{reason}") and "size the run yourself" in lines[0], lines
    steps = simulated_parts(monkeypatch)
    code = train.main(["--estimate-memory", "--model-name-or-path", str(tmp_path / "falcon"), "--world-size", "2",
                       "--max-tokens-per-gpu", "256", "--attn-implementation", "sdpa"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_gib"] > 0 and steps
    state = adamw_state_bytes(tmp_path / "falcon", 2)  # Falcon's own parameters, counted here
    assert [parts["optimizer_state"] for parts in steps] == [state] * len(steps)


def test_an_unknown_block_layout_is_refused_in_one_line():
    from torch import nn

    from minitrain.training.families import ModelError, decoder_blocks

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])

    class Outer(nn.Module):
        base_model_prefix = "backbone"
        config = type("Config", (), {"model_type": "odd"})()

        def __init__(self):
            super().__init__()
            self.base_model = Inner()

    with pytest.raises(ModelError, match=r"model type 'odd' keeps its blocks in none of the layouts") as e:
        decoder_blocks(Outer())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_blocks_are_found_for_every_layout(arch, zoo_dir):
    from minitrain.training.families import decoder_blocks

    lm = own_model(zoo_dir(arch))
    blocks = decoder_blocks(lm)
    names = {id(m): n for n, m in lm.named_modules()}
    assert [names[id(b)] for b in blocks] == [f"{LAYOUTS[arch]}.{k}" for k in range(2)]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_blocks_are_the_encoders_then_the_decoders(arch, tmp_path, tokenizer_dir):
    from transformers import AutoModelForSeq2SeqLM

    from minitrain.training.families import decoder_blocks
    from tests.tiny_models import build_tiny_seq2seq

    lm = AutoModelForSeq2SeqLM.from_pretrained(build_tiny_seq2seq(arch, tmp_path, tokenizer_dir("chatml")))
    names = {id(m): n for n, m in lm.named_modules()}
    stacks = {"t5": ("encoder.block", "decoder.block"), "bart": ("model.encoder.layers", "model.decoder.layers")}
    assert [names[id(b)] for b in decoder_blocks(lm)] == [f"{s}.{k}" for s in stacks[arch] for k in range(2)]


# ---------------------------------------------------------------------------------------------------------------
# Mixture-of-experts: the router aux loss is added and reported


def test_moe_router_aux_loss_is_added_as_the_model_adds_it_and_reported(zoo_dir, tmp_path, capsys):
    data = write_data(tmp_path / "one.jsonl", 2, vocab=700, seed=4)
    code, err = run_main(main_args(zoo_dir("mixtral"), data, tmp_path / "out"), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    truth, truth_aux = own_step_loss(zoo_dir("mixtral"), data)
    assert record["router_aux_loss"] == pytest.approx(truth_aux, rel=1e-5)
    assert record["loss"] == pytest.approx(truth, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Liger: per-family entry points with their own arguments; its fused CE with the model's transform


def test_liger_entry_points_get_only_the_arguments_they_take(zoo_dir):
    import inspect

    pytest.importorskip("liger_kernel")
    from transformers import AutoConfig

    from minitrain.training.families import liger_entry_point, liger_kernel_arguments

    with_entry = []
    for arch in ZOO:
        model_type = AutoConfig.from_pretrained(zoo_dir(arch)).model_type
        entry = liger_entry_point(model_type)
        if entry is None:
            continue
        kwargs = liger_kernel_arguments(entry)
        inspect.signature(entry).bind(**kwargs, model=None)  # a TypeError here is what Gemma got before
        assert not kwargs["fused_linear_cross_entropy"] and not kwargs["cross_entropy"]
        assert ("geglu" in kwargs) == model_type.startswith("gemma"), (arch, kwargs)
        with_entry.append(arch)
    assert {"llama", "gemma", "gemma2", "gemma3", "granite", "mixtral"} <= set(with_entry)


def liger_against_plain(paths: list[str], device: str) -> dict:
    """For each model folder: the loss and every gradient of a packed micro-batch (two samples) through minitrain's
    chunked head and through Liger's fused kernel, each against the model's own forward + plain cross-entropy (its
    logit transform included), and what minitrain passed Liger (accumulation dtype, softcap). On the CPU only under
    Triton's interpreter (LIGER_SCRIPT); on a GPU, compiled Triton (tests/test_cuda.py)."""
    from transformers import AutoModelForCausalLM

    from minitrain.training.model import PackedCausalLM

    out = {}
    for path in paths:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").to(device)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(3, lm.config.vocab_size, (1, 24), generator=g).to(device)
        pos = torch.cat([torch.arange(10), torch.arange(14)])[None].to(device)
        positions = torch.tensor([2, 3, 4, 5, 8, 13, 14, 20, 21, 22], device=device)
        targets = ids[0, positions + 1]
        r = {}
        for name, liger in (("chunked", False), ("liger", True)):
            model = PackedCausalLM(lm, use_liger=liger, chunk_rows=4)
            if liger:
                r["accum_dtype"] = str(model.head_loss.liger_loss.accum_dtype)
                r["softcap"] = model.head_loss.liger_loss.softcap
            lm.zero_grad(set_to_none=True)
            loss = model(ids, pos, positions, targets)
            loss.backward()
            r[name] = (loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()})
        lm.zero_grad(set_to_none=True)
        logits = lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0]  # the model's own, transform included
        plain = F.cross_entropy(logits[positions], targets, reduction="sum")
        plain.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters()}

        def rel(a):
            return max(((a[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads.items())

        out[lm.config.model_type] = {"plain": plain.item(), "chunked": r["chunked"][0], "liger": r["liger"][0],
                                     "chunked_grad_rel": rel(r["chunked"][1]), "liger_grad_rel": rel(r["liger"][1]),
                                     "accum_dtype": r["accum_dtype"], "softcap": r["softcap"]}
    return out


def check_liger_against_plain(report: dict, archs: list[str]) -> None:
    assert sorted(report) == sorted(archs)
    for arch, r in report.items():
        assert r["chunked"] == pytest.approx(r["plain"], rel=1e-5), arch
        assert r["liger"] == pytest.approx(r["plain"], rel=1e-5), arch
        assert r["chunked_grad_rel"] < 1e-4 and r["liger_grad_rel"] < 1e-4, (arch, r)
        assert r["accum_dtype"] == "torch.float32"
        assert r["softcap"] == (30.0 if arch == "gemma2" else None), arch


LIGER_SCRIPT = """
import json, sys
from tests.test_families import liger_against_plain
print(json.dumps(liger_against_plain(sys.argv[1:], "cpu")))
"""


def test_liger_fused_ce_takes_the_models_softcap_and_scaling(zoo_dir):
    """Granite's division and Cohere's multiplication folded into Liger's inputs, Gemma-2's softcap taken by Liger's
    kernel itself (all run under TRITON_INTERPRET on CPU; tests/liger_interpreter.py makes the interpreter run the
    softcap branch as compiled Triton does), the chunked path alike: loss and every gradient equal the model's own
    forward + plain cross-entropy."""
    paths = [str(zoo_dir(a)) for a in ("gemma2", "granite", "cohere")]
    stdout = liger_interpreter.run(LIGER_SCRIPT, *paths)
    check_liger_against_plain(json.loads(stdout.strip().splitlines()[-1]), ["cohere", "gemma2", "granite"])


# ---------------------------------------------------------------------------------------------------------------
# 2 processes (FSDP2) == 1 process, one model of each block layout, one torchrun job

GRAD_MODELS = ("llama", "gpt2", "gpt_neox", "opt", "mixtral", "qwen2_moe")  # qwen2_moe: (1, hidden) gates
SKEWED = {0: [[0, 1, 2], [3], [4]], 1: [[5], [], []]}  # rank 1 runs two dummy packs
SINGLES = {0: [[0], [3], [4]], 1: [[5], [1], [2]]}  # OPT cannot pack: one sample per micro-step


def grad_worker(out_dir: str, data_path: str, *model_dirs: str) -> None:
    import torch.distributed as dist

    import train
    from minitrain.training import families
    from minitrain.training.data import load_data
    from minitrain.training.distributed import (
        World,
        cleanup_distributed,
        init_distributed,
    )
    from minitrain.training.model import build_model
    from minitrain.training.objectives import SFT

    world = init_distributed("auto")
    report = {}
    check = families.check_loss_is_the_models_own
    for model_dir in model_dirs:
        arch = Path(model_dir).name
        config = train.TrainConfig(
            data_path=data_path, model_name_or_path=model_dir, output_dir=out_dir, batch_size=SAMPLES,
            max_tokens_per_gpu=512, activation_checkpointing=True, fsdp_sharding_strategy="FULL_SHARD",
        )
        cache = load_data(config, world, vocab_size=10**6)
        plan = SINGLES if arch == "opt" else SKEWED
        # OPT is refused by the probe (it cannot isolate packed samples); its layout's sharding is tested alone.
        skipped = lambda *a: families.ProbeResult(float("nan"), float("nan"), float("nan"), 0.0)  # noqa: E731
        families.check_loss_is_the_models_own = skipped if arch == "opt" else check
        units = int(cache.trained[[i for r in plan.values() for p in r for i in p]].sum())
        # Reference: one process running every pack of the step (the MoE aux loss is per pack, so the same packs).
        if world.is_main:
            reference = build_model(config, World(0, 0, 1, 1, world.device))
            packs = [np.asarray(p) for r in plan.values() for p in r if p]
            ref_sum = train.forward_backward(reference, SFT(), cache, packs, units, 1, world.device)
            ref_aux = reference.pop_router_aux_sum()
            ref_grads = {n: p.grad for n, p in reference.lm.named_parameters()}
        model = build_model(config, world)
        packs = [np.asarray(p, dtype=np.int64) for p in plan[world.rank]]
        local_sum = train.forward_backward(model, SFT(), cache, packs, units, world.world_size, world.device)
        aux = model.pop_router_aux_sum()
        dist.all_reduce(local_sum)
        if aux is not None:
            dist.all_reduce(aux)
        grads = {n: p.grad.full_tensor() for n, p in model.lm.named_parameters()}
        if world.is_main:
            rel = {n: ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items()}
            report[arch] = {
                "loss": local_sum.item() / units, "reference_loss": ref_sum.item() / units,
                "aux": None if aux is None else aux.item(), "reference_aux": None if ref_aux is None else ref_aux.item(),
                "max_rel": max(rel.values()), "names": sorted(grads) == sorted(ref_grads),
                "blocks_sharded": all(type(b).__name__.startswith("FSDP") for b in families.decoder_blocks(model.lm)),
                # fewer rows than ranks: split along another dimension (model.placement)
                "split_elsewhere": sorted(n for n, p in model.lm.named_parameters()
                                          if any(getattr(pl, "dim", 0) != 0 for pl in p.placements)),
            }
    families.check_loss_is_the_models_own = check
    if world.is_main:
        Path(out_dir, "report.json").write_text(json.dumps(report))
    cleanup_distributed()


def test_two_ranks_give_the_single_process_gradient_for_every_block_layout(zoo_dir, zoo_data, tmp_path, two_ranks):
    dirs = [str(zoo_dir(a)) for a in GRAD_MODELS]
    run = two_ranks.run(__name__, "grad_worker", [tmp_path / "out", zoo_data, *dirs], timeout=480)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(report) == sorted(GRAD_MODELS)
    for arch, r in report.items():
        assert r["names"] and r["blocks_sharded"], arch
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-6), arch
        assert r["max_rel"] < 1e-5, (arch, r["max_rel"])
        if arch in ("mixtral", "qwen2_moe"):
            assert r["aux"] == pytest.approx(r["reference_aux"], rel=1e-6) and r["aux"] > 0
        else:
            assert r["aux"] is None
        # qwen2_moe's shared-expert gates are (1, hidden): split by column, and their gradients still the one
        # process's (max_rel above)
        assert bool(r["split_elsewhere"]) == (arch == "qwen2_moe"), (arch, r["split_elsewhere"])
        if arch == "qwen2_moe":
            assert all("shared_expert_gate" in n for n in r["split_elsewhere"]), r["split_elsewhere"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    grad_worker(*sys.argv[1:])
